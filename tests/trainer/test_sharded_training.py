"""Sharded training through the real trainer: FineTuneJob manifests run by `python -m finetune_trainer.launch`
(torchrun) with 2 gloo processes on CPU, one thread each, on a tiny Llama built from a config and saved with
save_pretrained.

FSDP2 follows DDP's loss step for step (gradient accumulation 2, clipping), full and LoRA (with activation
checkpointing), and each rank holds half the training state (measured by the trainer from its live tensors, reported
in metrics.json); activation checkpointing keeps fewer activations (measured the same way); a group SIGKILLed mid-run
resumes from its sharded checkpoint, is stopped by SIGTERM (a sharded checkpoint, exit 75), resumes again and ends
at the uninterrupted run's loss, and one process resumes from the two processes' shards; with `selectBest` the best
sharded checkpoint is kept beside `keepLast` and its weights, read back by every rank, become the output, and the
metric history survives the sharded saves and resumes; the output is a normal save_pretrained folder (gathered
weights, or the adapter and a merged model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from finetune_api.manifest import load_job
from finetune_trainer import ownership
from finetune_trainer.__main__ import main
from finetune_trainer.history import read_lines
from finetune_trainer.locations import Storage
from tests.trainer import support

pytestmark = pytest.mark.slow

LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                  "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _spec(model: Path, data: tuple[Path, Path], out: Path, sharding: str, *, method: dict[str, Any] | None = None,
          checkpointing: bool = False, every: int = 1000, steps: int = 12) -> dict[str, Any]:
    return {
        "task": {"type": "causal-lm"},
        "model": {"source": str(model)},
        # 17 validation examples: the ranks evaluate 2 and 1 batches of 8, so FSDP's evaluation runs in lockstep.
        "dataset": {"train": str(data[0]), "validation": str(data[1])},
        "method": method or {"type": "full"},
        "hyperparameters": {"maxSteps": steps, "batchSize": 4, "gradientAccumulationSteps": 2, "learningRate": 5e-3,
                            "maxSeqLength": 32, "maxGradNorm": 0.5, "evalEverySteps": 4, "seed": 7,
                            "activationCheckpointing": checkpointing},
        "checkpointing": {"everySteps": every, "everyEpoch": False, "keepLast": 10},
        "resources": {"workers": 2, "gpusPerWorker": 0, "sharding": sharding},
        "output": {"storage": str(out)},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sharded-data")
    return (support.write_jsonl(tmp / "train.jsonl", support.qa_rows(40)),
            support.write_jsonl(tmp / "validation.jsonl", support.qa_rows(17, offset=40)))


@pytest.fixture(scope="module")
def runs(models: dict[str, Path], data: tuple[Path, Path],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The comparison runs, same seed, data, batch and schedule: DDP and FSDP, full and LoRA. FSDP LoRA also
    checkpoints activations (both are meant to leave the losses as they are) and merges its adapter."""
    tmp = tmp_path_factory.mktemp("sharded-runs")
    setups = {"ddp-full": ("none", None, False), "fsdp-full": ("fsdp", None, False),
              "ddp-lora": ("none", LORA, False), "fsdp-lora": ("fsdp", LORA, True)}
    results = {}
    for name, (sharding, method, ac) in setups.items():
        spec = _spec(models["llama"], data, tmp / name, sharding, method=method, checkpointing=ac)
        spec["output"]["mergeAdapter"] = name == "fsdp-lora"  # merged into a fresh base: the sharded one cannot
        results[name] = {**support.train_two_processes(spec, tmp, name), "out": tmp / name}
    return results


def _curve(doc: dict[str, Any]) -> torch.Tensor:
    return torch.tensor([loss for _, loss in doc["lossCurve"]])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_follows_ddp_and_each_rank_holds_half_the_training_state(runs: dict[str, dict[str, Any]],
                                                                       method: str) -> None:
    ddp, fsdp = runs[f"ddp-{method}"], runs[f"fsdp-{method}"]
    assert ddp["memory"]["sharding"] == "none" and fsdp["memory"]["sharding"] == "fsdp"
    assert fsdp["memory"]["reason"] == "as requested"
    # Same seed and data, gradient accumulation 2, clipping at 0.5: the same trajectory within float noise, and the
    # same evaluation (FSDP's lockstep passes on the rank with fewer batches are not counted).
    assert len(fsdp["lossCurve"]) == 12
    torch.testing.assert_close(_curve(fsdp), _curve(ddp), **TOL)
    assert fsdp["lossCurve"][-1][1] < fsdp["lossCurve"][0][1]
    assert fsdp["metrics"]["evalLoss"] == pytest.approx(ddp["metrics"]["evalLoss"], rel=1e-4)
    for rank in (0, 1):  # measured by the trainer after its first step, from the tensors each rank holds
        d, f = ddp["memory"]["measuredPerRank"][rank], fsdp["memory"]["measuredPerRank"][rank]
        assert 0.45 <= f["total"] / d["total"] <= 0.6, (rank, f, d)
        assert f["optimizer"] < 0.6 * d["optimizer"] and f["gradients"] < 0.6 * d["gradients"]


