"""Restarts and GPU-seconds survive pods that disappear and operators that restart."""

from __future__ import annotations

from finetune_operator.ledger import update
from finetune_operator.observe import JobView, PodView

T0, T60 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"
NOW = 1767225660.0  # 2026-01-01T00:01:00Z


def job(suspend: bool = False, uid: str = "job-1") -> JobView:
    return JobView(name="j", namespace="ns", uid=uid, owner_uid="f", suspend=suspend)


def pod(uid: str, phase: str = "Running", index: int = 0, gpus: int = 2, finished: str | None = None) -> PodView:
    return PodView(name=f"j-{index}-{uid}", uid=uid, job_uid="job-1", index=index, phase=phase, gpus=gpus,
                   started_at=T0, finished_at=finished)


def test_a_replaced_pod_is_one_restart_even_after_it_is_gone() -> None:
    led = update(None, job(), [pod("a")], 0, 0.0, NOW)
    assert (led.restarts, led.gpu_seconds) == (0, 120.0)
    led = update(led, job(), [pod("a", "Failed", finished=T60)], 0, 0.0, NOW + 30)
    led = update(led, job(), [pod("b")], 0, 0.0, NOW + 30)  # evicted pod deleted, replacement running
    assert led.restarts == 1
    assert led.gpu_seconds == 120.0 + 0.0 + 2 * 90  # a: 60 s x 2 GPUs, b: started T0 in this fake, 90 s x 2


def test_suspend_and_resume_is_not_a_restart() -> None:
    led = update(None, job(), [pod("a")], 0, 0.0, NOW)
    led = update(led, job(suspend=True), [pod("a", "Failed", finished=T60)], 0, 0.0, NOW)
    led = update(led, job(), [pod("b")], 0, 0.0, NOW)
    assert led.restarts == 0


def test_indexes_count_separately() -> None:
    led = update(None, job(), [pod("a", index=0), pod("b", index=1)], 0, 0.0, NOW)
    led = update(led, job(), [pod("c", index=0), pod("d", index=1), pod("e", index=1)], 0, 0.0, NOW)
    assert led.restarts == 3


def test_operator_restart_seeds_from_status() -> None:
    # Status said 2 restarts and 500 GPU-seconds; the evicted pods are gone, only the current one is visible.
    led = update(None, job(), [pod("z", gpus=1)], 2, 500.0, NOW)
    assert led.restarts == 2 and led.gpu_seconds == 500.0
    led = update(led, job(), [pod("z", "Failed", gpus=1, finished=T60)], 2, 500.0, NOW)
    led = update(led, job(), [pod("y", gpus=1)], 2, 500.0, NOW)
    assert led.restarts == 3


def test_a_recreated_job_keeps_the_counts() -> None:
    led = update(None, job(), [pod("a"), pod("b")], 0, 0.0, NOW)
    assert led.restarts == 1
    led2 = update(led, job(uid="job-2"), [], led.restarts, led.gpu_seconds, NOW)
    assert led2.restarts == 1 and led2.gpu_seconds == led.gpu_seconds


def test_a_whole_group_restart_counts_one_restart() -> None:
    """Worker 1 crashes; the operator stops worker 0 (and the replacement the Job controller already made for index 1)
    by suspending the Job, then both indexes start afresh: one restart, not three."""
    led = update(None, job(), [pod("a", index=0), pod("b", index=1)], 0, 0.0, NOW)
    crashed = pod("b", "Failed", index=1, finished=T60)
    led = update(led, job(), [pod("a", index=0), crashed, pod("c", "Pending", index=1)], 0, 0.0, NOW)
    assert led.doomed == {"a", "c"}, "the members alive at the failure are recorded"
    led = update(led, job(suspend=True), [pod("a", "Failed", index=0, finished=T60), crashed], 0, 0.0, NOW)
    led = update(led, job(), [crashed, pod("d", index=0), pod("e", index=1)], 0, 0.0, NOW)
    assert led.restarts == 1


def test_workers_that_only_lost_their_peers_are_not_restarts_of_their_own() -> None:
    """On gloo every worker fails within moments of the one that crashed, exiting 76 (peer lost): the group has
    restarted once."""
    led = update(None, job(), [pod("a", index=0), pod("b", index=1)], 0, 0.0, NOW)
    echo = PodView(name="j-0-a", uid="a", job_uid="job-1", index=0, phase="Failed", exit_code=76, finished_at=T60)
    led = update(led, job(), [echo, pod("b", "Failed", index=1, finished=T60)], 0, 0.0, NOW)
    led = update(led, job(), [pod("c", index=0), pod("d", index=1)], 0, 0.0, NOW)
    assert led.restarts == 1


def test_a_lost_peer_with_nothing_else_failed_is_the_one_restart() -> None:
    """A network partition: worker 0 exits 76 while worker 1 still runs. Nothing else failed, so the lost peer is
    the cause of the group restart and counts once; the stopped worker 1 does not."""
    led = update(None, job(), [pod("a", index=0), pod("b", index=1)], 0, 0.0, NOW)
    cut_off = PodView(name="j-0-a", uid="a", job_uid="job-1", index=0, phase="Failed", exit_code=76, finished_at=T60)
    led = update(led, job(), [cut_off, pod("b", index=1)], 0, 0.0, NOW)
    assert led.doomed == {"b"}
    led = update(led, job(suspend=True), [cut_off, pod("b", "Failed", index=1, finished=T60)], 0, 0.0, NOW)
    led = update(led, job(), [cut_off, pod("c", index=0), pod("d", index=1)], 0, 0.0, NOW)
    assert led.restarts == 1


def test_a_lost_peer_while_the_group_is_still_stopping_is_an_echo() -> None:
    """Kueue: the survivors are evicted, not suspended, so the Job controller replaces the crashed worker at once;
    that replacement meets the dying group and exits 76. It is part of the same restart, not a new one."""
    led = update(None, job(), [pod("a", index=0), pod("b", index=1)], 0, 0.0, NOW)
    crashed = pod("b", "Failed", index=1, finished=T60)
    led = update(led, job(), [pod("a", index=0), crashed], 0, 0.0, NOW)
    assert led.doomed == {"a"}
    met_the_dying = PodView(name="j-1-c", uid="c", job_uid="job-1", index=1, phase="Failed", exit_code=76,
                            finished_at=T60)
    led = update(led, job(), [pod("a", index=0), crashed, met_the_dying], 0, 0.0, NOW)
    assert led.doomed == {"a", "c"}
    led = update(led, job(), [crashed, met_the_dying, pod("d", index=0), pod("e", index=1)], 0, 0.0, NOW)
    assert led.restarts == 1


def test_a_group_failure_is_fresh_once_and_never_after_an_operator_restart() -> None:
    """The failure that broke a group is news on the update that first sees it: not on the next, and not when the
    ledger is rebuilt (an operator that restarted cannot tell whether it already said so)."""
    led = update(None, job(), [pod("a", index=0), pod("b", index=1)], 0, 0.0, NOW)
    assert led.fresh_causes == ()
    crashed = pod("b", "Failed", index=1, finished=T60)
    echo = PodView(name="j-0-a", uid="a", job_uid="job-1", index=0, phase="Failed", exit_code=76, finished_at=T60)
    led = update(led, job(), [echo, crashed], 0, 0.0, NOW)
    assert led.fresh_causes == (crashed,)
    led = update(led, job(), [echo, crashed], 0, 0.0, NOW)
    assert led.fresh_causes == ()
    assert update(None, job(), [echo, crashed], 1, 0.0, NOW).fresh_causes == ()
