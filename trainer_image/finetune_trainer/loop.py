"""The training loop: AdamW (fused where available) with decay on matrices only, warmup then linear/cosine/constant,
gradient accumulation, autocast where it helps, DDP, periodic evaluation, atomic checkpoints and SIGTERM handling.

Our own loop rather than transformers.Trainer: every batch comes pre-tokenised and length-grouped from `data`, so
the per-step overhead is a pad and a forward/backward; resume restores model, optimizer, scheduler, RNG and the
exact data position; and preemption is a first-class path (checkpoint, then exit 75).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune_api import exitcodes
from finetune_trainer.checkpoint import CheckpointInfo, CheckpointManager, rfc3339
from finetune_trainer.data import Encoded, collate, epoch_batches
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import Interrupted, StorageError
from finetune_trainer.evaluation import EvaluationStopped, Evaluator
from finetune_trainer.modeling import Precision
from finetune_trainer.progress import Display, Progress

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
    grouped_batches: bool = True


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


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """On CPU, torch's clip_grad_norm_ without its unconditional rescale: gradients are only rewritten when the norm
    is over the limit (the same result; one pass over all gradients fewer on most steps)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if grads[0].device.type != "cpu":  # on accelerators reading the norm back would stall the queue
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    norm = float(total)
    if norm > max_norm or not math.isfinite(norm):
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


