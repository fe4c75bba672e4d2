"""Failures a kubelet reports without ending the pod, and OOM kills, reach the FineTuneJob within a bounded time.

kwok plays the kubelet (tests/controlplane/kwok/stages.yaml): a secretKeyRef to a Secret or key named `kwok-missing-*`
gives CreateContainerConfigError with the kubelet's own message, an image under `/kwok-missing/` gives ErrImagePull
and then ImagePullBackOff, and `finish_pod(..., reason="OOMKilled")` ends a container as the OOM killer does. The
real-kubelet versions of these scenarios are issue 12's node tests.

Bounds: the condition and its Warning Event follow the pod's status update in the next pass (the watch event; the
tests allow SURFACED seconds); a pod that cannot start fails the job FINETUNE_START_TIMEOUT_SECONDS after the kubelet
took it on (status.startTime), in a pass scheduled for that moment (the tests allow LATE seconds more, and check it
was not earlier); the second OOM kill fails the job at once.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from finetune_api.times import parse_time
from tests.controlplane.cluster import ControlPlane
from tests.faults.conftest import StartOperator
from tests.faults.support import ftj_events
from tests.operator.cluster_support import (
    condition,
    create_ftj,
    get_or_none,
    pods_of,
    wait_phase,
    wait_running_pods,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster

SURFACED = 10.0  # seconds from the pod's status to the FineTuneJob's condition and Event
TIMEOUT = 8  # FINETUNE_START_TIMEOUT_SECONDS in these tests (default 300)
LATE = 10.0  # seconds after the start timeout by which the job must have failed
RESOLVED = "kwok.finetune.dev/resolved"  # the fake kubelet starts the container after all (Secret created)


def _stuck_pod(cp: ControlPlane, ns: str, name: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        for pod in pods_of(cp, ns, name, live_only=True):
            for cs in pod.get("status", {}).get("containerStatuses") or []:
                if (cs.get("state", {}).get("waiting") or {}).get("reason") == reason:
                    return pod
        return None

    return cp.wait_for(check, timeout=30, desc=f"a pod of {ns}/{name} in {reason}")


def _surfaced(cp: ControlPlane, ns: str, name: str, reason: str) -> dict[str, Any]:
    """The condition within SURFACED seconds of the pod's state, and its Warning Event."""
    ftj = wait_phase(cp, ns, name, "Pending", timeout=SURFACED, reason=("Running", reason))
    events = ftj_events(cp, ns, name, after=reason)
    assert [(e["type"], e["reason"]) for e in events if e["reason"] == reason] == [("Warning", reason)]
    return ftj


def _failed_on_time(cp: ControlPlane, ns: str, name: str, reason: str, pod: dict[str, Any]) -> dict[str, Any]:
    """Failed with `reason` no sooner than TIMEOUT after the pod's startTime, no later than LATE after that; the Job
    and its pods are deleted."""
    accepted = parse_time(pod["status"]["startTime"])
    assert accepted is not None
    ftj = wait_phase(cp, ns, name, "Failed", timeout=max(1.0, accepted + TIMEOUT + LATE - time.time()),
                     reason=("Failed", reason))
    failed_at = parse_time(condition(ftj, "Failed")["lastTransitionTime"])  # type: ignore[index]
    assert failed_at is not None and failed_at >= accepted + TIMEOUT - 1, "failed before the start timeout"
    cp.wait_for(lambda: get_or_none(cp, f"/apis/batch/v1/namespaces/{ns}/jobs/{name}") is None, timeout=30,
                desc="the Job deleted")
    cp.wait_for(lambda: not pods_of(cp, ns, name), timeout=30, desc="its pods gone")
    failures = [e for e in ftj_events(cp, ns, name, after=reason) if e["message"].startswith("Failed:")]
    assert [(e["type"], e["reason"]) for e in failures] == [("Warning", reason)]
    return ftj


@pytest.mark.parametrize(("ref", "named"), [
    ({"name": "kwok-missing-hf", "key": "token"},
     'Secret "kwok-missing-hf" does not exist (spec.credentials.hubToken needs its key "token")'),
    ({"name": "hf", "key": "kwok-missing-token"},
     'Secret "hf" has no key "kwok-missing-token" (spec.credentials.hubToken)'),
], ids=["secret", "key"])
def test_a_missing_secret_or_key_is_named_at_once_and_fails_the_job_after_the_start_timeout(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator, ref: dict[str, str],
        named: str) -> None:
    cp = control_plane
    start_operator(FINETUNE_START_TIMEOUT_SECONDS=str(TIMEOUT))
    create_ftj(cp, manifest("nosecret", namespace, credentials={"hubToken": ref}))
    pod = _stuck_pod(cp, namespace, "nosecret", "CreateContainerConfigError")
    ftj = _surfaced(cp, namespace, "nosecret", "CreateContainerConfigError")
    message = condition(ftj, "Running")["message"]  # type: ignore[index]
    assert message == f"pod {pod['metadata']['name']} cannot start: {named}; the job fails if a pod cannot start " \
                      f"for {TIMEOUT}s"
    ftj = _failed_on_time(cp, namespace, "nosecret", "CreateContainerConfigError", pod)
    assert named in condition(ftj, "Failed")["message"]  # type: ignore[index]