def test_activation_checkpointing_keeps_the_loss_and_fewer_activations(runs: dict[str, dict[str, Any]]) -> None:
    """FSDP LoRA with activation checkpointing against DDP LoRA without: the same losses (above), and each rank keeps
    a fraction of the activations for the backward pass, measured by the trainer on its first micro-batch (the same
    batch in both runs), while the training state is FSDP's half."""
    plain, ac = runs["ddp-lora"], runs["fsdp-lora"]
    assert ac["metrics"]["evalLoss"] == pytest.approx(plain["metrics"]["evalLoss"], rel=1e-4)
    for rank in (0, 1):
        kept, all_ = ac["memory"]["measuredPerRank"][rank], plain["memory"]["measuredPerRank"][rank]
        assert kept["activations"] < 0.6 * all_["activations"], (kept, all_)


def test_plan_reported_before_training(runs: dict[str, dict[str, Any]]) -> None:
    """The plan is in the progress document (and so in status.memoryPlan) and in metrics.json."""
    doc = json.loads((runs["fsdp-full"]["out"] / "checkpoints" / "progress.json").read_text())
    assert doc["memoryPlan"]["sharding"] == "fsdp" and doc["memoryPlan"]["perDeviceBytes"] > 0
    plan = runs["fsdp-full"]["memory"]
    assert set(plan["breakdown"]) == {"parameters", "gradients", "optimizer", "activations", "working", "process"}
    # The estimate of the state is what the ranks hold (a few bytes of AdamW step counters aside).
    held = plan["measuredPerRank"][0]
    for part in ("parameters", "gradients", "optimizer"):
        assert plan["breakdown"][part] == pytest.approx(held[part], rel=0.05)


