"""Children the operator did not create, or that people changed: never adopted, never fought over, repaired in time.

A Job deleted by hand is recreated (tests/operator/test_operator_cluster.py::
test_child_job_deleted_by_hand_is_recreated) and a foreign same-named ConfigMap is not adopted
(::test_foreign_same_named_child_is_not_adopted); here the Job itself is the foreign object, a FineTuneJob is
recreated under the same name, and children are edited or deleted by hand.
"""

from __future__ import annotations

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.conftest import StartOperator
from tests.faults.support import ftj_events, passes
from tests.operator.cluster_support import (
    FTJ,
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


def _foreign_job(name: str) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {"team": "someone-else"}},
        "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": "busybox", "command": ["true"]}]}}},
    }


def test_same_named_foreign_job_is_reported_left_alone_and_the_name_can_be_freed(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator) -> None:
    cp = control_plane
    op = start_operator()
    foreign = cp.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", _foreign_job("taken"))
    create_ftj(cp, manifest("taken", namespace))
    ftj = wait_phase(cp, namespace, "taken", "Pending", reason=("Created", "NameConflict"))
    created = condition(ftj, "Created")
    assert created is not None and created["status"] == "False"
    assert "Job taken already exists and is not owned by this FineTuneJob" in created["message"]
    assert [e["type"] for e in ftj_events(cp, namespace, "taken", after="NameConflict")
            if e["reason"] == "NameConflict"] == ["Warning"]

    # Two more passes: the foreign Job is not touched, the condition is not rewritten (no fight, no event storm).
    rv = ftj["metadata"]["resourceVersion"]
    start = passes(op)
    cp.wait_for(lambda: passes(op) >= start + 2, timeout=15, desc="two more reconcile passes")
    job = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/taken")
    managers = {m["manager"] for m in job["metadata"]["managedFields"]}
    assert not any("finetune" in m for m in managers), managers
    assert job["metadata"]["labels"] == foreign["metadata"]["labels"]
    assert not job["metadata"].get("ownerReferences") and job["spec"]["suspend"] is True
    assert get_ftj(cp, namespace, "taken")["metadata"]["resourceVersion"] == rv
    assert len(ftj_events(cp, namespace, "taken")) == 1

    # The owner of the name deletes their Job: within a resync the FineTuneJob gets its own and runs.
    cp.request("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/taken",
               {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
    ftj = wait_phase(cp, namespace, "taken", "Running", timeout=20)
    assert condition(ftj, "Created")["reason"] == "JobCreated"  # type: ignore[index]
    [job] = jobs_of(cp, namespace)
    assert job["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    assert operator_errors(op) == []


def test_hand_edited_job_is_put_back(control_plane: ControlPlane, namespace: str,
                                     start_operator: StartOperator) -> None:
    cp = control_plane
    start_operator()
    create_ftj(cp, manifest("edited", namespace, run_policy={"backoffLimit": 2}))
    wait_phase(cp, namespace, "edited", "Running")
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs/edited"
    cp.request("PATCH", path, {"spec": {"backoffLimit": 50}}, content_type="application/merge-patch+json")
    cp.wait_for(lambda: cp.request("GET", path)["spec"]["backoffLimit"] == 2, timeout=10,
                desc="backoffLimit put back to the spec's value within a resync")


@pytest.mark.parametrize("kind", ["ConfigMap", "Service"])
def test_hand_deleted_or_edited_child_is_repaired_within_a_resync(control_plane: ControlPlane, namespace: str,
                                                                  start_operator: StartOperator, kind: str) -> None:
    """The trainer pods read the ConfigMap when they (re)start and find each other through the Service: a restart
    after one of them was deleted or edited would train something else than the spec says, or not start at all.
    (The progress Secret is not checked: the operator may not read Secrets, by design.)"""
    cp = control_plane
    op = start_operator()
    # Two pods: a multi-pod job is the one that has a rendezvous Service.
    create_ftj(cp, manifest("drift", namespace, resources={"workers": 2, "gpusPerWorker": 1}))
    wait_phase(cp, namespace, "drift", "Running")
    plural, name = {"ConfigMap": ("configmaps", "drift-config"), "Service": ("services", "drift")}[kind]
    path = f"/api/v1/namespaces/{namespace}/{plural}/{name}"
    original = cp.request("GET", path)
    if kind == "ConfigMap":
        cp.request("PATCH", path, {"data": {"job.yaml": "tampered: true\n"}},
                   content_type="application/merge-patch+json")
    else:
        cp.request("DELETE", path)

    def repaired() -> bool:
        now = get_or_none(cp, path)
        if now is None:
            return False
        return now.get("data") == original.get("data") if kind != "Service" else True

    start = passes(op)
    cp.wait_for(lambda: passes(op) >= start + 2, timeout=15, desc="two more reconcile passes (resync 3 s)")
    assert repaired(), f"{kind} {name} was not repaired within a resync"


def test_recreated_under_the_same_name_never_adopts_the_old_jobs_children(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator,
        garbage_collector_ready: None) -> None:
    """Delete a running FineTuneJob and create it again at once: the old Job (same name, old owner uid) is left to
    garbage collection, and the new FineTuneJob gets a Job of its own."""
    cp = control_plane
    op = start_operator()
    first = create_ftj(cp, manifest("again", namespace))
    wait_phase(cp, namespace, "again", "Running")
    old_job_uid = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/again")["metadata"]["uid"]
    cp.request("DELETE", f"{FTJ}/namespaces/{namespace}/finetunejobs/again")
    cp.wait_for(lambda: get_or_none(cp, f"{FTJ}/namespaces/{namespace}/finetunejobs/again") is None, timeout=10,
                desc="old FineTuneJob gone")
    second = create_ftj(cp, manifest("again", namespace))
    assert second["metadata"]["uid"] != first["metadata"]["uid"]

    ftj = wait_phase(cp, namespace, "again", "Running", timeout=40)
    [job] = jobs_of(cp, namespace)
    assert job["metadata"]["uid"] != old_job_uid
    assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [second["metadata"]["uid"]]
    cm = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/again-config")
    assert [r["uid"] for r in cm["metadata"]["ownerReferences"]] == [second["metadata"]["uid"]]
    assert f"uid: {second['metadata']['uid']}" in cm["data"]["job.yaml"]
    assert condition(ftj, "Created")["reason"] == "JobCreated"  # type: ignore[index]
    assert operator_errors(op) == []
