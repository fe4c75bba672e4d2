"""End to end per task, in-process through the same `main` the console scripts call: loss falls, metrics are
written, the saved model reloads and predicts."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_api.spec import TASK_METRICS
from finetune_api.tasks.classification import REGRESSION_METRICS
from finetune_trainer.__main__ import main
from tests.trainer import support


def _spec(task: dict[str, Any], model: Path, train: Path, validation: Path, out: Path, **hp: Any) -> dict[str, Any]:
    return {
        "task": task,
        "model": {"source": str(model)},
        "dataset": {"train": str(train), "validation": str(validation)},
        "hyperparameters": {"maxSteps": 12, "batchSize": 8, "learningRate": 5e-3, "maxSeqLength": 64,
                            "lrScheduler": {"type": "linear", "warmupRatio": 0.1}, **hp},
        "checkpointing": {"everySteps": 6, "keepLast": 1},
        "output": {"storage": str(out)},
    }


def _metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def _reports_the_api_metrics(doc: dict[str, Any], task: str, regression: bool = False) -> None:
    """The metrics an evaluation reports are those finetune_api lets checkpointing.selectBest choose from."""
    assert set(doc["metrics"]) - {"trainLoss"} == set(REGRESSION_METRICS if regression else TASK_METRICS[task])


def _loss_fell(doc: dict[str, Any]) -> None:
    curve = doc["lossCurve"]
    assert len(curve) >= 2, curve
    assert curve[-1][1] < curve[0][1], f"loss did not fall: {curve}"


def test_classification_minilm(isolated: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The real MiniLM with a fresh 2-label head: accuracy, macro-F1 and the confusion matrix."""
    train = support.write_jsonl(isolated / "data" / "train.jsonl", support.sentiment_rows(96))
    val = support.write_jsonl(isolated / "data" / "validation.jsonl", support.sentiment_rows(32, offset=1000))
    out = isolated / "out"
    spec = _spec({"type": "sequence-classification", "labels": ["negative", "positive"]}, models["minilm"], train,
                 val, out, learningRate=1e-4, maxSteps=12)
    assert main([str(support.manifest(isolated / "job.yaml", spec))]) == 0
    doc = _metrics(out)
    _loss_fell(doc)
    _reports_the_api_metrics(doc, "sequence-classification")
    assert doc["step"] == 12
    assert doc["metrics"]["accuracy"] >= 0.9
    assert 0.0 <= doc["metrics"]["f1Macro"] <= 1.0
    cm = doc["confusionMatrix"]
    assert cm["labels"] == ["negative", "positive"]
    assert sum(map(sum, cm["matrix"])) == 32
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion matrix" in printed

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    texts = [r["text"] for r in support.sentiment_rows(8, offset=2000)]
    with torch.no_grad():
        pred = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    gold = [r["label"] == "positive" for r in support.sentiment_rows(8, offset=2000)]
    assert sum(p == g for p, g in zip(pred, gold, strict=True)) >= 6


