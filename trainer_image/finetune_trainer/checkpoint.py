"""Checkpoints: what one holds, how it is written atomically, and how a run resumes from the newest good one.

Layout under the checkpoint storage:

    checkpoint-<step>/            one complete checkpoint (only these are ever resumed from)
        model.safetensors         trainable parameters (all of them for full fine-tuning, adapters + head for LoRA)
        optimizer.pt scheduler.pt rng-<rank>.pt
        trainer_state.json        step, epoch, data position, metrics so far
        finetune-owner.json       the job that wrote it and its training fingerprint (finetune_trainer.ownership)
        COMPLETE                  {"step": N, "files": {name: bytes}}: written last, checked on resume
    .tmp-checkpoint-<step>-<pid>/ a save in progress, or a deletion (one left by a crash: reported and removed)
    damaged-checkpoint-<step>-<t>/ a complete-looking checkpoint that failed to load, set aside
    progress.json                 the latest progress document
    finetune-owner.json           the job the storage belongs to (finetune_trainer.ownership)

A checkpoint is deleted only after a newer one is complete, so a crash at any moment leaves the last complete one.

Three parts, each replaceable on its own:
- `CheckpointManager`: the folders of one storage: an atomic save through a writer (temporary folder, fsync,
  COMPLETE, rename), listing and verifying, keeping the newest `keepLast`, setting damaged ones aside, mirroring to
  remote storage.
- `TrainingFiles`: what a training run puts in a folder (parameters, optimizer, scheduler, every rank's RNG, the
  `TrainState`) and how it is read back: checked completely before anything is applied.
- `Checkpointer`: what every rank does: rank 0 writes and all ranks agree on a failure; all ranks resume from the
  same checkpoint. The sharded format (every rank writes its shard: finetune_trainer.sharded_checkpoint) replaces the
  tensor half of `TrainingFiles` and the `save`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune_api.times import format_time
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import ConfigError, StorageError, TrainerError
from finetune_trainer.locations import Storage
from finetune_trainer.ownership import CHECKPOINT_RE, COMPLETE_MARKER, RECORD, Record

log = logging.getLogger(__name__)

MARKER = COMPLETE_MARKER
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
PROGRESS_FILE = "progress.json"


def folder_name(step: int) -> str:
    """`checkpoint-<step>`: the folder of a complete checkpoint, relative to the checkpoint storage."""
    return f"checkpoint-{step}"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


# ------------------------------------------------------------------------------------------------ durable writes
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file, then the folder, so a rename never exposes data still in the page cache."""
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Writers that are not Python file objects (safetensors' Rust writer, torch's zip writer) report I/O failures as
# their own exception types; their messages carry the OS error.
_IO_MESSAGE = re.compile(r"I/O error|os error \d+|file write failed|failed writing|No space left|Read-only file "
                         r"system|Permission denied|File too large|Disk quota", re.IGNORECASE)


def is_io_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or bool(_IO_MESSAGE.search(str(exc)))


