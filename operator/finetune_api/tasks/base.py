"""What an objective (`spec.task.type`) is to the API: its name, the data columns it reads, the metrics its
evaluation reports and their direction, the task settings it owns, its own rules, and which methods and sharding
modes it allows. `finetune_api.spec` generates the `type` enum, the column mapping, the CEL rules and the
descriptions from these definitions; the trainer's module of the same name implements the objective.

No torch here: the operator image has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_api.rules import Rule


@dataclass(frozen=True)
class Column:
    """A column role the objective reads (camelCase, as in `dataset.columns`)."""

    role: str
    default: str | None  # the column read when the role is not mapped; None: optional, read only when mapped
    description: str  # what it holds, for this objective
    replaces: tuple[str, ...] = ()  # roles that mapping this one switches off (their defaults are not read)


@dataclass(frozen=True)
class Metric:
    """A metric the evaluation reports (camelCase, as in status.metrics and metrics.json)."""

    name: str
    higher_is_better: bool


@dataclass(frozen=True)
class MetricVariant:
    """Another set of metrics when the task's settings say so (e.g. regression for a classifier)."""

    when: str  # in words, for messages: "numLabels 1"
    cel: str  # over `self.task`, for the API server
    check: Callable[[Any], bool]  # over the task settings, for Python
    metrics: tuple[Metric, ...]


@dataclass(frozen=True)
class Setting:
    """A field of `spec.task` that only this objective uses: (annotation, pydantic FieldInfo)."""

    name: str  # snake_case attribute; camelCase on the wire
    annotation: Any
    field: Any  # pydantic.Field(...), default None: absent for every other objective


@dataclass(frozen=True)
class TaskDefinition:
    """One objective, as the API knows it."""

    name: str  # spec.task.type
    summary: str  # one line for `kubectl explain`: what it learns from what
    columns: tuple[Column, ...]
    metrics: tuple[Metric, ...]  # in the order they are shown; evalLoss included where reported
    variants: tuple[MetricVariant, ...] = ()
    settings: tuple[Setting, ...] = ()
    task_rules: tuple[Rule, ...] = ()  # over `spec.task`, checked only when the type is this one
    spec_rules: tuple[Rule, ...] = ()  # over the whole spec, checked only when the type is this one
    methods: tuple[str, ...] = ("full", "lora")
    no_fsdp: str | None = None  # why resources.sharding fsdp is not available (None: it is)
    rejects_over_long: bool = False  # examples longer than maxSeqLength are never truncated (dataset.overLong)
    logits: str = "tokens"  # for the memory plan: every input token over the vocabulary (tokens), every target token
    #                         (decoder), or one row of a small head per example (head)
    head_width: Callable[[Any], int] | None = None  # the head's outputs for these task settings (logits head)
    position: int = 100  # order in enums and messages

    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def all_metrics(self) -> tuple[Metric, ...]:
        return self.metrics + tuple(m for v in self.variants for m in v.metrics)

    def metrics_of(self, task: Any) -> tuple[str, ...]:
        """The metrics reported for these task settings (a variant's, when its condition holds)."""
        for variant in self.variants:
            if variant.check(task):
                return tuple(m.name for m in variant.metrics)
        return self.metric_names()
