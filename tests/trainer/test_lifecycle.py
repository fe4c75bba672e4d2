"""The trainer as a real process: live /metrics and /progress, pushes with the bearer token, SIGTERM -> checkpoint
and exit 75, SIGKILL -> resume to the same end, damaged checkpoints skipped, storage failure -> 74 with the last
good checkpoint intact. Every wait polls with a deadline."""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from finetune_api import exitcodes
from finetune_trainer.__main__ import main
from tests.trainer import support

pytestmark = pytest.mark.slow


def _gpt2_spec(model: Path, data: Path, out: Path, max_steps: int, every: int, keep: int = 2,
               validation: bool = False) -> dict[str, Any]:
    ds: dict[str, Any] = {"train": str(data)}
    if validation:
        ds["validationSplit"] = 0.25
    return {
        "task": {"type": "causal-lm"},
        "model": {"source": str(model)},
        "dataset": ds,
        "hyperparameters": {"maxSteps": max_steps, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 32,
                            "evalEverySteps": every if validation else None},
        "checkpointing": {"everySteps": every, "keepLast": keep},
        "output": {"storage": str(out)},
    }


def _clean(spec: dict[str, Any]) -> dict[str, Any]:
    spec["hyperparameters"] = {k: v for k, v in spec["hyperparameters"].items() if v is not None}
    return spec


