"""Ending `finetune watch` never fails, whatever state the watch connection is in.

`Cluster.end_watch` stops the kubernetes client's Watch and shuts the response's socket down for reading, so that the
watch thread blocked in a read wakes up and ends with the command. By then the API server may have ended the stream
itself (the job finished), the client may have shut the socket down already (`Watch.stop` does) or released the
connection: each state is made here for real, on a socket to a local server, and `end_watch` must return quietly.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
import yaml
from kubernetes import watch

from finetune_cli.cluster import Cluster, Target


class StreamServer:
    """Answers one GET with the head of a chunked watch stream, then keeps or closes the connection on request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.accepted.append(conn)

    def end_stream(self) -> None:
        """What the API server does when a watch times out or the server goes away: it closes the connection."""
        deadline = time.monotonic() + 10
        while not self.accepted:
            assert time.monotonic() < deadline, "the client never connected"
            time.sleep(0.01)
        self.accepted[0].close()

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def server() -> Iterator[StreamServer]:
    s = StreamServer()
    yield s
    s.close()


def cluster_watching(tmp_path: Path, server: StreamServer) -> tuple[Cluster, urllib3.BaseHTTPResponse]:
    """A Cluster from a kubeconfig naming the local server, whose watch holds an open streaming response, as
    `Watch.stream` leaves it while it waits for the next event."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": f"http://127.0.0.1:{server.port}"}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me", "namespace": "ns"}}]}))
    cluster = Cluster(Target(kubeconfig=str(kubeconfig)))
    resp = urllib3.PoolManager().request("GET", f"http://127.0.0.1:{server.port}/apis/finetune.dev/v1alpha1/"
                                         "namespaces/ns/finetunejobs?watch=true", preload_content=False)
    assert resp.status == 200
    w = watch.Watch()
    w._resp = resp  # where the kubernetes client keeps the open response during a stream
    cluster._watch = w  # as watch_job sets it
    return cluster, resp


def test_end_watch_wakes_a_read_blocked_in_another_thread(tmp_path: Path, server: StreamServer) -> None:
    cluster, resp = cluster_watching(tmp_path, server)
    done = threading.Event()

    def reader() -> None:
        try:
            resp.read(1)  # ends with a "connection broken" error once the socket is shut down
        except urllib3.exceptions.HTTPError:
            pass
        finally:
            done.set()

    threading.Thread(target=reader, daemon=True).start()
    assert not done.wait(0.2), "the read returned before the watch was ended"
    cluster.end_watch()
    assert done.wait(10), "end_watch did not wake the blocked read"


def test_end_watch_after_the_server_ended_the_stream(tmp_path: Path, server: StreamServer) -> None:
    """The race `finetune watch` used to lose (exit 1, `OSError: [Errno 107] Transport endpoint is not connected`
    from urllib3's shutdown): the server closed the connection and the socket was shut down already."""
    cluster, resp = cluster_watching(tmp_path, server)
    server.end_stream()
    sock = resp.connection.sock  # type: ignore[attr-defined]
    sock.shutdown(socket.SHUT_RDWR)  # what Watch.stop() does first
    deadline = time.monotonic() + 10
    while True:  # until the kernel no longer holds the connection, the state in which shutdown raises ENOTCONN
        try:
            with sock.dup() as probe:
                probe.shutdown(socket.SHUT_RD)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, exc
            break
        assert time.monotonic() < deadline, "the connection never closed"
        time.sleep(0.01)
    cluster.end_watch()  # must not raise


@pytest.mark.parametrize("ended", ["closed", "released"])
def test_end_watch_after_the_response_was_closed_or_released(tmp_path: Path, server: StreamServer,
                                                             ended: str) -> None:
    """The watch thread's own clean-up may run first: urllib3 then refuses to shut down (ValueError when closed,
    RuntimeError when the connection went back to the pool)."""
    cluster, resp = cluster_watching(tmp_path, server)
    if ended == "closed":
        resp.close()
    else:
        resp.release_conn()
    cluster.end_watch()  # must not raise


def test_end_watch_without_a_watch(tmp_path: Path, server: StreamServer) -> None:
    cluster, _ = cluster_watching(tmp_path, server)
    cluster._watch = None  # the command failed before the watch thread started
    cluster.end_watch()
