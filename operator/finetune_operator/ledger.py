"""Pure bookkeeping of the pods a job has run: restarts and GPU-seconds that outlive the pods themselves.

An evicted pod is deleted from the API, and the Job controller does not count failures its podFailurePolicy ignores,
so neither the Job's status nor the live pods can say how often training restarted. The operator therefore keeps one
record per pod uid it has seen. When a ledger is (re)built after an operator restart, `offset` carries what the last
written status already counted and the live pods can no longer show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune_api import exitcodes
from finetune_api.times import parse_time
from finetune_operator.gang import LIVE, members_at_failure
from finetune_operator.observe import JobView, PodView

TERMINAL_POD_PHASES = ("Succeeded", "Failed")


@dataclass
class PodRecord:
    index: int
    gpu_seconds: float = 0.0
    finished: bool = False
    stopped_by_suspend: bool = False  # deleted because the Job was suspended: not a restart


@dataclass
class Ledger:
    job_uid: str
    pods: dict[str, PodRecord] = field(default_factory=dict)
    restart_offset: int = 0
    gpu_offset: float = 0.0
    # Pods that ended (or will) because another member of their group failed first: stopped by the group restart,
    # or exited 76 (peer lost) as an echo of that failure. Not restarts of their own.
    doomed: set[str] = field(default_factory=set)
    # The failures that broke a group, seen for the first time in the latest update (none when the ledger was just
    # (re)built: an operator that restarted cannot tell whether it already reported them).
    fresh_causes: tuple[PodView, ...] = ()

    @property
    def restarts(self) -> int:
        """Pods replaced after a failure. Pods stopped by a suspension, the user's or a whole-group restart's, are
        not restarts of their own: the failure that caused the group restart is the one restart."""
        per_index: dict[int, list[bool]] = {}
        for uid, rec in self.pods.items():
            per_index.setdefault(rec.index, []).append(rec.stopped_by_suspend or uid in self.doomed)
        replaced = sum(max(0, len(stopped) - 1 - sum(stopped)) for stopped in per_index.values())
        return self.restart_offset + replaced

    @property
    def stopped(self) -> set[str]:
        """Pods that ended because the Job was suspended (not failures)."""
        return {uid for uid, rec in self.pods.items() if rec.stopped_by_suspend}

    @property
    def gpu_seconds(self) -> float:
        return self.gpu_offset + sum(r.gpu_seconds for r in self.pods.values())


def _pod_gpu_seconds(pod: PodView, now: float) -> float:
    start = parse_time(pod.started_at)
    if start is None or not pod.gpus:
        return 0.0
    end = parse_time(pod.finished_at) if pod.finished_at else now
    return max(0.0, (end or now) - start) * pod.gpus


def _record_group_failures(ledger: Ledger, pods: list[PodView], failed: list[PodView]) -> list[PodView]:
    """Failures seen for the first time: the causes (real failures; if every one is a lost peer, the earliest of
    them) doom the rest of their group; the other lost peers seen with them are echoes of those causes. So are lost
    peers while an earlier broken group is still stopping (a replacement that met a dying member). Returns the
    causes."""
    if not failed:
        return []
    real = [p for p in failed if p.exit_code != exitcodes.PEER_LOST]
    if not real and any(p.uid in ledger.doomed and p.phase in LIVE for p in pods):
        ledger.doomed.update(p.uid for p in failed)
        return []
    causes = real or [min(failed, key=lambda p: (parse_time(p.finished_at) or 0.0, p.name))]
    for pod in failed:
        if pod not in causes:
            ledger.doomed.add(pod.uid)
    for cause in causes:
        ledger.doomed |= members_at_failure(pods, cause)
    return causes


def update(
    ledger: Ledger | None,
    job: JobView,
    pods: list[PodView],
    prev_restarts: int | None,
    prev_gpu_seconds: float | None,
    now: float,
) -> Ledger:
    """Record the pods seen now; a new ledger (first pass, operator restart or a new Job) is seeded from status."""
    seeded = ledger is None or ledger.job_uid != job.uid
    if seeded:
        ledger = Ledger(job_uid=job.uid)
    assert ledger is not None
    failed_now: list[PodView] = []
    for pod in pods:
        rec = ledger.pods.get(pod.uid)
        if rec is None:
            rec = ledger.pods[pod.uid] = PodRecord(index=pod.index)
        rec.gpu_seconds = max(rec.gpu_seconds, _pod_gpu_seconds(pod, now))
        was_finished = rec.finished
        rec.finished = rec.finished or (pod.phase in TERMINAL_POD_PHASES and not job.suspend)
        if rec.finished and not was_finished and pod.phase == "Failed" and pod.uid not in ledger.doomed \
                and not rec.stopped_by_suspend:
            failed_now.append(pod)
    causes = _record_group_failures(ledger, pods, failed_now)
    ledger.fresh_causes = () if seeded else tuple(causes)
    if job.suspend:
        for rec in ledger.pods.values():
            if not rec.finished:
                rec.stopped_by_suspend = True
    if seeded:
        ledger.restart_offset = max(0, (prev_restarts or 0) - ledger.restarts)
        ledger.gpu_offset = max(0.0, (prev_gpu_seconds or 0.0) - ledger.gpu_seconds)
    return ledger
