"""The node scenarios' pod watch (jobs.PodRecorder) against the real API server behind the fault proxy: a watch that
meets transient failures resumes without losing an update and carries no error once it is back; a watch that cannot
go on fails every read at once instead of letting a wait run into its deadline. kwok pods: no real node needed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.apiproxy import Fault, FaultProxy

from .jobs import PodRecorder

pytestmark = pytest.mark.cluster
JOB = "recorded"


@pytest.fixture
def proxy(control_plane: ControlPlane, tmp_path: Path) -> Iterator[FaultProxy]:
    started = FaultProxy(control_plane.kubeconfig, tmp_path).start()
    yield started
    started.stop()


def _pod(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"finetune.dev/job-name": JOB}},
            "spec": {"containers": [{"name": "trainer", "image": "finetune.local/none:0"}]}}


def test_a_watch_that_recovers_from_transient_failures_loses_nothing_and_keeps_no_error(
        control_plane: ControlPlane, namespace: str, proxy: FaultProxy) -> None:
    watches = proxy.inject(Fault("GET", rf"/api/v1/namespaces/{namespace}/pods\?.*watch=", status=500, times=3))
    with PodRecorder(control_plane, namespace, kubeconfig=proxy.kubeconfig) as recorder:
        control_plane.wait_for(lambda: watches.hits >= 1, timeout=30, desc="the first watch to fail")
        control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", _pod("first"))
        [seen] = control_plane.wait_for(lambda: recorder.of_job(JOB), timeout=60,
                                        desc="the pod created while the watch failed")
        assert seen["metadata"]["name"] == "first"
        assert watches.hits == 3 and recorder.transient is None and recorder.dead is None
        control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", _pod("second"))
        control_plane.wait_for(lambda: len(recorder.of_job(JOB)) == 2, timeout=30, desc="the next pod")


@pytest.mark.parametrize("status", [403, 500])
def test_a_watch_that_cannot_go_on_fails_every_read_at_once(control_plane: ControlPlane, namespace: str,
                                                           proxy: FaultProxy, status: int) -> None:
    """403: refused for good at once; 500 for ever: dead after RETRIES tries in a row (about 8 s of backoff)."""
    proxy.inject(Fault("GET", rf"/api/v1/namespaces/{namespace}/pods", status=status))
    with PodRecorder(control_plane, namespace, kubeconfig=proxy.kubeconfig) as recorder:
        started = time.monotonic()
        with pytest.raises(AssertionError, match=f"the pod watch of namespace {namespace} is dead: ") as dead:
            recorder.wait_terminated("a-uid-that-never-comes", timeout=120)
        assert recorder.dead is not None and getattr(recorder.dead, "status", None) == status, dead.value
        assert time.monotonic() - started < 30, "the wait ran on after the watch had died"
        with pytest.raises(AssertionError, match="is dead"):
            recorder.of_job(JOB)
