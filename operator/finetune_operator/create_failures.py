"""Why a running Job has no pods (quota, admission): the Job controller's FailedCreate Events, read sparingly.

Pod creates are the Job controller's, so their refusals reach the operator only as Events on the Job. Reading Events
is a list request; it is made at most once per `QUOTA_RECHECK` per job, and only while the Job is short of pods.
"""

from __future__ import annotations

from finetune_api.times import parse_time
from finetune_operator.k8s import Kube
from finetune_operator.observe import JobView, PodView
from finetune_operator.record import JobRecord, Key
from finetune_operator.workqueue import WorkQueue

QUOTA_RECHECK = 10.0  # seconds between looks at a pod-less Job's FailedCreate events
CREATE_GRACE = 2.0  # seconds a new Job may have no pods before its FailedCreate events are read


async def create_failure(kube: Kube, queue: WorkQueue[Key], key: Key, record: JobRecord, now: float, job: JobView,
                         pods: list[PodView]) -> str | None:
    """The latest FailedCreate message of a Job that should have pods and has none; None when it is not short."""
    live = [p for p in pods if p.phase not in ("Succeeded", "Failed")]
    if job.suspend or job.finished or live or job.active or job.succeeded >= job.completions:
        # (every index succeeded: the Job is about to be Complete, not short of pods)
        record.create_failure_checked, record.create_failure = 0.0, None
        return None
    if job.start_time is None:
        # The Job controller has not synced this Job yet (a backlog after a burst): its first sync sets startTime
        # even when every pod create fails, and that update comes through the Job watch. Until then no Event
        # can exist, so none is listed.
        return None
    age = now - (parse_time(job.created) or now)
    if age < CREATE_GRACE:  # the Job controller has not had its chance yet: look again then
        queue.add(key, CREATE_GRACE - age)
        return None
    if now - record.create_failure_checked >= QUOTA_RECHECK:
        events = await kube.job_events(key[0], job.uid, "FailedCreate")
        events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        record.create_failure_checked = now
        record.create_failure = events[-1].get("message") if events else None
    queue.add(key, QUOTA_RECHECK)
    return record.create_failure
