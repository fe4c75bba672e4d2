"""Sharded checkpoints: every rank writes its own shard of the model and optimizer state with
`torch.distributed.checkpoint` (DCP), inside the same atomic ledger as `checkpoint.CheckpointManager`.

A save, all ranks together:
  1. rank 0 creates a staging folder `.tmp-checkpoint-<step>-shards-<pid>` (a crash leaves it as a partial, which the
     manager reports and removes on the next start) and every rank checks that it sees it (the storage must be shared);
  2. DCP writes one file per rank (`__<rank>_0.distcp`) and fsyncs it; the coordinator writes `.metadata` only after
     every rank reported its shard written; a barrier follows, so every shard is durable before step 3;
  3. rank 0 alone hands the staged files to `CheckpointManager.save`, which adds the small files (trainer state,
     scheduler, RNG), writes COMPLETE listing every file with its size, fsyncs, renames and prunes.
A checkpoint therefore has its COMPLETE marker only once all ranks' shards are on disk, and a crash at any moment
leaves the previous complete one.

Loading reshards: DCP maps the saved shards onto whatever layout this run has (another world size, FSDP or a plain
model), and a bad checkpoint is found before any parameter changes (read into copies, then applied).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.checkpoint import CheckpointInfo, CheckpointManager, is_io_error
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import ConfigError, StorageError, TrainerError

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


def _agree(dist: Dist, error: str | None, kind: type[TrainerError] = StorageError) -> None:
    """The same error on every rank if any rank had one, so no rank waits in a collective for ever."""
    errors = [e for e in dist.gather(error) if e]
    if errors:
        raise kind(errors[0])


def _storage_error(step: int, manager: CheckpointManager, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    return (f"cannot write checkpoint for step {step} to {manager.storage.uri} ({manager.root}): {reason}; the last "
            "complete checkpoint is kept")


def save(manager: CheckpointManager | None, dist: Dist, step: int, module: nn.Module,
         optimizer: torch.optim.Optimizer, write_small_files: Callable[[Path], None] | None = None,
         root: Path | None = None) -> CheckpointInfo | None:
    """Collective: every rank calls it. Rank 0 passes its writing `manager` (others may pass None, with `root` the
    same checkpoint folder); `write_small_files(tmp)` runs on rank 0 inside the manager's save. StorageError (exit
    74) on every rank if any rank cannot write; returns the CheckpointInfo on rank 0."""
    import torch.distributed.checkpoint as dcp

    folder = manager.root if manager is not None else root
    assert folder is not None, "ranks other than 0 pass the checkpoint folder as root"
    staging: str | None = None
    error: str | None = None
    if dist.main:
        assert manager is not None
        path = manager.root / f".tmp-checkpoint-{step}-shards-{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=False)
            staging = str(path)
        except OSError as exc:
            error = _storage_error(step, manager, exc)
    _agree(dist, error)
    staging = dist.gather(staging)[0]
    assert staging is not None
    stage = Path(staging)
    if not stage.is_dir():  # another node with its own local folder: rank 0's files would never meet ours
        error = (f"spec.checkpointing.storage {folder}: rank {dist.rank} does not see the folder rank 0 created; "
                 "sharded checkpoints need storage that every worker shares (a ReadWriteMany volume, or one node)")
    _agree(dist, error, ConfigError)
    t0 = time.monotonic()
    try:
        writer = dcp.FileSystemWriter(str(stage), sync_files=True, single_file_per_rank=True)
        dcp.save(training_state(module, optimizer), storage_writer=writer)
    except Exception as exc:
        if not is_io_error(exc) and not _is_checkpoint_io(exc):
            raise
        error = f"cannot write checkpoint shards for step {step} to {folder}: {str(exc).strip().splitlines()[0]}"
    else:
        error = None
    dist.barrier()  # every rank's shard is written and fsynced before rank 0 marks the checkpoint complete
    info: CheckpointInfo | None = None
    if dist.main and error is None:
        assert manager is not None

        def write(tmp: Path) -> None:
            for f in stage.iterdir():
                os.replace(f, tmp / f.name)
            if write_small_files is not None:
                write_small_files(tmp)

        try:
            info = manager.save(step, write)
        except StorageError as exc:
            error = exc.message
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    elif dist.main:
        shutil.rmtree(stage, ignore_errors=True)
    _agree(dist, error)
    if info is not None:
        log.info("sharded checkpoint %s complete from %d rank(s) (%.1fs)", info.path, dist.world,
                 time.monotonic() - t0)
    return info


def _is_checkpoint_io(exc: BaseException) -> bool:
    """DCP wraps every rank's failure in a CheckpointException whose text carries the original errors."""
    return type(exc).__name__ == "CheckpointException" and is_io_error(Exception(str(exc)))


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


def load(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into this run's layout, whatever world size wrote it (collective under a process
    group, plain in a single process). The shards are read into copies first: if reading fails, the model and the
    optimizer are unchanged and the caller can set the checkpoint aside and try an older one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    check(path, module, optimizer)
    state = training_state(module, optimizer)
    copies = {"model": _clone(state["model"]), "optim": _clone(state["optim"])}
    dcp.load(copies, storage_reader=dcp.FileSystemReader(str(path)))
    set_state_dict(module, optimizer, model_state_dict=copies["model"], optim_state_dict=copies["optim"],
                   options=_options())


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------- final output
def full_state_dict(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on every rank's call; collective under FSDP2. `trainable_only`
    gathers just the adapters of a LoRA model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(module, options=opts)


def save_pretrained(module: nn.Module, model: nn.Module, out: Path, dist: Dist, adapters_only: bool) -> None:
    """Collective: gather the full weights and let rank 0 write a normal `save_pretrained` folder (the model, or the
    LoRA adapter), which serving loads as it loads any other."""
    sd = full_state_dict(module, trainable_only=adapters_only)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), state_dict=sd)
    dist.barrier()


def merge_adapter(base: nn.Module, adapter_dir: Path, out: Path) -> None:
    """Write the LoRA adapter saved in `adapter_dir` merged into `base`, a freshly loaded unsharded base model (rank 0,
    on CPU, loaded as the job loads its model): what `output.mergeAdapter` writes when the trained model is sharded
    or quantized, where merging in place is not possible."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