# --------------------------------------------------------------------------------------------------------- signals
class StopSignal:
    """SIGTERM/SIGINT set a flag checked after every optimizer step and before every evaluation batch; a watchdog
    exits with 75 once the grace period is spent, whatever the loop is doing (a save still in progress stays a
    partial, ignored checkpoint)."""

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.event.is_set():
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                os._exit(exitcodes.INTERRUPTED)
            return
        self.signum = signum
        self.event.set()
        log.warning("received %s: saving a checkpoint and stopping (grace period %gs)",
                    signal.Signals(signum).name, self.grace_period)
        threading.Thread(target=self._watchdog, name="grace-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        time.sleep(self.grace_period)
        log.error("grace period of %gs is over before the checkpoint completed: exiting now", self.grace_period)
        logging.shutdown()
        os._exit(exitcodes.INTERRUPTED)

    @property
    def requested(self) -> bool:
        return self.event.is_set()


# ----------------------------------------------------------------------------------------------------------- state
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

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        raw = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class TrainResult:
    state: TrainState
    metrics: dict[str, float]
    extras: dict[str, Any]
    resumed_from: int | None
    train_seconds: float
    train_cpu_seconds: float
    samples_per_second: float
    tokens_per_second: float


# ------------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """Runs one job's optimisation from a fresh start or the latest complete checkpoint."""

    def __init__(self, *, model: torch.nn.Module, train: Encoded, pad_id: int, settings: LoopSettings,
                 precision: Precision, dist: Dist, checkpoints: CheckpointManager, checkpoint_uri: str,
                 evaluator: Evaluator | None, progress: Progress, stop: StopSignal, progress_bar: bool = False,
                 log_interval: float = 5.0, on_step: Callable[[TrainState], None] | None = None) -> None:
        self.raw_model = model
        self.train_data = train
        self.pad_id = pad_id
        self.s = settings
        self.precision = precision
        self.dist = dist
        self.ckpt = checkpoints
        self.ckpt_uri = checkpoint_uri.rstrip("/")
        self.evaluator = evaluator
        self.progress = progress
        self.stop = stop
        self.progress_bar = progress_bar
        self.log_interval = log_interval
        self.on_step = on_step
        self.device = dist.device
        self.cost = train.cost()
        self.batches_per_epoch = len(self._batches(0))
        if self.batches_per_epoch == 0:
            from finetune_trainer.errors import DataError

            raise DataError(f"dataset.train has {len(train)} examples: too few for one batch on each of "
                            f"{dist.world} processes")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / settings.grad_accum)
        if settings.max_steps is not None:
            self.total_steps = settings.max_steps
        else:
            self.total_steps = self.steps_per_epoch * int(settings.epochs or 1)
        self.warmup_steps = math.ceil(settings.warmup_ratio * self.total_steps)
        model.to(self.device)
        model.train()
        self.model: torch.nn.Module = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, settings.learning_rate, settings.weight_decay)
        total, warmup, kind = self.total_steps, self.warmup_steps, settings.scheduler
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: lr_factor(step, total, warmup, kind))
        self.scaler = torch.amp.GradScaler("cuda") if precision.grad_scaling else None
        self.state = TrainState(world=dist.world, train_examples=len(train))
        self.extras: dict[str, Any] = {}
        self._losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self._curve: list[float] = []  # losses since the last loss-curve point
        self._session_seconds = 0.0
        self._session_cpu = 0.0  # process CPU time in training steps: a load-independent cost measure
        self._session_samples = 0
        self._session_tokens = 0
        self._session_steps = 0

    def _batches(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(self.cost, self.s.batch_size, self.s.seed, epoch, self.dist.world, self.dist.rank,
                             grouped=self.s.grouped_batches)

    def _autocast(self) -> Any:
        return self.precision.autocast(self.device)

    # ------------------------------------------------------------------------------------------------- resume
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").contiguous() for n, p in self.raw_model.named_parameters()
                if p.requires_grad}

    def _rng_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def _read(self, path: Path) -> dict[str, Any]:
        """Read and check a checkpoint without touching the model: a bad one changes nothing on any rank."""
        from safetensors.torch import load_file

        tensors = load_file(str(path / "model.safetensors"))
        params = dict(self.raw_model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise ValueError(f"parameters do not match the model (missing {missing}, unexpected {extra})")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(params[n].shape):
                raise ValueError(f"parameter {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        ours = [len(g["params"]) for g in self.optimizer.param_groups]
        theirs = [len(g["params"]) for g in opt_state["param_groups"]]
        if ours != theirs:
            raise ValueError(f"optimizer parameter groups {theirs} do not match the model's {ours}")
        sched_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
        rng_file = path / f"rng-{self.dist.rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
        state = TrainState.from_json((path / "trainer_state.json").read_text())
        return {"tensors": tensors, "optimizer": opt_state, "scheduler": sched_state, "rng": rng, "state": state}

    def _apply(self, bundle: dict[str, Any]) -> TrainState:
        params = dict(self.raw_model.named_parameters())
        with torch.no_grad():
            for n, t in bundle["tensors"].items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(bundle["optimizer"])
        self.scheduler.load_state_dict(bundle["scheduler"])
        state: TrainState = bundle["state"]
        rng = bundle["rng"]
        if rng is not None and state.world == self.dist.world:
            torch.set_rng_state(rng["torch"])
            random.setstate(_tuples(json.loads(rng["python"])))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        if state.world != self.dist.world:  # keep the global data position when the process count changes
            state.batch_in_epoch = state.batch_in_epoch * state.world // self.dist.world
            state.world = self.dist.world
        if state.train_examples and state.train_examples != len(self.train_data):
            log.warning("the training data had %d examples at the checkpoint and has %d now",
                        state.train_examples, len(self.train_data))
        return state

    def resume(self) -> int | None:
        """Resume from the newest complete checkpoint that every rank can load; return its step or None."""
        if self.dist.main:
            self.ckpt.clean_partials()
        self.dist.barrier()
        candidates = self.dist.gather([c.step for c in self.ckpt.complete()] if self.dist.main else None)[0]
        for step in reversed(candidates):
            path = self.ckpt.root / f"checkpoint-{step}"
            if self.dist.local_rank == 0:  # one download per node for remote storage; the others then read it
                self.ckpt.ensure_local(step)
            self.dist.barrier()
            if self.dist.local_rank != 0:
                self.ckpt.ensure_local(step)
            try:
                bundle: dict[str, Any] | None = self._read(path)
                error = None
            except Exception as exc:  # any unreadable file means this checkpoint is unusable
                bundle, error = None, f"{type(exc).__name__}: {exc}"
            errors = [e for e in self.dist.gather(error) if e]
            if errors:
                log.warning("skipping damaged checkpoint %s: %s", path, errors[0])
                if self.dist.main:
                    self.ckpt.set_aside(path)
                self.dist.barrier()
                continue
            assert bundle is not None
            state = self._apply(bundle)
            self.state = state
            self.state.checkpoints = max(self.state.checkpoints, 1)
            info = {"step": step, "path": f"{self.ckpt_uri}/checkpoint-{step}",
                    "time": (state.last_checkpoint or {}).get("time"), "count": self.state.checkpoints}
            self.state.last_checkpoint = info
            log.info("resuming from %s (step %d of %d, epoch %d)", path, step, self.total_steps, state.epoch)
            return step
        return None

    # ------------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self) -> CheckpointInfo | None:
        """All ranks call this; rank 0 writes. A storage failure on rank 0 stops every rank with exit 74."""
        rngs = self.dist.gather(self._rng_state())
        info: CheckpointInfo | None = None
        error: str | None = None
        t0 = time.monotonic()
        if self.dist.main:
            state = self.state
            state.checkpoints += 1
            state.last_checkpoint = {"step": state.step, "path": f"{self.ckpt_uri}/checkpoint-{state.step}",
                                     "time": rfc3339(), "count": state.checkpoints}

            def write(tmp: Path) -> None:
                from safetensors.torch import save_file

                save_file(self._trainable_state(), str(tmp / "model.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                for r, rng in enumerate(rngs):
                    torch.save(rng, tmp / f"rng-{r}.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2, sort_keys=True))

            try:
                info = self.ckpt.save(state.step, write)
                state.last_checkpoint["time"] = info.time
            except StorageError as exc:
                state.checkpoints -= 1
                error = exc.message
        errors = [e for e in self.dist.gather(error) if e]
        if errors:
            raise StorageError(errors[0])
        if info is not None:
            log.info("checkpoint %s complete (%.1fs)", info.path, time.monotonic() - t0)
            self.progress.update(urgent=True, checkpoint=dict(self.state.last_checkpoint or {}))
        return info

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        t0 = time.monotonic()
        log.info("evaluating at step %d", self.state.step)
        # The unwrapped model: DDP's forward broadcasts buffers, and ranks may hold one eval batch more or less.
        try:
            metrics, extras = self.evaluator.run(self.raw_model, should_stop=lambda: self.stop.requested)
        except EvaluationStopped:
            # Checkpoint the step just trained (unless saved) and exit 75: the restart resumes from it. A stop during
            # the final evaluation finds the final checkpoint saved; the restart evaluates and writes the output.
            log.warning("evaluation at step %d stopped by signal after %.1fs", self.state.step,
                        time.monotonic() - t0)
            raise self._interrupt() from None
        self.extras.update(extras)
        self.state.metrics.update(metrics)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        log.info("evaluation at step %d: %s (%.1fs)", self.state.step, shown, time.monotonic() - t0)
        self.progress.update(urgent=True, metrics=metrics)
        return metrics

    # ------------------------------------------------------------------------------------------------ training
    def _publish_step(self, display: Display) -> None:
        st = self.state
        steps_left = max(0, self.total_steps - st.step)
        per_step = self._session_seconds / self._session_steps if self._session_steps else None
        fields: dict[str, Any] = {
            "step": st.step, "totalSteps": self.total_steps,
            "epoch": round(st.epoch + st.batch_in_epoch / max(1, self.batches_per_epoch), 4),
            "percent": round(100.0 * st.step / max(1, self.total_steps), 2),
            "learningRate": float(self.scheduler.get_last_lr()[0]),
        }
        if self._losses:
            fields["loss"] = float(sum(self._losses) / len(self._losses))
        if self._session_seconds > 0:
            fields["samplesPerSecond"] = round(self._session_samples / self._session_seconds, 3)
            fields["tokensPerSecond"] = round(self._session_tokens / self._session_seconds, 1)
        if per_step is not None:
            fields["etaSeconds"] = round(steps_left * per_step)
        if st.loss_steps:
            fields["metrics"] = {"trainLoss": st.loss_sum / st.loss_steps}
        self.progress.update(**fields)
        if self.dist.main:
            display.update(self.progress.snapshot())

    def _step(self, micro: list[np.ndarray]) -> tuple[float, int, int]:
        """One optimizer step over a few micro-batches; returns (mean loss, samples, real tokens)."""
        loss_total, samples, tokens = 0.0, 0, 0
        for j, idx in enumerate(micro):
            batch, n_tokens = collate(self.train_data, idx, self.pad_id)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()  # type: ignore[operator]
            with sync:
                with self._autocast():
                    out = self.model(**batch)
                loss = out.loss / len(micro)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_total += float(loss.detach())
            samples += len(idx)
            tokens += n_tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.s.max_grad_norm > 0:
            clip_grad_norm(self.params, self.s.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, samples, tokens

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
        self.progress.update(totalSteps=self.total_steps, step=st.step, metrics=dict(st.metrics),
                             checkpoint=dict(st.last_checkpoint) if st.last_checkpoint else None)
        display = Display(self.total_steps, st.step, self.progress_bar and self.dist.main, self.log_interval)
        eval_done_at = -1
        try:
            while st.step < self.total_steps:
                batches = self._batches(st.epoch)
                while st.batch_in_epoch < len(batches) and st.step < self.total_steps:
                    if self.stop.requested and not self.dist.enabled:
                        raise self._interrupt()  # with DDP the flag is agreed after the step instead
                    micro = batches[st.batch_in_epoch: st.batch_in_epoch + self.s.grad_accum]
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss, samples, tokens = self._step(micro)
                    stop_flag, loss_sum, samples, tokens = self.dist.sum(
                        [float(self.stop.requested), loss, float(samples), float(tokens)])
                    dt = time.perf_counter() - t0
                    self._session_cpu += time.process_time() - c0
                    loss = loss_sum / self.dist.world
                    st.step += 1
                    st.batch_in_epoch += len(micro)
                    st.samples += int(samples)
                    st.tokens += int(tokens)
                    st.loss_sum += loss
                    st.loss_steps += 1
                    self._losses.append(loss)
                    self._curve.append(loss)
                    if st.step % max(1, self.total_steps // 100) == 0 or st.step in (1, self.total_steps):
                        st.loss_curve.append([st.step, sum(self._curve) / len(self._curve)])
                        self._curve.clear()
                    self._session_seconds += dt
                    self._session_samples += int(samples)
                    self._session_tokens += int(tokens)
                    self._session_steps += 1
                    if not math.isfinite(loss):
                        log.warning("non-finite training loss %s at step %d", loss, st.step)
                    epoch_end = st.batch_in_epoch >= len(batches)
                    if epoch_end:
                        st.epoch += 1
                        st.batch_in_epoch = 0
                    self._publish_step(display)
                    if self.on_step is not None:
                        self.on_step(st)
                    if stop_flag > 0:
                        raise self._interrupt()
                    final = st.step >= self.total_steps
                    if self.s.eval_every and st.step % self.s.eval_every == 0 and not final:
                        self.evaluate()
                        eval_done_at = st.step
                    if final or (self.s.checkpoint_every and st.step % self.s.checkpoint_every == 0) or (
                            epoch_end and self.s.checkpoint_every_epoch):
                        self.save_checkpoint()
                    if epoch_end:
                        break
        finally:
            display.close()
        if eval_done_at != st.step:
            self.evaluate()
        metrics = dict(st.metrics)
        if st.loss_steps:
            metrics["trainLoss"] = st.loss_sum / st.loss_steps
        secs = self._session_seconds
        return TrainResult(st, metrics, dict(self.extras), resumed, secs, self._session_cpu,
                           self._session_samples / secs if secs else 0.0,
                           self._session_tokens / secs if secs else 0.0)


def _tuples(obj: Any) -> Any:
    """json turns random.getstate()'s tuples into lists; setstate needs them back."""
    if isinstance(obj, list):
        return tuple(_tuples(x) for x in obj)
    return obj
