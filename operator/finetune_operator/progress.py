"""The progress channel's pure half: per-job tokens and folding the trainer's reports into status.

The report itself (`ProgressReport`, written once in finetune_api.progress) is validated by the intake and merged with
`merge_reports`; `apply_report` maps it to the FineTuneJob's status.

Tokens are HMAC-SHA256(operator key, "<namespace>/<name>/<uid>"): the operator verifies a push by recomputing, so it
keeps no token state, survives restarts, and a token opens exactly one job (a recreated job has a new uid).
"""

from __future__ import annotations

import hashlib
import hmac
import math

from finetune_api.progress import MAX_METRICS, ProgressReport
from finetune_api.status import (
    CheckpointRef,
    CheckpointsStatus,
    FineTuneJobStatus,
    MemoryPlanStatus,
    OutputStatus,
    ProgressStatus,
)
from finetune_api.times import humanize_eta

MAX_BODY_BYTES = 64 * 1024


def job_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    return hmac.new(key, f"{namespace}/{name}/{uid}".encode(), hashlib.sha256).hexdigest()


def token_valid(key: bytes, namespace: str, name: str, uid: str, presented: str) -> bool:
    """Constant-time comparison, so response timing reveals nothing about the expected token."""
    return hmac.compare_digest(job_token(key, namespace, name, uid).encode(), presented.strip().encode())


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def significant(value: float | None, digits: int = 4) -> float | None:
    """`value` to `digits` significant digits (`kubectl get ftj` prints the number as stored)."""
    return None if value is None else float(f"{value:.{digits}g}")


def _clean_metrics(metrics: dict[str, float] | None) -> dict[str, float] | None:
    if not metrics:
        return None
    clean = {k[:128]: float(v) for k, v in metrics.items() if math.isfinite(v)}
    return clean or None


def apply_report(status: FineTuneJobStatus, report: ProgressReport) -> FineTuneJobStatus:
    """Fold a (merged) report into status.progress/metrics/checkpoints/output; pure and idempotent."""
    out = status.model_copy(deep=True)
    percent = _finite(report.percent)
    if percent is None and report.step is not None and report.total_steps:
        percent = 100.0 * report.step / report.total_steps
    eta_seconds = _finite(report.eta_seconds)
    progress = ProgressStatus(
        step=report.step,
        total_steps=report.total_steps,
        epoch=_finite(report.epoch),
        percent=None if percent is None else round(min(max(percent, 0.0), 100.0), 2),
        loss=significant(_finite(report.loss)),
        learning_rate=_finite(report.learning_rate),
        samples_per_second=_finite(report.samples_per_second),
        tokens_per_second=_finite(report.tokens_per_second),
        eta_seconds=None if eta_seconds is None else round(eta_seconds),
        eta=humanize_eta(eta_seconds),
        updated_at=report.updated_at,
    )
    if report.state == "finished":
        progress.eta_seconds, progress.eta = 0, "0s"
    if progress.model_dump(exclude_none=True):
        out.progress = progress
    if metrics := _clean_metrics(report.metrics):
        out.metrics = {**(out.metrics or {}), **metrics}
        if len(out.metrics) > MAX_METRICS:
            out.metrics = dict(list(out.metrics.items())[-MAX_METRICS:])
    if report.checkpoint is not None:
        cp = report.checkpoint
        prev = out.checkpoints or CheckpointsStatus()
        latest = CheckpointRef(step=cp.step, path=cp.path, time=cp.time)
        is_new = prev.latest is None or (prev.latest.step, prev.latest.path) != (cp.step, cp.path)
        count = max(prev.count, cp.count if cp.count is not None else prev.count + (1 if is_new else 0))
        out.checkpoints = CheckpointsStatus(latest=latest, count=count)
    if report.output is not None:
        o = report.output
        out.output = OutputStatus(path=o.path, metrics=_clean_metrics(o.metrics), step=o.step,
                                  model=o.model if o.model in ("best", "last") else None, reason=o.reason)
    if report.memory_plan is not None and report.memory_plan.sharding in ("none", "fsdp"):
        out.memory_plan = MemoryPlanStatus.model_validate(report.memory_plan.model_dump())
    return out
