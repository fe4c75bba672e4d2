"""The rules around a run, on their own (no training): which evaluation is best and when early stopping stops,
retention that keeps the best checkpoint, and metrics.jsonl brought back to a checkpoint's history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_api.spec import TASK_METRICS, FineTuneJobSpec
from finetune_trainer import tasks
from finetune_trainer.checkpoint import CheckpointManager, TrainState
from finetune_trainer.history import HISTORY_FILE, RunLog, log_every, read_lines
from finetune_trainer.locations import Storage
from finetune_trainer.selection import Selection
from finetune_trainer.tracking import scalars


def _observe(sel: Selection, values: list[float], every: int = 10) -> TrainState:
    state = TrainState()
    for i, value in enumerate(values, 1):
        state.step = i * every
        sel.observe(state, {"accuracy": value, "evalLoss": 1 - value}, {"confusionMatrix": {"at": state.step}})
        if sel.stopped(state):
            break
    return state


def test_early_stopping_counts_evaluations_without_an_improvement_over_min_delta() -> None:
    sel = Selection("accuracy", "max", patience=2, min_delta=0.01, model="best")
    # 0.80 best; 0.805 is better but by less than minDelta (best moves, the count goes on); 0.79 worse: stop.
    state = _observe(sel, [0.7, 0.8, 0.805, 0.79, 0.95])
    assert state.step == 40 and sel.stopped(state)
    assert state.selection is not None and state.selection["stoppedAt"] == 40
    assert sel.pinned(state) == 30  # the best checkpoint is the strict best, minDelta or not
    choice = sel.choose(state, total_steps=100, extras={})
    assert (choice.step, choice.model, choice.value) == (30, "best", 0.805)
    assert choice.extras == {"confusionMatrix": {"at": 30}} and choice.metrics["accuracy"] == 0.805
    assert "stopped early at step 40 of 100" in choice.reason and "in 2 evaluation(s)" in choice.reason


def test_an_improvement_resets_the_count_and_min_mode_prefers_lower() -> None:
    sel = Selection("evalLoss", "min", patience=2)
    state = _observe(sel, [0.5, 0.4, 0.7, 0.65, 0.9])  # evalLoss 0.5, 0.6 (1), 0.3 (reset), 0.35 (1), 0.1
    assert not sel.stopped(state) and sel.pinned(state) == 50
    strict = Selection("evalLoss", "min", patience=2)
    stopped = _observe(strict, [0.5, 0.4, 0.45, 0.9])  # 0.6, 0.55: stop before the fourth
    assert strict.stopped(stopped) and stopped.step == 30


def test_an_evaluation_is_observed_once() -> None:
    """A resumed run repeats the evaluation at its checkpoint's step: it must not count twice."""
    sel = Selection("accuracy", "max", patience=1)
    state = TrainState(step=10)
    sel.observe(state, {"accuracy": 0.9}, {})
    state.step = 20
    sel.observe(state, {"accuracy": 0.8}, {})
    assert sel.stopped(state)
    again = TrainState(step=10, selection=json.loads(json.dumps(state.selection)))
    again.selection["stoppedAt"] = None  # type: ignore[index]
    again.selection["withoutImprovement"] = 0  # type: ignore[index]
    again.selection["lastStep"] = 10  # type: ignore[index]
    sel.observe(again, {"accuracy": 0.1}, {})  # the repeat at step 10: ignored
    assert not sel.stopped(again) and again.selection["evaluations"] == 2  # type: ignore[index]


