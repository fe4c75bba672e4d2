"""The pre-flight (`--preflight`): the trainer's own checks and messages before any weights are loaded, its findings
as the termination message the operator reads, the token cache the training run then reads, a sample of data too
large to read whole, and the memory plan for the requested devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune_api import exitcodes
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import PreflightStatus
from finetune_trainer import memory, preflight, throughput
from finetune_trainer.__main__ import main
from tests.trainer import support

CLASSIFY = {"type": "sequence-classification", "labels": ["negative", "positive"]}


def _job(tmp: Path, model: Path, rows: list[dict[str, Any]] | str, task: dict[str, Any] | None = None,
         **extra: Any) -> Path:
    train = tmp / "data" / "train.jsonl"
    if isinstance(rows, str):
        train.parent.mkdir(parents=True, exist_ok=True)
        train.write_text(rows)
    else:
        support.write_jsonl(train, rows)
    spec: dict[str, Any] = {
        "task": task or CLASSIFY, "model": {"source": str(model)}, "dataset": {"train": str(train)},
        "hyperparameters": {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 16},
        "output": {"storage": str(tmp / "out")}, "resources": {"gpusPerWorker": 0, "memory": "8Gi"}, **extra,
    }
    return support.manifest(tmp / "job.yaml", spec)


def _preflight(path: Path, tmp: Path) -> tuple[int, str]:
    code = main([str(path), "--preflight", "--no-progress-bar"])
    log = tmp / "termination-log"
    return code, log.read_text() if log.exists() else ""


@pytest.mark.slow
def test_a_good_job_passes_and_the_training_run_reads_its_token_cache(isolated: Path, models: dict[str, Path],
                                                                      capfd: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rows = support.sentiment_rows(24)
    job = _job(isolated, models["bert"], rows)
    code, message = _preflight(job, isolated)
    assert code == exitcodes.OK, message
    found = PreflightStatus.model_validate_json(message)
    assert len(message.encode()) < 4096, "the kubelet keeps 4 KB of a termination message"
    assert (found.train.examples, found.train.checked, found.sampled) == (24, 24, False)
    assert 0 < found.train.longest <= 16 and found.train.tokens >= found.train.longest * 2
    assert (found.steps_per_epoch, found.total_steps) == (6, 2)
    plan = found.memory_plan
    assert plan.fits is True and plan.device_memory_from == "spec.resources.memory"
    assert plan.device_bytes == 8 * 2**30 and plan.breakdown is not None and plan.breakdown["process"] > 0
    assert found.estimate is not None and found.estimate.gpu_seconds == 0 and "measured fp32" in found.estimate.basis
    cache = Path(found.token_cache or "")
    assert [p.name.split("-")[0] for p in (cache).glob("*.npz")] == ["train"]
    capfd.readouterr()

    (isolated / "termination-log").unlink()
    # Another pod: its own caches (the datasets cache is per pod); only the checkpoint storage is shared.
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(isolated / "trainer-pod-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(isolated / "trainer-pod-hf"))
    assert main([str(job), "--no-progress-bar"]) == exitcodes.OK
    said = capfd.readouterr().err
    assert "using tokenised train from cache" in said, said[-3000:]
    done = json.loads((isolated / "out" / "metrics.json").read_text())
    assert done["memory"]["perDeviceBytes"] > 0


BAD = {
    "missing column": ([{"sentence": "the cat", "label": "positive"}], None, {}, exitcodes.DATA_ERROR,
                       ["train.jsonl", "'text'", "sentence"]),
    "label outside the set": ([*support.sentiment_rows(3), {"text": "the dog", "label": "neutral"}], None, {},
                              exitcodes.DATA_ERROR, ["train.jsonl, row 4", "'label'", "'neutral'"]),
    "over-long example": ([{"prompt": "the cat " * 20, "response": "yes"}], {"type": "causal-lm"}, {},
                          exitcodes.DATA_ERROR, ["train.jsonl, row 1", "longer than hyperparameters.maxSeqLength"]),
    "bad chat messages": ([{"messages": [{"role": "user", "content": "hello"}]}], {"type": "causal-lm"},
                          {"dataset": "messages"}, exitcodes.DATA_ERROR, ["row 1", "no assistant message"]),
    "empty split": ("", None, {}, exitcodes.DATA_ERROR, ["train", "empty"]),
    "tokenizer that cannot load": ([{"text": "the cat", "label": "positive"}], None, {"model": "missing"},
                                   exitcodes.CONFIG_ERROR, ["model.source", "cannot load the tokenizer"]),
    "memory plan that cannot fit": (support.sentiment_rows(8), None, {"gpu": "1Mi"}, exitcodes.CONFIG_ERROR,
                                    ["the training state would not fit", "GB usable"]),
    "a pod whose memory the process alone exceeds": (support.sentiment_rows(8), None, {"memory": "300Mi"},
                                                     exitcodes.CONFIG_ERROR,
                                                     ["the training process would not fit", "is the process itself",
                                                      "set spec.resources.memory to at least"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_failure_class_fails_the_preflight_with_the_trainers_code_and_message(
        isolated: Path, models: dict[str, Path], case: str) -> None:
    rows, task, how, code_expected, said = BAD[case]
    model = models["gpt2"] if task else models["bert"]
    extra: dict[str, Any] = {}
    if how.get("dataset") == "messages":
        extra["dataset"] = {"train": str(isolated / "data" / "train.jsonl"), "columns": {"messages": "messages"}}
    if how.get("model") == "missing":  # the model's files, with a tokenizer.json that is not one
        model = isolated / "broken-tokenizer"
        shutil.copytree(models["bert"], model)
        (model / "tokenizer.json").write_text("{not json")
    if how.get("memory"):
        extra["resources"] = {"gpusPerWorker": 0, "memory": how["memory"]}
    if how.get("gpu"):
        extra["resources"] = {"gpusPerWorker": 1}
        extra["preflight"] = {"gpuMemory": how["gpu"]}
    job = _job(isolated, model, rows, task, **extra)
    code, message = _preflight(job, isolated)
    assert code == code_expected, message
    assert all(part in message for part in said), message
    assert message.endswith("]\n") and f"[exit {code_expected}: " in message
    assert not (isolated / "out" / "metrics.json").exists()


def test_a_split_too_large_to_read_whole_is_checked_on_a_sample(isolated: Path, models: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_PREFLIGHT_MAX_EXAMPLES", "8")
    job = _job(isolated, models["bert"], support.sentiment_rows(40))
    code, message = _preflight(job, isolated)
    assert code == exitcodes.OK, message
    found = PreflightStatus.model_validate_json(message)
    assert (found.train.examples, found.train.checked, found.sampled, found.token_cache) == (40, 8, True, None)
    assert found.total_steps == 2 and found.steps_per_epoch == 10


def _spec(**resources: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "task": CLASSIFY, "model": {"source": "m"}, "dataset": {"train": "t.jsonl"},
        "hyperparameters": {"maxSteps": 1}, "output": {"storage": "o"}, "resources": resources})


def test_the_gpu_memory_comes_from_the_spec_a_node_label_or_the_product_name() -> None:
    assert preflight.device_memory(_spec(gpusPerWorker=1)) == (None, "unknown")
    assert preflight.device_memory(_spec(gpusPerWorker=1, nodeSelector={"nvidia.com/gpu.memory": "81920"})) == (
        81920 * 2**20, "nodeSelector nvidia.com/gpu.memory")
    assert preflight.device_memory(_spec(gpusPerWorker=1, nodeSelector={
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"})) == (
        80e9, "nodeSelector nvidia.com/gpu.product (80GB in its name)")
    with_spec = _spec(gpusPerWorker=1).model_copy(update={"preflight": _spec().preflight.model_copy(
        update={"gpu_memory": "24Gi"})})
    assert preflight.device_memory(with_spec) == (24 * 2**30, "spec.preflight.gpuMemory")
    assert preflight.device_memory(_spec(gpusPerWorker=0, memory="4Gi")) == (4 * 2**30, "spec.resources.memory")


def test_throughput_is_derived_from_the_gpu_type_and_says_so() -> None:
    flops = throughput.flops_per_token(1_000_000_000, 1.0, False)
    assert flops == 6e9
    rate = throughput.for_spec(_spec(gpusPerWorker=1, nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB"}),
                               flops)
    assert rate.tokens_per_second == pytest.approx(989e12 * 0.4 / 6e9)
    assert "H100" in rate.basis and "assumed 40%" in rate.basis
    est = throughput.estimate(train_tokens=1e6, eval_tokens=3e5, evaluations=1, tokens_per_second=1000, devices=2,
                              gpus=2)
    assert (est.wall_seconds, est.gpu_seconds) == (550, 1100)


def test_the_plan_uses_the_widest_real_batch_head_logits_and_the_process() -> None:
    """MiniLM-sized classifier, batch 32: maxSeqLength 128 with vocabulary logits (the estimate before) against the
    data's longest example (55 tokens) with a 2-label head, plus the process itself on CPU."""
    shape = memory.ModelShape(parameters=22_700_000, trainable=22_700_000, embedding=11_900_000,
                              largest_block=1_800_000, layers=6, hidden=384, intermediate=1536, vocab=30522)
    before = memory.estimate(memory.MemoryInputs(shape, "none", 1, 32, 128, "fp32", "cpu"))
    spec = _spec(gpusPerWorker=0)
    now = memory.for_job(spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(
        update={"batch_size": 32, "max_seq_length": 128})}), shape, 1, "fp32", "cpu", 8e9,
        memory.DataShape(longest=55), baseline=0.9e9)
    assert before.activations > 2.5e9, "vocabulary logits for every token of a classifier"
    assert now.estimate.activations < 0.6e9
    assert now.estimate.baseline == 0.9e9 and now.report().breakdown["process"] == 900_000_000  # type: ignore[index]


@pytest.mark.slow
def test_finetune_validate_data_runs_the_preflight_locally(isolated: Path, models: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_cli.main import main as cli

    good = _job(isolated, models["bert"], support.sentiment_rows(8))
    assert cli(["validate", "--data", str(good)]) == exitcodes.OK
    said = capsys.readouterr().out
    assert f"{good}: valid\n{good}: pre-flight\ntrain: 8 examples, " in said, said
    assert "memory plan: sharding none" in said and "; fits" in said

    bad = _job(isolated / "bad", models["bert"], [{"text": "the dog", "label": "neutral"}])
    assert cli(["validate", "--data", str(bad)]) == exitcodes.DATA_ERROR
    assert "train.jsonl, row 1: field 'label' has label 'neutral'" in capsys.readouterr().err
