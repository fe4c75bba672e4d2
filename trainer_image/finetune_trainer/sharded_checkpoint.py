"""Sharded checkpoints: under FSDP every rank writes its own shard of the trainable state and the optimizer with
`torch.distributed.checkpoint` (DCP), inside the same atomic ledger as `checkpoint.CheckpointManager`.

A save, all ranks together (`ShardedCheckpointer.save`):
  1. rank 0 creates a staging folder `.tmp-checkpoint-<step>-shards-<pid>` (a crash leaves it as a partial, which the
     manager reports and removes on the next start) and every rank checks that it sees it (the storage must be shared);
  2. DCP writes one file per rank (`__<rank>_0.distcp`) and fsyncs it; the coordinator writes `.metadata` only after
     every rank reported its shard written; a barrier follows, so every shard is durable before step 3;
  3. rank 0 alone hands the staged files to `CheckpointManager.save`, which adds the small files (trainer state,
     scheduler, RNG), writes COMPLETE listing every file with its size, fsyncs, renames and prunes.
A checkpoint therefore has its COMPLETE marker only once all ranks' shards are on disk, and a crash at any moment
leaves the previous complete one.

Resuming detects the format of each checkpoint (`ShardedFiles`): a sharded one is resharded by DCP onto whatever
layout this run has (another world size, FSDP or a plain model); an unsharded one (safetensors) is spread over this
run's shards. Either is read into copies and checked before any parameter changes, so a bad checkpoint is set aside
with the model untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.checkpoint import (
    Checkpointer,
    CheckpointInfo,
    CheckpointManager,
    Snapshot,
    TrainingFiles,
    TrainState,
    describe_failure,
    io_reason,
    is_io_error,
)
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import ConfigError, StorageError
from finetune_trainer.sharding import Wrapped

log = logging.getLogger(__name__)

METADATA = ".metadata"  # DCP's index of every shard: its presence marks a checkpoint as sharded


def is_sharded(path: Path) -> bool:
    return (path / METADATA).is_file()


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA base) come from the model source again; only trainable state is checkpointed.
    return StateDictOptions(ignore_frozen_params=True, strict=False, full_state_dict=full, cpu_offload=full)


def training_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": trainable parameters, "optim": optimizer state}, keyed by parameter name, as this rank holds them
    (DTensor shards under FSDP2, whole tensors otherwise): the form DCP saves and reshards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd}


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes one process, which is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


# ------------------------------------------------------------------------------------------------------- saving
def save(manager: CheckpointManager, dist: Dist, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
         write_small_files: Callable[[Path], None] | None = None) -> CheckpointInfo | None:
    """Collective: every rank calls it with the same manager (rank 0 alone writes through it).
    `write_small_files(tmp)` runs on rank 0 inside the manager's save. StorageError (exit 74) on every rank if any
    rank cannot write; returns the CheckpointInfo on rank 0."""
    import torch.distributed.checkpoint as dcp

    def stage_folder() -> str:
        path = manager.root / f".tmp-checkpoint-{step}-shards-{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise StorageError(_storage_error(step, manager, exc)) from exc
        return str(path)

    stage = Path(dist.gather(dist.on_main(stage_folder))[0])
    seen = None if stage.is_dir() else ConfigError(
        f"spec.checkpointing.storage {manager.storage.uri}: rank {dist.rank} does not see the folder rank 0 created "
        f"({stage}); sharded checkpoints need storage that every worker shares (a ReadWriteMany volume, or one node)")
    dist.agree(seen)
    t0 = time.monotonic()
    try:
        failed: StorageError | None = None
        try:
            writer = dcp.FileSystemWriter(str(stage), sync_files=True, single_file_per_rank=True)
            with _single_process_quiet():
                dcp.save(training_state(module, optimizer), storage_writer=writer, no_dist=not dist.enabled)
        except (Exception, dcp.CheckpointException) as exc:
            cause = dcp_failure(exc)
            if not is_io_error(cause):
                raise
            failed = StorageError(f"cannot write checkpoint shards for step {step} to {manager.storage.uri} "
                                  f"({manager.root}): {io_reason(cause)}; the last complete checkpoint is kept")
        dist.barrier()  # every rank's shard is written and fsynced before rank 0 marks the checkpoint complete
        dist.agree(failed)

        def write(tmp: Path) -> None:
            for f in stage.iterdir():
                os.replace(f, tmp / f.name)
            if write_small_files is not None:
                write_small_files(tmp)

        info = dist.on_main(lambda: manager.save(step, write))
    finally:
        if dist.main:
            shutil.rmtree(stage, ignore_errors=True)
    if info is not None:
        log.info("sharded checkpoint %s complete from %d rank(s) (%.1fs)", info.path, dist.world,
                 time.monotonic() - t0)
    return info


def _storage_error(step: int, manager: CheckpointManager, exc: BaseException) -> str:
    return (f"cannot write checkpoint for step {step} to {manager.storage.uri} ({manager.root}): {io_reason(exc)}; "
            "the last complete checkpoint is kept")


def dcp_failure(exc: BaseException) -> BaseException:
    """What went wrong in a DCP save or load: DCP raises a CheckpointException (a BaseException, on every rank) that
    carries each failed rank's exception; the first of those, else `exc` itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))[0]  # type: ignore[no-any-return]
    return exc