def test_last_output_names_the_best_step_and_a_changed_metric_starts_afresh() -> None:
    sel = Selection("accuracy", "max", model="last")
    state = _observe(sel, [0.9, 0.7])
    choice = sel.choose(state, total_steps=20, extras={"x": 1})
    assert (choice.step, choice.model) == (20, "last")
    assert "best accuracy 0.9 was at step 10 (kept in checkpoint-10)" in choice.reason
    kept = json.loads(json.dumps(state.selection))
    Selection("f1Macro", "max").restore(state)
    assert state.selection is None
    state.selection = kept
    Selection().restore(state)  # selectBest removed: the last step, without a "best None" in the reason
    assert state.selection is None and "best" not in Selection().choose(state, 20, {}).reason
    plain = Selection().choose(TrainState(step=7, metrics={"evalLoss": 1.0}), 7, {})
    assert (plain.step, plain.model, plain.reason) == (7, "last", "the weights after the last optimizer step (7)")


def test_selection_from_the_spec() -> None:
    base = {"task": {"type": "causal-lm"}, "model": {"source": "m"}, "dataset": {"train": "t", "validation": "v"},
            "hyperparameters": {"maxSteps": 10, "evalEverySteps": 2}, "output": {"storage": "o"}}
    select = {"checkpointing": {"selectBest": {"metric": "perplexity"}}, "earlyStopping": {"minDelta": 0.5}}
    sel = Selection.of(FineTuneJobSpec.model_validate({**base, **select}))
    assert (sel.metric, sel.mode, sel.patience, sel.min_delta, sel.model) == ("perplexity", "min", 3, 0.5, "best")
    assert Selection.of(FineTuneJobSpec.model_validate(base)).model == "last"


def test_retention_never_deletes_the_pinned_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(Storage("out", tmp_path), keep_last=1)
    for step in (10, 20, 30):
        manager.pinned = 10
        manager.save(step, lambda folder: (folder / "weights").write_bytes(b"w"))
    assert [c.step for c in manager.complete()] == [10, 30]
    manager.pinned = 30
    manager.save(40, lambda folder: (folder / "weights").write_bytes(b"w"))
    assert [c.step for c in manager.complete()] == [30, 40]
    # Deleted through a hidden name (a crash midway leaves a partial for the next start, not a damaged checkpoint).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40"]


def test_run_log_rewrites_the_file_to_the_checkpoints_history(tmp_path: Path) -> None:
    """What a killed process appended after its checkpoint (and a line it cut short) is gone on the restart; the
    steps trained again are appended once."""
    path = tmp_path / HISTORY_FILE
    kept = [{"type": "train", "step": s, "loss": 1.0 / s, "time": "2026-01-01T00:00:00Z"} for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*kept, {"type": "train", "step": 3}]) + '{"type": "tr')
    assert [r["step"] for r in read_lines(path)] == [1, 2, 3]  # the cut line is skipped when reading
    state = TrainState(step=2, history=[dict(r) for r in kept])
    log = RunLog(tmp_path)
    log.start(state, total_steps=5, resumed=True)
    assert read_lines(path) == kept and path.read_text().endswith("\n")
    for step, loss in ((3, 0.3), (4, 0.2)):
        state.step = step
        log.step(state, loss, {"epoch": 0.1 * step, "learning_rate": 1e-3})
    log.evaluation(state, {"evalLoss": 0.25}, epoch=0.4)
    log.evaluation(state, {"evalLoss": 0.25}, epoch=0.4)  # the same step again: not written twice
    assert [(r["type"], r["step"]) for r in read_lines(path)] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert read_lines(path) == state.history
    assert scalars(state.history[-1]) == {"eval/evalLoss": 0.25}
    assert scalars(state.history[-2]) == {"train/loss": 0.2, "train/learningRate": 1e-3}


def test_training_lines_are_bounded() -> None:
    assert log_every(120) == 1 and log_every(1000) == 1 and log_every(1001) == 2 and log_every(1_000_000) == 1000


@pytest.mark.parametrize("task", sorted(TASK_METRICS))
def test_the_api_names_the_metrics_each_task_reports(task: str) -> None:
    """selectBest is validated against finetune_api's table: the trainer's tasks must report exactly those (the
    task tests check the keys of real evaluations)."""
    assert task in tasks.TASKS
    assert set(tasks.TASKS[task].metric_names) | {"evalLoss"} >= set(TASK_METRICS[task])
