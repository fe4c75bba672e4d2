"""DPO across processes through the real trainer (`python -m finetune_trainer.launch`, 2 gloo processes on CPU, a tiny
Llama): full fine-tuning keeps a frozen reference copy, sharded like the model under FSDP; FSDP follows DDP's losses
and rewards, and holds half the reference per process; a group SIGKILLed after a sharded checkpoint resumes and ends
on the uninterrupted run's losses and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.trainer import support

pytestmark = pytest.mark.slow
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _spec(model: Path, data: tuple[Path, Path], out: Path, sharding: str, every: int = 1000) -> dict[str, Any]:
    return {
        "task": {"type": "dpo", "dpo": {"beta": 0.2}},
        "model": {"source": str(model)},
        "dataset": {"train": str(data[0]), "validation": str(data[1])},
        "hyperparameters": {"maxSteps": 8, "batchSize": 4, "gradientAccumulationSteps": 2, "learningRate": 5e-3,
                            "maxSeqLength": 48, "maxGradNorm": 0.5, "evalEverySteps": 4, "seed": 7},
        "checkpointing": {"everySteps": every, "everyEpoch": False, "keepLast": 10},
        "resources": {"workers": 2, "gpusPerWorker": 0, "sharding": sharding},
        "output": {"storage": str(out)},
        "tracking": {"tensorboard": False},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dpo-sharded-data")
    return (support.write_jsonl(tmp / "train.jsonl", support.preference_rows(32)),
            support.write_jsonl(tmp / "validation.jsonl", support.preference_rows(10, offset=32)))


@pytest.fixture(scope="module")
def runs(models: dict[str, Path], data: tuple[Path, Path],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dpo-sharded-runs")
    return {sharding: support.train_two_processes(_spec(models["llama"], data, tmp / sharding, sharding), tmp,
                                                  sharding) for sharding in ("none", "fsdp")}


def _curve(doc: dict[str, Any]) -> torch.Tensor:
    return torch.tensor([loss for _, loss in doc["lossCurve"]])


def test_fsdp_follows_ddp_with_a_sharded_reference_copy(runs: dict[str, dict[str, Any]]) -> None:
    ddp, fsdp = runs["none"], runs["fsdp"]
    assert len(fsdp["lossCurve"]) == 8
    torch.testing.assert_close(_curve(fsdp), _curve(ddp), **TOL)
    for name in ("evalLoss", "rewardAccuracy", "rewardMargin", "rewardChosen", "rewardRejected"):
        assert fsdp["metrics"][name] == pytest.approx(ddp["metrics"][name], rel=1e-4, abs=1e-6), name
    assert fsdp["metrics"]["rewardMargin"] > 0 and fsdp["lossCurve"][-1][1] < fsdp["lossCurve"][0][1]
    # The plan counts the frozen reference per device: a full copy under DDP, half of it under FSDP on 2 processes.
    reference = {k: runs[k]["memory"]["breakdown"]["reference"] for k in ("none", "fsdp")}
    assert reference["fsdp"] == pytest.approx(reference["none"] / 2, rel=1e-6) and reference["none"] > 0


def test_sigkill_then_resume_reaches_the_uninterrupted_losses(runs: dict[str, dict[str, Any]],
                                                              models: dict[str, Path], data: tuple[Path, Path],
                                                              tmp_path: Path, isolated: Path) -> None:
    out = tmp_path / "killed"
    spec = _spec(models["llama"], data, out, "fsdp", every=2)
    ckpts = out / "checkpoints"
    proc = support.launch_two_processes(support.manifest(tmp_path / "killed.yaml", spec, name="killed"), tmp_path,
                                          "killed")
    try:
        support.wait_for(lambda: any(s >= 4 for s in support.complete_steps(ckpts)), 600,
                         "a sharded checkpoint at step 4 or later", proc, tmp_path / "killed.log", interval=0.05)
    finally:  # SIGKILL the launcher and both workers: no handler runs, nothing is flushed
        group = psutil.Process(proc.pid)
        for p in [*group.children(recursive=True), group]:
            p.kill()
        proc.wait(timeout=60)
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    assert (ckpts / "checkpoint-4" / ".metadata").exists()  # sharded
    resumed = support.train_two_processes(spec, tmp_path, "killed")
    assert resumed["resumedFrom"] is not None and resumed["resumedFrom"] >= 4
    torch.testing.assert_close(_curve(resumed), _curve(runs["fsdp"]), **TOL)
    for name, value in runs["fsdp"]["metrics"].items():
        assert resumed["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
