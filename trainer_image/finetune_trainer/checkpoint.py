"""Atomic checkpoints: written to a temporary folder, flushed, renamed, then marked COMPLETE.

Layout under the checkpoint storage:

    checkpoint-<step>/            one complete checkpoint (only these are ever resumed from)
        model.safetensors         trainable parameters (all of them for full fine-tuning, adapters + head for LoRA)
        optimizer.pt scheduler.pt rng-<rank>.pt
        trainer_state.json        step, epoch, data position, metrics so far
        COMPLETE                  {"step": N, "files": {name: bytes}}: written last, checked on resume
    .tmp-checkpoint-<step>-<pid>/ a save in progress (or left by a crash: reported and removed)
    progress.json                 the latest progress document

A checkpoint is deleted only after a newer one is complete, so a crash at any moment leaves the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_trainer.errors import StorageError
from finetune_trainer.locations import Storage

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


def rfc3339(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    time: str | None = None


def _name(step: int) -> str:
    return f"checkpoint-{step}"


class CheckpointManager:
    """Saves, lists, prunes and finds checkpoints in one storage. Only rank 0 constructs a writing manager."""

    def __init__(self, storage: Storage, keep_last: int) -> None:
        self.storage = storage
        self.root = storage.local
        self.keep_last = max(1, keep_last)

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
        found: list[CheckpointInfo] = []
        if not self.root.is_dir():
            return found
        for p in self.root.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if not m or not p.is_dir():
                continue
            ok = self._verify(p)
            if ok is None:
                log.warning("ignoring incomplete or damaged checkpoint %s (no valid %s marker or a file of the "
                            "wrong size)", p, MARKER)
                continue
            found.append(CheckpointInfo(ok[0], p, ok[1] or None))
        return sorted(found, key=lambda c: c.step)

    def partials(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(".tmp-checkpoint-"))

    def clean_partials(self) -> None:
        """Report and remove saves that a crash cut short (they can never complete)."""
        for p in self.partials():
            log.warning("removing partial checkpoint %s left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)

    def ensure_local(self, step: int) -> None:
        """For remote storage: make sure checkpoint `step` is complete in the local staging folder."""
        rel = _name(step)
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
            rel = _name(step)
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
        final = self.root / _name(step)
        if self._verify(final) is not None:
            log.info("checkpoint for step %d already complete at %s", step, final)
            return CheckpointInfo(step, final, rfc3339(final.stat().st_mtime))
        tmp = self.root / f".tmp-{_name(step)}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write(tmp)
            now = rfc3339()
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
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise StorageError(f"cannot write checkpoint for step {step} to {self.storage.uri} ({self.root}): "
                               f"{reason}; the last complete checkpoint is kept") from exc
        self.prune()
        return CheckpointInfo(step, final, now)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; never touch the newest complete one."""
        done = self.complete() if not self.storage.remote else self._local_complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            log.info("deleting old checkpoint %s", old.path)
            try:
                self.storage.remove(old.path.name)
            except OSError as exc:
                log.warning("cannot delete old checkpoint %s: %s", old.path, exc)

    def _local_complete(self) -> list[CheckpointInfo]:
        out = []
        for p in self.root.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir() and (ok := self._verify(p)) is not None:
                out.append(CheckpointInfo(ok[0], p, ok[1] or None))
        return sorted(out, key=lambda c: c.step)

    def write_progress(self, doc: dict[str, Any], upload: bool) -> None:
        """progress.json beside the checkpoints (atomic replace; uploaded to remote storage when asked)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.root / "progress.json", doc)
            if upload:
                self.storage.publish("progress.json")
        except (OSError, StorageError) as exc:
            log.debug("cannot write progress.json: %s", exc)
