"""Who holds a Job's suspend (suspend_owner.py): decided from what Kueue did, never from the spec's queue name alone."""

from __future__ import annotations

import pytest

from finetune_operator import suspend_owner
from finetune_operator.observe import JobCondition, JobView, WorkloadView
from tests.operator.helpers import spec


def job(**kw: object) -> JobView:
    return JobView(name="j", namespace="ns", uid="job-uid", owner_uid="ftj-uid", **kw)  # type: ignore[arg-type]


def workload(**kw: object) -> WorkloadView:
    return WorkloadView(**{"name": "job-j-1a2b3", "uid": "wl", "job_uid": "job-uid", "queue_name": "q",
                           **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("the_job", "the_workload", "party"), [
    (job(), None, "operator"),
    (job(suspend=True, suspended_by="user"), None, "operator"),  # the operator's own suspension
    (job(suspend=True, suspended_by="restart"), None, "operator"),
    (job(queue_name="q", suspend=True), None, "kueue"),  # the queue label
    (job(queue_name="q"), None, "kueue"),  # admitted: still Kueue's to suspend again
    (job(), workload(), "kueue"),  # Kueue made a Workload (manageJobsWithoutQueueName)
    (job(suspend=True), None, "kueue"),  # suspended, not by the operator: Kueue's webhook at creation
])
def test_the_holder_follows_what_kueue_did(the_job: JobView, the_workload: WorkloadView | None, party: str) -> None:
    assert suspend_owner.holder(the_job, the_workload).party == party


def test_new_jobs_start_as_their_holder_wants() -> None:
    assert suspend_owner.at_creation(spec()) == (False, None)
    assert suspend_owner.at_creation(spec(run_policy={"suspend": True})) == (True, "user")
    # Queued: created suspended and unmarked (Kueue's), also when the user suspends it before it ever ran.
    assert suspend_owner.at_creation(spec(run_policy={"queueName": "q"})) == (True, None)
    assert suspend_owner.at_creation(spec(run_policy={"queueName": "q", "suspend": True})) == (True, None)


def test_the_operator_writes_its_own_switch_with_its_mark() -> None:
    decide = suspend_owner.decide
    assert decide(spec(), job(), None, restarting=False) == suspend_owner.Actions()
    assert decide(spec(run_policy={"suspend": True}), job(), None, restarting=False) == \
        suspend_owner.Actions(job_suspend=True, mark="user")
    assert decide(spec(), job(), None, restarting=True) == suspend_owner.Actions(job_suspend=True, mark="restart")
    assert decide(spec(), job(suspend=True, suspended_by="user"), None, restarting=False) == \
        suspend_owner.Actions(job_suspend=False, mark=None)
    # A finished Job is left alone.
    done = job(conditions=(JobCondition("Complete", "True"),))
    assert decide(spec(run_policy={"suspend": True}), done, None, restarting=False) == suspend_owner.Actions()


def test_under_kueue_the_job_is_never_written_and_a_user_suspend_deactivates_the_workload() -> None:
    decide = suspend_owner.decide
    queued = job(queue_name="q", suspend=True)
    admitted = job(queue_name="q")
    assert decide(spec(run_policy={"queueName": "q"}), queued, workload(), restarting=False) == \
        suspend_owner.Actions()
    assert decide(spec(run_policy={"queueName": "q", "suspend": True}), admitted, workload(), restarting=False) == \
        suspend_owner.Actions(workload_active=False)
    assert decide(spec(run_policy={"queueName": "q", "suspend": True}), queued,
                  workload(active=False, suspended_by="user"), restarting=False) == suspend_owner.Actions()
    assert decide(spec(run_policy={"queueName": "q"}), queued, workload(active=False, suspended_by="user"),
                  restarting=False) == suspend_owner.Actions(workload_active=True)
    # Without a Workload yet there is nothing to deactivate; a broken group is restarted by eviction.
    assert decide(spec(run_policy={"queueName": "q", "suspend": True}), queued, None, restarting=False) == \
        suspend_owner.Actions()
    assert decide(spec(run_policy={"queueName": "q"}), admitted, workload(), restarting=True) == \
        suspend_owner.Actions(evict_broken_group=True)


def test_a_workload_kueue_deactivated_is_never_activated_by_the_operator() -> None:
    gave_up = workload(active=False)  # no operator mark: Kueue's requeuing limit, or an administrator
    assert suspend_owner.deactivated_by_kueue(gave_up)
    assert suspend_owner.decide(spec(run_policy={"queueName": "q"}), job(queue_name="q", suspend=True), gave_up,
                                restarting=False) == suspend_owner.Actions()
    assert not suspend_owner.deactivated_by_kueue(workload(active=False, suspended_by="user"))


def test_an_unmarked_suspension_is_not_fought_over() -> None:
    """manageJobsWithoutQueueName: the Job was created running and Kueue's webhook suspended it. No write."""
    webhook_suspended = job(suspend=True)
    assert suspend_owner.decide(spec(), webhook_suspended, None, restarting=False) == suspend_owner.Actions()
    assert suspend_owner.decide(spec(), webhook_suspended, workload(queue_name=None), restarting=False) == \
        suspend_owner.Actions()
