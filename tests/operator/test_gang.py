"""Whole-group restarts: which failure breaks a torchrun group, and which pods belong to the broken group."""

from __future__ import annotations

from finetune_operator.gang import broken_member, members_at_failure, regrouping, restart_message
from finetune_operator.observe import PodView

T0, T5, T9 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:00:09Z"


def pod(uid: str, index: int, phase: str = "Running", created: str = T0, finished: str | None = None,
        exit_code: int | None = None, disrupted: bool = False) -> PodView:
    return PodView(name=f"j-{index}-{uid}", uid=uid, job_uid="job", index=index, phase=phase, created=created,
                   finished_at=finished, exit_code=exit_code, disrupted=disrupted)


CRASHED = pod("b", 1, "Failed", finished=T5, exit_code=1)


def test_a_failed_member_with_older_survivors_breaks_the_group() -> None:
    pods = [pod("a", 0), CRASHED]
    assert broken_member(2, pods, set()) == CRASHED  # from timestamps alone (an operator that just restarted)
    assert broken_member(2, pods, {"a"}) == CRASHED


def test_one_pod_jobs_and_healthy_groups_are_never_broken() -> None:
    assert broken_member(1, [CRASHED], set()) is None
    assert broken_member(2, [pod("a", 0), pod("b", 1)], set()) is None


def test_a_group_started_after_the_failure_is_whole() -> None:
    restarted = [CRASHED, pod("c", 0, created=T9), pod("d", 1, created=T9)]
    assert broken_member(2, restarted, set()) is None
    # Same-second timestamps: the members seen alive at the failure are named, the new group is not among them.
    same_second = [pod("a", 0, phase="Failed", finished=T5), CRASHED, pod("c", 0, created=T5), pod("d", 1, created=T5)]
    assert broken_member(2, same_second, {"a"}) is None
    assert broken_member(2, [pod("a", 0, created=T5), CRASHED], {"a"}) == CRASHED


def test_members_stopped_by_the_restart_are_not_new_failures() -> None:
    stopped = pod("a", 0, "Failed", finished=T9, exit_code=143)
    assert broken_member(2, [stopped, CRASHED, pod("c", 1, created=T5)], {"a", "c"}) == CRASHED


def test_a_permanent_failure_is_left_to_the_pod_failure_policy() -> None:
    bad_data = pod("b", 1, "Failed", finished=T5, exit_code=65)
    assert broken_member(2, [pod("a", 0), bad_data], set()) is None


def test_members_at_failure_include_a_replacement_but_not_the_failed_pod() -> None:
    replacement = pod("c", 1, phase="Pending", created=T5)
    assert members_at_failure([pod("a", 0), CRASHED, replacement], CRASHED) == {"a", "c"}


def test_once_every_older_member_ended_only_pods_that_may_have_met_them_belong_to_the_broken_group() -> None:
    """On gloo the survivor exits 76 moments after the crash. A replacement made before it ended may have met it; a
    group created after it ended is new (an operator that saw the failure late leaves it alone)."""
    echo = pod("a", 0, "Failed", finished=T5, exit_code=76)
    early = pod("c", 1, phase="Pending", created=T5)
    assert members_at_failure([echo, CRASHED, early], CRASHED) == {"c"}
    new_group = [pod("d", 0, created=T9), pod("e", 1, created=T9)]
    assert members_at_failure([echo, CRASHED, *new_group], CRASHED) == set()
    assert broken_member(2, [echo, CRASHED, *new_group], {"a"}) is None


def test_regrouping_names_the_latest_restartable_cause_of_a_multi_pod_job() -> None:
    later = pod("c", 0, "Failed", finished=T9, exit_code=137)
    assert regrouping(2, [CRASHED, later]) == later
    assert regrouping(1, [CRASHED]) is None, "one pod: the Job controller's own retry, no group"
    assert regrouping(2, [pod("b", 1, "Failed", finished=T5, exit_code=65)]) is None, "permanent: the job fails"
    assert regrouping(2, []) is None
    assert restart_message(later, 2, others_stopped=True) == (
        "worker 0 (pod j-0-c) exited with code 137: the other workers stopped with it; all 2 start again from the "
        "latest checkpoint")


def test_restart_message_says_what_happened_and_stays_stable() -> None:
    assert restart_message(CRASHED, 4) == ("worker 1 (pod j-1-b) exited with code 1: stopping the other workers, "
                                           "then restarting all 4 from the latest checkpoint")
    evicted = pod("b", 1, "Failed", finished=T5, disrupted=True)
    assert "was disrupted (eviction, preemption or node loss)" in restart_message(evicted, 2)


def test_the_cause_is_named_before_its_echoes() -> None:
    echo = pod("a", 0, "Failed", finished=T5, exit_code=76)
    survivor = pod("c", 2)
    assert broken_member(3, [echo, CRASHED, survivor], set()) == CRASHED
    assert "lost contact with the other workers" in restart_message(echo, 3)


def test_pods_stopped_by_a_suspension_are_not_failures() -> None:
    stopped = pod("b", 1, "Failed", finished=T5, exit_code=75)
    assert broken_member(2, [pod("a", 0), stopped], set(), {"b"}) is None
    assert broken_member(2, [pod("a", 0), stopped], set()) == stopped
