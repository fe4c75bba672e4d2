"""Who holds a trainer Job's `suspend`, and what the operator does about it: pure decisions, no I/O.

Three parties may want a Job suspended: the user (`runPolicy.suspend`), the operator itself (a broken torchrun group
restarts as a whole, gang.py) and Kueue (a Job waits suspended until its Workload is admitted, and is suspended again
when Kueue evicts it). Only one may write the switch, or two controllers fight over it: Kueue suspends, the operator
unsuspends, twenty writes a second for as long as both run.

Kueue holds it when what Kueue did says so, not because the spec names a queue (the operator cannot read Kueue's
configuration, and `manageJobsWithoutQueueName` makes Kueue take Jobs without a queue label):

- the Job carries Kueue's queue label (`runPolicy.queueName`; Kueue's webhook suspends it at creation), or
- a Workload owned by the Job exists (Kueue took the Job), or
- the Job is suspended and the operator did not suspend it. The operator marks each suspension of its own with the
  annotation `labels.SUSPENDED_BY` in the same write as `spec.suspend` (or at creation), so a suspension without the
  mark is someone else's: Kueue's mutating webhook suspends a Job at creation, before its Workload exists.

The operator holds it otherwise, and writes it for a user suspend or a group restart. Under Kueue the operator never
writes the Job's `suspend` (nor its pod template: a template change would recreate the Workload, losing its place in
the queue); a user suspend deactivates the Workload (`spec.active: false`, marked the same way: Kueue evicts it and
frees its quota), a resume activates it again, and a broken group restarts by evicting the surviving workers.
A Workload Kueue deactivated itself (its requeuing limit) is never activated by the operator.

Used by the builders (the Job at creation), the reconcile pass (what to patch) and the status (Queued or Suspended).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from finetune_api.spec import FineTuneJobSpec

if TYPE_CHECKING:  # observe.py imports builders.py, which asks this module how a Job starts
    from finetune_operator.observe import JobView, WorkloadView

Party = Literal["operator", "kueue"]
OPERATOR: Party = "operator"
KUEUE: Party = "kueue"
# Values of the SUSPENDED_BY annotation: why the operator suspended the Job (or deactivated the Workload).
BY_USER = "user"  # runPolicy.suspend
BY_RESTART = "restart"  # a broken torchrun group is being restarted (gang.py)


@dataclass(frozen=True)
class Holder:
    """Who holds the Job's `suspend`, and the evidence (for messages and logs)."""

    party: Party
    evidence: str

    @property
    def kueue(self) -> bool:
        return self.party == KUEUE


@dataclass(frozen=True)
class Actions:
    """What the operator writes about suspension in this pass: nothing (None), or the value and its mark."""

    job_suspend: bool | None = None  # Job spec.suspend, with SUSPENDED_BY set to `mark` (or removed)
    mark: str | None = None
    workload_active: bool | None = None  # Workload spec.active, with SUSPENDED_BY BY_USER while false
    evict_broken_group: bool = False  # a broken group restarts by eviction (Kueue) instead of a suspension


def at_creation(spec: FineTuneJobSpec) -> tuple[bool, str | None]:
    """`spec.suspend` of a new Job and the operator's mark: a queued Job is created suspended and unmarked (Kueue
    admits it by unsuspending it), a user-suspended one suspended and marked, any other one running."""
    if spec.run_policy.queue_name is not None:
        return True, None
    if spec.run_policy.suspend:
        return True, BY_USER
    return False, None


def holder(job: JobView, workload: WorkloadView | None) -> Holder:
    if job.queue_name is not None:
        return Holder(KUEUE, f"the Job is queued in LocalQueue {job.queue_name}")
    if workload is not None:
        return Holder(KUEUE, f"Kueue manages the Job through Workload {workload.name}")
    if job.suspend and job.suspended_by is None:
        return Holder(KUEUE, f"the Job {job.name} was suspended by another controller, not by the operator (Kueue "
                             "suspends Jobs without a queue name in namespaces where manageJobsWithoutQueueName "
                             "applies)")
    return Holder(OPERATOR, "the operator created the Job and nothing else holds it")


def deactivated_by_kueue(workload: WorkloadView | None) -> bool:
    """Kueue deactivated the Workload itself (spec.active false without the operator's mark): it stays so until
    someone activates it; the operator does not."""
    return workload is not None and not workload.active and workload.suspended_by is None


def decide(spec: FineTuneJobSpec, job: JobView, workload: WorkloadView | None, restarting: bool) -> Actions:
    """The suspension writes of one pass over an unfinished Job; `restarting`: a broken group must stop."""
    if job.finished:
        return Actions()
    who = holder(job, workload)
    user = spec.run_policy.suspend
    if not who.kueue:
        want = user or restarting
        mark = (BY_USER if user else BY_RESTART) if want else None
        if job.suspend == want and job.suspended_by == mark:
            return Actions()
        return Actions(job_suspend=want, mark=mark)
    evict = restarting and not user
    if workload is None or (deactivated_by_kueue(workload) and not user):
        return Actions(evict_broken_group=evict)
    if workload.active == (not user) and (workload.suspended_by == BY_USER) == user:
        return Actions(evict_broken_group=evict)
    return Actions(workload_active=not user, evict_broken_group=evict)
