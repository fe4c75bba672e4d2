"""Kueue's Workload in the FineTuneJob's words (queueing.py, and through state.compute_status the phase and Events).

The Workloads are summaries of what Kueue v0.15 writes (conditions and messages copied from a real run of the suite's
Kueue); the cluster tests (test_kueue_cluster.py) prove the same against the real controller.
"""

from __future__ import annotations

from finetune_api.status import FineTuneJobStatus, QueueStatus
from finetune_operator import queueing, state
from finetune_operator.observe import Eviction, JobCondition, JobView, PodView, WorkloadView, summarize_workload
from finetune_operator.suspend_owner import holder

PENDING = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor h100, 1 " \
          "more needed"


def job(**kw: object) -> JobView:
    return JobView(name="j", namespace="ns", uid="job-uid", owner_uid="ftj", **kw)  # type: ignore[arg-type]


def workload(*conditions: tuple[str, str, str, str], **kw: object) -> WorkloadView:
    conds = tuple(JobCondition(*c) for c in conditions)
    return WorkloadView(name="job-j-1a2b3", uid="wl", job_uid="job-uid", queue_name="team-a", conditions=conds,
                        **kw)  # type: ignore[arg-type]


def test_summary_reads_admission_flavors_evictions_and_the_operators_mark() -> None:
    body = {
        "metadata": {"name": "job-j-1a2b3", "uid": "wl", "namespace": "ns",
                     "annotations": {"finetune.dev/suspended-by": "user"},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "job-uid",
                                          "controller": True}]},
        "spec": {"queueName": "team-a", "active": False,
                 "priorityClassRef": {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": "high"}},
        "status": {"admission": {"clusterQueue": "cq-a", "podSetAssignments": [
            {"name": "main", "flavors": {"nvidia.com/gpu": "h100", "cpu": "default"}}]},
            "conditions": [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "ok"}],
            "schedulingStats": {"evictions": [{"reason": "Preempted", "underlyingCause": "", "count": 2}]}},
    }
    wl = summarize_workload(body)
    assert (wl.job_uid, wl.queue_name, wl.active, wl.suspended_by, wl.priority_class, wl.cluster_queue) == \
        ("job-uid", "team-a", False, "user", "high", "cq-a")
    assert wl.flavors == (("cpu", "default"), ("nvidia.com/gpu", "h100"))
    assert wl.requeues == 2 and wl.is_true("QuotaReserved")
    assert queueing.flavor_text(wl) == "cpu=default, nvidia.com/gpu=h100"


def test_waiting_says_kueues_own_message_with_the_queue() -> None:
    who = holder(job(queue_name="team-a", suspend=True), None)
    assert queueing.waiting(who, job(queue_name="team-a", suspend=True), None) == (
        "WaitingForAdmission", "waiting for Kueue to admit the Job through LocalQueue team-a")
    pending = workload(("QuotaReserved", "False", "Pending", PENDING))
    assert queueing.waiting(who, job(queue_name="team-a", suspend=True), pending) == (
        "WaitingForQuota", f"Kueue: {PENDING} (LocalQueue team-a, Workload job-j-1a2b3)")
    lost = workload(("QuotaReserved", "False", "Inadmissible", "LocalQueue team-a doesn't exist"))
    assert queueing.waiting(who, job(queue_name="team-a", suspend=True), lost)[0] == "Inadmissible"


def test_a_preempted_job_says_why_and_counts_the_requeue() -> None:
    wl = workload(("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: x) due to "
                   "prioritization in the ClusterQueue"),
                  ("Preempted", "True", "InClusterQueue", "Preempted to accommodate ..."),
                  ("QuotaReserved", "False", "Pending", PENDING),
                  evictions=(Eviction("Preempted", "", 1),))
    reason, message = queueing.waiting(holder(job(queue_name="team-a", suspend=True), wl),
                                       job(queue_name="team-a", suspend=True), wl)
    assert reason == "Preempted"
    assert message.startswith("evicted by Kueue (InClusterQueue): Preempted to accommodate a workload")
    assert "(1 requeue so far)" in message and message.endswith(f"now: {PENDING}")
    assert queueing.queue_status(job(queue_name="team-a", suspend=True), wl) == QueueStatus(
        workload="job-j-1a2b3", local_queue="team-a", requeues=1)


