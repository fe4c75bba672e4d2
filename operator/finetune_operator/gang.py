"""Whole-group restarts of multi-pod jobs: pure decisions, no I/O.

A torchrun group is static: when one pod of a multi-pod job fails (a crash, an eviction, a lost node), the Job
controller replaces only that index, and the replacement cannot join the running group, while the surviving workers
hang in a collective until a timeout and then fail one by one, each failure counted against backoffLimit. So the
operator restarts the whole group instead: it suspends the Job (the Job controller stops every pod, and pods stopped
by a suspension are not counted as failures), waits until none of the pods that belonged to the broken group is left,
then resumes the Job; every index starts afresh, the rendezvous forms again, and all workers resume from the latest
complete checkpoint. One failure costs one restart.

Kueue owns `suspend` of a queued Job, so for Kueue-managed jobs the operator evicts the surviving members instead:
evictions are disruptions, which the pod failure policy ignores, and a replacement that meets a dying member exits
76 (peer lost), also ignored, until every member is new.
"""

from __future__ import annotations

from collections.abc import Iterable

from finetune_api import exitcodes
from finetune_api.times import parse_time
from finetune_operator.observe import PodView

LIVE = ("Pending", "Running", "Unknown")


def members_at_failure(pods: Iterable[PodView], failed: PodView) -> set[str]:
    """The uids of the live pods that belong to the group `failed` broke, or may have met it.

    While an older member still runs, that is every live pod (a replacement the Job controller already made for the
    failed index included; the suspension stops it too). Once every older member has ended (on gloo the others exit
    76 within moments of the crash), only the pods created before the last of them ended: pods created after it form
    a new group by themselves (an operator that saw the failure late must not stop a healthy group). Same-second
    timestamps count as "may have met": one needless restart costs seconds, a mixed group costs a hang.
    """
    pods = list(pods)
    failed_at = parse_time(failed.finished_at) or 0.0
    others = [p for p in pods if p.uid != failed.uid]
    live = [p for p in others if p.phase in LIVE]
    older = [p for p in others if (created := parse_time(p.created)) is None or created < failed_at]
    if any(p.phase in LIVE for p in older):
        return {p.uid for p in live}
    ended = max((parse_time(p.finished_at) or failed_at for p in older), default=failed_at)
    return {p.uid for p in live if (created := parse_time(p.created)) is None or created <= ended}


def regrouping(workers: int, causes: Iterable[PodView]) -> PodView | None:
    """The failure that stopped a whole group by itself (every member ended with it; the Job controller starts them
    all again), seen for the first time: said like a restart the operator makes, so the user learns why."""
    if workers <= 1:
        return None
    restartable = [p for p in causes if p.exit_code not in exitcodes.PERMANENT]
    return max(restartable, key=lambda p: (parse_time(p.finished_at) or 0.0, p.name), default=None)


def broken_member(workers: int, pods: Iterable[PodView], doomed: set[str],
                  stopped: frozenset[str] | set[str] = frozenset()) -> PodView | None:
    """The failed pod of the newest broken group whose other members still run, else None.

    A live pod belongs to a broken group when it was alive when a member failed: recorded in `doomed` as the operator
    saw it happen, or, after an operator restart, because it was created before that member's failure. Pods in
    `stopped` ended because the Job was suspended (by the user, Kueue or a group restart): not failures.
    """
    if workers <= 1:
        return None
    pods = list(pods)
    # Members stopped by the restart itself are not new failures. (An evicted pod is Failed and being deleted: that
    # is a failure like any other.)
    failed = [p for p in pods if p.phase == "Failed" and p.finished_at is not None and p.uid not in doomed
              and p.uid not in stopped]
    if not failed:
        return None
    # Newest first; within the same second, the cause before its echoes (workers that only lost their peers).
    latest = max(failed, key=lambda p: (parse_time(p.finished_at) or 0.0, p.exit_code != exitcodes.PEER_LOST, p.name))
    if latest.exit_code in exitcodes.PERMANENT:
        return None  # the pod failure policy fails the whole Job: nothing to restart
    return latest if survivors(pods, doomed, latest) else None


def survivors(pods: Iterable[PodView], doomed: set[str], failed: PodView) -> list[PodView]:
    """The live members (some maybe already being deleted) of the group that `failed` broke."""
    failed_at = parse_time(failed.finished_at) or 0.0
    out = []
    for p in pods:
        if p.phase not in LIVE or p.uid == failed.uid:
            continue
        created = parse_time(p.created)
        if p.uid in doomed or (created is not None and created < failed_at):
            out.append(p)
    return out


def restart_message(failed: PodView, workers: int, others_stopped: bool = False) -> str:
    """Why the workers are being restarted, stable across passes (no counts that change while pods stop)."""
    if failed.disrupted:
        what = "was disrupted (eviction, preemption or node loss)"
    elif failed.exit_code == exitcodes.PEER_LOST:
        what = "lost contact with the other workers"
    elif failed.exit_code is not None:
        why = f", {failed.terminated_reason}" if failed.terminated_reason else ""
        what = f"exited with code {failed.exit_code}{why}"
    else:
        what = "failed"
    then = (f"the other workers stopped with it; all {workers} start again from the latest checkpoint"
            if others_stopped else
            f"stopping the other workers, then restarting all {workers} from the latest checkpoint")
    return f"worker {failed.index} (pod {failed.name}) {what}: {then}"
