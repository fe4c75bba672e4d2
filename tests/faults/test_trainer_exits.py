"""Storage full or unwritable, through the operator: the trainer's exit 74 fails the job at once with a clear reason,
and the last good checkpoint stays recorded as the resume point.

The trainer's side (it exits 74 and leaves the previous checkpoint intact on disk) is tests/trainer/
test_lifecycle.py::test_storage_failure_exits_74_and_keeps_last_checkpoint; SIGTERM and SIGKILL during a checkpoint
are test_sigterm_saves_checkpoint_and_exits_75, test_resume_after_sigkill_reaches_the_same_end and
test_damaged_and_partial_checkpoints_are_skipped there.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.faults.conftest import StartOperator
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


def test_storage_error_fails_at_once_and_keeps_the_last_good_checkpoint(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator) -> None:
    cp = control_plane
    op = start_operator()
    create_ftj(cp, manifest("diskfull", namespace, run_policy={"backoffLimit": 3}))
    pod = wait_running_pods(cp, namespace, "diskfull", 1)[0]
    wait_phase(cp, namespace, "diskfull", "Running")
    secret = cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets/diskfull-progress")
    token = base64.b64decode(secret["data"]["token"]).decode()
    good = {"step": 4, "path": "s3://bucket/out/checkpoints/checkpoint-4"}
    assert op.post_progress(namespace, "diskfull", token, {"state": "running", "step": 5, "checkpoint": good}) == 202

    def recorded() -> dict[str, Any] | None:
        st = get_ftj(cp, namespace, "diskfull").get("status") or {}
        return st if (st.get("checkpoints") or {}).get("latest", {}).get("step") == 4 else None

    cp.wait_for(recorded, timeout=10, desc="checkpoint 4 recorded")
    said = "cannot write checkpoint for step 6 to s3://bucket/out/checkpoints: [Errno 28] No space left on device"
    cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=74, message=said)

    ftj = wait_phase(cp, namespace, "diskfull", "Failed", timeout=20, reason=("Failed", "StorageError"))
    message = condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert "trainer exited with code 74 (storage full or not writable (not retried))" in message
    assert said in message
    assert ftj["status"]["checkpoints"]["latest"] == good, "the last good checkpoint stays the resume point"
    assert len(pods_of(cp, namespace, "diskfull")) == 1, "a storage error is not retried"
    assert ftj["status"]["restarts"] == 0
    assert operator_errors(op) == []