def test_a_deactivation_the_user_asked_for_is_not_reported_as_an_eviction_after_the_resume() -> None:
    resumed = workload(("Evicted", "True", "Deactivated", "The workload is deactivated"),
                       ("QuotaReserved", "False", "Pending", PENDING), suspended_by=None)
    reason, _ = queueing.waiting(holder(job(queue_name="team-a", suspend=True), resumed),
                                 job(queue_name="team-a", suspend=True), resumed)
    assert reason == "WaitingForQuota"


def test_kueue_giving_up_fails_the_job_and_stops_it() -> None:
    wl = workload(("Evicted", "True", "DeactivatedDueToRequeuingLimitExceeded",
                   "The workload is deactivated due to exceeding the maximum number of re-queuing retries"),
                  active=False, evictions=(Eviction("PodsReadyTimeout", "", 2),
                                           Eviction("Deactivated", "RequeuingLimitExceeded", 1)))
    reason, message = queueing.gave_up(wl)  # type: ignore[misc]
    assert reason == "RequeuingLimitExceeded" and "PodsReadyTimeout x2" in message
    obs = state.Observation(now="2026-01-01T00:00:10Z", job=job(queue_name="team-a", suspend=True), workload=wl)
    st = state.compute_status(FineTuneJobStatus(phase="Queued"), obs)
    assert st.phase == "Failed" and reason in state.STOPS_THE_JOB
    assert queueing.gave_up(workload(active=False, suspended_by="user")) is None


def test_admission_is_announced_with_its_flavor_and_a_queued_job_becomes_running() -> None:
    queued_job = job(queue_name="team-a", suspend=True)
    pending = workload(("QuotaReserved", "False", "Pending", PENDING))
    prev = state.compute_status(FineTuneJobStatus(), state.Observation(now="2026-01-01T00:00:00Z", job=queued_job,
                                                                      workload=pending))
    assert prev.phase == "Queued"
    assert state.headline(prev)[:2] == ("Queued", "WaitingForQuota")  # type: ignore[index]
    admitted = workload(("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq-a"),
                        ("Admitted", "True", "Admitted", "The workload is admitted"),
                        cluster_queue="cq-a", flavors=(("nvidia.com/gpu", "h100"),))
    pod = PodView(name="j-0-x", uid="p", job_uid="job-uid", phase="Running", started_at="2026-01-01T00:00:05Z")
    new = state.compute_status(prev, state.Observation(now="2026-01-01T00:00:06Z", job=job(queue_name="team-a"),
                                                       workload=admitted, pods=(pod,)))
    assert new.phase == "Running"
    assert new.queue == QueueStatus(workload="job-j-1a2b3", local_queue="team-a", cluster_queue="cq-a",
                                    flavor="h100")
    assert state.transition_events(prev, new) == [
        ("Normal", "Admitted", "Kueue admitted the Job in ClusterQueue cq-a with flavor h100"),
        ("Normal", "PodsRunning", "Running: all 1 worker pod(s) are running")]


def test_a_user_suspend_under_kueue_is_suspended_not_queued() -> None:
    wl = workload(("Evicted", "True", "Deactivated", "The workload is deactivated"), active=False,
                  suspended_by="user")
    obs = state.Observation(now="2026-01-01T00:00:00Z", job=job(queue_name="team-a", suspend=True), workload=wl,
                            suspend_requested=True)
    st = state.compute_status(FineTuneJobStatus(phase="Running"), obs)
    assert st.phase == "Suspended"
    assert "Workload is deactivated" in state.headline(st)[2]  # type: ignore[index]
