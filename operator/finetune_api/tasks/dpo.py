"""dpo: direct preference optimisation of a decoder on preference pairs (prompt, chosen answer, rejected answer).

The policy learns to give the chosen answer a higher log-probability than the rejected one, relative to a frozen
reference (the starting model): r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over the answer's tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune_api.rules import Rule, SpecModel
from finetune_api.tasks.base import Column, Metric, Setting, TaskDefinition

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DpoSpec(SpecModel):
    """Direct preference optimisation: the loss, its strength and the reference model."""

    beta: float = Field(default=0.1, description="Strength of the pull towards the reference model: rewards are "
                        "beta x the log-probability ratio of policy and reference. Lower lets the policy move "
                        "further from the reference.", gt=0, le=100)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        default="sigmoid", description="sigmoid: -log sigmoid(reward margin), the DPO paper's loss; ipo: the "
        "squared distance of the log-ratio margin from 1/(2 beta), averaged per token (IPO: does not push the "
        "margin to infinity on deterministic preferences); hinge: max(0, 1 - reward margin) (SLiC).")
    # Below 0.5 as a rule, not as an exclusive maximum: the API server checks an integral value (the default 0)
    # against the bound truncated to an integer, and would refuse 0 < 0.
    label_smoothing: float = Field(default=0.0, description="Assumed share of pairs whose preference is flipped "
                                   "(conservative DPO), below 0.5; sigmoid loss only.", ge=0)
    max_prompt_length: int | None = Field(
        default=None, description="Longest prompt in tokens: a longer prompt loses its beginning (the end, next to "
        "the answers, is kept). Must be below hyperparameters.maxSeqLength, which limits prompt plus answer. Unset: "
        "no limit of its own.", ge=1, le=131072)
    precompute_reference_log_probs: bool = Field(
        default=False, description="Compute the reference model's log-probabilities of every pair once, before "
        "training, with the starting weights, instead of a reference forward pass in every step: no frozen copy of "
        "the model is kept during training (full fine-tuning), and each step is about a third cheaper; costs one "
        "forward pass over the data at every start.")

    rules = (
        Rule(cel="self.labelSmoothing < 0.5", message="task.dpo.labelSmoothing must be below 0.5 (with half the pairs "
             "flipped there is no preference left to learn)", check=lambda d: d.label_smoothing < 0.5),
        Rule(cel="self.labelSmoothing == 0.0 || self.lossType == 'sigmoid'",
             message="task.dpo.labelSmoothing applies only to lossType sigmoid",
             check=lambda d: d.label_smoothing == 0.0 or d.loss_type == "sigmoid"),
    )


def _prompt_fits(spec: object) -> bool:
    dpo = spec.task.dpo  # type: ignore[attr-defined]
    limit = dpo.max_prompt_length if dpo is not None else None
    return limit is None or limit < spec.hyperparameters.max_seq_length  # type: ignore[attr-defined]


DEFINITION = TaskDefinition(
    name="dpo",
    summary="direct preference optimisation of a decoder on prompt/chosen/rejected pairs, usually after causal-lm; "
    "settings in task.dpo",
    position=3,
    columns=(
        Column("prompt", "prompt", "text or chat messages both answers follow (the hosted fine-tuning APIs' "
               "preference rows, input/preferred_output/non_preferred_output, are read as they are); a data set "
               "without this column has its prompt in chosen and rejected: their shared beginning"),
        Column("chosen", "chosen", "the preferred answer: text or assistant messages"),
        Column("rejected", "rejected", "the answer not preferred: text or assistant messages"),
    ),
    metrics=(Metric("evalLoss", False), Metric("rewardAccuracy", True), Metric("rewardMargin", True),
             Metric("rewardChosen", True), Metric("rewardRejected", False)),
    settings=(Setting("dpo", DpoSpec | None,
                      Field(default=None, description="DPO settings for type dpo; defaults apply when omitted.")),),
    spec_rules=(
        Rule(cel="!has(self.task.dpo) || !has(self.task.dpo.maxPromptLength) || "
             "self.task.dpo.maxPromptLength < self.hyperparameters.maxSeqLength",
             message="task.dpo.maxPromptLength must be below hyperparameters.maxSeqLength, which limits prompt plus "
             "answer", check=_prompt_fits),
    ),
    rejects_over_long=True,
)
