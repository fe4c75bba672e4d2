"""causal-lm: supervised fine-tuning of a decoder on prompt/response pairs or chat messages."""

from __future__ import annotations

from finetune_api.tasks.base import Column, Metric, TaskDefinition

DEFINITION = TaskDefinition(
    name="causal-lm",
    summary="supervised fine-tuning on prompt/response pairs or chat messages; loss on responses only",
    position=1,
    columns=(
        Column("prompt", "prompt", "prompt"),
        Column("response", "response", "response the model learns"),
        Column("messages", None, "chat messages [{role, content}], rendered with the tokenizer's chat template; "
               "exclusive with prompt and response", replaces=("prompt", "response")),
    ),
    metrics=(Metric("evalLoss", False), Metric("perplexity", False)),
    rejects_over_long=True,
)
