"""The training loop: AdamW (fused where available) with decay on matrices only, warmup then linear/cosine/constant,
gradient accumulation, autocast where it helps, DDP or FSDP2 (`Dist.wrap`, finetune_trainer.sharding), periodic
evaluation, checkpoints (sharded under FSDP) and SIGTERM handling.

The objective (finetune_trainer.tasks) makes the batches and computes the loss from the model and a batch.

Our own loop rather than transformers.Trainer: every batch comes pre-tokenised and length-grouped from `data`, so
the per-step overhead is a pad and a forward/backward; resume restores model, optimizer, scheduler, RNG and the
exact data position (finetune_trainer.checkpoint); and preemption is a first-class path (checkpoint, then exit 75).

One step is reported in one place (`Trainer._report_step`: progress, the metric history and the console);
evaluation results land in one place (`Trainer.evaluate`: state, progress, the history and the best-model selection).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.checkpoint import CheckpointInfo, CheckpointManager, InitialWeights, TrainState
from finetune_trainer.data import Encoded, collate, epoch_batches
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import DataError, Interrupted
from finetune_trainer.evaluation import Evaluation, EvaluationStopped, Evaluator
from finetune_trainer.history import RunLog
from finetune_trainer.modeling import Precision
from finetune_trainer.progress import START_LOGGER, Display, Progress
from finetune_trainer.selection import Choice, Selection, load_chosen
from finetune_trainer.sharded_checkpoint import checkpointer
from finetune_trainer.sharding import Layout, SavedTensorBytes, resident_bytes
from finetune_trainer.signals import StopSignal
from finetune_trainer.tasks.base import Task

log = logging.getLogger(__name__)

LOSS_WINDOW = 20  # optimizer steps in the running-mean loss that progress reports


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class LoopSettings:
    """The spec's hyperparameters and checkpointing, flattened for the loop."""

    batch_size: int
    grad_accum: int
    learning_rate: float
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    epochs: int | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    checkpoint_every_epoch: bool = True

    def total_steps(self, batches_per_epoch: int) -> int:
        """maxSteps, else whole epochs of optimizer steps (a short last step takes the epoch's leftover batches)."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(batches_per_epoch / self.grad_accum) * int(self.epochs or 1)

    @classmethod
    def of(cls, spec: FineTuneJobSpec) -> LoopSettings:
        hp = spec.hyperparameters
        return cls(
            batch_size=hp.batch_size, grad_accum=hp.gradient_accumulation_steps, learning_rate=hp.learning_rate,
            scheduler=hp.lr_scheduler.type, warmup_ratio=hp.lr_scheduler.warmup_ratio, weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm, seed=hp.seed, epochs=hp.epochs, max_steps=hp.max_steps,
            eval_every=hp.eval_every_steps, checkpoint_every=spec.checkpointing.every_steps,
            checkpoint_every_epoch=spec.checkpointing.every_epoch,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier on the peak learning rate: linear warmup from 0, then the configured decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    return max(0.0, 1.0 - progress)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, settings: LoopSettings) -> Any:
    """The learning-rate schedule: `lr_factor` over the optimizer's peak rate, stepped once per optimizer step."""
    warmup, kind = math.ceil(settings.warmup_ratio * total_steps), settings.scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, kind))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases or norms); fused kernels where the build has them."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # pragma: no cover - depends on the torch build/device
        log.info("fused AdamW unavailable (%s); using the foreach implementation", exc)
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    metrics: dict[str, float]
    extras: dict[str, Any]
    resumed_from: int | None
    train_seconds: float
    train_cpu_seconds: float
    samples_per_second: float
    tokens_per_second: float
    choice: Choice | None = None  # which step's weights the model is, and why
    last_metrics: dict[str, float] | None = None  # the last evaluation's, when the model is another step's


