"""The phase/condition state machine as table tests: observation in, (phase, headline condition) out."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api.progress import ProgressReport
from finetune_api.status import Condition, FineTuneJobStatus
from finetune_operator import conditions as cond
from finetune_operator import state
from finetune_operator.observe import JobCondition, JobView, PodView

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:01:00Z"


def job(**kw: Any) -> JobView:
    base: dict[str, Any] = {"name": "j", "namespace": "ns", "uid": "job-uid", "owner_uid": "ftj-uid",
                            "backoff_limit": 3, "created": T0}
    base.update(kw)
    return JobView(**base)


def pod(name: str = "j-0-aaaaa", **kw: Any) -> PodView:
    base: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "job_uid": "job-uid", "phase": "Pending"}
    base.update(kw)
    return PodView(**base)


def running(name: str = "j-0-aaaaa", index: int = 0) -> PodView:
    return pod(name, index=index, phase="Running", node="kwok-gpu-node-0", started_at=T0, gpus=1)


def obs(**kw: Any) -> state.Observation:
    base: dict[str, Any] = {"now": T1, "generation": 1, "workers": 1, "output_storage": "s3://b/out"}
    base.update(kw)
    return state.Observation(**base)


REFS = (("spec.credentials.hubToken", "hf", "token"), ("spec.credentials.s3.accessKeyId", "s3", "id"),
        ("spec.credentials.s3.secretAccessKey", "s3", "secret"),
        ("the operator's progress token", "j-progress", "token"))


def prev_with(phase: str | None = None, *conds: tuple[str, str, str]) -> FineTuneJobStatus:
    return FineTuneJobStatus(phase=phase, conditions=[
        Condition(type=t, status=s, reason=r, message="m", observed_generation=1, last_transition_time=T0)
        for t, s, r in conds] or None)


CASES = [
    ("invalid spec", prev_with(), obs(invalid="spec.task: bad"), "Failed", ("Failed", "True", "InvalidSpec"),
     "spec.task: bad"),
    ("name conflict", prev_with(), obs(conflict="Service x exists"), "Pending", ("Created", "False", "NameConflict"),
     "Service x exists"),
    ("storage conflict", prev_with(), obs(storage_conflict="spec.output.storage pvc://runs/x is also where ..."),
     "Pending", ("Created", "False", "StorageConflict"), "pvc://runs/x"),
    ("job created, no pods", prev_with(), obs(job=job()), "Pending", ("Running", "False", "PodsPending"), "waiting"),
    ("all workers running", prev_with(), obs(job=job(active=1), pods=(running(),)), "Running",
     ("Running", "True", "PodsRunning"), "all 1 worker"),
    ("one of two workers running", prev_with(),
     obs(workers=2, job=job(active=2), pods=(running(), pod("j-1-bbbbb", index=1))), "Pending",
     ("Running", "False", "PodsPending"), "2 worker"),
    ("unschedulable for GPUs", prev_with(),
     obs(job=job(active=1), pods=(pod(unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),)),
     "Pending", ("Running", "False", "Unschedulable"), "Insufficient nvidia.com/gpu"),
    ("image pull failure", prev_with(),
     obs(job=job(active=1), pods=(pod(waiting_reason="ImagePullBackOff", waiting_message="back-off pulling x"),)),
     "Pending", ("Running", "False", "ImagePullBackOff"), "back-off pulling x"),
    ("missing secret", prev_with(),
     obs(job=job(active=1), pods=(pod(waiting_reason="CreateContainerConfigError",
                                      waiting_message='secret "hf" not found'),)),
     "Pending", ("Running", "False", "CreateContainerConfigError"), 'Secret "hf" does not exist'),
    ("missing secret named with the fields that read it", prev_with(),
     obs(job=job(active=1), secret_refs=REFS, pods=(pod(waiting_reason="CreateContainerConfigError",
                                                        waiting_message='secret "s3" not found'),)),
     "Pending", ("Running", "False", "CreateContainerConfigError"),
     'pod j-0-aaaaa cannot start: Secret "s3" does not exist (spec.credentials.s3.accessKeyId needs its key "id", '
     'spec.credentials.s3.secretAccessKey needs its key "secret")'),
    ("missing key named with its field", prev_with(),
     obs(job=job(active=1), secret_refs=REFS, start_timeout=300,
         pods=(pod(waiting_reason="CreateContainerConfigError",
                   waiting_message="couldn't find key token in Secret ns/hf"),)),
     "Pending", ("Running", "False", "CreateContainerConfigError"),
     'pod j-0-aaaaa cannot start: Secret "hf" has no key "token" (spec.credentials.hubToken); the job fails if a pod '
     "cannot start for 5m00s"),
    ("a kubelet 1.34 pull back-off names the image and the pull error", prev_with(),
     obs(job=job(active=1), pods=(pod(waiting_reason="ImagePullBackOff", image="reg.example.com/t:9",
                                      waiting_message='Back-off pulling image "reg.example.com/t:9": ErrImagePull: '
                                                      "reg.example.com/t:9: not found"),)),
     "Pending", ("Running", "False", "ImagePullBackOff"),
     'pod j-0-aaaaa cannot pull image "reg.example.com/t:9": reg.example.com/t:9: not found; the pods keep waiting'),
    ("a pod that could not start within the timeout fails the job", prev_with(),
     obs(job=job(active=1), start_timeout=30, pods=(pod(waiting_reason="ErrImagePull", image="r/t:1",
                                                        waiting_message="not found", accepted_at=T0),)),
     "Failed", ("Failed", "True", "ImagePullBackOff"),
     'pod j-0-aaaaa cannot pull image "r/t:1": not found; gave up after 30s'),
    ("not yet at the timeout", prev_with(),
     obs(job=job(active=1), start_timeout=61, pods=(pod(waiting_reason="CreateContainerConfigError",
                                                        accepted_at=T0),)),
     "Pending", ("Running", "False", "CreateContainerConfigError"), "for 1m01s"),
    ("an OOM kill is reported while the replacement starts", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(failed=1), memory="4Gi", pods=(pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled",
                                                    finished_at=T0),)),
     "Pending", ("Running", "False", "OOMKilled"),
     "pod j-0-aaaaa was killed for exceeding its memory limit (OOMKilled); restarting from the latest checkpoint, "
     "and a second OOM kill fails the job: re-create the FineTuneJob with a larger spec.resources.memory (now 4Gi)"),
    ("after an OOM kill the replacement runs", prev_with("Pending", ("Running", "False", "OOMKilled")),
     obs(job=job(failed=1, active=1), pods=(pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled",
                                                finished_at=T0), running("j-0-bbbbb"))),
     "Running", ("Running", "True", "PodsRunning"), "running"),
    ("a second OOM kill fails the job", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(failed=2), pods=(pod("j-0-a", phase="Failed", exit_code=137, terminated_reason="OOMKilled",
                                      finished_at=T0),
                                  pod("j-0-b", phase="Failed", exit_code=137, terminated_reason="OOMKilled",
                                      finished_at=T1))),
     "Failed", ("Failed", "True", "OOMKilled"), "OOMKilled) 2 times, last in pod j-0-b; not retried again: "
     "re-create the FineTuneJob with a spec.resources.memory set"),
    ("quota exhausted", prev_with(),
     obs(job=job(), create_failure='pods "j-0-x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'),
     "Pending", ("Running", "False", "QuotaExceeded"), "exceeded quota"),
    ("other create failure", prev_with(),
     obs(job=job(), create_failure='pods "j-0-x" is forbidden: violates PodSecurity "restricted:latest"'),
     "Pending", ("Running", "False", "FailedCreate"), "PodSecurity"),
    ("queued by kueue", prev_with(), obs(job=job(suspend=True, queue_name="q")), "Queued",
     ("Queued", "True", "WaitingForAdmission"), "LocalQueue q"),
    ("suspended by the user", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(suspend_requested=True, job=job(suspend=True)), "Suspended", ("Suspended", "True", "Suspended"), "resume"),
    ("user suspends a kueue job", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(suspend_requested=True, job=job(suspend=True, queue_name="q")), "Suspended",
     ("Suspended", "True", "Suspended"), "suspend"),
    ("resumed", prev_with("Suspended", ("Running", "False", "Suspended"), ("Suspended", "True", "Suspended")),
     obs(job=job(active=1), pods=(running(),)), "Running", ("Running", "True", "PodsRunning"), "running"),
    ("admitted by kueue", prev_with("Queued", ("Queued", "True", "WaitingForAdmission")),
     obs(job=job(active=1, queue_name="q"), pods=(running(),)), "Running", ("Running", "True", "PodsRunning"), ""),
    ("workers finished, Job not yet Complete", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(workers=2, job=job(succeeded=1, active=1), pods=(pod(phase="Succeeded", exit_code=0),
                                                          running("j-1-b", index=1))),
     "Running", ("Running", "True", "PodsRunning"), "running"),
    ("crashed worker waits for its replacement", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(failed=1), pods=(pod(phase="Failed", exit_code=1),)), "Pending",
     ("Running", "False", "PodsPending"), "waiting"),
    ("completed", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(succeeded=1, completion_time=T1, conditions=(JobCondition("Complete", "True"),)),
         pods=(pod(phase="Succeeded", exit_code=0),)),
     "Succeeded", ("Succeeded", "True", "Completed"), "finished"),
    ("bad data: trainer message", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(conditions=(JobCondition("Failed", "True", "PodFailurePolicy", "Container trainer ... 65"),)),
         pods=(pod(phase="Failed", exit_code=65, terminated_message="column 'label' missing in train.jsonl\n",
                   finished_at=T1),)),
     "Failed", ("Failed", "True", "DataError"), "column 'label' missing in train.jsonl"),
    ("bad config", prev_with(),
     obs(job=job(conditions=(JobCondition("FailureTarget", "True", "PodFailurePolicy"),)),
         pods=(pod(phase="Failed", exit_code=78, terminated_message="model cannot be loaded"),)),
     "Failed", ("Failed", "True", "ConfigError"), "code 78"),
    ("storage full", prev_with(),
     obs(job=job(conditions=(JobCondition("Failed", "True", "PodFailurePolicy"),)),
         pods=(pod(phase="Failed", exit_code=74, terminated_message="No space left on device"),)),
     "Failed", ("Failed", "True", "StorageError"), "No space left"),
    ("backoff limit", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(failed=2, conditions=(JobCondition("Failed", "True", "BackoffLimitExceeded",
                                                    "Job has reached the specified backoff limit"),)),
         pods=(pod("j-0-a", phase="Failed", exit_code=1, finished_at=T0),
               pod("j-0-b", phase="Failed", exit_code=137, terminated_reason="OOMKilled", finished_at=T1))),
     "Failed", ("Failed", "True", "OOMKilled"), "pod j-0-b exited with code 137 (OOMKilled): the trainer exceeded "
     "its memory limit"),
    ("backoff limit after crashes", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(failed=2, conditions=(JobCondition("Failed", "True", "BackoffLimitExceeded", "limit"),)),
         pods=(pod("j-0-a", phase="Failed", exit_code=1, finished_at=T0),)),
     "Failed", ("Failed", "True", "BackoffLimitExceeded"), "limit; last failure: pod j-0-a exited with code 1"),
    ("deadline", prev_with("Running", ("Running", "True", "PodsRunning")),
     obs(job=job(conditions=(JobCondition("Failed", "True", "DeadlineExceeded",
                                          "Job was active longer than specified deadline"),))),
     "Failed", ("Failed", "True", "DeadlineExceeded"), "deadline"),
    ("finished stays finished", prev_with("Succeeded", ("Succeeded", "True", "Completed")), obs(job=None),
     "Succeeded", ("Succeeded", "True", "Completed"), "m"),
    ("failed stays failed even if pods run", prev_with("Failed", ("Failed", "True", "InvalidSpec")),
     obs(job=job(active=1), pods=(running(),)), "Failed", ("Failed", "True", "InvalidSpec"), "m"),
]


@pytest.mark.parametrize(("desc", "prev", "observation", "phase", "condition", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_state_machine(desc: str, prev: FineTuneJobStatus, observation: state.Observation, phase: str,
                       condition: tuple[str, str, str], message: str) -> None:
    new = state.compute_status(prev, observation)
    assert new.phase == phase
    c = cond.find(new.conditions, condition[0])
    assert c is not None, f"no {condition[0]} condition in {new.conditions}"
    assert (c.type, c.status, c.reason) == condition
    assert message in c.message
    assert new.observed_generation == 1
    assert state.compute_status(prev, observation) == new, "pure: same input, same output"


def test_success_records_output_times_and_counters() -> None:
    new = state.compute_status(prev_with("Running", ("Running", "True", "PodsRunning")), obs(
        job=job(succeeded=1, start_time=T0, completion_time=T1, conditions=(JobCondition("Complete", "True"),)),
        pods=(pod(phase="Succeeded", started_at=T0, finished_at=T1),), restarts=2, gpu_seconds=60.04))
    assert new.output is not None and new.output.path == "s3://b/out"
    assert (new.start_time, new.completion_time, new.restarts, new.gpu_seconds) == (T0, T1, 2, 60.0)
    running_cond = cond.find(new.conditions, "Running")
    assert running_cond is not None and (running_cond.status, running_cond.reason) == ("False", "Completed")


def test_reported_output_wins_over_the_spec_location() -> None:
    report = ProgressReport.model_validate({"state": "finished", "output": {"path": "s3://b/out/final",
                                                                            "metrics": {"accuracy": 0.9}}})
    new = state.compute_status(prev_with("Running"), obs(job=job(conditions=(JobCondition("Complete", "True"),)),
                                                         report=report))
    assert new.output is not None and new.output.path == "s3://b/out/final" and new.output.metrics == {"accuracy": 0.9}


def test_progress_and_checkpoint_reach_status_while_running() -> None:
    report = ProgressReport.model_validate({
        "state": "running", "step": 50, "totalSteps": 200, "epoch": 0.25, "loss": 0.42, "learningRate": 4e-5,
        "samplesPerSecond": 31.5, "etaSeconds": 3725, "metrics": {"evalAccuracy": 0.8},
        "checkpoint": {"step": 50, "path": "s3://b/out/checkpoints/checkpoint-50", "time": T1},
    })
    new = state.compute_status(prev_with(), obs(job=job(active=1), pods=(running(),), report=report))
    assert new.phase == "Running"
    assert new.progress is not None
    assert (new.progress.step, new.progress.percent, new.progress.eta) == (50, 25.0, "1h02m")
    assert new.metrics == {"evalAccuracy": 0.8}
    assert new.checkpoints is not None and new.checkpoints.count == 1
    assert new.checkpoints.latest is not None and new.checkpoints.latest.step == 50


def test_last_transition_time_moves_only_when_status_flips() -> None:
    prev = prev_with("Pending", ("Running", "False", "PodsPending"))
    unsched = state.compute_status(prev, obs(job=job(), pods=(pod(unschedulable="no GPUs"),)))
    c = cond.find(unsched.conditions, "Running")
    assert c is not None and c.reason == "Unschedulable" and c.last_transition_time == T0
    run = state.compute_status(unsched, obs(now="2026-01-01T00:02:00Z", job=job(active=1), pods=(running(),)))
    c = cond.find(run.conditions, "Running")
    assert c is not None and c.status == "True" and c.last_transition_time == "2026-01-01T00:02:00Z"


def test_transition_events() -> None:
    pending = state.compute_status(FineTuneJobStatus(), obs(job=job()))
    assert state.transition_event(FineTuneJobStatus(), pending) is None, "pods starting is no news"
    unsched = state.compute_status(pending, obs(job=job(), pods=(pod(unschedulable="no GPUs"),)))
    kind, reason, _ = state.transition_event(pending, unsched) or ("", "", "")
    assert (kind, reason) == ("Warning", "Unschedulable")
    assert state.transition_event(unsched, unsched) is None
    run = state.compute_status(unsched, obs(job=job(active=1), pods=(running(),)))
    assert state.transition_event(unsched, run) == ("Normal", "PodsRunning", "Running: all 1 worker pod(s) are running")


def test_a_missing_secret_is_announced_again_once_its_name_is_known() -> None:
    """A real kubelet's first report often names no Secret (its cache was not synced yet); when the next one names
    the missing Secret, the condition learns it and one more Warning Event says it, once per Secret or key named."""
    vague = pod(waiting_reason="CreateContainerConfigError",
                waiting_message="failed to sync secret cache: timed out waiting for the condition")
    first = state.compute_status(prev_with(), obs(job=job(active=1), secret_refs=REFS, pods=(vague,)))
    events = state.transition_events(prev_with(), first)
    assert [(k, r) for k, r, _ in events] == [("Warning", "CreateContainerConfigError")]
    assert 'Secret "hf" key "token"' in events[0][2], "the first report lists every Secret the pod reads"
    again = state.compute_status(first, obs(job=job(active=1), secret_refs=REFS, pods=(vague,)))
    assert state.transition_events(first, again) == []
    named = pod(waiting_reason="CreateContainerConfigError", waiting_message='secret "s3" not found')
    learned = state.compute_status(again, obs(job=job(active=1), secret_refs=REFS, pods=(named,)))
    assert state.transition_events(again, learned) == [
        ("Warning", "CreateContainerConfigError", 'Pending: pod j-0-aaaaa cannot start: Secret "s3" does not exist '
         '(spec.credentials.s3.accessKeyId needs its key "id", spec.credentials.s3.secretAccessKey needs its key '
         '"secret"); the pods keep waiting for it (FINETUNE_START_TIMEOUT_SECONDS is 0)')]
    same = state.compute_status(learned, obs(job=job(active=1), secret_refs=REFS, pods=(named,)))
    assert state.transition_events(learned, same) == [], "once"
    key = pod(waiting_reason="CreateContainerConfigError", waiting_message="couldn't find key token in Secret ns/hf")
    other = state.compute_status(same, obs(job=job(active=1), secret_refs=REFS, pods=(key,)))
    assert [r for _, r, m in state.transition_events(same, other) if 'Secret "hf" has no key "token"' in m] == [
        "CreateContainerConfigError"], "another Secret or key is news again"


def test_a_storage_conflict_is_a_warning_and_clears_when_the_job_is_created() -> None:
    held = state.compute_status(FineTuneJobStatus(), obs(storage_conflict="spec.output.storage pvc://runs/x ..."))
    assert state.transition_events(FineTuneJobStatus(), held) == [
        ("Warning", "StorageConflict", "Pending: spec.output.storage pvc://runs/x ...")]
    ready = cond.find(held.conditions, "Reconciling")
    assert ready is not None and (ready.status, ready.reason) == ("True", "StorageConflict")
    waiting = state.compute_status(held, obs())  # no longer held, no Job yet (the pre-flight, or children to make)
    assert cond.find(waiting.conditions, "Created") is None, "a stale StorageConflict would stay the headline"
    started = state.compute_status(held, obs(job=job(active=1), pods=(running(),)))
    created = cond.find(started.conditions, "Created")
    assert started.phase == "Running" and created is not None and (created.status, created.reason) == (
        "True", "JobCreated")


def test_status_patch_writes_only_real_changes() -> None:
    run = state.compute_status(FineTuneJobStatus(), obs(job=job(active=1), pods=(running(),), gpu_seconds=10))
    stored = state.dump_status(run)
    assert state.status_patch(stored, run) is None
    later = state.compute_status(run, obs(job=job(active=1), pods=(running(),), gpu_seconds=99))
    assert state.status_patch(stored, later) is None, "GPU-seconds alone do not justify a write while running"
    stored_with_progress = {**stored, "progress": {"step": 5, "eta": "1m", "loss": 1.0}}
    new = FineTuneJobStatus.model_validate({**stored, "progress": {"step": 6, "loss": 0.9}})
    assert state.status_patch(stored_with_progress, new) == {"progress": {"step": 6, "eta": None, "loss": 0.9}}


def test_merge_diff_nulls_removed_keys_and_recurses() -> None:
    assert state.merge_diff({"a": 1, "b": {"c": 1, "d": 2}, "e": [1]}, {"b": {"c": 1, "d": 3}, "e": [2]}) == {
        "a": None, "b": {"d": 3}, "e": [2]}


def test_cancel_ends_the_job_failed_cancelled_and_keeps_the_record() -> None:
    """runPolicy.cancel: Failed with reason Cancelled (a Normal Event: the user asked for it), progress kept."""
    run = state.compute_status(FineTuneJobStatus(), obs(job=job(active=1), pods=(running(),)))
    run.restarts = 1
    cancelled = state.compute_status(run, obs(cancel_requested=True))
    assert cancelled.phase == "Failed" and cancelled.completion_time == T1 and cancelled.restarts == 1
    failed = cond.find(cancelled.conditions, "Failed")
    assert failed is not None and (failed.status, failed.reason) == ("True", state.CANCELLED)
    assert cond.find(cancelled.conditions, "Running").status == "False"  # type: ignore[union-attr]
    assert state.transition_event(run, cancelled) == ("Normal", state.CANCELLED, f"Failed: {failed.message}")
    assert state.compute_status(prev_with(), obs(cancel_requested=True)).phase == "Failed", "before any Job exists"
    done = state.compute_status(run, obs(job=job(conditions=(JobCondition("Complete", "True", "", ""),))))
    assert state.compute_status(done, obs(cancel_requested=True)).phase == "Succeeded", "a finished job stays"


def test_a_start_failure_is_a_whole_failed_status() -> None:
    observation = obs(job=job(active=1), secret_refs=REFS, start_timeout=45,
                      pods=(pod("j-0-b", waiting_reason="CreateContainerConfigError",
                                accepted_at="2026-01-01T00:00:10Z",
                                waiting_message="couldn't find key token in Secret ns/hf"),
                            pod("j-1-a", index=1, waiting_reason="CreateContainerConfigError", accepted_at=T0,
                                waiting_message='secret "s3" not found')))
    new = state.compute_status(FineTuneJobStatus(), observation)
    message = ('pod j-1-a cannot start: Secret "s3" does not exist (spec.credentials.s3.accessKeyId needs its key "id",'
               ' spec.credentials.s3.secretAccessKey needs its key "secret"); gave up after 45s '
               "(FINETUNE_START_TIMEOUT_SECONDS): the Job and its pods were deleted")
    assert state.dump_status(new) == {
        "phase": "Failed",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "CreateContainerConfigError", "message": message,
             "observedGeneration": 1, "lastTransitionTime": T1},
            {"type": "Created", "status": "True", "reason": "JobCreated",
             "message": "Job j exists with its ConfigMap and progress Secret", "observedGeneration": 1,
             "lastTransitionTime": T1},
            {"type": "Failed", "status": "True", "reason": "CreateContainerConfigError", "message": message,
             "observedGeneration": 1, "lastTransitionTime": T1},
            {"type": "Stalled", "status": "True", "reason": "CreateContainerConfigError", "message": message,
             "observedGeneration": 1, "lastTransitionTime": T1},
        ],
        "restarts": 0, "gpuSeconds": 0.0, "jobName": "j", "observedGeneration": 1, "completionTime": T1,
    }
    assert "CreateContainerConfigError" in state.STOPS_THE_JOB and "OOMKilled" in state.WARNING_REASONS


def test_start_deadline_is_the_earliest_stuck_pod_plus_the_timeout() -> None:
    stuck = pod("j-0-a", waiting_reason="ErrImagePull", accepted_at="2026-01-01T00:00:30Z")
    older = pod("j-1-a", waiting_reason="CreateContainerConfigError", accepted_at=T0)
    fine = pod("j-2-a", waiting_reason="ContainerCreating", accepted_at="2025-12-31T00:00:00Z")
    t0 = 1767225600.0
    assert state.start_deadline((stuck, older, fine), 300) == t0 + 300
    assert state.start_deadline((stuck, fine), 300) == t0 + 330
    assert state.start_deadline((fine,), 300) is None
    assert state.start_deadline((stuck, older), 0) is None, "0: the pods wait for ever"


KSTATUS = {  # phase -> (Ready, Reconciling, Stalled); None: absent or False
    "Pending": ("False", "True", None), "Queued": ("False", "True", None), "Running": ("True", None, None),
    "Suspended": ("True", None, None), "Succeeded": ("True", None, None), "Failed": ("False", None, "True"),
}


@pytest.mark.parametrize(("prev", "observation"), [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_kstatus_conditions_follow_the_phase(prev: FineTuneJobStatus, observation: state.Observation) -> None:
    """Ready, Reconciling and Stalled (kstatus: Flux, kubectl wait) judge a FineTuneJob as kstatus judges a Job:
    healthy while it runs, is suspended or has succeeded; in progress before; failed when it failed. They carry the
    headline's reason and message."""
    new = state.compute_status(prev, observation)
    assert new.phase is not None
    phase, reason, message = state.headline(new)  # type: ignore[misc]

    def status(type_: str) -> str | None:
        """Ready always has a status; Reconciling and Stalled only matter when True (abnormal-true)."""
        c = cond.find(new.conditions, type_)
        return None if c is None or (type_ != "Ready" and c.status != "True") else c.status

    assert (status("Ready"), status("Reconciling"), status("Stalled")) == KSTATUS[phase]
    ready = cond.find(new.conditions, "Ready")
    assert ready is not None and (ready.reason, ready.message) == (reason, message)
