"""Small pieces with sharp contracts: batching, schedule, chat masking, metrics, configuration, locations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune_trainer import config
from finetune_trainer.chat import chat_segments
from finetune_trainer.checkpoint import CheckpointManager
from finetune_trainer.data import (
    IGNORE_INDEX,
    Encoded,
    _ragged,
    collate,
    epoch_batches,
    eval_batches,
)
from finetune_trainer.errors import ConfigError
from finetune_trainer.launch import worker_exit_code
from finetune_trainer.locations import Storage, resolve
from finetune_trainer.loop import lr_factor
from finetune_trainer.progress import Progress
from finetune_trainer.tasks.classification import classification_metrics, confusion_matrix
from tests.trainer import support


def _padding_fraction(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1 - real / padded


def test_length_grouped_batches_cut_padding_and_cover_the_epoch() -> None:
    lengths = np.random.default_rng(0).integers(7, 62, size=4000)
    grouped = epoch_batches(lengths, 32, seed=1, epoch=0)
    plain = epoch_batches(lengths, 32, seed=1, epoch=0, grouped=False)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(4000))
    assert _padding_fraction(grouped, lengths) < 0.08 < 0.3 < _padding_fraction(plain, lengths)
    # Deterministic per (seed, epoch), different across epochs: a resumed run replays the same order.
    again = epoch_batches(lengths, 32, seed=1, epoch=0)
    assert all((a == b).all() for a, b in zip(grouped, again, strict=True))
    assert not all((a == b).all() for a, b in zip(grouped, epoch_batches(lengths, 32, seed=1, epoch=1),
                                                   strict=False))


def test_ranks_get_disjoint_equal_shares() -> None:
    lengths = np.arange(1, 103)
    shares = [epoch_batches(lengths, 4, seed=3, epoch=0, world=2, rank=r) for r in range(2)]
    assert len(shares[0]) == len(shares[1])
    a, b = (set(np.concatenate(s).tolist()) for s in shares)
    assert not a & b
    ev = [eval_batches(lengths, 8, world=2, rank=r) for r in range(2)]
    assert sorted(np.concatenate([np.concatenate(e) for e in ev]).tolist()) == list(range(102))


def test_collate_pads_per_batch_and_counts_real_tokens() -> None:
    enc = Encoded({"input_ids": _ragged([[5, 6, 7], [8]]), "labels": _ragged([[-100, 6, 7], [8]])})
    batch, tokens = collate(enc, np.array([0, 1]), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert tokens == 4


def test_schedule_warmup_then_decay() -> None:
    assert lr_factor(0, 100, 10, "linear") == 0.0
    assert lr_factor(5, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "linear") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0


def test_chat_segments_only_assistant_replies_carry_loss() -> None:
    tok = support.word_tokenizer()
    msgs = [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "yes"}, {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "yes please"}]
    segs = chat_segments(tok, msgs)
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(msgs, tokenize=False)
    assert [t.strip() for t, loss in segs if loss] == ["yes </s>", "yes please </s>"]
    assert IGNORE_INDEX == -100


def test_classification_metrics_and_confusion() -> None:
    gold = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(pred, gold, 3)
    assert m["accuracy"] == pytest.approx(0.6)
    from sklearn.metrics import f1_score

    assert m["f1Macro"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert confusion_matrix(pred, gold, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_pvc_root_default_depends_on_the_operator_variable(tmp_path: Path) -> None:
    assert config.parse(["job.yaml"], env={}).pvc_root == Path("./runs/pvc")
    assert config.parse(["job.yaml"], env={"FINETUNE_PVC_ROOT": "/mnt/pvc"}).pvc_root == Path("/mnt/pvc")
    cfg = config.parse(["job.yaml", "--pvc-root", str(tmp_path), "--metrics-port", "9400"],
                       env={"FINETUNE_PVC_ROOT": "/mnt/pvc", "FINETUNE_GRACE_PERIOD": "10",
                            "FINETUNE_THREADS": "3", "FINETUNE_PROGRESS_URL": "http://op/progress",
                            "FINETUNE_PROGRESS_TOKEN": "t"})
    assert (cfg.pvc_root, cfg.metrics_port, cfg.grace_period, cfg.threads) == (tmp_path, 9400, 10.0, 3)
    assert (cfg.progress_url, cfg.progress_token) == ("http://op/progress", "t")
    assert config.parse(["job.yaml"], env={}).metrics_port == 0
    with pytest.raises(ConfigError):
        config.parse(["job.yaml"], env={"FINETUNE_GRACE_PERIOD": "soon"})


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, a pod limited to 1500m
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "90000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.9),  # v1: 900m
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup file to read
], ids=["v2", "v2-unlimited", "v1", "v1-unlimited", "none"])
def test_threads_stay_within_the_pods_cpu_limit(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    """A pod limited to fewer CPUs than its node has must not run a thread per core of the node (they would spend
    most of each period throttled): the default thread count is the whole CPUs of the limit, at least 1."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert config.cpu_limit(tmp_path) == limit
    unlimited = config.physical_cores(tmp_path / "absent")
    assert config.physical_cores(tmp_path) == (unlimited if limit is None else max(1, min(unlimited, int(limit))))


