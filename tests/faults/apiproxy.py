"""A fault-injecting HTTP proxy in front of the real kube-apiserver, so the real operator meets real failures.

The operator gets a kubeconfig pointing at the proxy (plain HTTP on loopback); the proxy forwards every request,
watch streams included, to the API server over TLS with the admin's client certificate. Rules answer matching
requests with an error, or hold them (optionally after forwarding, so the write happened but the operator never
hears back), for a number of requests or a time window. Every request is logged with its body, which is how the
tests count writes and retries, and grep what was sent, without trusting the operator's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web

Action = Literal["error", "hang", "forward_then_hang"]
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection",
                         "te", "trailer", "proxy-authorization", "proxy-authenticate"})
_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


@dataclass
class Fault:
    """Answer requests matching `method`, the `path` regex (searched in path?query) and the optional `body` regex
    (searched in the request body, e.g. a new object's name) with a fault.

    `times` limits how many requests it hits (None: unlimited), `until` (time.monotonic()) ends it, and
    `for_seconds` ends it that long after its first hit (an outage that starts when the operator first meets it).
    """

    method: str
    path: str
    body: str | None = None
    action: Action = "error"
    status: int = 500
    times: int | None = None
    until: float | None = None
    for_seconds: float | None = None
    hits: int = 0
    first_hit: float | None = None

    def matches(self, method: str, target: str, body: bytes, now: float) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.for_seconds is not None and self.first_hit is not None and now >= self.first_hit + self.for_seconds:
            return False
        if method != self.method or re.search(self.path, target) is None:
            return False
        return self.body is None or re.search(self.body, body.decode(errors="replace")) is not None


@dataclass(frozen=True)
class Seen:
    """One request that reached the proxy, with what it was answered (status 0: held, never answered)."""

    at: float
    method: str
    target: str
    status: int
    injected: bool
    body: bytes = b""

    @property
    def write(self) -> bool:
        return self.method in WRITE_VERBS

    @property
    def watch(self) -> bool:
        return "watch=" in self.target


@dataclass
class FaultProxy:
    """Start with `start()`, point a process at `kubeconfig`, add faults with `inject()`, `stop()` at the end."""

    upstream_kubeconfig: Path
    workdir: Path
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    @property
    def kubeconfig(self) -> Path:
        path = self.workdir / f"proxy-{self.port}.kubeconfig"
        if not path.exists():
            config = {
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
                "users": [{"name": "proxy", "user": {}}],
                "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
                "current-context": "proxy",
            }
            path.write_text(json.dumps(config))
        return path

    # ------------------------------------------------------------------------------------------ control (test side)

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def requests(self, since: float = 0.0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.at >= since]

    def writes(self, since: float = 0.0) -> list[Seen]:
        return [s for s in self.requests(since) if s.write]

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("fault proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"fault proxy failed: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)

    # ------------------------------------------------------------------------------------------ the proxy (its thread)

    def _upstream(self) -> tuple[str, ssl.SSLContext]:
        """Server URL and a TLS context with the admin client certificate, from the control plane's kubeconfig."""
        config = json.loads(self.upstream_kubeconfig.read_text())
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        pki = Path(tempfile.mkdtemp(prefix="proxy-pki-", dir=self.workdir))
        paths = {}
        for key in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
            data = cluster.get(key) or user.get(key)
            paths[key] = pki / key
            paths[key].write_bytes(base64.b64decode(data))
        ctx = ssl.create_default_context(cafile=str(paths["certificate-authority-data"]))
        ctx.load_cert_chain(str(paths["client-certificate-data"]), str(paths["client-key-data"]))
        return cluster["server"].rstrip("/"), ctx

    def _record(self, method: str, target: str, status: int, injected: bool, body: bytes) -> None:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), method, target, status, injected, body))

    def _match(self, method: str, target: str, body: bytes) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, target, body, now):
                    fault.hits += 1
                    fault.first_hit = now if fault.first_hit is None else fault.first_hit
                    return fault
        return None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() if it happens before ready
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server, ctx = self._upstream()
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0), auto_decompress=False,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        stop = self._stop

        async def hold(request: web.Request) -> web.StreamResponse:
            # Never answer; the client times out, or dies, or the proxy stops.
            with contextlib.suppress(asyncio.CancelledError):
                await stop.wait()
            raise web.HTTPServiceUnavailable()

        async def handle(request: web.Request) -> web.StreamResponse:
            method, target = request.method, request.path_qs
            body = await request.read()
            fault = self._match(method, target, body)
            if fault is not None and fault.action == "error":
                self._record(method, target, fault.status, True, body)
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": fault.status,
                          "reason": _REASONS.get(fault.status, "InternalError"),
                          "message": f"injected by the fault proxy ({fault.status})"}
                return web.json_response(status, status=fault.status)
            if fault is not None and fault.action == "hang":
                self._record(method, target, 0, True, body)
                return await hold(request)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            async with session.request(method, server + target, data=body or None, headers=headers) as up:
                if fault is not None:  # forward_then_hang: the write happened, the answer is lost
                    await up.read()
                    self._record(method, target, 0, True, body)
                    return await hold(request)
                self._record(method, target, up.status, False, body)
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
                resp = web.StreamResponse(status=up.status, headers=out_headers)
                await resp.prepare(request)
                try:
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                        if stop.is_set():
                            break
                except (ConnectionResetError, aiohttp.ClientError):
                    return resp
                with contextlib.suppress(ConnectionResetError):
                    await resp.write_eof()
                return resp

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await session.close()
