"""What Kueue is doing with a job, in the FineTuneJob's words: pure functions of its Job and Workload, no I/O.

Kueue writes why a Workload waits (insufficient quota in a flavor, a LocalQueue that does not exist, an inactive
ClusterQueue), which ClusterQueue and flavors admitted it, and why it was evicted (preemption, a PodsReady timeout)
on the Workload only. These turn that into the FineTuneJob's `Queued` condition (Kueue's own message, with the
queue and the Workload it concerns), its `status.queue`, and the failure when Kueue gives up on a job.
"""

from __future__ import annotations

from finetune_api.status import QueueStatus
from finetune_operator.observe import JobView, WorkloadView
from finetune_operator.suspend_owner import Holder, deactivated_by_kueue

# Reasons of the Queued condition (and of the Failed one when Kueue gives up).
WAITING_FOR_ADMISSION = "WaitingForAdmission"  # no Workload yet, or one Kueue has not looked at
WAITING_FOR_QUOTA = "WaitingForQuota"  # Kueue: not enough unused quota (QuotaReserved=False/Pending)
INADMISSIBLE = "Inadmissible"  # Kueue: the LocalQueue does not exist, the ClusterQueue is inactive or stopped
ADMISSION_CHECKS = "AdmissionChecksPending"  # quota reserved, admission checks (e.g. provisioning) not yet ready
STARTING = "WaitingForKueueToStart"  # admitted, but Kueue has not unsuspended the Job yet
DEACTIVATED = "Deactivated"  # the Workload was deactivated outside the operator
REQUEUING_LIMIT = "RequeuingLimitExceeded"  # Kueue deactivated it after too many evictions: the job fails
ADMITTED = "Admitted"
# Evictions keep Kueue's own reason: Preempted, PodsReadyTimeout, ClusterQueueStopped, AdmissionCheck, NodeFailures...
WARNINGS = frozenset({INADMISSIBLE, DEACTIVATED, REQUEUING_LIMIT, "Preempted", "PodsReadyTimeout",
                      "ClusterQueueStopped", "LocalQueueStopped", "AdmissionCheck", "NodeFailures"})


def flavor_text(workload: WorkloadView) -> str:
    """The admission's ResourceFlavors: `gpu-h100`, or `nvidia.com/gpu=gpu-h100, cpu=default` when they differ."""
    names = sorted({flavor for _, flavor in workload.flavors})
    if len(names) <= 1:
        return names[0] if names else ""
    return ", ".join(f"{resource}={flavor}" for resource, flavor in workload.flavors)


def queue_status(job: JobView, workload: WorkloadView | None) -> QueueStatus | None:
    """`status.queue`: the Workload, its queues, the flavor of the current admission, the priority, the requeues."""
    if workload is None:
        return QueueStatus(local_queue=job.queue_name) if job.queue_name else None
    admitted = workload.is_true("QuotaReserved")
    return QueueStatus(
        workload=workload.name,
        local_queue=workload.queue_name or job.queue_name,
        cluster_queue=workload.cluster_queue if admitted else None,
        flavor=(flavor_text(workload) or None) if admitted else None,
        priority_class=workload.priority_class,
        requeues=workload.requeues or None,
    )


def _where(job: JobView, workload: WorkloadView | None) -> str:
    queue = (workload.queue_name if workload is not None else None) or job.queue_name
    parts = [f"LocalQueue {queue}" if queue else "no LocalQueue"]
    if workload is not None:
        parts.append(f"Workload {workload.name}")
    return ", ".join(parts)


def _requeues(n: int) -> str:
    return f"{n} requeue{'s' if n != 1 else ''}"


