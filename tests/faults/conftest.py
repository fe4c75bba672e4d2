"""Fixtures of the fault suite: operators scoped to the test's namespaces, fault proxies, and nothing left behind.

Each test starts its own operator(s) with FINETUNE_NAMESPACES set to its own namespace(s), so tests that run two
replicas, kill one, or put a proxy in front never share (or fight over) FineTuneJobs with another test's operator.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.apiproxy import FaultProxy
from tests.operator.cluster_support import FTJ, OperatorProcess, create_ftj, get_or_none
from tests.operator.helpers import manifest

StartOperator = Callable[..., OperatorProcess]
StartProxy = Callable[[], FaultProxy]


@pytest.fixture
def start_proxy(control_plane: ControlPlane, tmp_path: Path) -> Iterator[StartProxy]:
    proxies: list[FaultProxy] = []

    def start() -> FaultProxy:
        proxy = FaultProxy(control_plane.kubeconfig, tmp_path).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def start_operator(control_plane: ControlPlane, finetune_crd: None, namespace: str, tmp_path: Path,
                   start_proxy: StartProxy) -> Iterator[StartOperator]:
    """start_operator(namespaces=(namespace,), proxy=None, wait_ready=True, lease=None, **env) -> OperatorProcess.

    Every process started here is stopped (SIGTERM, then SIGKILL) at teardown, before any proxy it talks through.
    """
    started: list[OperatorProcess] = []

    def start(namespaces: tuple[str, ...] | None = None, proxy: FaultProxy | None = None, wait_ready: bool = True,
              lease: str | None = None, **env: str) -> OperatorProcess:
        env.setdefault("FINETUNE_NAMESPACES", ",".join(namespaces or (namespace,)))
        if proxy is not None:
            env["KUBECONFIG"] = str(proxy.kubeconfig)
        op = OperatorProcess(control_plane, tmp_path, lease=lease, **env)
        started.append(op)
        return op.start(wait_ready=wait_ready)

    yield start
    for op in started:  # all at once: each takes a moment to wind kopf down
        if op.proc is not None and op.alive:
            op.proc.send_signal(signal.SIGTERM)
    for op in started:
        op.stop(timeout=15)
    assert not [op for op in started if op.alive], "an operator process survived the test"


@pytest.fixture(scope="session")
def garbage_collector_ready(control_plane: ControlPlane, finetune_crd: None) -> None:
    """Wait until the garbage collector deletes children of a deleted FineTuneJob.

    It learns about a new CRD from discovery, which it refreshes every 30 s; until then it cannot resolve the
    owner kind and backs off per object. Real clusters install the CRD long before; a test session that starts
    with a fresh CRD waits here once. Each probe uses fresh objects, so no backoff carries over.
    """
    cp = control_plane
    ns = f"gc-probe-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    deadline = time.monotonic() + 90
    try:
        for i in range(1000):
            owner = create_ftj(cp, manifest(f"probe-{i}", ns))
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"probe-{i}", "ownerReferences": [
                {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": f"probe-{i}",
                 "uid": owner["metadata"]["uid"]}]}}
            cp.request("POST", f"/api/v1/namespaces/{ns}/configmaps", cm)
            cp.request("DELETE", f"{FTJ}/namespaces/{ns}/finetunejobs/probe-{i}")
            path = f"/api/v1/namespaces/{ns}/configmaps/probe-{i}"
            try:
                cp.wait_for(lambda path=path: get_or_none(cp, path) is None, timeout=5, desc="probe collected")
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
    finally:
        cp.delete_namespace(ns)
