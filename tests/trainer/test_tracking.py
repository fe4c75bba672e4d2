"""What a run leaves besides the model, from real trainer runs on tiny models: metrics.jsonl (every logged step and
every evaluation, no duplicates after a SIGKILL and a resume), loss.png, TensorBoard event files read back with
tensorboard's EventAccumulator, an MLflow run read back with MlflowClient from a real file store, the best checkpoint
kept and written as the model, early stopping at the evaluation the rule says, and the model card."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_trainer.__main__ import main
from finetune_trainer.history import read_lines
from tests.trainer import support

pytestmark = pytest.mark.slow

UID = "5d0c7a43-8f1e-4c2b-9a57-0c6f1e2d3b4a"


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def _steps(acc: Any, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def _mlflow_run(store: Path) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("tracking-tests")
    assert experiment is not None, "the experiment was not created"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _mlflow_env(store: Path) -> dict[str, str]:
    # MLflow 3 keeps its file store only on request (a database is its default); the client is the same.
    return {"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


def _mlflow_spec() -> dict[str, Any]:
    return {"mlflow": {"trackingUri": {"name": "mlflow", "key": "uri"}, "experiment": "tracking-tests"}}


# ------------------------------------------------------------------------------------------ best and early stop
@pytest.fixture(scope="module")
def stopped_run(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """MiniLM (it learns this data within a few steps, so its validation loss falls steadily), selectBest by
    evalLoss *max* (so the best is the first evaluation, an earlier step than the last) and early stopping whose
    minDelta no change can reach: evaluations at 4 (the first: an improvement), 8 and 12 (none), so
    training stops at 12 with patience 2. keepLast 1 and a checkpoint every 8 steps: checkpoint-4 exists only
    because its evaluation was the best."""
    tmp = tmp_path_factory.mktemp("stopped")
    train = support.write_jsonl(tmp / "train.jsonl", support.sentiment_rows(64))
    val = support.write_jsonl(tmp / "validation.jsonl", support.sentiment_rows(16, offset=500))
    out = tmp / "out"
    spec = {
        "task": {"type": "sequence-classification", "labels": ["negative", "positive"]},
        "model": {"source": str(models["minilm"])},
        "dataset": {"train": str(train), "validation": str(val)},
        "hyperparameters": {"maxSteps": 40, "batchSize": 8, "learningRate": 1e-4, "maxSeqLength": 32,
                            "evalEverySteps": 4},
        "checkpointing": {"everySteps": 8, "keepLast": 1, "selectBest": {"metric": "evalLoss", "mode": "max"}},
        "earlyStopping": {"patience": 2, "minDelta": 10.0},
        "output": {"storage": str(out)},
        "tracking": _mlflow_spec(),
    }
    job = support.manifest(tmp / "job.yaml", spec, name="sentiment-best")
    doc = yaml.safe_load(job.read_text())
    doc["metadata"].update(namespace="team-a", uid=UID)  # as the operator's ConfigMap has it
    job.write_text(yaml.safe_dump(doc))
    store = tmp / "mlruns"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # what the `isolated` fixture does, for the module
        for key, value in {**_mlflow_env(store), "FINETUNE_CACHE_DIR": str(tmp / "cache"),
                           "HF_DATASETS_CACHE": str(tmp / "hf"), "FINETUNE_THREADS": "1",
                           "FINETUNE_TERMINATION_LOG": str(tmp / "termination-log")}.items():
            mp.setenv(key, value)
        for var in ("FINETUNE_PVC_ROOT", "FINETUNE_PROGRESS_URL", "FINETUNE_METRICS_PORT", "RANK", "WORLD_SIZE"):
            mp.delenv(var, raising=False)
        with contextlib.redirect_stdout(printed):
            code = main([str(job), "--no-progress-bar"])
    assert code == 0, printed.getvalue()
    yield {"out": out, "store": store, "printed": printed.getvalue(), "source": str(models["minilm"]),
           "metrics": json.loads((out / "metrics.json").read_text()), "history": read_lines(out / "metrics.jsonl")}


def _expected_stop(values: list[tuple[int, float]], patience: int, min_delta: float, mode: str) -> tuple[int, int]:
    """(best step, stop step) by the rule, recomputed from the evaluations in metrics.jsonl."""
    best_step, best, bad = -1, None, 0
    for step, value in values:
        better = best is None or (value > best if mode == "max" else value < best)
        significant = best is None or (value > best + min_delta if mode == "max" else value < best - min_delta)
        if better:
            best_step, best = step, value
        bad = 0 if significant else bad + 1
        if bad >= patience:
            return best_step, step
    raise AssertionError(f"the rule does not stop on {values}")


def test_early_stop_at_the_expected_evaluation(stopped_run: dict[str, Any]) -> None:
    history, doc = stopped_run["history"], stopped_run["metrics"]
    evals = [(r["step"], r["evalLoss"]) for r in history if r["type"] == "eval"]
    assert [s for s, _ in evals] == [4, 8, 12]
    best_step, stop_step = _expected_stop(evals, patience=2, min_delta=10.0, mode="max")
    assert stop_step == 12
    assert doc["step"] == 12 and doc["totalSteps"] == 40, "trained past the early stop"
    assert max(r["step"] for r in history if r["type"] == "train") == 12
    out = doc["output"]
    assert (out["model"], out["step"], out["stoppedEarlyAt"], out["metric"], out["mode"]) == \
        ("best", best_step, 12, "evalLoss", "max")
    assert "training stopped early at step 12 of 40" in out["reason"]
    assert f"at step {best_step}" in out["reason"]


def test_best_checkpoint_is_kept_and_becomes_the_model(stopped_run: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    out, doc, history = stopped_run["out"], stopped_run["metrics"], stopped_run["history"]
    best_step = doc["output"]["step"]
    assert best_step < 12, "the best evaluation was the last: the test needs an earlier one"
    # keepLast 1 keeps the newest; the best is kept as well.
    assert support.complete_steps(out / "checkpoints") == sorted({best_step, 12})
    # The model's weights are the best checkpoint's, and the metrics are that evaluation's.
    best = load_file(str(out / "checkpoints" / f"checkpoint-{best_step}" / "model.safetensors"))
    model = load_file(str(out / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "checkpoint-12" / "model.safetensors"))
    assert set(best) <= set(model)
    assert all(model[k].equal(best[k]) for k in best)
    assert not all(model[k].equal(last[k]) for k in last)
    best_eval = next(r for r in history if r["type"] == "eval" and r["step"] == best_step)
    assert doc["metrics"]["evalLoss"] == pytest.approx(best_eval["evalLoss"])
    assert doc["lastMetrics"]["evalLoss"] == pytest.approx([r for r in history if r["type"] == "eval"][-1]["evalLoss"])
    assert sum(map(sum, doc["confusionMatrix"]["matrix"])) == 16


def test_history_has_every_step_and_evaluation_once(stopped_run: dict[str, Any]) -> None:
    history = stopped_run["history"]
    train = [r for r in history if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))  # 40 steps planned: every step is logged
    for r in train:
        assert r["loss"] > 0 and r["learningRate"] > 0 and r["samplesPerSecond"] > 0 and r["time"].endswith("Z")
    evals = [r for r in history if r["type"] == "eval"]
    assert all({"accuracy", "f1Macro", "evalLoss"} <= set(r) for r in evals)
    assert evals[0]["epoch"] == pytest.approx(0.5)  # step 4 of 8 batches per epoch


def test_loss_plot_is_a_png(stopped_run: dict[str, Any]) -> None:
    from PIL import Image

    with Image.open(stopped_run["out"] / "loss.png") as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 300
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "an empty canvas"


def test_tensorboard_events_match_the_history(stopped_run: dict[str, Any]) -> None:
    acc = _events(stopped_run["out"] / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learningRate", "eval/evalLoss", "eval/accuracy", "eval/f1Macro"} <= tags
    assert _steps(acc, "train/loss") == list(range(1, 13))
    assert _steps(acc, "eval/accuracy") == [4, 8, 12]
    history = stopped_run["history"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in history if r["type"] == "train"], rel=1e-6)


def test_mlflow_run_holds_params_metrics_and_artifacts(stopped_run: dict[str, Any]) -> None:
    client, run = _mlflow_run(stopped_run["store"])
    assert run.info.status == "FINISHED" and run.info.run_name == "sentiment-best"
    assert run.data.params["hyperparameters.learningRate"] == "0.0001"
    assert run.data.params["task"] == "sequence-classification"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/evalLoss")] == [4, 8, 12]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 13))
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "loss.png", "README.md"} <= artifacts


def test_model_card(stopped_run: dict[str, Any]) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(stopped_run["out"] / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-classification" and data["library_name"] == "transformers"
    assert "finetune-operator" in data["tags"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    doc = stopped_run["metrics"]
    assert results["evalLoss"] == pytest.approx(doc["metrics"]["evalLoss"], abs=1e-6)
    text = card.text
    for wanted in ("`team-a/sentiment-best`", f"uid `{UID}`",  # the FineTuneJob
                   "Labels, in index order: `negative`, `positive`",  # the task
                   "train.jsonl` | 64", "validation.jsonl` | 16",  # the data
                   "| `learningRate` | `0.0001` |", "| `evalEverySteps` | `4` |",  # hyperparameters
                   "| true \\ predicted | negative | positive |",  # the confusion matrix
                   f"weights of step {doc['output']['step']}", "training stopped early at step 12",
                   "of training time"):
        assert wanted in text, wanted
    assert f"Fine-tuned from `{stopped_run['source']}`" in text  # the base model (a local path here)


def test_console_summary(stopped_run: dict[str, Any]) -> None:
    printed = stopped_run["printed"]
    assert "finished sentiment-best: 12 of 40 steps" in printed
    assert f"model: step {stopped_run['metrics']['output']['step']}, best evalLoss" in printed
    for name in ("metrics.json", "metrics.jsonl", "loss.png", "README.md", "tensorboard/"):
        assert name in printed, name
    assert "TensorBoard: tensorboard --logdir" in printed and "MLflow: run " in printed
    assert "file://" not in printed, "the tracking URI (a secret) was printed"


# ------------------------------------------------------------------------------------------ SIGKILL and resume
def test_no_duplicates_after_sigkill_and_resume(models: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed with steps logged past its last checkpoint, the run resumes from that checkpoint: metrics.jsonl,
    TensorBoard and MLflow each end with every step once, and the best evaluation and the early-stopping count come
    back from the checkpoint (evaluations at 20, 40, 60, 80; a minDelta no change reaches: the stop is at 80)."""
    data = support.write_jsonl(tmp_path / "train.jsonl", support.qa_rows(64))
    out = tmp_path / "out"
    spec = {
        "task": {"type": "causal-lm"}, "model": {"source": str(models["gpt2"])},
        "dataset": {"train": str(data), "validationSplit": 0.25},
        "hyperparameters": {"maxSteps": 200, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 32,
                            "evalEverySteps": 20},
        "checkpointing": {"everySteps": 20, "everyEpoch": False, "keepLast": 1,
                          "selectBest": {"metric": "evalLoss", "mode": "max"}},
        "earlyStopping": {"patience": 3, "minDelta": 100.0},
        "output": {"storage": str(out)},
        "tracking": _mlflow_spec(),
    }
    job = support.manifest(tmp_path / "job.yaml", spec)
    store = tmp_path / "mlruns"
    env = support.trainer_env(tmp_path, **_mlflow_env(store))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading the store here
    log = tmp_path / "killed.log"
    history = out / "metrics.jsonl"

    def past_checkpoint() -> tuple[int, int] | None:
        done = support.complete_steps(out / "checkpoints")
        steps = [r["step"] for r in read_lines(history)] if history.exists() else []
        # After the first evaluation's checkpoint, two steps past the last one and not at a checkpoint step: the
        # next save is more than a step away when the kill lands.
        if done and done[-1] >= 20 and steps and steps[-1] >= done[-1] + 2 and steps[-1] % 20:
            return done[-1], steps[-1]
        return None

    proc = support.start_trainer([str(job)], env, log)
    try:
        # The run is short (early stopping after ~80 tiny steps, lines only every 20): checked every 50 ms.
        support.wait_for(past_checkpoint, 180, "steps logged past a checkpoint", proc, log, interval=0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = support.complete_steps(out / "checkpoints")[-1]
    before = read_lines(history)
    assert max(r["step"] for r in before) > killed_at, "nothing past the checkpoint to drop"
    assert not (out / "metrics.json").exists()

    log2 = tmp_path / "resumed.log"
    proc = support.start_trainer([str(job)], env, log2)
    assert proc.wait(timeout=300) == 0, support.tail(log2)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["resumedFrom"] == killed_at and doc["step"] == 80

    records = read_lines(history)
    train = [r["step"] for r in records if r["type"] == "train"]
    evals = [r["step"] for r in records if r["type"] == "eval"]
    assert train == list(range(1, 81))
    assert evals == [20, 40, 60, 80]
    # The lines up to the checkpoint are the killed run's own (kept, not recomputed).
    assert [r for r in records if r["step"] <= killed_at] == [r for r in before if r["step"] <= killed_at]
    # Early stopping counted the evaluations before the kill (from the checkpoint) and after it: the fourth stops.
    best_step, stop_step = _expected_stop([(r["step"], r["evalLoss"]) for r in records if r["type"] == "eval"],
                                          patience=3, min_delta=100.0, mode="max")
    assert (doc["output"]["step"], doc["output"]["stoppedEarlyAt"]) == (best_step, stop_step) == (best_step, 80)
    assert support.complete_steps(out / "checkpoints") == sorted({best_step, 80})

    acc = _events(out / "tensorboard")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert _steps(acc, "train/loss") == list(range(1, 81))
    assert _steps(acc, "eval/evalLoss") == [20, 40, 60, 80]

    client, run = _mlflow_run(store)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 81)), "MLflow holds a step twice or misses one"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/perplexity")) == [20, 40, 60, 80]
