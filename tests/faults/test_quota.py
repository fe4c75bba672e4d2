"""A namespace out of GPU quota: reported as QuotaExceeded, no crash or retry loop, other tenants unaffected.

That the reason shows up at all is tests/operator/test_operator_cluster.py::test_resource_quota_exhaustion_is_reported;
here two namespaces share one operator, and the quota is later raised.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.conftest import StartOperator
from tests.faults.support import metric, passes
from tests.operator.cluster_support import (
    condition,
    create_ftj,
    get_ftj,
    operator_errors,
    pods_of,
    wait_phase,
    wait_running_pods,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster


@pytest.fixture
def other_namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"quota-neighbour-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.delete_namespace(name)


def test_quota_exhausted_in_one_namespace_only_affects_that_namespace(
        control_plane: ControlPlane, namespace: str, other_namespace: str, start_operator: StartOperator) -> None:
    cp = control_plane
    quota = f"/api/v1/namespaces/{namespace}/resourcequotas"
    cp.request("POST", quota, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus"},
                               "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    op = start_operator(namespaces=(namespace, other_namespace))
    create_ftj(cp, manifest("starved", namespace))
    create_ftj(cp, manifest("neighbour", other_namespace))

    ftj = wait_phase(cp, namespace, "starved", "Pending", timeout=40, reason=("Running", "QuotaExceeded"))
    assert "exceeded quota: gpus" in condition(ftj, "Running")["message"]  # type: ignore[index]
    errors_before = metric(op, "finetune_operator_reconcile_errors_total")
    event_reads = metric(op, "finetune_operator_api_requests_total", verb="GET", resource="Event")
    rv = ftj["metadata"]["resourceVersion"]
    start = passes(op)

    # The neighbour runs and finishes meanwhile, as if nothing happened next door.
    pod = wait_running_pods(cp, other_namespace, "neighbour", 1)[0]
    wait_phase(cp, other_namespace, "neighbour", "Running")
    cp.finish_pod(other_namespace, pod["metadata"]["name"], exit_code=0)
    wait_phase(cp, other_namespace, "neighbour", "Succeeded")

    # At least two resyncs of the starved job: no errors, no status rewrites, FailedCreate events read at most
    # every 10 s (not on every pass), and the operator is the same process.
    cp.wait_for(lambda: passes(op) >= start + 4, timeout=15, desc="two resyncs of both jobs")
    assert metric(op, "finetune_operator_reconcile_errors_total") == errors_before == 0
    assert metric(op, "finetune_operator_reconcile_total", result="error") == 0
    assert metric(op, "finetune_operator_api_requests_total", verb="GET", resource="Event") - event_reads <= 2
    assert get_ftj(cp, namespace, "starved")["metadata"]["resourceVersion"] == rv, "a steady report was rewritten"
    assert pods_of(cp, namespace, "starved") == []
    assert op.alive and operator_errors(op) == []

    # Quota raised: the Job controller creates the pod on its next try and the report clears.
    cp.request("PATCH", f"{quota}/gpus", {"spec": {"hard": {"requests.nvidia.com/gpu": "8"}}},
               content_type="application/merge-patch+json")
    ftj = wait_phase(cp, namespace, "starved", "Running", timeout=60, reason=("Running", "PodsRunning"))
    assert operator_errors(op) == []
