"""sequence-classification: text (or text pairs) to one of `labels`, or to a number (`numLabels: 1`, regression)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from finetune_api.rules import Rule, exactly_one
from finetune_api.tasks.base import Column, Metric, MetricVariant, Setting, TaskDefinition


def _unique(labels: list[str] | None) -> list[str] | None:
    # The CRD enforces the same through x-kubernetes-list-type: set.
    if labels is not None and len(set(labels)) != len(labels):
        raise ValueError("task.labels must be unique")
    return labels


REGRESSION_METRICS = ("evalLoss", "mse")  # numLabels 1

DEFINITION = TaskDefinition(
    name="sequence-classification",
    summary="text or text pairs to labels; numLabels 1 means regression with MSE",
    position=0,
    columns=(
        Column("text", "text", "input text"),
        Column("textPair", None, "optional second text (sentence pairs)"),
        Column("label", "label", "label or regression target"),
    ),
    metrics=(Metric("evalLoss", False), Metric("accuracy", True), Metric("f1Macro", True)),
    variants=(MetricVariant(when="numLabels 1", cel="has(self.task.numLabels) && self.task.numLabels == 1",
                            check=lambda task: task.num_labels == 1,
                            metrics=tuple(Metric(m, False) for m in REGRESSION_METRICS)),),
    settings=(
        Setting("labels", Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]] | None,
                                    AfterValidator(_unique)],
                Field(default=None, description="Label names for sequence-classification, in index order. Exclusive "
                      "with numLabels.", min_length=2, max_length=1000,
                      json_schema_extra={"x-kubernetes-list-type": "set"})),
        Setting("num_labels", int | None,
                Field(default=None, description="Number of classes for sequence-classification when labels are "
                      "integers 0..n-1; 1 means regression (float targets, MSE loss). Exclusive with labels.",
                      ge=1, le=10000)),
    ),
    logits="head",
    head_width=lambda t: len(t.labels) if t.labels else int(t.num_labels or 1),
    task_rules=(
        Rule(cel="has(self.labels) != has(self.numLabels)",
             message="sequence-classification needs exactly one of task.labels or task.numLabels",
             check=lambda t: exactly_one(t.labels, t.num_labels)),
    ),
)
