"""The progress report: what the trainer's rank 0 POSTs to the operator, serves at GET /progress and writes to
progress.json, and where it POSTs it.

The trainer builds a `ProgressReport` and sends `report.wire()`; the operator validates the body with the same model
(unknown keys are ignored, so a newer trainer may say more) and folds it into the FineTuneJob's status. Every key is
optional and absent keys are omitted on the wire.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

PROGRESS_ROUTE = "/v1/progress/{namespace}/{name}"  # the operator's endpoint, below its progress base URL
MAX_METRICS = 64


def progress_path(namespace: str, name: str) -> str:
    """The path a job's trainer POSTs its reports to."""
    return PROGRESS_ROUTE.format(namespace=namespace, name=name)


class _Report(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class CheckpointReport(_Report):
    """The latest complete checkpoint."""

    step: int = Field(ge=0)
    path: str = Field(min_length=1, max_length=2048)
    time: str | None = Field(default=None, max_length=64)
    count: int | None = Field(default=None, ge=0)


class OutputReport(_Report):
    """The final model, once written: where, its metrics, which step's weights and why."""

    path: str = Field(min_length=1, max_length=2048)
    metrics: dict[str, float] | None = None
    step: int | None = Field(default=None, ge=0)
    model: str | None = Field(default=None, max_length=16)  # "best" | "last"
    reason: str | None = Field(default=None, max_length=1024)


class MemoryPlanReport(_Report):
    """The memory plan the trainer chose before training: the sharding and its estimated bytes per device."""

    sharding: str = Field(min_length=1, max_length=16)  # "none" | "fsdp", as `resources.sharding` resolved
    reason: str = Field(max_length=512)  # why (what `auto` decided, or "as requested")
    per_device_bytes: int = Field(ge=0)  # estimated peak of the training state and activations on one device
    device_bytes: int = Field(ge=0)  # the memory of one device (one process's share on CPU)
    breakdown: dict[str, int] | None = Field(default=None, max_length=8)  # parameters, gradients, optimizer, ...


class ProgressReport(_Report):
    """One progress report (camelCase on the wire)."""

    state: str | None = Field(default=None, max_length=32)  # "running" | "finished"; others are tolerated
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    percent: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = Field(default=None, ge=0)
    tokens_per_second: float | None = Field(default=None, ge=0)
    eta_seconds: int | float | None = Field(default=None, ge=0)
    updated_at: str | None = Field(default=None, max_length=64)
    metrics: dict[str, float] | None = None
    checkpoint: CheckpointReport | None = None
    output: OutputReport | None = None
    memory_plan: MemoryPlanReport | None = None

    @field_validator("metrics")
    @classmethod
    def _few_metrics(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_METRICS:
            raise ValueError(f"at most {MAX_METRICS} metrics")
        return v

    def wire(self) -> dict[str, Any]:
        """The JSON body: camelCase keys, absent values left out."""
        return self.model_dump(by_alias=True, exclude_none=True)


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