class PushSink:
    """A tiny HTTP server that records what the trainer POSTs."""

    def __init__(self) -> None:
        self.received: list[tuple[str | None, dict[str, Any]]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.received.append((self.headers.get("Authorization"), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/progress"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


@pytest.fixture(scope="module")
def live_run(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One long run, observed over HTTP while it trains, then stopped with SIGTERM."""
    tmp = tmp_path_factory.mktemp("live")
    data = support.write_jsonl(tmp / "train.jsonl", support.qa_rows(64))
    out = tmp / "out"
    job = support.manifest(tmp / "job.yaml", _clean(_gpt2_spec(models["gpt2"], data, out, 1_000_000, 25,
                                                               validation=True)))
    sink = PushSink()
    port = support.free_port()
    env = support.trainer_env(tmp, FINETUNE_PROGRESS_URL=sink.url, FINETUNE_PROGRESS_TOKEN="test-token",
                              FINETUNE_PROGRESS_INTERVAL="0.2", FINETUNE_GRACE_PERIOD="20",
                              FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"))
    log = tmp / "trainer.log"
    proc = support.start_trainer([str(job), "--metrics-port", str(port)], env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        progress = support.wait_for(
            lambda: (lambda t: json.loads(t) if t and json.loads(t).get("step", 0) >= 30 else None)(
                _get(base + "/progress")), 120, "/progress to show step 30", proc, log)
        metrics_text = support.wait_for(lambda: _get(base + "/metrics"), 10, "/metrics", proc, log)
        support.wait_for(lambda: any(b.get("checkpoint") for _, b in sink.received), 30,
                         "a push that carries a checkpoint", proc, log)
        seen_step = json.loads(_get(base + "/progress") or "{}").get("step", 0)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        yield {"tmp": tmp, "out": out, "progress": progress, "metrics": metrics_text, "sink": sink, "code": code,
               "seen_step": seen_step, "log": support.tail(log, 20000)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sink.close()


def test_progress_served_while_training(live_run: dict[str, Any]) -> None:
    doc = live_run["progress"]
    assert doc["state"] == "running"
    assert doc["totalSteps"] == 1_000_000 and doc["step"] >= 30
    for key in ("epoch", "percent", "loss", "learningRate", "samplesPerSecond", "tokensPerSecond", "etaSeconds",
                "updatedAt"):
        assert key in doc, key
    assert doc["updatedAt"].endswith("Z")


def test_prometheus_metrics_served(live_run: dict[str, Any]) -> None:
    text = live_run["metrics"]
    for name in ("finetune_trainer_step", "finetune_trainer_total_steps", "finetune_trainer_train_loss",
                 "finetune_trainer_learning_rate", "finetune_trainer_samples_per_second",
                 "finetune_trainer_eta_seconds"):
        assert f"\n{name} " in text or text.startswith(f"{name} "), name


def test_pushes_carry_bearer_token_and_contract(live_run: dict[str, Any]) -> None:
    received = live_run["sink"].received
    assert received
    assert {auth for auth, _ in received} == {"Bearer test-token"}
    bodies = [b for _, b in received]
    with_ckpt = [b for b in bodies if "checkpoint" in b]
    assert set(with_ckpt[-1]["checkpoint"]) == {"step", "path", "time", "count"}
    assert any("evalLoss" in b.get("metrics", {}) for b in bodies)
    assert all(b["state"] == "running" for b in bodies)  # interrupted, never "finished"


def test_sigterm_saves_checkpoint_and_exits_75(live_run: dict[str, Any]) -> None:
    assert live_run["code"] == exitcodes.INTERRUPTED, live_run["log"][-3000:]
    steps = support.complete_steps(live_run["out"] / "checkpoints")
    assert steps and steps[-1] >= live_run["seen_step"]
    assert not list((live_run["out"] / "checkpoints").glob(".tmp-*"))
    progress = json.loads((live_run["out"] / "checkpoints" / "progress.json").read_text())
    assert progress["checkpoint"]["step"] == steps[-1]
    last_push = live_run["sink"].received[-1][1]
    assert last_push["checkpoint"]["step"] == steps[-1]
    # The pod's termination message says where a restart resumes (not the log's last lines, the kubelet's fallback).
    assert (live_run["tmp"] / "termination-log").read_text() == (
        f"stopped by signal; checkpoint at step {steps[-1]} of 1000000 is complete, a restart resumes from it "
        "[exit 75: interrupted after saving a checkpoint (retried)]\n")


def test_sigterm_during_a_long_evaluation_checkpoints_at_once(models: dict[str, Path], tmp_path: Path,
                                                             isolated: Path) -> None:
    """An evaluation can outlast the grace period: the stop is honoured between evaluation batches, the step just
    trained is checkpointed and the trainer exits 75 long before the watchdog would have fired (without a checkpoint
    for that step)."""
    train = support.write_jsonl(tmp_path / "train.jsonl", support.qa_rows(64))
    validation = support.write_jsonl(tmp_path / "validation.jsonl", support.qa_rows(20_000, offset=64))
    out = tmp_path / "out"
    spec = _clean(_gpt2_spec(models["gpt2"], train, out, 1000, 5))
    spec["dataset"]["validation"] = str(validation)
    spec["hyperparameters"]["evalEverySteps"] = 5
    spec["checkpointing"]["everySteps"] = 1000  # no checkpoint at step 5 but the one the stop writes
    job = support.manifest(tmp_path / "job.yaml", spec)
    log = tmp_path / "trainer.log"
    grace = 60.0
    proc = support.start_trainer([str(job), "--no-progress-bar"],
                                 support.trainer_env(tmp_path, FINETUNE_GRACE_PERIOD=str(grace)), log)
    try:
        support.wait_for(lambda: "evaluating at step 5" in log.read_text(), 120, "the evaluation at step 5", proc,
                         log)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=grace + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = support.tail(log, 20000)
    assert code == exitcodes.INTERRUPTED, text
    assert "evaluation at step 5 stopped by signal" in text, text
    assert took < grace / 2, f"exit took {took:.1f}s: the watchdog, not the evaluation loop, ended the run"
    assert support.complete_steps(out / "checkpoints") == [5]


def test_resume_after_sigkill_reaches_the_same_end(models: dict[str, Path], tmp_path: Path, isolated: Path) -> None:
    data = support.write_jsonl(tmp_path / "train.jsonl", support.qa_rows(64))
    # Uninterrupted reference, in-process.
    ref_out = tmp_path / "ref"
    ref_job = support.manifest(tmp_path / "ref.yaml", _clean(_gpt2_spec(models["gpt2"], data, ref_out, 300, 10)))
    assert main([str(ref_job), "--no-progress-bar"]) == 0
    ref = json.loads((ref_out / "metrics.json").read_text())

    out = tmp_path / "killed"
    job = support.manifest(tmp_path / "job.yaml", _clean(_gpt2_spec(models["gpt2"], data, out, 300, 10)))
    log = tmp_path / "killed.log"
    proc = support.start_trainer([str(job)], support.trainer_env(tmp_path), log)
    try:
        support.wait_for(lambda: any(s >= 30 for s in support.complete_steps(out / "checkpoints")), 120,
                         "a checkpoint at step 30 or later", proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = support.complete_steps(out / "checkpoints")[-1]

    # The restart resumes on its own: same manifest, no flag.
    log2 = tmp_path / "resumed.log"
    proc = support.start_trainer([str(job)], support.trainer_env(tmp_path), log2)
    assert proc.wait(timeout=180) == 0, support.tail(log2)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["step"] == ref["step"] == 300
    assert doc["resumedFrom"] is not None and doc["resumedFrom"] >= killed_at
    # Model, optimizer, scheduler, RNG and data position restored: the result matches the uninterrupted run.
    assert doc["metrics"]["trainLoss"] == pytest.approx(ref["metrics"]["trainLoss"], rel=1e-3)


def test_damaged_and_partial_checkpoints_are_skipped(models: dict[str, Path], isolated: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = support.write_jsonl(isolated / "train.jsonl", support.qa_rows(32))
    out = isolated / "out"
    ckpts = out / "checkpoints"
    job = support.manifest(isolated / "job.yaml", _clean(_gpt2_spec(models["gpt2"], data, out, 16, 4, keep=3)))
    assert main([str(job), "--no-progress-bar"]) == 0
    assert support.complete_steps(ckpts) == [8, 12, 16]
    # 16: same size, garbage header (loads fail); 12: truncated (size check); 20: no marker; a crashed save.
    model16 = ckpts / "checkpoint-16" / "model.safetensors"
    model16.write_bytes(b"\xff" * 16 + model16.read_bytes()[16:])
    model12 = ckpts / "checkpoint-12" / "model.safetensors"
    model12.write_bytes(model12.read_bytes()[:100])
    (ckpts / "checkpoint-20").mkdir()
    (ckpts / "checkpoint-20" / "model.safetensors").write_bytes(b"partial")
    (ckpts / ".tmp-checkpoint-24-999").mkdir()

    # The same job again (a restarted pod): it resumes from the newest checkpoint that loads, 8, and ends at 16.
    assert main([str(job), "--no-progress-bar"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["resumedFrom"] == 8 and doc["step"] == 16
    assert support.complete_steps(ckpts) == [8, 12, 16]
    assert not list(ckpts.glob(".tmp-*"))
    assert list(ckpts.glob("damaged-checkpoint-16-*"))


def test_storage_failure_exits_74_and_keeps_last_checkpoint(models: dict[str, Path], tmp_path: Path,
                                                            isolated: Path) -> None:
    data = support.write_jsonl(tmp_path / "train.jsonl", support.qa_rows(32))
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    job = support.manifest(tmp_path / "job.yaml", _clean(_gpt2_spec(models["gpt2"], data, out, 1_000_000, 2)))
    env = support.trainer_env(isolated, FINETUNE_CACHE_DIR=os.environ["FINETUNE_CACHE_DIR"],
                              HF_DATASETS_CACHE=os.environ["HF_DATASETS_CACHE"],
                              FINETUNE_TERMINATION_LOG=str(tmp_path / "termination-log"))
    # Train until a checkpoint exists, then stop (SIGTERM: the step just trained is checkpointed too).
    first = support.start_trainer([str(job)], env, tmp_path / "first.log")
    try:
        support.wait_for(lambda: support.complete_steps(ckpts), 120, "a checkpoint", first, tmp_path / "first.log")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == exitcodes.INTERRUPTED, support.tail(tmp_path / "first.log")
    finally:
        if first.poll() is None:
            first.kill()
    kept = support.complete_steps(ckpts)
    last = kept[-1]
    before = (ckpts / f"checkpoint-{last}" / "model.safetensors").read_bytes()

    # The job continues on storage that refuses large files (as a full or quota-limited volume would).
    limit = 32 * 1024
    log = tmp_path / "trainer.log"
    proc = support.start_trainer([str(job)], env, log,
                                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.wait(timeout=120) == exitcodes.STORAGE_ERROR, support.tail(log)
    message = (tmp_path / "termination-log").read_text()
    failed = last + 2 - last % 2  # the next step of the every-2-steps cadence
    assert f"cannot write checkpoint for step {failed}" in message and str(out) in message
    assert support.complete_steps(ckpts) == kept
    assert (ckpts / f"checkpoint-{last}" / "model.safetensors").read_bytes() == before
    assert not list(ckpts.glob(".tmp-*"))