def io_reason(exc: BaseException) -> str:
    """The OS's words for an I/O failure (strerror), else the first line of the message."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]


# ----------------------------------------------------------------------------------------------------- the state
@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's micro-batches already consumed in `epoch`
    world: int = 1
    samples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    checkpoints: int = 0
    train_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: dict[str, Any] | None = None
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, mean loss since previous point], ~100
    train_seconds: float = 0.0  # in optimizer steps, over every session of the run
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's records so far (history.py)
    selection: dict[str, Any] | None = None  # best evaluation and early-stopping count (selection.py)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        raw = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, folder: Path) -> TrainState:
        return cls.from_json((folder / STATE_FILE).read_text())

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    def rescale(self, world: int) -> None:
        """Keep the global data position when the number of processes changed since the checkpoint."""
        if self.world != world:
            self.batch_in_epoch = self.batch_in_epoch * self.world // world
            self.world = world


# -------------------------------------------------------------------------------------------- folders in storage
@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    time: str | None = None


class CheckpointManager:
    """Saves, lists, prunes and finds checkpoints in one storage. Only rank 0 writes through a manager."""

    def __init__(self, storage: Storage, keep_last: int, owner: Record | None = None) -> None:
        self.storage = storage
        self.root = storage.local
        self.keep_last = max(1, keep_last)
        self.pinned: int | None = None  # a step kept whatever keep_last says (the best checkpoint)
        self.owner = owner  # written into every checkpoint: which job wrote it, with what training

    def path(self, step: int) -> Path:
        return self.root / folder_name(step)

    def uri(self, step: int) -> str:
        """Where people find checkpoint `step`: under the storage's URI as the spec names it."""
        return f"{self.storage.uri.rstrip('/')}/{folder_name(step)}"

    # ------------------------------------------------------------------------------------------------- reading
    def _verify(self, path: Path) -> tuple[int, str] | None:
        """The step and completion time if `path` is a complete checkpoint whose files all have their sizes."""
        try:
            marker = json.loads((path / MARKER).read_text())
            step = int(marker["step"])
            for name, size in marker.get("files", {}).items():
                if (path / name).stat().st_size != int(size):
                    return None
            return step, str(marker.get("time") or "")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first; incomplete or damaged ones are reported and skipped."""
        if self.storage.remote:
            self._sync_down()
        return self._local_complete(report=True)

    def _local_complete(self, report: bool = False) -> list[CheckpointInfo]:
        found: list[CheckpointInfo] = []
        if not self.root.is_dir():
            return found
        for p in self.root.iterdir():
            if not CHECKPOINT_RE.match(p.name) or not p.is_dir():
                continue
            ok = self._verify(p)
            if ok is None:
                if report:
                    log.warning("ignoring incomplete or damaged checkpoint %s (no valid %s marker or a file of the "
                                "wrong size)", p, MARKER)
                continue
            found.append(CheckpointInfo(ok[0], p, ok[1] or None))
        return sorted(found, key=lambda c: c.step)

    def clean_partials(self) -> None:
        """Report and remove saves that a crash cut short (they can never complete)."""
        if not self.root.is_dir():
            return
        for p in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(".tmp-checkpoint-")):
            log.warning("removing partial checkpoint %s left by an interrupted save or deletion", p)
            shutil.rmtree(p, ignore_errors=True)

    def ensure_local(self, step: int) -> None:
        """For remote storage: make sure checkpoint `step` is complete in the local staging folder."""
        rel = folder_name(step)
        if self.storage.remote and self._verify(self.root / rel) is None:
            try:
                self.storage.download(rel)
            except OSError as exc:
                log.warning("cannot download checkpoint %s/%s: %s", self.storage.remote, rel, exc)

    def set_aside(self, path: Path) -> None:
        """Rename a checkpoint that failed to load out of the way (kept for inspection, never resumed again)."""
        target = path.with_name(f"damaged-{path.name}-{int(time.time())}")
        try:
            os.rename(path, target)
            log.warning("moved damaged checkpoint to %s", target)
        except OSError as exc:
            log.warning("cannot move damaged checkpoint %s aside: %s", path, exc)

    def _sync_down(self) -> None:
        """For remote storage: fetch the newest complete remote checkpoint that is not here yet."""
        names = self.storage.remote_entries()
        steps = sorted((int(m.group(1)) for n in names if (m := CHECKPOINT_RE.match(n))), reverse=True)
        for step in steps:
            rel = folder_name(step)
            if not self.storage.remote_exists(f"{rel}/{MARKER}"):
                log.warning("ignoring incomplete remote checkpoint %s/%s", self.storage.remote, rel)
                continue
            if self._verify(self.root / rel) is None:
                log.info("downloading checkpoint %s/%s", self.storage.remote, rel)
                self.storage.download(rel)
            return

    # ------------------------------------------------------------------------------------------------- writing
    def save(self, step: int, write: Callable[[Path], None]) -> CheckpointInfo:
        """Write a checkpoint through `write(tmp_folder)`; atomic and durable. StorageError on any I/O failure."""
        final = self.path(step)
        if self._verify(final) is not None:
            log.info("checkpoint for step %d already complete at %s", step, final)
            return CheckpointInfo(step, final, format_time(final.stat().st_mtime))
        tmp = self.root / f".tmp-{folder_name(step)}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write(tmp)
            if self.owner is not None:
                self.owner.write(tmp)
            now = format_time()
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            with (tmp / MARKER).open("w") as f:
                json.dump({"step": step, "time": now, "files": files}, f)
            fsync_tree(tmp)
            if final.exists():  # a damaged folder of the same step: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            self.storage.publish(final.name, last=MARKER)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_io_error(exc):
                raise
            raise StorageError(f"cannot write checkpoint for step {step} to {self.storage.uri} ({self.root}): "
                               f"{io_reason(exc)}; the last complete checkpoint is kept") from exc
        self.prune()
        return CheckpointInfo(step, final, now)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the pinned one; never touch the newest complete one."""
        done = self.complete() if not self.storage.remote else self._local_complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old.step == self.pinned:
                continue
            log.info("deleting old checkpoint %s", old.path)
            try:
                self.storage.remove(old.path.name)
            except OSError as exc:
                log.warning("cannot delete old checkpoint %s: %s", old.path, exc)

    def write_progress(self, doc: dict[str, Any], upload: bool) -> None:
        """progress.json beside the checkpoints (atomic replace; uploaded to remote storage when asked)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.root / PROGRESS_FILE, doc)
            if upload:
                self.storage.publish(PROGRESS_FILE)
        except (OSError, StorageError) as exc:
            log.debug("cannot write progress.json: %s", exc)


# ------------------------------------------------------------------------------------------ a training run's files
@dataclass
class Snapshot:
    """A checkpoint read back and checked against the model, not yet applied."""

    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # None: the weights alone were read (`read_tensors(optimizer=False)`)
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None  # this rank's; absent when the checkpoint had fewer ranks
    state: TrainState
    sharded: bool = False  # read from a sharded checkpoint (finetune_trainer.sharded_checkpoint)


class TrainingFiles:
    """The files of one training run's checkpoint: trainable parameters (safetensors), optimizer and scheduler state,
    every rank's RNG state and the TrainState. A sharded layout replaces the tensor half (`write_tensors`,
    `read_tensors`, `apply_tensors`) and keeps the rest."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 device: torch.device, rank: int) -> None:
        self.model = model  # unwrapped: parameter names without a DDP prefix
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.rank = rank

    def rng_state(self) -> dict[str, Any]:
        """This rank's torch (+CUDA) and Python RNG state."""
        out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def write(self, folder: Path, state: TrainState, rngs: list[dict[str, Any]]) -> None:
        self.write_tensors(folder)
        self.write_small(folder, state, rngs)

    def write_tensors(self, folder: Path) -> None:
        """The trainable parameters and the optimizer state."""
        from safetensors.torch import save_file

        trainable = {n: p.detach().to("cpu").contiguous() for n, p in self.model.named_parameters()
                     if p.requires_grad}
        save_file(trainable, str(folder / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def write_small(self, folder: Path, state: TrainState, rngs: list[dict[str, Any]]) -> None:
        """Scheduler, every rank's RNG and the state."""
        torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
        for r, rng in enumerate(rngs):
            torch.save(rng, folder / rng_file(r))
        state.save(folder)

    def read(self, folder: Path) -> Snapshot:
        """Read and check a checkpoint without touching the model: a bad one changes nothing on any rank."""
        snap = self.read_tensors(folder)
        snap.scheduler = torch.load(folder / SCHEDULER_FILE, map_location="cpu", weights_only=True)
        rng_path = folder / rng_file(self.rank)
        snap.rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.exists() else None
        snap.state = TrainState.load(folder)
        return snap

    def read_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        """The trainable parameters of a checkpoint, checked against the model (names and shapes)."""
        from safetensors.torch import load_file

        tensors = load_file(str(folder / MODEL_FILE))
        params = dict(self.model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise ValueError(f"parameters do not match the model (missing {missing}, unexpected {extra})")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(params[n].shape):
                raise ValueError(f"parameter {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
        return tensors

    def read_tensors(self, folder: Path, optimizer: bool = True) -> Snapshot:
        """The parameters and (unless `optimizer` is false: the weights alone) the optimizer state, checked against
        the model (the rest of the snapshot left empty)."""
        tensors = self.read_weights(folder)
        if not optimizer:
            return Snapshot(tensors, None, {}, None, TrainState())
        opt_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        ours = [len(g["params"]) for g in self.optimizer.param_groups]
        theirs = [len(g["params"]) for g in opt_state["param_groups"]]
        if ours != theirs:
            raise ValueError(f"optimizer parameter groups {theirs} do not match the model's {ours}")
        return Snapshot(tensors, opt_state, {}, None, TrainState())

    def apply(self, snap: Snapshot, world: int) -> TrainState:
        """Restore model, optimizer, scheduler and (with the same number of processes) the RNG; return the state."""
        self.apply_tensors(snap)
        self.scheduler.load_state_dict(snap.scheduler)
        state, rng = snap.state, snap.rng
        if rng is not None and state.world == world:
            torch.set_rng_state(rng["torch"])
            random.setstate(_tuples(json.loads(rng["python"])))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        state.rescale(world)
        return state

    def apply_tensors(self, snap: Snapshot) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in snap.tensors.items():
                params[n].copy_(t)
        if snap.optimizer is not None:
            self.optimizer.load_state_dict(snap.optimizer)


def _tuples(obj: Any) -> Any:
    """json turns random.getstate()'s tuples into lists; setstate needs them back."""
    if isinstance(obj, list):
        return tuple(_tuples(x) for x in obj)
    return obj


# ---------------------------------------------------------------------------------------------------- all ranks
class Checkpointer:
    """Saving and resuming across the processes of a run. Every rank calls both methods."""

    def __init__(self, manager: CheckpointManager, files: TrainingFiles, dist: Dist) -> None:
        self.manager = manager
        self.files = files
        self.dist = dist

    def save(self, state: TrainState) -> CheckpointInfo | None:
        """Rank 0 writes (the others return None); a storage failure there stops every rank with exit 74."""
        rngs = self.dist.gather(self.files.rng_state())
        return self.dist.on_main(lambda: self._recorded(state, lambda: self.manager.save(
            state.step, lambda tmp: self.files.write(tmp, state, rngs))))

    def _recorded(self, state: TrainState, save: Callable[[], CheckpointInfo | None]) -> CheckpointInfo | None:
        """Count the checkpoint in the state it carries, then `save()`; the count is undone if saving fails."""
        state.checkpoints += 1
        state.last_checkpoint = {"step": state.step, "path": self.manager.uri(state.step), "time": format_time(),
                                 "count": state.checkpoints}
        try:
            info = save()
        except TrainerError:
            state.checkpoints -= 1
            raise
        if info is not None:
            state.last_checkpoint["time"] = info.time
        return info

    def resume(self) -> tuple[int, TrainState] | None:
        """The step and state of the newest complete checkpoint that every rank can load, applied on every rank;
        None to start afresh. Checkpoints that fail to load are set aside and the next older one is tried."""
        if self.dist.main:
            self.manager.clean_partials()
        self.dist.barrier()
        candidates = self.dist.gather([c.step for c in self.manager.complete()] if self.dist.main else None)[0]
        for step in reversed(candidates):
            path = self.manager.path(step)
            self._fetch(step)
            try:
                snap: Snapshot | None = self.files.read(path)
                error = None
            except TrainerError:  # not a damaged checkpoint but one this run must not use (every rank raises)
                raise
            except Exception as exc:  # any unreadable file means this checkpoint is unusable
                snap, error = None, f"{type(exc).__name__}: {exc}"
            problems = [e for e in self.dist.gather(error) if e]
            if problems:
                log.warning("skipping damaged checkpoint %s: %s", path, problems[0])
                if self.dist.main:
                    self.manager.set_aside(path)
                self.dist.barrier()
                continue
            assert snap is not None
            state = self.files.apply(snap, self.dist.world)
            state.checkpoints = max(state.checkpoints, 1)
            state.last_checkpoint = {"step": step, "path": self.manager.uri(step),
                                     "time": (state.last_checkpoint or {}).get("time"), "count": state.checkpoints}
            return step, state
        return None

    def initialise(self, initial: InitialWeights) -> None:
        """Every rank: copy another run's trainable weights (spec.model.initFrom) into the model; optimizer, schedule
        and data position stay fresh. ConfigError on every rank when they do not fit this model."""
        snap: Snapshot | None = None
        try:
            snap = self.files.read_tensors(initial.path, optimizer=False)
            error = None
        except Exception as exc:
            error = describe_failure(exc)
        problems = [e for e in self.dist.gather(error) if e]
        if problems:
            raise ConfigError(f"spec.model.initFrom {initial.uri} ({initial.path}): its weights do not fit this model: "
                              f"{problems[0]}; it must be a checkpoint of a run with the same model.source and method")
        assert snap is not None
        self.files.apply_tensors(snap)
        log.info("initialised the trainable weights from %s%s; optimizer, schedule and data start afresh",
                 initial.path, f" (written by {initial.writer})" if initial.writer else "")

    def _fetch(self, step: int) -> None:
        """Every rank: checkpoint `step` in local staging (remote storage), downloaded once per node."""
        if self.dist.local_rank == 0:
            self.manager.ensure_local(step)
        self.dist.barrier()
        if self.dist.local_rank != 0:
            self.manager.ensure_local(step)

    def load_weights(self, step: int) -> str | None:
        """Copy checkpoint `step`'s trainable weights into the model where the output is written from: rank 0 (the
        model is whole there). Every rank calls it. Returns None, or on every rank why the checkpoint could not be
        read; the model is then unchanged."""
        error: str | None = None
        if self.dist.main:
            self.manager.ensure_local(step)
            try:
                snap = self.files.read_tensors(self.manager.path(step), optimizer=False)
            except Exception as exc:
                error = describe_failure(exc)
            else:
                self.files.apply_tensors(snap)
        return self.dist.gather(error)[0]


@dataclass(frozen=True)
class InitialWeights:
    """spec.model.initFrom, found: the checkpoint folder whose trainable weights a fresh run starts from."""

    uri: str
    path: Path
    writer: str | None = None  # who wrote it, from its record


def initial_checkpoint(uri: str, path: Path) -> InitialWeights:
    """model.initFrom at `path`: the folder itself when it is a complete checkpoint, else the newest complete
    checkpoint in it (a checkpoint storage). ConfigError when there is none."""
    manager = CheckpointManager(Storage(uri, path), keep_last=1)
    if manager._verify(path) is None:
        found = manager._local_complete()
        if not found:
            raise ConfigError(f"spec.model.initFrom {uri} ({path}) is neither a complete checkpoint (a folder with a "
                              f"valid {MARKER} marker) nor a checkpoint storage that holds one")
        path = found[-1].path
    try:
        writer: str | None = Record.parse((path / RECORD).read_bytes()).owner.describe()
    except (OSError, ValueError):
        writer = None
    return InitialWeights(uri, path, writer)


def describe_failure(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
