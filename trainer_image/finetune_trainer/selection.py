"""Which weights become the model: the best evaluation by `checkpointing.selectBest`, early stopping by
`earlyStopping`, and the choice (`output.model`) with the reason that status and metrics.json show.

The selection's state lives in the training state (`TrainState.selection`), so every checkpoint carries the best
evaluation so far and the count of evaluations without improvement: both survive a resume. An evaluation that
improves the metric is checkpointed at once, and that checkpoint is pinned: retention (`keepLast`) never deletes it.
An evaluation is observed once: the one a resumed run repeats at its checkpoint's step changes nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from finetune_api.spec import FineTuneJobSpec, metric_mode, output_model
from finetune_trainer.checkpoint import Checkpointer, TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The weights written as the model: which step, chosen how (best or last), why, and their metrics."""

    step: int
    model: str  # "best" | "last"
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    mode: str | None = None
    value: float | None = None
    stopped_early_at: int | None = None

    def wire(self) -> dict[str, Any]:
        """metrics.json's `output` section."""
        doc: dict[str, Any] = {"step": self.step, "model": self.model, "reason": self.reason}
        if self.metric is not None:
            doc.update(metric=self.metric, mode=self.mode, value=self.value)
        doc["stoppedEarlyAt"] = self.stopped_early_at
        return doc


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class Selection:
    """Keeps the best evaluation, counts evaluations without improvement, and chooses the output's weights."""

    def __init__(self, metric: str | None = None, mode: str = "min", patience: int | None = None,
                 min_delta: float = 0.0, model: str = "last") -> None:
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = patience, min_delta
        self.model = model  # output.model, resolved

    @classmethod
    def of(cls, spec: FineTuneJobSpec) -> Selection:
        select, early = spec.checkpointing.select_best, spec.early_stopping
        if select is None:
            return cls(model=output_model(spec))
        return cls(select.metric, metric_mode(select), early.patience if early else None,
                   early.min_delta if early else 0.0, output_model(spec))

    # ---------------------------------------------------------------------------------------------------- state
    def restore(self, state: TrainState) -> None:
        """Check the state's selection against the spec (checkpointing is editable between restarts)."""
        sel = state.selection
        if sel and not self.metric:
            log.warning("checkpointing.selectBest was removed since the checkpoint: no best evaluation is kept")
            state.selection = None
        elif sel and (sel.get("metric"), sel.get("mode")) != (self.metric, self.mode):
            log.warning("checkpointing.selectBest changed from %s (%s) to %s (%s) since the checkpoint: the best "
                        "evaluation is chosen afresh from here on", sel.get("metric"), sel.get("mode"), self.metric,
                        self.mode)
            state.selection = None

    def _state(self, state: TrainState) -> dict[str, Any]:
        if state.selection is None:
            state.selection = {"metric": self.metric, "mode": self.mode, "best": None, "evaluations": 0,
                               "lastStep": -1, "withoutImprovement": 0, "stoppedAt": None}
        return state.selection

    def _better(self, value: float, than: float, by: float = 0.0) -> bool:
        return value < than - by if self.mode == "min" else value > than + by

    def observe(self, state: TrainState, metrics: dict[str, float], extras: dict[str, Any]) -> None:
        """One evaluation at state.step."""
        if self.metric is None:
            return
        sel = self._state(state)
        if state.step <= sel["lastStep"]:
            return  # already observed (a resumed run repeats the evaluation at its checkpoint's step)
        sel["lastStep"] = state.step
        sel["evaluations"] += 1
        value = metrics.get(self.metric)
        best = sel["best"]
        if value is None or not math.isfinite(value):
            log.warning("evaluation at step %d: %s is %s; it counts as no improvement", state.step, self.metric,
                        value)
            better = significant = False
        else:
            better = best is None or self._better(value, best["value"])
            significant = best is None or self._better(value, best["value"], self.min_delta)
        if better:
            sel["best"] = {"step": state.step, "value": value, "metrics": dict(metrics), "extras": extras}
            log.info("new best %s %s at step %d", self.metric, _fmt(value), state.step)  # type: ignore[arg-type]
        if self.patience is None:
            return
        sel["withoutImprovement"] = 0 if significant else sel["withoutImprovement"] + 1
        if sel["withoutImprovement"] >= self.patience and sel["stoppedAt"] is None:
            sel["stoppedAt"] = state.step
            log.info("early stopping at step %d: %s has not improved by more than %s in %d evaluation(s)",
                     state.step, self.metric, self.min_delta, self.patience)

    def improved_at(self, state: TrainState) -> bool:
        """Whether the evaluation at state.step was the best so far (its checkpoint is then written at once)."""
        best = (state.selection or {}).get("best")
        return best is not None and best["step"] == state.step

    def stopped(self, state: TrainState) -> bool:
        """Whether early stopping ended training (at or before state.step)."""
        return (state.selection or {}).get("stoppedAt") is not None

    def pinned(self, state: TrainState) -> int | None:
        """The step of the best checkpoint, which retention keeps."""
        best = (state.selection or {}).get("best")
        return int(best["step"]) if best else None

    # --------------------------------------------------------------------------------------------------- choice
    def choose(self, state: TrainState, total_steps: int, extras: dict[str, Any]) -> Choice:
        """The weights to write: the best evaluation's (output.model best) or the last step's. `extras` are the
        last evaluation's (the confusion matrix)."""
        sel = state.selection or {}
        best, stopped = sel.get("best"), sel.get("stoppedAt")
        early = ""
        if stopped is not None:
            early = (f"; training stopped early at step {stopped} of {total_steps}: {self.metric} did not improve by "
                     f"more than {_fmt(self.min_delta)} in {self.patience} evaluation(s)")
        common = {"metric": self.metric, "mode": self.mode if self.metric else None, "stopped_early_at": stopped}
        if self.model == "best" and best is not None:
            reason = (f"best {self.metric} {_fmt(best['value'])} ({self.mode}) of {sel['evaluations']} "
                      f"evaluation(s), at step {best['step']}{early}")
            if best["step"] == state.step:
                return Choice(state.step, "best", reason, dict(state.metrics), extras, value=best["value"], **common)
            return Choice(int(best["step"]), "best", reason, dict(best["metrics"]), dict(best.get("extras") or {}),
                          value=best["value"], **common)
        reason = f"the weights after the last optimizer step ({state.step})"
        if best is not None:
            reason += f"; the best {self.metric} {_fmt(best['value'])} was at step {best['step']}"
            if best["step"] != state.step:
                reason += f" (kept in checkpoint-{best['step']})"
        value = state.metrics.get(self.metric) if self.metric else None
        return Choice(state.step, "last", reason + early, dict(state.metrics), extras, value=value, **common)


def load_chosen(choice: Choice, checkpointer: Checkpointer, last_step: int, last_metrics: dict[str, float],
                last_extras: dict[str, Any]) -> Choice:
    """Load the chosen checkpoint's trainable weights into the model (`Checkpointer.load_weights`: rank 0, which
    writes the output, or every rank of a sharded model). Every rank calls it and gets the same choice back. A
    checkpoint that cannot be read leaves the last step's weights, and the choice says so."""
    path = checkpointer.manager.path(choice.step)
    error = checkpointer.load_weights(choice.step)
    if error is not None:
        log.warning("cannot read the best checkpoint %s (%s): the last step's weights are written instead", path,
                    error)
        return Choice(last_step, "last", f"the best checkpoint (step {choice.step}) could not be read ({error}); the "
                      f"weights after the last optimizer step ({last_step}) were written", dict(last_metrics),
                      last_extras, choice.metric, choice.mode, last_metrics.get(choice.metric or ""),
                      choice.stopped_early_at)
    log.info("the model is checkpoint %s: %s", path, choice.reason)
    return choice