def gave_up(workload: WorkloadView | None) -> tuple[str, str] | None:
    """Kueue deactivated the Workload after its requeuing limit (WaitForPodsReady's backoffLimitCount): it will not
    be admitted again, so the job fails, with the last eviction's cause."""
    if not deactivated_by_kueue(workload):
        return None
    assert workload is not None
    evicted = workload.condition("Evicted")
    limit = any(e.cause == REQUEUING_LIMIT for e in workload.evictions) or (
        evicted is not None and evicted.reason.endswith(REQUEUING_LIMIT))
    if not limit:
        return None
    causes = ", ".join(f"{e.reason} x{e.count}" for e in workload.evictions if e.reason != "Deactivated")
    said = evicted.message if evicted is not None else "deactivated after exceeding the maximum number of requeues"
    return REQUEUING_LIMIT, (f"Kueue deactivated Workload {workload.name}: {said}" +
                             (f" (evictions: {causes})" if causes else "") +
                             "; it is not admitted again, so the job failed and its Job was deleted")


def waiting(who: Holder, job: JobView, workload: WorkloadView | None) -> tuple[str, str]:
    """(reason, message) of the Queued condition while Kueue holds the Job suspended (not a user suspend)."""
    where = _where(job, workload)
    if workload is None:
        if job.queue_name is None:
            return WAITING_FOR_ADMISSION, f"{who.evidence}; waiting for Kueue's Workload ({where})"
        return WAITING_FOR_ADMISSION, f"waiting for Kueue to admit the Job through LocalQueue {job.queue_name}"
    if deactivated_by_kueue(workload):
        evicted = workload.condition("Evicted")
        said = f": {evicted.message}" if evicted is not None and evicted.message else ""
        return DEACTIVATED, (f"Workload {workload.name} was deactivated (spec.active false) outside the "
                             f"operator{said}; Kueue admits it again once it is activated ({where})")
    evicted = workload.condition("Evicted")
    if evicted is not None and evicted.status == "True" and not evicted.reason.startswith(DEACTIVATED):
        preempted = workload.condition("Preempted")
        how = f" ({preempted.reason})" if preempted is not None and preempted.status == "True" else ""
        now = workload.condition("QuotaReserved")
        pending = f"; now: {now.message}" if now is not None and now.status == "False" and now.message else ""
        return evicted.reason or "Evicted", (
            f"evicted by Kueue{how}: {evicted.message}; the pods were stopped (each saved a checkpoint) and the job "
            f"is back in its queue ({_requeues(workload.requeues)} so far); it resumes from the latest checkpoint "
            f"when admitted again ({where}){pending}")
    if workload.is_true("Admitted"):
        return STARTING, (f"Kueue admitted Workload {workload.name} (ClusterQueue {workload.cluster_queue}, flavor "
                          f"{flavor_text(workload)}) and has not unsuspended the Job yet")
    if not workload.queue_name:
        return INADMISSIBLE, (f"Kueue took the Job without a queue name (manageJobsWithoutQueueName) into Workload "
                              f"{workload.name}, which names no LocalQueue, and Kueue admits nothing without one: set "
                              "spec.runPolicy.queueName (or give the namespace a default LocalQueue)")
    reserved = workload.condition("QuotaReserved")
    if reserved is not None and reserved.status == "True":
        return ADMISSION_CHECKS, (f"quota reserved in ClusterQueue {workload.cluster_queue}; waiting for the "
                                  f"ClusterQueue's admission checks ({where})")
    if reserved is not None and reserved.message:
        reason = INADMISSIBLE if reserved.reason == INADMISSIBLE else WAITING_FOR_QUOTA
        return reason, f"Kueue: {reserved.message} ({where})"
    return WAITING_FOR_ADMISSION, f"waiting for Kueue to consider the Workload ({where})"


def admitted(workload: WorkloadView | None) -> str:
    """The message of Queued=False/Admitted: where Kueue admitted the job."""
    if workload is None or workload.cluster_queue is None:
        return "Kueue admitted the Job"
    flavor = flavor_text(workload)
    again = f", after {_requeues(workload.requeues)}" if workload.requeues else ""
    return f"Kueue admitted the Job in ClusterQueue {workload.cluster_queue}" + (
        f" with flavor {flavor}" if flavor else "") + again
