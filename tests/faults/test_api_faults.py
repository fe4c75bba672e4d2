"""The real operator behind a fault-injecting proxy: API error bursts, a crash with writes in flight, steady state.

The proxy sees every request the operator makes, so retries, write counts and hot loops are counted from the wire,
not from the operator's own metrics.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.apiproxy import Fault
from tests.faults.conftest import StartOperator, StartProxy
from tests.faults.support import ftj_events, passes, reconciler_requests
from tests.operator.cluster_support import (
    condition,
    create_ftj,
    get_ftj,
    get_or_none,
    jobs_of,
    operator_errors,
    wait_phase,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster

STATUS = r"/finetunejobs/[^/]+/status$"
JOBS = r"/apis/batch/v1/namespaces/[^/]+/jobs$"


def test_error_burst_is_retried_with_backoff_and_no_condition_is_lost(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator,
        start_proxy: StartProxy) -> None:
    """500s on Job creation, then two 409s and a 6 s outage (500s) on every status write: bounded retries with
    backoff (no hot loop), exactly one Job, and the Running condition and its Event land once the API recovers."""
    cp = control_plane
    proxy = start_proxy()
    # Resync far away: what paces the retries here must be the operator's backoff, not the periodic resync.
    op = start_operator(proxy=proxy, FINETUNE_RESYNC_SECONDS="120")
    proxy.inject(Fault("POST", JOBS, status=500, times=3))
    proxy.inject(Fault("PATCH", STATUS, status=409, times=2))
    outage = proxy.inject(Fault("PATCH", STATUS, status=500, for_seconds=6.0))
    start = time.monotonic()
    create_ftj(cp, manifest("bursty", namespace))

    ftj = wait_phase(cp, namespace, "bursty", "Running", timeout=45, reason=("Running", "PodsRunning"))
    job_posts = [s for s in proxy.requests(start) if s.method == "POST" and s.target.endswith("/jobs")]
    assert [s.status for s in job_posts] == [500, 500, 500, 201], "three failures, then one create"
    assert len(jobs_of(cp, namespace)) == 1
    assert [c["type"] for c in ftj["status"]["conditions"]] == ["Ready", "Created", "Running"]
    assert condition(ftj, "Created")["status"] == "True"  # type: ignore[index]

    status_writes = [s for s in proxy.requests(start) if s.method == "PATCH" and s.target.endswith("/status")]
    failed = [s for s in status_writes if s.injected]
    assert outage.first_hit is not None
    in_outage = [s for s in failed if s.status == 500]
    # Backoff 0.5, 1, 2, 4, 8 s (+-20%): two 409s, then about three tries in the 6 s outage. A hot loop makes hundreds.
    assert 2 <= len(in_outage) <= 6, [round(s.at - start, 2) for s in failed]
    # A watch event may trigger a pass early, but the delay between tries must grow (a fixed 0.5 s would not).
    gaps = [round(b.at - a.at, 2) for a, b in itertools.pairwise(failed)]
    assert max(gaps) >= 1.5, f"retries did not back off: gaps {gaps}"
    requests = reconciler_requests(proxy.requests(start))
    assert len(requests) <= 40, f"{len(requests)} requests for one job in a 6 s error window"
    assert [s.status for s in status_writes if not s.injected] == [200], "one successful status write"
    assert [e["reason"] for e in ftj_events(cp, namespace, "bursty", after="PodsRunning")] == ["PodsRunning"], \
        "one Event, not one per try"
    assert operator_errors(op) == [], "a retried API error is not an ERROR"


def test_steady_state_resync_makes_no_request_at_all(control_plane: ControlPlane, namespace: str,
                                                     start_operator: StartOperator, start_proxy: StartProxy) -> None:
    """Two resync passes over a Running job and a Failed one: no write (and no read) reaches the API server."""
    cp = control_plane
    proxy = start_proxy()
    op = start_operator(proxy=proxy, FINETUNE_RESYNC_SECONDS="2")
    create_ftj(cp, manifest("steady", namespace))
    create_ftj(cp, manifest("broken", namespace, merge_resources={"image": "evil.example.org/x:1"}))
    wait_phase(cp, namespace, "steady", "Running")
    wait_phase(cp, namespace, "broken", "Failed")
    cp.wait_for(lambda: get_ftj(cp, namespace, "steady")["status"].get("observedGeneration") == 1, timeout=10,
                desc="status settled")
    since = time.monotonic()
    before = passes(op)
    cp.wait_for(lambda: passes(op) >= before + 4, timeout=15, desc="two resyncs of two jobs")
    assert reconciler_requests(proxy.requests(since)) == []
    ftj = get_ftj(cp, namespace, "steady")
    assert ftj["status"]["observedGeneration"] == ftj["metadata"]["generation"]


def test_killed_with_writes_in_flight_then_restarted_converges(control_plane: ControlPlane, namespace: str,
                                                                start_operator: StartOperator,
                                                                start_proxy: StartProxy) -> None:
    """SIGKILL while one job's Job POST has reached the server but its answer has not come back (status not yet
    written), and another job has only its ConfigMap (its Secret POST hangs): the restarted operator makes exactly one
    Job each, keeps the first Job (same uid), reports no NameConflict and logs no error."""
    cp = control_plane
    proxy = start_proxy()
    op = start_operator(proxy=proxy)
    proxy.inject(Fault("POST", JOBS, body=r'"name":"held"', action="forward_then_hang"))
    proxy.inject(Fault("POST", r"/secrets$", body=r'"name":"partial-progress"', action="hang"))
    create_ftj(cp, manifest("held", namespace))
    create_ftj(cp, manifest("partial", namespace))
    cp.wait_for(lambda: sum(1 for s in proxy.requests() if s.injected) >= 2, timeout=20,
                desc="both requests held by the proxy")
    op.kill()

    held_job = get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/held")
    assert held_job is not None, "the held Job POST did reach the server"
    assert not get_ftj(cp, namespace, "held").get("status"), "killed before the status write"
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/configmaps/partial-config") is not None
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/secrets/partial-progress") is None
    assert get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/partial") is None

    proxy.clear()
    # Same lease: the new process waits for the dead one's lease to expire, as a restarted pod would.
    restarted = start_operator(proxy=proxy, lease=op.lease)
    for name in ("held", "partial"):
        ftj = wait_phase(cp, namespace, name, "Running", timeout=30)
        assert condition(ftj, "Created")["reason"] == "JobCreated"  # type: ignore[index]
    jobs = {j["metadata"]["name"]: j for j in jobs_of(cp, namespace)}
    assert sorted(jobs) == ["held", "partial"]
    assert jobs["held"]["metadata"]["uid"] == held_job["metadata"]["uid"], "the first Job was kept, not replaced"
    for name, job in jobs.items():
        owner = get_ftj(cp, namespace, name)["metadata"]["uid"]
        assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [owner]
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/secrets/partial-progress") is not None
    assert operator_errors(restarted) == []
