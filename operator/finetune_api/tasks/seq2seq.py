"""seq2seq: translation or summarisation with an encoder-decoder on source/target pairs."""

from __future__ import annotations

from pydantic import Field

from finetune_api.tasks.base import Column, Metric, Setting, TaskDefinition

DEFINITION = TaskDefinition(
    name="seq2seq",
    summary="translation or summarisation on source/target pairs",
    position=2,
    columns=(Column("source", "source", "source text"), Column("target", "target", "target text")),
    metrics=(Metric("evalLoss", False), Metric("chrf", True)),
    settings=(
        Setting("source_prefix", str | None,
                Field(default=None, description="Text put before every source for seq2seq, e.g. 'translate English "
                      "to German: ' for T5.", max_length=512)),
    ),
    no_fsdp="its evaluation generates text, which sharded models do not do in lockstep",
    logits="decoder",
)
