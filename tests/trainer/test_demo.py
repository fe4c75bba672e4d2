"""The demo's pieces: the committed data is what the generator makes, staging lays out the PVC the manifest points
at, and the manifest trains from it (shortened here; the full demo is `make demo`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_trainer.__main__ import main
from tests.trainer import support

EXAMPLES = support.REPO / "examples"


def _load(path: Path, name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_committed_data(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(EXAMPLES / "data" / "make_sentiment.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("train.jsonl", "validation.jsonl"):
        made = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        committed = hashlib.sha256((EXAMPLES / "data" / "sentiment" / name).read_bytes()).hexdigest()
        assert made == committed, name
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4000 and len({r["text"] for r in rows}) == 4000
    assert {r["label"] for r in rows} == {"negative", "positive"}


def test_staged_demo_trains_from_pvc(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage_demo = _load(EXAMPLES / "stage_demo.py", "stage_demo")
    pvc = isolated / "pvc"
    stage_demo.stage(pvc, copy=False)
    assert (pvc / "models" / "all-MiniLM-L6-v2" / "config.json").exists()
    assert (pvc / "datasets" / "sentiment" / "train.jsonl").exists()
    doc = yaml.safe_load((EXAMPLES / "sentiment.yaml").read_text())
    doc["spec"]["hyperparameters"].update({"maxSteps": 3, "batchSize": 8})
    doc["spec"]["hyperparameters"].pop("epochs")
    doc["spec"]["dataset"]["maxSamples"] = 48
    job = isolated / "sentiment-short.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main([str(job), "--pvc-root", str(pvc), "--no-progress-bar"]) == 0
    out = pvc / "runs" / "sentiment-minilm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["trainExamples"] == 48
    assert "accuracy" in metrics["metrics"] and metrics["confusionMatrix"]["labels"] == ["negative", "positive"]
    # What `make demo` ends with besides the model: the summary, the plot, TensorBoard files and the model card.
    assert metrics["output"]["model"] == "best" and metrics["output"]["step"] == 3
    printed = capsys.readouterr().out
    assert "finished sentiment-minilm: 3 of 3 steps" in printed and "model: step 3, best f1Macro" in printed
    assert (out / "loss.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "# sentiment-minilm" in (out / "README.md").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # steps 1, 2, 3 and the final evaluation
