"""The progress channel's pure half: per-job tokens, the trainer's report format, and folding reports into status.

Tokens are HMAC-SHA256(operator key, "<namespace>/<name>/<uid>"): the operator verifies a push by recomputing, so it
keeps no token state, survives restarts, and a token opens exactly one job (a recreated job has a new uid).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from finetune_api.status import CheckpointRef, CheckpointsStatus, FineTuneJobStatus, OutputStatus, ProgressStatus

MAX_BODY_BYTES = 64 * 1024
MAX_METRICS = 64


def job_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    return hmac.new(key, f"{namespace}/{name}/{uid}".encode(), hashlib.sha256).hexdigest()


def token_valid(key: bytes, namespace: str, name: str, uid: str, presented: str) -> bool:
    """Constant-time comparison, so response timing reveals nothing about the expected token."""
    return hmac.compare_digest(job_token(key, namespace, name, uid).encode(), presented.strip().encode())


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class _Report(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class CheckpointReport(_Report):
    step: int = Field(ge=0)
    path: str = Field(min_length=1, max_length=2048)
    time: str | None = Field(default=None, max_length=64)
    count: int | None = Field(default=None, ge=0)


class OutputReport(_Report):
    path: str = Field(min_length=1, max_length=2048)
    metrics: dict[str, float] | None = None


class ProgressReport(_Report):
    """What the trainer POSTs (every key optional; unknown keys ignored so the trainer can grow the format)."""

    state: str | None = Field(default=None, max_length=32)  # "running" | "finished"; others are tolerated
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    percent: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = Field(default=None, ge=0)
    tokens_per_second: float | None = Field(default=None, ge=0)
    eta_seconds: float | None = Field(default=None, ge=0)
    updated_at: str | None = Field(default=None, max_length=64)
    metrics: dict[str, float] | None = None
    checkpoint: CheckpointReport | None = None
    output: OutputReport | None = None

    @field_validator("metrics")
    @classmethod
    def _few_metrics(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_METRICS:
            raise ValueError(f"at most {MAX_METRICS} metrics")
        return v


def merge_reports(old: ProgressReport | None, new: ProgressReport) -> ProgressReport:
    """Later keys win; metrics accumulate, so an eval metric reported once is not lost by the next train report."""
    if old is None:
        return new
    merged: dict[str, Any] = old.model_dump(exclude_none=True)
    incoming = new.model_dump(exclude_none=True)
    metrics = {**(merged.get("metrics") or {}), **(incoming.get("metrics") or {})}
    merged.update(incoming)
    if metrics:
        merged["metrics"] = dict(list(metrics.items())[-MAX_METRICS:])
    return ProgressReport.model_validate(merged)


def humanize_eta(seconds: float | None) -> str | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    s = round(seconds)
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


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
        loss=_finite(report.loss),
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
        out.output = OutputStatus(path=report.output.path, metrics=_clean_metrics(report.output.metrics))
    return out