def test_locations_resolve(tmp_path: Path) -> None:
    assert resolve("pvc://models/minilm", tmp_path).path == tmp_path / "models" / "minilm"
    assert resolve("s3://bucket/prefix/", tmp_path).remote == "s3://bucket/prefix"
    assert resolve("org/model-name", tmp_path).hub == "org/model-name"
    assert resolve("./local/thing", tmp_path).path == Path("./local/thing")
    with pytest.raises(ConfigError):
        resolve("pvc://claim/../escape", tmp_path)


def test_remote_storage_mirrors_checkpoints_with_marker(tmp_path: Path) -> None:
    """fsspec storage (file:// stands in for s3://): uploads, lists and resumes a complete checkpoint."""
    remote = tmp_path / "bucket"
    remote.mkdir()
    store = Storage("file-remote", tmp_path / "staging", f"file://{remote}")
    mgr = CheckpointManager(store, keep_last=1)
    mgr.save(3, lambda d: (d / "model.safetensors").write_bytes(b"x" * 10))
    mgr.save(6, lambda d: (d / "model.safetensors").write_bytes(b"y" * 10))
    assert sorted(p.name for p in remote.iterdir()) == ["checkpoint-6"]
    assert (remote / "checkpoint-6" / "COMPLETE").exists()
    fresh = CheckpointManager(Storage("file-remote", tmp_path / "other-machine", f"file://{remote}"), keep_last=1)
    assert [c.step for c in fresh.complete()] == [6]


def test_progress_push_failure_is_not_fatal() -> None:
    p = Progress(push_url=f"http://127.0.0.1:{support.free_port()}/progress", push_token="t")
    assert p.push({"state": "running"}) is False


def test_launcher_picks_the_most_telling_worker_code() -> None:
    assert worker_exit_code([0, 0]) == 0
    assert worker_exit_code([1, 65]) == 65  # a permanent failure wins: do not retry
    assert worker_exit_code([75, 1]) == 75
    assert worker_exit_code([-9, 0]) == 137
    # Lost peers: only when nothing else went wrong in this pod (SIGTERM from the agent after the first loss is fine).
    assert worker_exit_code([76, 75]) == worker_exit_code([76, 76]) == 76
    assert worker_exit_code([76, 1]) == 1, "a local crash that left the other local worker without a peer"
    assert worker_exit_code([76, 78]) == 78


def test_peer_loss_is_read_narrowly() -> None:
    from finetune_trainer.distributed import is_peer_loss

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [10.0.0.7]:4242: Connection reset by peer")
    assert is_peer_loss(gloo, world=2)
    assert not is_peer_loss(gloo, world=1), "one process has no peers"
    nccl = RuntimeError("NCCL error: remote process exited or there was a network error, NCCL version 2.21.5")
    assert is_peer_loss(nccl, world=8)
    wrapped = ValueError("step failed")
    wrapped.__cause__ = gloo
    assert is_peer_loss(wrapped, world=2)
    for local in (RuntimeError("CUDA out of memory"), RuntimeError("NCCL error: unhandled system error"),
                  OSError("Connection reset by peer")):  # (an OSError is storage or the hub, not the group)
        assert not is_peer_loss(local, world=2), local


def test_every_task_type_of_the_api_is_one_task_module() -> None:
    from typing import get_args

    from finetune_api.spec import TASK_COLUMNS, TaskType
    from finetune_trainer.tasks import TASKS

    assert set(TASKS) == set(get_args(TaskType)) == set(TASK_COLUMNS)
    assert {cls.__module__.rsplit(".", 1)[-1] for cls in TASKS.values()} == {"classification", "causal_lm", "seq2seq",
                                                                             "dpo"}