def test_sharded_output_is_a_normal_pretrained_folder(runs: dict[str, dict[str, Any]], data: tuple[Path, Path],
                                                      models: dict[str, Path]) -> None:
    """Gathered full weights (full fine-tuning), or the adapter plus a merged model (LoRA), load as any other."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs["fsdp-full"]["out"])
    x = tok(["question : what colour is the cat ? answer : the cat is red"], return_tensors="pt")["input_ids"]

    def loss(model: Any) -> float:
        with torch.no_grad():
            return float(model(input_ids=x, labels=x).loss)

    full_ddp = AutoModelForCausalLM.from_pretrained(runs["ddp-full"]["out"])
    full_fsdp = AutoModelForCausalLM.from_pretrained(runs["fsdp-full"]["out"])
    assert loss(full_fsdp) == pytest.approx(loss(full_ddp), rel=1e-4)
    lora_out = runs["fsdp-lora"]["out"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in lora_out.iterdir()}
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), lora_out)
    merged = AutoModelForCausalLM.from_pretrained(lora_out / "merged")
    ddp_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]),
                                         runs["ddp-lora"]["out"])
    assert loss(merged) == pytest.approx(loss(adapted), rel=1e-4)
    assert loss(adapted) == pytest.approx(loss(ddp_lora), rel=1e-4)
    assert loss(adapted) != pytest.approx(loss(AutoModelForCausalLM.from_pretrained(models["llama"])), rel=1e-3)


def _evaluations(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["evalLoss"]) for r in read_lines(out / "metrics.jsonl") if r["type"] == "eval"]


def test_sigkill_sigterm_and_resume_from_sharded_checkpoints_on_two_or_one_process(
        runs: dict[str, dict[str, Any]], models: dict[str, Path], data: tuple[Path, Path], tmp_path: Path,
        isolated: Path) -> None:
    """The uninterrupted run's evaluations fall (4, 8, 12): selectBest evalLoss *max* makes step 4 the best, so its
    checkpoint is pinned (keepLast 1) and its weights become the output."""
    reference = runs["fsdp-full"]
    evals = _evaluations(reference["out"])
    assert [s for s, _ in evals] == [4, 8, 12] and max(evals, key=lambda e: e[1])[0] == 4, evals
    out = tmp_path / "killed"
    spec = _spec(models["llama"], data, out, "fsdp", every=2)
    spec["checkpointing"].update(keepLast=1, selectBest={"metric": "evalLoss", "mode": "max"})
    ckpts = out / "checkpoints"
    job = support.manifest(tmp_path / "killed.yaml", spec, name="killed")
    proc = support.launch_two_processes(job, tmp_path, "killed")
    try:
        support.wait_for(lambda: any(s >= 4 for s in support.complete_steps(ckpts)), 600,
                         "a sharded checkpoint at step 4 or later", proc, tmp_path / "killed.log")
    finally:  # SIGKILL the launcher and both workers: no handler runs, nothing is flushed
        group = psutil.Process(proc.pid)
        for p in [*group.children(recursive=True), group]:
            p.kill()
        proc.wait(timeout=60)
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    steps = support.complete_steps(ckpts)
    assert 4 in steps and steps[-1] < 12
    assert sorted(f.name for f in (ckpts / "checkpoint-4").iterdir()) == [
        ".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "finetune-owner.json", "rng-0.pt", "rng-1.pt",
        "scheduler.pt", "trainer_state.json"]
    assert "finetune-owner.json" in json.loads((ckpts / "checkpoint-4" / "COMPLETE").read_text())["files"]
    at_4 = json.loads((ckpts / "checkpoint-4" / "trainer_state.json").read_text())["metrics"]["evalLoss"]

    # The same job on one process (no process group, no sharding; the process count is not part of what a job is)
    # resumes from the two ranks' shards: its best evaluation, at step 4, is theirs, and becomes its output.
    single = tmp_path / "single"
    shutil.copytree(ckpts / "checkpoint-4", single / "checkpoint-4")
    one_spec = {**spec, "checkpointing": {**spec["checkpointing"], "storage": str(single)},
                "resources": {"workers": 1, "gpusPerWorker": 0}, "output": {"storage": str(tmp_path / "one")}}
    one_job = support.manifest(tmp_path / "one.yaml", one_spec, name="killed")
    assert main([str(one_job), "--no-progress-bar"]) == 0  # in-process
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["resumedFrom"] == 4 and one["processes"] == 1 and one["output"]["step"] == 4
    assert one["metrics"]["evalLoss"] == pytest.approx(at_4, rel=1e-4)
    # Another job is refused those shards, by the record inside the sharded checkpoint (the check the trainer runs
    # before it writes anything).
    copied = tmp_path / "copied"
    shutil.copytree(ckpts / "checkpoint-4", copied / "checkpoint-4")
    other = ownership.for_job(load_job(support.manifest(tmp_path / "other.yaml", one_spec, name="other")), Path("."))
    refused = ownership.problem(Storage(str(copied), copied), *other, "checkpointing.storage")
    assert refused is not None and f"{copied}/checkpoint-4 holds the checkpoints or model of FineTuneJob killed" \
        in refused, refused

    # The same two-process job restarted resumes from its newest complete checkpoint; stopped by SIGTERM (what the
    # kubelet sends the launcher) once it has trained a step, every rank writes its shard and it exits 75.
    restart = support.launch_two_processes(job, tmp_path, "restarted")
    progress = ckpts / "progress.json"
    try:
        support.wait_for(lambda: progress.exists() and json.loads(progress.read_text()).get("step", 0) > steps[-1],
                         600, "a step after the resume", restart, tmp_path / "restarted.log")
        restart.terminate()
        assert restart.wait(timeout=120) == 75, support.tail(tmp_path / "restarted.log", 8000)
    finally:
        if restart.poll() is None:
            restart.kill()
    log = (tmp_path / "restarted.log").read_text()
    assert f"resuming from {ckpts / f'checkpoint-{steps[-1]}'}" in log
    stopped = support.complete_steps(ckpts)[-1]
    assert steps[-1] < stopped < 12 and f"stopped by signal; checkpoint at step {stopped} of 12 is complete" in log
    assert (ckpts / f"checkpoint-{stopped}" / "__1_0.distcp").exists()

    # Restarted once more, it ends where the uninterrupted run ended, step for step.
    resumed = support.train_two_processes(spec, tmp_path, "killed")
    assert resumed["resumedFrom"] == stopped
    torch.testing.assert_close(_curve(resumed), _curve(reference), **TOL)
    assert resumed["lastMetrics"]["evalLoss"] == pytest.approx(reference["metrics"]["evalLoss"], rel=1e-4)
    assert not list(ckpts.glob(".tmp-*"))
    # Its history came through the sharded checkpoints: every step and evaluation once, the uninterrupted values.
    history = read_lines(out / "metrics.jsonl")
    assert [r["step"] for r in history if r["type"] == "train"] == list(range(1, 13))
    assert [s for s, _ in _evaluations(out)] == [4, 8, 12]
    assert [v for _, v in _evaluations(out)] == pytest.approx([v for _, v in evals], rel=1e-4)
    # The best sharded checkpoint was kept beside the last one, and every rank read its shard of it back: the output
    # is step 4's weights, those the one process above wrote from the same checkpoint.
    assert support.complete_steps(ckpts) == [4, 12]
    assert (resumed["output"]["step"], resumed["output"]["model"]) == (4, "best")
    assert resumed["metrics"]["evalLoss"] == pytest.approx(at_4, rel=1e-6)
    from safetensors.torch import load_file

    best, from_one = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    last = load_file(str(reference["out"] / "model.safetensors"))
    assert set(best) == set(from_one) == set(last)
    assert all(torch.equal(best[k], from_one[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)
