"""What `finetune list/status/watch/checkpoints` print, from FineTuneJobs as the API serves them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from finetune_cli import pods, view

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

RUNNING: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "sentiment", "namespace": "team-a", "creationTimestamp": "2026-01-01T11:50:00Z"},
    "spec": {
        "task": {"type": "sequence-classification", "labels": ["negative", "positive"]},
        "model": {"source": "pvc://models/minilm"},
        "checkpointing": {"everySteps": 50, "keepLast": 2, "everyEpoch": True},
        "output": {"storage": "pvc://runs/sentiment"},
        "resources": {"workers": 2},
        "runPolicy": {"suspend": False, "cancel": False},
    },
    "status": {
        "phase": "Running",
        "startTime": "2026-01-01T11:51:00Z",
        "restarts": 1,
        "gpuSeconds": 7200.0,
        "jobName": "sentiment",
        "conditions": [
            {"type": "Created", "status": "True", "reason": "JobCreated", "message": "Job sentiment exists",
             "lastTransitionTime": "2026-01-01T11:50:01Z"},
            {"type": "Running", "status": "True", "reason": "PodsRunning",
             "message": "all 2 worker pod(s) are running", "lastTransitionTime": "2026-01-01T11:51:00Z"},
        ],
        "progress": {"step": 120, "totalSteps": 400, "epoch": 0.3, "percent": 30.0, "loss": 0.69314,
                     "learningRate": 4e-05, "samplesPerSecond": 55.5, "etaSeconds": 310, "eta": "5m10s",
                     "updatedAt": "2026-01-01T11:59:50Z"},
        "metrics": {"evalAccuracy": 0.75, "evalLoss": 0.52},
        "checkpoints": {"latest": {"step": 100, "path": "pvc://runs/sentiment/checkpoints/checkpoint-100",
                                   "time": "2026-01-01T11:58:00Z"}, "count": 2},
    },
}


def failed(reason: str, message: str) -> dict[str, Any]:
    obj = copy.deepcopy(RUNNING)
    obj["status"]["phase"] = "Failed"
    obj["status"]["conditions"].append({"type": "Failed", "status": "True", "reason": reason, "message": message,
                                        "lastTransitionTime": "2026-01-01T11:59:00Z"})
    return obj


def test_eta_counts_down_from_the_last_report() -> None:
    assert view.eta_seconds(RUNNING, NOW) == 300.0  # reported 310 s, ten seconds ago
    later = NOW.replace(minute=10)
    assert view.eta_seconds(RUNNING, later) == 0.0
    assert view.eta_seconds(failed("DataError", "x"), NOW) is None, "no ETA once the job is not running"


def test_list_table() -> None:
    pending = {"metadata": {"name": "queued-one", "namespace": "team-b", "creationTimestamp": "2026-01-01T11:59:30Z"},
               "status": {"phase": "Queued", "conditions": [
                   {"type": "Queued", "status": "True", "reason": "WaitingForAdmission", "message": "m",
                    "lastTransitionTime": "2026-01-01T11:59:31Z"}]}}
    assert view.list_table([RUNNING, pending], NOW) == (
        "NAME         PHASE     PROGRESS      LOSS     ETA     CHECKPOINT   RESTARTS   AGE   REASON\n"
        "sentiment    Running   30% 120/400   0.6931   5m00s   step 100     1          10m   PodsRunning\n"
        "queued-one   Queued    -             -        -       -            0          30s   WaitingForAdmission\n"
    )
    wide = view.list_table([RUNNING], NOW, all_namespaces=True, wide=True).splitlines()
    assert wide[0].split() == ["NAMESPACE", *view.LIST_HEADERS, "QUEUE", "METRICS"]
    assert wide[1].startswith("team-a ") and wide[1].split()[-3:] == ["-", "evalAccuracy=0.75", "evalLoss=0.52"]


def test_where_kueue_holds_a_job_is_listed_and_described() -> None:
    preempted = copy.deepcopy(RUNNING)
    preempted["status"].update({"phase": "Queued", "queue": {
        "workload": "job-sentiment-1a2b3", "localQueue": "team-a", "priorityClass": "low", "requeues": 2}})
    preempted["status"]["conditions"].append({
        "type": "Queued", "status": "True", "reason": "Preempted", "lastTransitionTime": "2026-01-01T11:59:00Z",
        "message": "evicted by Kueue (InClusterQueue): Preempted to accommodate a workload"})
    row = view.list_row(preempted, NOW, wide=True)
    assert row[8] == "Preempted" and row[9] == "team-a, priority low, 2 requeues"
    text = view.describe(preempted, NOW)
    assert "Phase:         Queued (Preempted)\n" in text
    assert "Message:       evicted by Kueue (InClusterQueue): Preempted to accommodate a workload\n" in text
    assert "Queue:         team-a, priority low, 2 requeues; Workload job-sentiment-1a2b3\n" in text
    admitted = copy.deepcopy(preempted)
    admitted["status"]["queue"].update({"clusterQueue": "cq-a", "flavor": "h100"})
    assert view.queue_text(admitted) == "team-a -> cq-a (h100), priority low, 2 requeues"


def test_describe_running_job() -> None:
    text = view.describe(RUNNING, NOW)
    lines = dict(line.split(":", 1) for line in text.splitlines() if line and not line.startswith(" ")
                 and ":" in line and not line.startswith("Conditions"))
    assert lines["Phase"].strip() == "Running (PodsRunning)"
    assert lines["Message"].strip() == "all 2 worker pod(s) are running"
    assert lines["Progress"].strip() == "[#######.................] 30.0%  step 120/400, epoch 0.30"
    assert lines["ETA"].strip() == "5m00s"
    assert lines["Loss"].strip() == "0.6931 (lr 4e-05, 55.5 samples/s)"
    assert lines["Metrics"].strip() == "evalAccuracy=0.75 evalLoss=0.52"
    assert lines["Checkpoints"].strip() == \
        "2 written; latest step 100 at pvc://runs/sentiment/checkpoints/checkpoint-100, 2m00s ago"
    assert lines["Restarts"].strip() == "1"
    assert lines["GPU time"].strip() == "2.00 GPU-hours"
    assert "Conditions:\n  TYPE      STATUS   REASON        AGE     MESSAGE\n" in text
    assert "  Running   True     PodsRunning   9m00s   all 2 worker pod(s) are running\n" in text


def test_describe_and_watch_a_failed_and_a_cancelled_job() -> None:
    bad = failed("DataError", "trainer exited with code 65 (bad data): row 3: label 'neutral' is not in task.labels")
    assert "Phase:         Failed (DataError)\n" in view.describe(bad, NOW)
    assert view.final_line(bad) == \
        "sentiment failed: DataError: trainer exited with code 65 (bad data): row 3: label 'neutral' is not in " \
        "task.labels"
    assert not view.cancelled(bad)
    gone = failed("Cancelled", "runPolicy.cancel is true")
    gone["spec"]["runPolicy"]["cancel"] = True
    assert view.cancelled(gone)
    assert "Cancel:" not in view.describe(gone, NOW), "a cancel already carried out is not 'requested'"
    asked = copy.deepcopy(RUNNING)
    asked["spec"]["runPolicy"]["cancel"] = True
    assert "Cancel:        requested (runPolicy.cancel: true)\n" in view.describe(asked, NOW)


def test_watch_line_and_final_line() -> None:
    assert view.watch_line(RUNNING, NOW, width=10) == \
        "sentiment  Running    [###.......]   30.0%  step 120/400  loss 0.6931  ETA 5m00s"
    done = copy.deepcopy(RUNNING)
    done["status"].update(phase="Succeeded", output={"path": "pvc://runs/sentiment", "metrics": {"accuracy": 0.99}})
    assert view.watch_line(done, NOW, width=10).startswith("sentiment  Succeeded  [##########]  100.0%")
    assert view.final_line(done) == "sentiment succeeded -> pvc://runs/sentiment  (accuracy=0.99)"
    pending = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "Running", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes have 16 GPUs",
         "lastTransitionTime": "2026-01-01T11:59:00Z"}]}}
    assert view.watch_line(pending, NOW, width=4) == \
        "p  Pending    [....]    0.0%  Unschedulable: 0/4 nodes have 16 GPUs"
    assert view.watch_line({"metadata": {"name": "new"}}, NOW, width=4) == "new  Pending    [....]    0.0%"


def test_checkpoints() -> None:
    assert view.checkpoints_text(RUNNING, NOW) == (
        "Storage:    pvc://runs/sentiment/checkpoints\n"
        "Schedule:   every 50 steps, every epoch; keep the last 2\n"
        "Written:    2\n"
        "Latest:     step 100\n"
        "Path:       pvc://runs/sentiment/checkpoints/checkpoint-100\n"
        "Completed:  2026-01-01T11:58:00Z (2m00s ago)\n"
        "Resume:     a restarted or resumed run continues from step 100\n"
    )
    assert view.checkpoints_data(RUNNING) == {
        "name": "sentiment", "namespace": "team-a", "storage": "pvc://runs/sentiment/checkpoints", "keepLast": 2,
        "count": 2, "latest": {"step": 100, "path": "pvc://runs/sentiment/checkpoints/checkpoint-100",
                               "time": "2026-01-01T11:58:00Z"}}
    fresh = {"metadata": {"name": "f"}, "spec": {"output": {"storage": "s3://b/out/"},
                                                 "checkpointing": {"storage": "s3://b/ckpt", "everyEpoch": False,
                                                                   "everySteps": 10}}}
    text = view.checkpoints_text(fresh, NOW)
    assert "Storage:    s3://b/ckpt\n" in text and "Written:    0\n" in text
    assert "Latest:     none yet: a restart starts from the beginning\n" in text


def test_durations_and_numbers() -> None:
    assert [view.duration(s) for s in (0, 59, 61, 599, 600, 3599, 3600, 86399, 90000)] == \
        ["0s", "59s", "1m01s", "9m59s", "10m", "59m", "1h0m", "23h59m", "1d1h"]
    assert [view.number(v) for v in (None, 3, 2.0, 0.123456, 1e-7, True)] == ["-", "3", "2", "0.1235", "1e-07",
                                                                              "True"]


def test_dump_formats() -> None:
    assert view.dump({"b": 1, "a": [1]}, "json") == '{\n  "b": 1,\n  "a": [\n    1\n  ]\n}\n'
    assert view.dump({"b": 1, "a": [1]}, "yaml") == "b: 1\na:\n- 1\n"


def _pod(name: str, index: int, phase: str, created: str, node: str | None = "n1",
         deleting: bool = False, **status: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created,
                            "annotations": {pods.INDEX_ANNOTATION: str(index)}}
    if deleting:
        meta["deletionTimestamp"] = created
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": {"phase": phase, **status}}


def test_logs_read_the_current_pod_of_each_worker() -> None:
    found = pods.current_workers([
        _pod("w1-old", 1, "Failed", "2026-01-01T10:00:00Z"),
        _pod("w0", 0, "Running", "2026-01-01T10:00:00Z"),
        _pod("w1-new", 1, "Running", "2026-01-01T10:05:00Z"),
        _pod("w1-going", 1, "Running", "2026-01-01T10:06:00Z", deleting=True),
        _pod("w2-failed-late", 2, "Failed", "2026-01-01T10:07:00Z"),
        _pod("w2-failed-early", 2, "Failed", "2026-01-01T10:01:00Z"),
    ])
    assert [p["metadata"]["name"] for p in found] == ["w0", "w1-new", "w2-failed-late"]
    only = pods.current_workers([_pod("w0", 0, "Running", "t"), _pod("w1", 1, "Running", "t")], worker=1)
    assert [p["metadata"]["name"] for p in only] == ["w1"]
    before = pods.current_workers([
        _pod("w0", 0, "Running", "2026-01-01T10:00:00Z"),
        _pod("w1-old", 1, "Failed", "2026-01-01T10:00:00Z"),
        _pod("w1-older", 1, "Failed", "2026-01-01T09:00:00Z"),
        _pod("w1-new", 1, "Running", "2026-01-01T10:05:00Z"),
    ], previous=True)
    assert [p["metadata"]["name"] for p in before] == ["w1-old"], "worker 0 has no earlier attempt"


def test_why_a_pod_has_no_logs() -> None:
    unscheduled = _pod("p", 0, "Pending", "t", node=None, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}])
    assert pods.no_logs_reason(unscheduled) == \
        "not scheduled to a node yet: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pulling = _pod("p", 0, "Pending", "t", containerStatuses=[
        {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}])
    assert pods.no_logs_reason(pulling) == "container trainer has not started: ImagePullBackOff: not found"
    assert pods.no_logs_reason(_pod("p", 0, "Running", "t", containerStatuses=[
        {"name": "trainer", "state": {"running": {}}}])) is None


def test_describe_shows_what_the_preflight_found() -> None:
    found = {"train": {"examples": 4000, "tokens": 86774, "longest": 55, "checked": 4000},
             "validation": {"examples": 800, "tokens": 17983, "longest": 54, "checked": 200},
             "stepsPerEpoch": 125, "totalSteps": 250,
             "memoryPlan": {"sharding": "none", "reason": "auto", "perDeviceBytes": 1870000000,
                            "deviceBytes": 4294967296, "deviceMemoryFrom": "spec.resources.memory", "fits": True},
             "estimate": {"tokensPerSecond": 1164.0, "basis": "spec.preflight.tokensPerSecond", "wallSeconds": 72,
                          "wall": "1m12s", "gpuSeconds": 0}}
    text = view.describe({**RUNNING, "status": {**RUNNING["status"], "preflight": found}}, NOW)
    assert ("Data:          train 4000 examples, 86774 tokens, longest 55; validation 800 examples, 17983 tokens, "
            "longest 54 (checked a sample of 200)\n") in text
    assert "Steps:         125 per epoch, 250 in all\n" in text
    assert ("Memory plan:   1.87 GB per device of 4.29 GB (spec.resources.memory): fits, sharding none\n") in text
    assert "Estimate:      1m12s at 1164 tokens/s per device (spec.preflight.tokensPerSecond)\n" in text
    assert "Data:" not in view.describe(RUNNING, NOW)