def test_regression_tiny_bert(isolated: Path, models: dict[str, Path]) -> None:
    """numLabels 1 is regression: float targets, MSE."""
    rows = [{"text": r["text"], "label": 1.0 if r["label"] == "positive" else -1.0}
            for r in support.sentiment_rows(64)]
    train = support.write_jsonl(isolated / "train.jsonl", rows)
    val = support.write_jsonl(isolated / "val.jsonl", rows[:16])
    out = isolated / "out"
    spec = _spec({"type": "sequence-classification", "numLabels": 1}, models["bert"], train, val, out,
                 maxSteps=40, learningRate=3e-3)
    assert main([str(support.manifest(isolated / "job.yaml", spec))]) == 0
    doc = _metrics(out)
    _loss_fell(doc)
    _reports_the_api_metrics(doc, "sequence-classification", regression=True)
    assert doc["metrics"]["mse"] < 0.5  # predicting the mean would give 1.0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_causal_lm_prompt_response(isolated: Path, models: dict[str, Path]) -> None:
    """Prompt tokens are masked; loss and perplexity are reported; the model reloads and generates."""
    train = support.write_jsonl(isolated / "train.jsonl", support.qa_rows(48))
    val = support.write_jsonl(isolated / "val.jsonl", support.qa_rows(12, offset=7))
    out = isolated / "out"
    spec = _spec({"type": "causal-lm"}, models["gpt2"], train, val, out, maxSteps=20, learningRate=1e-2)
    assert main([str(support.manifest(isolated / "job.yaml", spec))]) == 0
    doc = _metrics(out)
    _loss_fell(doc)
    _reports_the_api_metrics(doc, "causal-lm")
    m = doc["metrics"]
    assert m["perplexity"] == pytest.approx(float(torch.tensor(m["evalLoss"]).exp()), rel=1e-4)
    assert m["perplexity"] < 50

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("question : what colour is the cat ? answer :", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_causal_lm_messages_lora_merged(isolated: Path, models: dict[str, Path]) -> None:
    """Chat messages through the chat template with LoRA; the adapter and the merged model are written."""
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in support.qa_rows(40)]
    train = support.write_jsonl(isolated / "train.jsonl", rows)
    val = support.write_jsonl(isolated / "val.jsonl", rows[:8])
    out = isolated / "out"
    spec = _spec({"type": "causal-lm"}, models["gpt2"], train, val, out, maxSteps=12, learningRate=1e-2)
    spec["dataset"]["columns"] = {"messages": "messages"}
    spec["method"] = {"type": "lora", "lora": {"r": 4, "alpha": 8}}
    spec["output"]["mergeAdapter"] = True
    assert main([str(support.manifest(isolated / "job.yaml", spec))]) == 0
    _loss_fell(_metrics(out))
    assert (out / "adapter_config.json").exists()
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_seq2seq_t5_chrf(isolated: Path, models: dict[str, Path]) -> None:
    """Source prefix, loss and chrF from generated text; the model reloads and generates."""
    nums = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = [{"source": f"{nums[i % 10]} {nums[(i * 3) % 10]}", "target": f"{nums[i % 10]} {nums[(i * 3) % 10]}"}
            for i in range(48)]
    train = support.write_jsonl(isolated / "train.jsonl", rows)
    val = support.write_jsonl(isolated / "val.jsonl", rows[:10])
    out = isolated / "out"
    spec = _spec({"type": "seq2seq", "sourcePrefix": "repeat : "}, models["t5"], train, val, out, maxSteps=16,
                 learningRate=1e-2)
    assert main([str(support.manifest(isolated / "job.yaml", spec))]) == 0
    doc = _metrics(out)
    _loss_fell(doc)
    _reports_the_api_metrics(doc, "seq2seq")
    assert 0.0 <= doc["metrics"]["chrf"] <= 100.0
    assert doc["metrics"]["evalLoss"] > 0
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    gen = model.generate(**tok(["repeat : one two"], return_tensors="pt"), max_new_tokens=4)
    assert isinstance(tok.decode(gen[0], skip_special_tokens=True), str)


def test_each_objective_is_an_api_definition_and_a_trainer_module_of_the_same_name() -> None:
    """Adding an objective is adding two modules of one name: the API definition (no torch: the operator image has
    none) and the trainer module that reads it. (Here, not beside the layering tests: it imports the trainer.)"""
    from finetune_api.tasks import TASKS as DEFINITIONS
    from finetune_trainer.tasks import TASKS

    api_dir = support.REPO / "operator" / "finetune_api" / "tasks"
    trainer_dir = support.REPO / "trainer_image" / "finetune_trainer" / "tasks"
    api = {p.stem for p in api_dir.glob("*.py")} - {"__init__", "base"}
    trainer = {p.stem for p in trainer_dir.glob("*.py")} - {"__init__", "base"}
    assert api == trainer
    assert set(DEFINITIONS) == set(TASKS)
    for name, task in TASKS.items():
        module = task.__module__.rsplit(".", 1)[-1]
        assert module in api and importlib.import_module(f"finetune_api.tasks.{module}").DEFINITION.name == name
        assert DEFINITIONS[name] is importlib.import_module(f"finetune_api.tasks.{module}").DEFINITION
