"""Two operator replicas started at the same instant: one leads, the other never writes; killing the leader hands
over within the lease duration, without double work; a leader paused past its lease wakes up and writes nothing.

A clean hand-over (SIGTERM releases the lease) is tests/operator/test_operator_cluster.py::
test_second_replica_waits_for_the_lease; here the start is a race and the leader dies by SIGKILL.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.conftest import StartOperator, StartProxy
from tests.faults.support import ftj_events, reconciler_requests
from tests.operator.cluster_support import (
    create_ftj,
    jobs_of,
    operator_errors,
    patch_ftj,
    wait_phase,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster


def test_two_replicas_started_at_once_do_no_double_work(control_plane: ControlPlane, namespace: str,
                                                        start_operator: StartOperator,
                                                        start_proxy: StartProxy) -> None:
    cp = control_plane
    proxies = [start_proxy(), start_proxy()]  # one each: who wrote what is read off the wire
    lease = f"race-{namespace[-6:]}"
    replicas = [start_operator(proxy=p, lease=lease, wait_ready=False) for p in proxies]

    def one_leader() -> bool:
        ready = [r.ready() for r in replicas]
        assert sum(ready) <= 1, "two replicas lead at once"
        return sum(ready) == 1

    cp.wait_for(one_leader, timeout=30, desc="exactly one leader")
    leader = next(i for i, r in enumerate(replicas) if r.ready())
    standby = 1 - leader
    names = [f"race-{i}" for i in range(5)]
    for name in names:
        create_ftj(cp, manifest(name, namespace))
    for name in names:
        wait_phase(cp, namespace, name, "Running")
        assert [e["reason"] for e in ftj_events(cp, namespace, name, after="PodsRunning")] == ["PodsRunning"], \
            "one Event per change"
    assert sorted(j["metadata"]["name"] for j in jobs_of(cp, namespace)) == names
    assert not replicas[standby].ready() and one_leader()
    assert reconciler_requests(proxies[standby].requests()) == [], "the standby touched more than its lease"
    assert "finetune_operator_leader 0.0" in replicas[standby].metrics()

    # The leader dies without handing over: the standby takes the expired lease (3 s) and carries on.
    killed_at = time.monotonic()
    replicas[leader].kill()
    cp.wait_for(replicas[standby].ready, timeout=20, desc="standby took over")
    took = time.monotonic() - killed_at
    assert took < 10, f"hand-over took {took:.1f}s with a 3 s lease"
    create_ftj(cp, manifest("after", namespace))
    patch_ftj(cp, namespace, "race-0", {"spec": {"runPolicy": {"suspend": True}}})
    wait_phase(cp, namespace, "after", "Running")
    wait_phase(cp, namespace, "race-0", "Suspended")
    jobs = jobs_of(cp, namespace)
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted([*names, "after"]), "one Job per FineTuneJob"
    lease_obj = cp.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/default/leases/{lease}")
    assert lease_obj["spec"]["leaseTransitions"] >= 1
    assert operator_errors(replicas[standby]) == []


def test_a_paused_leader_that_lost_its_lease_writes_nothing_when_it_wakes(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator, start_proxy: StartProxy) -> None:
    """SIGSTOP the leader (a stalled node, a long GC pause) past its 3 s lease: the standby takes over and does the
    work that arrives meanwhile. On SIGCONT the old leader's watches deliver that work too, but its writes are fenced
    by the lease (LeaderElector.holds): not one reaches the API server, and it exits to restart as a standby."""
    cp = control_plane
    proxies = [start_proxy(), start_proxy()]
    lease = f"pause-{namespace[-6:]}"
    old = start_operator(proxy=proxies[0], lease=lease)
    standby = start_operator(proxy=proxies[1], lease=lease, wait_ready=False)
    create_ftj(cp, manifest("before", namespace))
    wait_phase(cp, namespace, "before", "Running")
    assert old.proc is not None and not standby.ready()

    old.proc.send_signal(signal.SIGSTOP)
    try:
        cp.wait_for(standby.ready, timeout=20, desc="the standby took the lease over")
        create_ftj(cp, manifest("during", namespace))
        patch_ftj(cp, namespace, "before", {"spec": {"runPolicy": {"suspend": True}}})
        wait_phase(cp, namespace, "during", "Running")
        wait_phase(cp, namespace, "before", "Suspended")
    finally:
        woke = time.monotonic()
        old.proc.send_signal(signal.SIGCONT)
    assert old.proc.wait(timeout=30) == 1, "the old leader must step down (and be restarted as a standby)"
    wrote = [f"{s.method} {s.target}" for s in reconciler_requests(proxies[0].requests(since=woke)) if s.write]
    assert wrote == [], f"the paused leader wrote after waking up: {wrote}"
    assert "lost the lease" in old.log_text() or "could not renew the lease" in old.log_text()
    assert sorted(j["metadata"]["name"] for j in jobs_of(cp, namespace)) == ["before", "during"]
    assert operator_errors(standby) == []
