"""The metric history: every logged training step and every evaluation, one JSON line each in <output>/metrics.jsonl,
and the same records sent to the experiment trackers (finetune_trainer.tracking). Rank 0 only.

    {"type": "train", "step": 40, "epoch": 0.32, "loss": 0.412, "learningRate": 9.1e-05, "samplesPerSecond": 48.2,
     "tokensPerSecond": 1040.0, "time": "2026-11-29T16:59:25Z"}
    {"type": "eval", "step": 50, "epoch": 0.4, "accuracy": 0.99, "f1Macro": 0.99, "evalLoss": 0.03, "time": "..."}

A training line is written every `log_every(total_steps)` steps (every step up to 1,000 steps, else about 1,000 lines
in all) and at the first and last step; its loss is the mean over the steps since the previous line.

The records also live in the training state, so every checkpoint carries the history up to its step. A run that
starts, fresh or resumed, rewrites metrics.jsonl from the checkpoint's history (temporary file, fsync, rename): what
a process that died wrote after its last checkpoint is dropped, and those steps, trained again, are not written
twice. During the run lines are only appended, one write per line, so a crash can cut the last line short but never
touch an earlier one; the end of the run rewrites the file once more from the state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune_api.times import format_time
from finetune_trainer.checkpoint import TrainState, fsync_dir
from finetune_trainer.tracking import Trackers

log = logging.getLogger(__name__)

HISTORY_FILE = "metrics.jsonl"
TRAIN_LINES = 1000  # about this many training lines at most, whatever the number of steps


def log_every(total_steps: int) -> int:
    """Steps between two training lines."""
    return max(1, math.ceil(total_steps / TRAIN_LINES))


def write_lines(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with one JSON line per record, atomically (a reader sees the old or the new file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a crash is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class RunLog:
    """Appends the run's records to metrics.jsonl and the trackers. Disabled (folder None) on ranks other than 0."""

    def __init__(self, folder: Path | None, trackers: Trackers | None = None) -> None:
        self.path = folder / HISTORY_FILE if folder is not None else None
        self.trackers = trackers or Trackers([])
        self.every = 1
        self.total_steps = 0
        self._loss_sum = 0.0
        self._loss_steps = 0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def start(self, state: TrainState, total_steps: int, resumed: bool) -> None:
        """Bring metrics.jsonl and the trackers to the history of the state the run starts from."""
        self.every, self.total_steps = log_every(total_steps), total_steps
        if self.path is None:
            return
        self._rewrite(state)
        self.trackers.restore(list(state.history), resumed)

    def step(self, state: TrainState, loss: float, fields: dict[str, Any]) -> None:
        """After every optimizer step: `loss` is the step's, `fields` the progress report's (epoch, learning rate,
        throughput)."""
        if self.path is None:
            return
        if math.isfinite(loss):
            self._loss_sum += loss
            self._loss_steps += 1
        step = state.step
        if step % self.every and step not in (1, self.total_steps):
            return
        record: dict[str, Any] = {"type": "train", "step": step, "epoch": fields.get("epoch")}
        if self._loss_steps:
            record["loss"] = self._loss_sum / self._loss_steps
        for name, key in (("learning_rate", "learningRate"), ("samples_per_second", "samplesPerSecond"),
                          ("tokens_per_second", "tokensPerSecond")):
            if fields.get(name) is not None:
                record[key] = fields[name]
        self._loss_sum, self._loss_steps = 0.0, 0
        self._add(state, record)

    def evaluation(self, state: TrainState, metrics: dict[str, float], epoch: float) -> None:
        """After every evaluation. An evaluation at a step the history already holds (the one a resumed run repeats
        at its checkpoint's step) is not written again."""
        if self.path is None:
            return
        for record in reversed(state.history):
            if record["step"] < state.step:
                break
            if record["type"] == "eval":
                return
        self._add(state, {"type": "eval", "step": state.step, "epoch": round(epoch, 4),
                          **{k: float(v) for k, v in sorted(metrics.items())}})
        self.trackers.flush()

    def _add(self, state: TrainState, record: dict[str, Any]) -> None:
        record["time"] = format_time()
        state.history.append(record)
        assert self.path is not None
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # the state keeps the record; the file is rewritten from it at the end
            if not self._warned:
                log.warning("cannot append to %s: %s", self.path, exc.strerror or exc)
                self._warned = True
        self.trackers.log(record)

    def _rewrite(self, state: TrainState) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_lines(self.path, state.history)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)

    def seal(self, state: TrainState) -> None:
        """At the end, before metrics.json: the file is exactly the state's history."""
        if self.path is not None:
            write_lines(self.path, state.history)

    def close(self, files: Iterable[Path] = (), status: str | None = None) -> None:
        """Hand the trackers the output's files and the run's end: FINISHED, FAILED, or None when interrupted (a
        restart continues the run)."""
        if self.path is not None:
            self.trackers.finish(files, status)

    def describe(self) -> list[str]:
        return self.trackers.describe() if self.path is not None else []
