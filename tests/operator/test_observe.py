"""Summaries of real-shaped Job and Pod objects (as the API server and kwok write them)."""

from __future__ import annotations

import pytest

from finetune_api.times import format_time, parse_time
from finetune_operator.observe import owner_key, summarize_job, summarize_pod

POD = {
    "metadata": {
        "name": "job1-0-abcde", "namespace": "team-a", "uid": "pod-uid",
        "labels": {"finetune.dev/job-name": "job1", "batch.kubernetes.io/controller-uid": "job-uid",
                   "batch.kubernetes.io/job-completion-index": "0"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        "ownerReferences": [{"kind": "Job", "name": "job1", "uid": "job-uid", "controller": True}],
    },
    "spec": {"nodeName": "kwok-gpu-node-1",
             "containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
    "status": {
        "phase": "Failed",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {
            "exitCode": 65, "reason": "Error", "message": "bad label", "startedAt": "2026-01-01T00:00:00Z",
            "finishedAt": "2026-01-01T00:00:30Z"}}}],
    },
}


def test_pod_summary() -> None:
    p = summarize_pod(POD)
    assert (p.name, p.uid, p.job_uid, p.index, p.phase, p.node, p.gpus) == (
        "job1-0-abcde", "pod-uid", "job-uid", 0, "Failed", "kwok-gpu-node-1", 4)
    assert (p.exit_code, p.terminated_reason, p.terminated_message, p.disrupted) == (65, "Error", "bad label", True)
    assert (p.started_at, p.finished_at) == ("2026-01-01T00:00:00Z", "2026-01-01T00:00:30Z")
    assert owner_key(POD) == ("team-a", "job1")


def test_unschedulable_and_waiting_pods() -> None:
    pending = {"metadata": {"name": "p", "uid": "u"}, "spec": {}, "status": {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}}
    assert summarize_pod(pending).unschedulable == "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pulling = {"metadata": {"name": "p", "uid": "u"},
               "spec": {"containers": [{"name": "trainer", "image": "registry.example.com/t:1"}]},
               "status": {"phase": "Pending", "startTime": "2026-01-01T00:00:05Z",
                          "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff",
                                                                       "message": "Back-off pulling image"}}}]}}
    p = summarize_pod(pulling)
    assert (p.waiting_reason, p.waiting_message) == ("ImagePullBackOff", "Back-off pulling image")
    assert (p.image, p.accepted_at, p.started_at) == ("registry.example.com/t:1", "2026-01-01T00:00:05Z", None)


def test_job_summary() -> None:
    job = {
        "metadata": {"name": "job1", "namespace": "team-a", "uid": "job-uid",
                     "labels": {"kueue.x-k8s.io/queue-name": "q", "finetune.dev/job-name": "job1"},
                     "ownerReferences": [{"kind": "FineTuneJob", "uid": "ftj-uid", "controller": True}]},
        "spec": {"suspend": True, "backoffLimit": 2, "activeDeadlineSeconds": 60},
        "status": {"active": 1, "failed": 2, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}]},
    }
    j = summarize_job(job)
    assert (j.owner_uid, j.queue_name, j.suspend, j.active, j.failed) == ("ftj-uid", "q", True, 1, 2)
    assert j.live_spec == {"suspend": True, "backoffLimit": 2, "activeDeadlineSeconds": 60}
    failed = j.condition("Failed")
    assert failed is not None and failed.reason == "BackoffLimitExceeded"
    assert j.condition("Complete") is None


@pytest.mark.parametrize(("conditions", "outcome"), [
    ([], None),
    ([("Complete", "True")], "success"),
    ([("SuccessCriteriaMet", "True")], "success"),  # set first; Complete follows once the pods are gone
    ([("Failed", "True")], "failure"),
    ([("FailureTarget", "True")], "failure"),  # set first; Failed follows once the pods are gone
    ([("Failed", "False"), ("Suspended", "True")], None),
])
def test_one_definition_of_a_finished_job(conditions: list[tuple[str, str]], outcome: str | None) -> None:
    job = summarize_job({"metadata": {"name": "j", "uid": "u"}, "status": {
        "conditions": [{"type": t, "status": s} for t, s in conditions]}})
    assert (job.success is not None, job.failure is not None) == (outcome == "success", outcome == "failure")
    assert job.finished is (outcome is not None)


def test_time_round_trip() -> None:
    assert format_time(parse_time("2026-01-01T00:00:30Z") or 0) == "2026-01-01T00:00:30Z"
    assert parse_time(None) is None and parse_time("garbage") is None