class StepMeter:
    """The running numbers of training steps: the loss window progress shows, the loss curve and totals kept in the
    state, and this session's throughput (seconds and process CPU seconds spent in training steps only)."""

    def __init__(self) -> None:
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self._curve: list[float] = []  # losses since the last loss-curve point
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # process CPU time: a load-independent cost measure
        self.samples = 0
        self.tokens = 0
        self.steps = 0

    def record(self, st: TrainState, total_steps: int, loss: float, samples: int, tokens: int, seconds: float,
               cpu_seconds: float) -> None:
        """Account for the optimizer step just counted in `st.step`."""
        st.samples += samples
        st.tokens += tokens
        st.loss_sum += loss
        st.loss_steps += 1
        st.train_seconds += seconds
        self.losses.append(loss)
        self._curve.append(loss)
        if st.step % max(1, total_steps // 100) == 0 or st.step in (1, total_steps):
            st.loss_curve.append([st.step, sum(self._curve) / len(self._curve)])
            self._curve.clear()
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.samples += samples
        self.tokens += tokens
        self.steps += 1

    def report(self, st: TrainState, total_steps: int, batches_per_epoch: int, lr: float) -> dict[str, Any]:
        """Progress fields for the step just taken."""
        fields: dict[str, Any] = {
            "step": st.step, "total_steps": total_steps,
            "epoch": round(st.epoch + st.batch_in_epoch / max(1, batches_per_epoch), 4),
            "percent": round(100.0 * st.step / max(1, total_steps), 2),
            "learning_rate": lr,
        }
        if self.losses:
            fields["loss"] = float(sum(self.losses) / len(self.losses))
        if self.seconds > 0:
            fields["samples_per_second"] = round(self.samples / self.seconds, 3)
            fields["tokens_per_second"] = round(self.tokens / self.seconds, 1)
        if self.steps:
            fields["eta_seconds"] = round(max(0, total_steps - st.step) * (self.seconds / self.steps))
        if st.loss_steps:
            fields["metrics"] = {"trainLoss": st.loss_sum / st.loss_steps}
        return fields


class OptimizerStep:
    """One optimizer step: forward and backward over a few micro-batches (with DDP, gradients are synchronised on the
    last one only; FSDP2 reduce-scatters each), loss scaling, clipping, the optimizer and the schedule. The model is
    wrapped here for training across processes (`Dist.wrap`); the optimizer and scheduler live here.

    The first step of a session also measures what this rank holds (`measured`): parameters, gradients and optimizer
    state from the live tensors (local shards under FSDP), and the activations autograd kept for the backward pass
    of the first micro-batch."""

    def __init__(self, model: torch.nn.Module, dist: Dist, settings: LoopSettings, precision: Precision,
                 total_steps: int, layout: Layout | None = None, task: Task | None = None) -> None:
        layout = layout or Layout(compute_dtype=precision.autocast_dtype, grad_scaling=precision.grad_scaling)
        # The objective's batches and loss (the model's own loss when none is given).
        self.collate = task.collate if task is not None else collate
        self.loss = task.loss if task is not None else (lambda model, batch: model(**batch).loss)
        self.wrapped = dist.wrap(model, layout)
        self.model = self.wrapped.module
        self.dist = dist
        self.device = dist.device
        self.max_grad_norm = settings.max_grad_norm
        self.optimizer = make_optimizer(self.wrapped.model, settings.learning_rate, settings.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, total_steps, settings)
        self.scaler = self.wrapped.grad_scaler()
        self.measured: list[dict[str, int]] | None = None  # every rank's, after this session's first step

    def __call__(self, data: Encoded, micro: list[np.ndarray], pad_id: int) -> tuple[float, int, int]:
        """Returns (mean loss, samples, real tokens) of this rank's micro-batches."""
        loss_total, samples, tokens = 0.0, 0, 0
        activations = SavedTensorBytes() if self.measured is None else None
        for j, idx in enumerate(micro):
            batch, n_tokens = self.collate(data, idx, pad_id)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.wrapped.accumulating(last=j == len(micro) - 1):
                measure = activations if activations is not None and j == 0 else contextlib.nullcontext()
                with measure, self.wrapped.autocast(self.device):
                    loss = self.loss(self.model, batch) / len(micro)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_total += float(loss.detach())
            samples += len(idx)
            tokens += n_tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            self.wrapped.clip_grad_norm(self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if activations is not None:
            self._measure(activations.bytes)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, samples, tokens

    def _measure(self, activation_bytes: int) -> None:
        """Collective: every rank's resident training state (gradients still held) and kept activations."""
        mine: dict[str, int] = {**resident_bytes(self.wrapped.model, self.optimizer), "activations": activation_bytes}
        if self.device.type == "cuda":
            mine["peakAllocated"] = int(torch.cuda.max_memory_allocated(self.device))
        self.measured = self.dist.gather(mine)


# ------------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """Runs one job's optimisation from a fresh start or the latest complete checkpoint."""

    def __init__(self, *, model: torch.nn.Module, train: Encoded, pad_id: int, settings: LoopSettings,
                 precision: Precision, dist: Dist, checkpoints: CheckpointManager, evaluator: Evaluator | None,
                 progress: Progress, stop: StopSignal, progress_bar: bool = False, log_interval: float = 5.0,
                 run_log: RunLog | None = None, selection: Selection | None = None,
                 layout: Layout | None = None, task: Task | None = None,
                 init_from: Callable[[], InitialWeights] | None = None) -> None:
        self.raw_model = model
        self.train_data = train
        self.pad_id = pad_id
        self.s = settings
        self.dist = dist
        self.evaluator = evaluator
        self.progress = progress
        self.stop = stop
        self.progress_bar = progress_bar
        self.log_interval = log_interval
        self.run_log = run_log or RunLog(None)  # metrics.jsonl and the trackers (rank 0)
        self.selection = selection or Selection()  # best checkpoint, early stopping, the output's weights
        self.init_from = init_from  # another run's weights to start from (model.initFrom), found when needed
        self.device = dist.device
        self.cost = train.cost()
        self.batches_per_epoch = len(self._batches(0))
        if self.batches_per_epoch == 0:
            raise DataError(f"dataset.train has {len(train)} examples: too few for one batch on each of "
                            f"{dist.world} processes")
        self.total_steps = settings.total_steps(self.batches_per_epoch)
        step = self.optimizer_step = OptimizerStep(model, dist, settings, precision, self.total_steps, layout, task)
        self.checkpoints = checkpointer(checkpoints, step.wrapped, step.optimizer, step.scheduler, dist)
        self.state = TrainState(world=dist.world, train_examples=len(train))
        self.extras: dict[str, Any] = {}
        self.meter = StepMeter()

    def _batches(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(self.cost, self.s.batch_size, self.s.seed, epoch, self.dist.world, self.dist.rank)

    def resume(self) -> int | None:
        """Continue from the newest complete checkpoint that every rank can load; return its step or None (a fresh
        start: from model.initFrom's weights when it is set)."""
        found = self.checkpoints.resume()
        if found is None:
            if self.init_from is not None:
                self.checkpoints.initialise(self.init_from())
            return None
        step, state = found
        if state.train_examples and state.train_examples != len(self.train_data):
            log.warning("the training data had %d examples at the checkpoint and has %d now",
                        state.train_examples, len(self.train_data))
        self.state = state
        logging.getLogger(START_LOGGER).info(  # every rank, not only rank 0
            "resuming from %s (step %d of %d, epoch %d)", self.checkpoints.manager.path(step), step, self.total_steps,
            state.epoch)
        return step

    def save_checkpoint(self) -> CheckpointInfo | None:
        """All ranks call this; rank 0 writes. A storage failure on rank 0 stops every rank with exit 74."""
        t0 = time.monotonic()
        self.checkpoints.manager.pinned = self.selection.pinned(self.state)
        info = self.checkpoints.save(self.state)
        if info is not None:
            log.info("checkpoint %s complete (%.1fs)", info.path, time.monotonic() - t0)
            self.progress.update(urgent=True, checkpoint=dict(self.state.last_checkpoint or {}))
        return info

    def evaluate(self) -> Evaluation | None:
        """Evaluate the model as it is now; the results join the state's metrics, the extras and progress."""
        if self.evaluator is None:
            return None
        t0 = time.monotonic()
        log.info("evaluating at step %d", self.state.step)
        # The unwrapped model: DDP's forward broadcasts buffers, and ranks may hold one eval batch more or less.
        try:
            result = self.evaluator.run(self.raw_model, should_stop=lambda: self.stop.requested)
        except EvaluationStopped:
            # Checkpoint the step just trained (unless saved) and exit 75: the restart resumes from it. A stop during
            # the final evaluation finds the final checkpoint saved; the restart evaluates and writes the output.
            log.warning("evaluation at step %d stopped by signal after %.1fs", self.state.step,
                        time.monotonic() - t0)
            raise self._interrupt() from None
        self.extras.update(result.extras)
        self.state.metrics.update(result.metrics)
        self.selection.observe(self.state, result.metrics, result.extras)
        st = self.state
        self.run_log.evaluation(st, result.metrics, st.epoch + st.batch_in_epoch / max(1, self.batches_per_epoch))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
        log.info("evaluation at step %d: %s (%.1fs)", self.state.step, shown, time.monotonic() - t0)
        self.progress.update(urgent=True, metrics=result.metrics)
        return result

    def _report_step(self, display: Display) -> None:
        """The one place a training step is reported: the progress report and the bar or log line."""
        lr = float(self.optimizer_step.scheduler.get_last_lr()[0])
        fields = self.meter.report(self.state, self.total_steps, self.batches_per_epoch, lr)
        self.progress.update(**fields)
        self.run_log.step(self.state, self.meter.losses[-1], fields)
        if self.dist.main:
            display.update(self.progress.snapshot())

    def _interrupt(self) -> Interrupted:
        st = self.state
        saved = (st.last_checkpoint or {}).get("step") == st.step
        if not saved and st.step > 0:
            self.save_checkpoint()
        elif st.step == 0:
            return Interrupted("stopped by signal before the first optimizer step; nothing to checkpoint")
        return Interrupted(f"stopped by signal; checkpoint at step {st.step} of {self.total_steps} is complete, a "
                           "restart resumes from it")

    def run(self) -> TrainResult:
        """Train to the end (or raise Interrupted after a checkpoint on SIGTERM), then run the final evaluation."""
        resumed = self.resume()
        st = self.state
        self.selection.restore(st)
        self.run_log.start(st, self.total_steps, resumed is not None)
        self.progress.update(total_steps=self.total_steps, step=st.step, metrics=dict(st.metrics),
                             checkpoint=dict(st.last_checkpoint) if st.last_checkpoint else None)
        display = Display(self.total_steps, st.step, self.progress_bar and self.dist.main, self.log_interval)
        evaluated_at = -1
        try:
            while st.step < self.total_steps and not self.selection.stopped(st):
                evaluated_at = self._epoch(display, evaluated_at)
        finally:
            display.close()
        if evaluated_at != st.step:
            self.evaluate()
        choice = self.selection.choose(st, self.total_steps, dict(self.extras))
        if choice.step != st.step:
            choice = load_chosen(choice, self.checkpoints, st.step, dict(st.metrics), dict(self.extras))
        metrics = dict(choice.metrics)
        if st.loss_steps:
            metrics["trainLoss"] = st.loss_sum / st.loss_steps
        m = self.meter
        return TrainResult(st, self.total_steps, metrics, dict(choice.extras), resumed, m.seconds, m.cpu_seconds,
                           m.samples / m.seconds if m.seconds else 0.0, m.tokens / m.seconds if m.seconds else 0.0,
                           choice, dict(st.metrics) if choice.step != st.step else None)

    def _epoch(self, display: Display, evaluated_at: int) -> int:
        """Train the rest of the current epoch (or up to the last step); return the step last evaluated at."""
        st = self.state
        batches = self._batches(st.epoch)
        while st.batch_in_epoch < len(batches) and st.step < self.total_steps:
            if self.stop.requested and not self.dist.enabled:
                raise self._interrupt()  # with DDP the flag is agreed after the step instead
            micro = batches[st.batch_in_epoch: st.batch_in_epoch + self.s.grad_accum]
            t0, c0 = time.perf_counter(), time.process_time()
            loss, samples, tokens = self.optimizer_step(self.train_data, micro, self.pad_id)
            stop_flag, loss_sum, samples, tokens = self.dist.sum(
                [float(self.stop.requested), loss, float(samples), float(tokens)])
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            loss = loss_sum / self.dist.world
            st.step += 1
            st.batch_in_epoch += len(micro)
            self.meter.record(st, self.total_steps, loss, int(samples), int(tokens), seconds, cpu_seconds)
            if not math.isfinite(loss):
                log.warning("non-finite training loss %s at step %d", loss, st.step)
            epoch_end = st.batch_in_epoch >= len(batches)
            if epoch_end:
                st.epoch += 1
                st.batch_in_epoch = 0
            self._report_step(display)
            if stop_flag > 0:
                raise self._interrupt()
            final = st.step >= self.total_steps
            if self.s.eval_every and st.step % self.s.eval_every == 0 and not final:
                self.evaluate()
                evaluated_at = st.step
            # A new best and an early stop are checkpointed at once (the best is then kept; a restart ends there).
            stopped = self.selection.stopped(st)
            if final or stopped or (evaluated_at == st.step and self.selection.improved_at(st)) or (
                    self.s.checkpoint_every and st.step % self.s.checkpoint_every == 0) or (
                    epoch_end and self.s.checkpoint_every_epoch):
                self.save_checkpoint()
            if epoch_end or stopped:
                break
        return evaluated_at
