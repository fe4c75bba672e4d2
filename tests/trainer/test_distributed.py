"""Two processes under torchrun on CPU (gloo): both train, rank 0 alone writes each checkpoint and the output, and a
restart of the group resumes from the same checkpoint on every rank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from finetune_api import exitcodes
from tests.trainer import support

pytestmark = pytest.mark.slow


def _torchrun(job: Path, env: dict[str, str], log: Path) -> int:
    with log.open("wb") as out:
        return subprocess.run([support.PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "finetune_trainer", str(job), "--no-progress-bar"], cwd=support.REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode


def test_torchrun_two_processes_gloo(models: dict[str, Path], tmp_path: Path) -> None:
    data = support.write_jsonl(tmp_path / "train.jsonl", support.qa_rows(48))
    out = tmp_path / "out"
    spec = {
        "task": {"type": "causal-lm"},
        "model": {"source": str(models["gpt2"])},
        "dataset": {"train": str(data), "validationSplit": 0.25},
        "hyperparameters": {"maxSteps": 9, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 32},
        "checkpointing": {"everySteps": 3, "everyEpoch": False, "keepLast": 5},
        "output": {"storage": str(out)},
    }
    job = support.manifest(tmp_path / "job.yaml", spec)
    env = support.trainer_env(tmp_path, FINETUNE_LOG_LEVEL="INFO")
    log = tmp_path / "torchrun.log"
    assert _torchrun(job, env, log) == 0, support.tail(log, 8000)
    text = log.read_text()
    ckpts = out / "checkpoints"
    assert support.complete_steps(ckpts) == [3, 6, 9]
    # Saved once per step (by rank 0), with both ranks' RNG states; no leftovers from a second writer.
    assert [text.count(f"checkpoint-{s} complete") for s in (3, 6, 9)] == [1, 1, 1]
    assert sorted(p.name for p in (ckpts / "checkpoint-6").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert not list(ckpts.glob(".tmp-*"))
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["processes"] == 2 and doc["step"] == 9 and "perplexity" in doc["metrics"]
    assert text.count("finished test-job") == 1  # only rank 0 prints the summary

    # The same job again, as if the group had died before its last checkpoint: both ranks resume from checkpoint 6.
    shutil.rmtree(ckpts / "checkpoint-9")
    log2 = tmp_path / "torchrun2.log"
    assert _torchrun(job, env, log2) == 0, support.tail(log2, 8000)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["resumedFrom"] == 6 and doc["step"] == 9


def test_launcher_keeps_the_workers_exit_code(models: dict[str, Path], tmp_path: Path) -> None:
    """torchrun alone exits 1 when a worker fails; `finetune_trainer.launch` passes the trainer's code on."""
    data = support.write_jsonl(tmp_path / "train.jsonl", [{"prompt": "question :", "response": 5}])
    spec = {
        "task": {"type": "causal-lm"},
        "model": {"source": str(models["gpt2"])},
        "dataset": {"train": str(data)},
        "hyperparameters": {"maxSteps": 2, "batchSize": 1},
        "output": {"storage": str(tmp_path / "out")},
    }
    job = support.manifest(tmp_path / "job.yaml", spec)
    termination = tmp_path / "termination-log"
    env = support.trainer_env(tmp_path, FINETUNE_TERMINATION_LOG=str(termination))
    done = subprocess.run([support.PYTHON, "-m", "finetune_trainer.launch", "--standalone", "--nproc_per_node", "2",
                           "-m", "finetune_trainer", str(job), "--no-progress-bar"], cwd=support.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == exitcodes.DATA_ERROR, done.stderr[-4000:]
    assert "row 1" in termination.read_text() and "'response'" in termination.read_text()


def test_a_worker_whose_peer_node_dies_exits_peer_lost(models: dict[str, Path], tmp_path: Path) -> None:
    """Two nodes (two launchers, as two pods run them); node 1 dies whole (a lost node: agent and worker killed). The
    survivor's collective fails at once on gloo: it must exit 76 (peer lost: not counted against backoffLimit, the
    operator restarts the group), not 1 (a crash of its own, counted)."""
    data = support.write_jsonl(tmp_path / "train.jsonl", support.qa_rows(64))
    spec = {
        "task": {"type": "causal-lm"},
        "model": {"source": str(models["gpt2"])},
        "dataset": {"train": str(data)},
        "hyperparameters": {"maxSteps": 1_000_000, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 32},
        "checkpointing": {"everySteps": 1000, "everyEpoch": False},
        "output": {"storage": str(tmp_path / "out")},
    }
    job = support.manifest(tmp_path / "job.yaml", spec)
    port = support.free_port()
    procs, logs = [], []
    for node in (0, 1):
        env = support.trainer_env(tmp_path, FINETUNE_LOG_LEVEL="INFO", FINETUNE_PROGRESS_INTERVAL="0.2",
                                  FINETUNE_TERMINATION_LOG=str(tmp_path / f"termination-{node}"))
        logs.append(tmp_path / f"node{node}.log")
        procs.append(support.start_trainer(
            ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
             f"--master_port={port}", "-m", "finetune_trainer", str(job)], env, logs[-1],
            module="finetune_trainer.launch"))
    try:
        def steps() -> int:
            done = re.findall(r"step (\d+)/1000000 ", logs[0].read_text())
            return int(done[-1]) if done else 0

        support.wait_for(lambda: steps() >= 5, 120, "both nodes training", procs[0], logs[0], interval=0.05)
        node1 = psutil.Process(procs[1].pid)
        for p in [node1, *node1.children(recursive=True)]:
            p.kill()
        code = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                for q in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
                    q.kill()
                p.wait()
    assert code == exitcodes.PEER_LOST, support.tail(logs[0], 6000)
    said = (tmp_path / "termination-0").read_text()
    assert "lost contact with another worker of the group" in said and "[exit 76:" in said