def test_a_secret_created_within_the_start_timeout_lets_the_job_run(control_plane: ControlPlane, namespace: str,
                                                                    start_operator: StartOperator) -> None:
    """The job waits for the Secret (up to the start timeout, 300 s by default): GitOps may apply the FineTuneJob
    before the Secret, or an external-secrets controller deliver it a little later."""
    cp = control_plane
    start_operator()
    create_ftj(cp, manifest("latesecret", namespace, credentials={"hubToken": {"name": "kwok-missing-hf",
                                                                               "key": "token"}}))
    pod = _stuck_pod(cp, namespace, "latesecret", "CreateContainerConfigError")
    ftj = _surfaced(cp, namespace, "latesecret", "CreateContainerConfigError")
    assert "the job fails if a pod cannot start for 5m00s" in condition(ftj, "Running")["message"]  # type: ignore[index]
    cp.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kwok-missing-hf"}, "stringData": {"token": "t"}})
    cp.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}",
               {"metadata": {"annotations": {RESOLVED: "true"}}}, content_type="application/merge-patch+json")
    ftj = wait_phase(cp, namespace, "latesecret", "Running", timeout=SURFACED, reason=("Running", "PodsRunning"))
    assert [e["reason"] for e in ftj_events(cp, namespace, "latesecret", after="PodsRunning")] == [
        "CreateContainerConfigError", "PodsRunning"]


def test_an_image_that_does_not_exist_is_named_and_fails_the_job_after_the_start_timeout(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator) -> None:
    cp = control_plane
    image = "registry.example.com/kwok-missing/trainer:1"
    start_operator(FINETUNE_START_TIMEOUT_SECONDS=str(TIMEOUT))
    create_ftj(cp, manifest("noimage", namespace, merge_resources={"image": image}))
    pod = _stuck_pod(cp, namespace, "noimage", "ImagePullBackOff")  # ErrImagePull first, then the back-off
    ftj = _surfaced(cp, namespace, "noimage", "ImagePullBackOff")
    message = condition(ftj, "Running")["message"]  # type: ignore[index]
    assert message.startswith(f'pod {pod["metadata"]["name"]} cannot pull image "{image}": rpc error: code = '
                              f'NotFound desc = failed to pull and unpack image "{image}"'), message
    ftj = _failed_on_time(cp, namespace, "noimage", "ImagePullBackOff", pod)
    assert f'cannot pull image "{image}"' in condition(ftj, "Failed")["message"]  # type: ignore[index]


def test_an_oom_kill_is_reported_with_advice_retried_once_and_the_second_fails_the_job(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator) -> None:
    cp = control_plane
    start_operator()
    create_ftj(cp, manifest("hungry", namespace, merge_resources={"memory": "4Gi"}, run_policy={"backoffLimit": 5}))
    first = wait_running_pods(cp, namespace, "hungry", 1)[0]["metadata"]["name"]
    wait_phase(cp, namespace, "hungry", "Running")
    cp.finish_pod(namespace, first, exit_code=137, reason="OOMKilled")
    ftj = _surfaced(cp, namespace, "hungry", "OOMKilled")
    assert condition(ftj, "Running")["message"] == (  # type: ignore[index]
        f"pod {first} was killed for exceeding its memory limit (OOMKilled); restarting from the latest checkpoint, "
        "and a second OOM kill fails the job: re-create the FineTuneJob with a larger spec.resources.memory (now "
        "4Gi), or a smaller hyperparameters.batchSize or maxSeqLength (resources are immutable)")
    # The Job controller replaces the pod after its own back-off (about 10 s).
    second = cp.wait_for(lambda: [p for p in pods_of(cp, namespace, "hungry", live_only=True)
                                  if p["status"].get("phase") == "Running"], timeout=45, desc="replacement running")
    wait_phase(cp, namespace, "hungry", "Running", timeout=SURFACED)
    # Not waited on: the operator fails the job and deletes its Job, and with it this pod, as soon as it sees the kill.
    cp.finish_pod(namespace, second[0]["metadata"]["name"], exit_code=137, reason="OOMKilled", wait=False)
    ftj = wait_phase(cp, namespace, "hungry", "Failed", timeout=SURFACED, reason=("Failed", "OOMKilled"))
    assert "(OOMKilled) 2 times" in condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert "larger spec.resources.memory (now 4Gi)" in condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert ftj["status"]["restarts"] == 1
    cp.wait_for(lambda: get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/hungry") is None, timeout=30,
                desc="the Job deleted: no third attempt, though backoffLimit allows five")
    oom_events = [e for e in ftj_events(cp, namespace, "hungry", after="OOMKilled") if e["reason"] == "OOMKilled"]
    assert [e["message"].split(":")[0] for e in oom_events] == ["Pending", "Failed"]
    assert all(e["type"] == "Warning" for e in oom_events)