# ------------------------------------------------------------------------------------------------------ loading
def check(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless the checkpoint at `path` has every trainable parameter of this model with its shape."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    expected = training_state(module, optimizer)["model"]
    missing = sorted(f"model.{k}" for k in expected if f"model.{k}" not in meta)
    if missing:
        raise ValueError(f"parameters do not match the model (missing {missing[:3]})")
    for k, t in expected.items():
        saved = tuple(getattr(meta[f"model.{k}"], "size", ()))
        if saved != tuple(t.shape):
            raise ValueError(f"parameter {k} has shape {saved}, the model {tuple(t.shape)}")


def read(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, collective: bool = False,
         parts: tuple[str, ...] = ("model", "optim")) -> dict[str, Any]:
    """A sharded checkpoint read into copies laid out as this run holds its state (`parts`: the trainable weights,
    the optimizer state), whatever world size wrote it; the model and optimizer are not touched. `collective`: every
    rank of the group reads its own shards together (a sharded model); otherwise this process reads whole tensors
    on its own (a plain model, or one process)."""
    import torch.distributed.checkpoint as dcp

    no_dist = not (collective and torch.distributed.is_initialized())
    if no_dist:
        check(path, module, optimizer)
    else:  # every rank enters DCP's collective load only if every rank found the checkpoint fit
        try:
            check(path, module, optimizer)
            problem = None
        except Exception as exc:
            problem = f"{type(exc).__name__}: {describe_failure(exc)}"
        problems: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(problems, problem)
        if any(problems):
            raise ValueError(next(p for p in problems if p))
    state = training_state(module, optimizer)
    copies = {part: _clone(state[part]) for part in parts}
    try:
        with _single_process_quiet():
            dcp.load(copies, storage_reader=dcp.FileSystemReader(str(path)), no_dist=no_dist)
    except dcp.CheckpointException as exc:  # a shard that cannot be read: a damaged checkpoint, as any other
        cause = dcp_failure(exc)
        said = describe_failure(cause)
        what = type(cause).__name__ if said == type(cause).__name__ else f"{type(cause).__name__}: {said}"
        raise ValueError(f"cannot read the shards of {path}: {what}") from cause
    return copies


def load(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """`read`, then apply: the whole sharded load in one call (one process)."""
    copies = read(path, module, optimizer)
    _apply(module, optimizer, copies["model"], copies["optim"])


def _apply(module: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Any],
           optim_sd: dict[str, Any] | None, full: bool = False) -> None:
    """Copy the weights (and the optimizer state unless None) into the model's layout; `full`: they are whole
    tensors, each rank keeps its shard of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False, full_state_dict=full)
    if optim_sd is None:
        set_model_state_dict(module, model_sd, options=options)
    else:
        set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          saved: dict[str, Any]) -> dict[str, Any]:
    """An unsharded optimizer state dict (parameters numbered in param_group order) keyed by parameter name, the form
    `set_state_dict` spreads over shards. The numbering is this model's: the same model builds the same groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[int(i)]: v for i, v in saved["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                              "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}


class ShardedFiles(TrainingFiles):
    """TrainingFiles for any layout: a sharded model's tensors are written by DCP (`save`, collective), and every
    checkpoint is read in the format it was written in, onto the layout this run has."""

    def __init__(self, wrapped: Wrapped, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                 rank: int) -> None:
        super().__init__(wrapped.model, optimizer, scheduler, device, rank)
        self.sharded = wrapped.sharded

    def read_tensors(self, folder: Path, optimizer: bool = True) -> Snapshot:
        """Collective when this run is sharded and the checkpoint too (every rank reads its shards)."""
        if is_sharded(folder):
            parts = ("model", "optim") if optimizer else ("model",)
            copies = read(folder, self.model, self.optimizer, collective=self.sharded, parts=parts)
            return Snapshot(copies["model"], copies.get("optim"), {}, None, TrainState(), sharded=True)
        return super().read_tensors(folder, optimizer)  # whole tensors: checked against the global shapes

    def apply_tensors(self, snap: Snapshot) -> None:
        if snap.sharded:
            _apply(self.model, self.optimizer, snap.tensors, snap.optimizer)
        elif self.sharded:  # an unsharded checkpoint spread over this run's shards
            optim = None if snap.optimizer is None else named_optimizer_state(self.model, self.optimizer,
                                                                              snap.optimizer)
            _apply(self.model, self.optimizer, snap.tensors, optim, full=True)
        else:
            super().apply_tensors(snap)


class ShardedCheckpointer(Checkpointer):
    """Saving with every rank writing its shard (the model is sharded); resuming as any Checkpointer; loading a
    checkpoint's weights on every rank, since each holds a shard of the model."""

    files: ShardedFiles

    def save(self, state: TrainState) -> CheckpointInfo | None:
        rngs = self.dist.gather(self.files.rng_state())
        return self._recorded(state, lambda: save(self.manager, self.dist, state.step, self.files.model,
                                                  self.files.optimizer,
                                                  lambda tmp: self.files.write_small(tmp, state, rngs)))

    def load_weights(self, step: int) -> str | None:
        """Every rank reads its shard of checkpoint `step`'s weights (DCP, collective; a checkpoint written without
        sharding: the whole tensors, of which each rank keeps its shard) and, once every rank has read them, copies
        them in. Returns None, or on every rank why some rank could not read them; the model is then unchanged."""
        self._fetch(step)
        snap: Snapshot | None = None
        try:
            snap = self.files.read_tensors(self.manager.path(step), optimizer=False)
            error = None
        except Exception as exc:
            error = describe_failure(exc)
        problems = [e for e in self.dist.gather(error) if e]
        if problems:
            return problems[0]
        assert snap is not None
        self.files.apply_tensors(snap)
        return None


def checkpointer(manager: CheckpointManager, wrapped: Wrapped, optimizer: torch.optim.Optimizer, scheduler: Any,
                 dist: Dist) -> Checkpointer:
    """The checkpointer for this run's layout: sharded saves under FSDP, rank 0's files otherwise; either resumes
    from both formats."""
    files = ShardedFiles(wrapped, optimizer, scheduler, dist.device, dist.rank)
    return (ShardedCheckpointer if wrapped.sharded else Checkpointer)(manager, files, dist)


# ------------------------------------------------------------------------------------------------- final output
def full_state_dict(wrapped: Wrapped, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """Collective under FSDP2: the whole (unsharded) weights on CPU, `trainable_only` just the adapters (and head) of
    a LoRA model, for rank 0's save_pretrained; None when the model is not sharded (it saves its own)."""
    if not wrapped.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(wrapped.model, options=opts)
