"""The pre-flight: everything about a job that needs neither its weights nor a GPU, on CPU, before any GPU is held.

The operator runs it as a small CPU-only pod from the trainer image (`python -m finetune_trainer --preflight`), and
`finetune validate --data` runs it on a laptop. It goes through the trainer's own code in the trainer's order, so it
fails with exactly the trainer's messages and exit codes: storage probed, the model's configuration and tokenizer
loaded (no weights), all the data read and checked by the task, tokenised (chat templates rendered) into the token
cache the trainer pods then read instead of tokenising again, the memory plan computed for the requested devices
(the widest batch of the real data, the process itself on CPU), and the time estimated. A split too large to read
whole is checked on a seeded sample (said in the result; the cache is then not written).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import numpy as np

from finetune_api import trainer_env as var
from finetune_api.manifest import FineTuneJob
from finetune_api.spec import FineTuneJobSpec, quantity_value
from finetune_api.status import PreflightEstimate, PreflightMemory, PreflightStatus, SplitStats
from finetune_trainer import data as data_mod
from finetune_trainer import job as job_mod
from finetune_trainer import memory, tasks, throughput
from finetune_trainer.config import RunConfig
from finetune_trainer.errors import ConfigError
from finetune_trainer.loop import LoopSettings
from finetune_trainer.modeling import load_tokenizer
from finetune_trainer.tasks.base import Task

log = logging.getLogger(__name__)

DEFAULT_MAX_EXAMPLES = 200_000  # rows per split read whole; larger splits are checked on a seeded sample this size
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # GPU Feature Discovery: MiB of one GPU
NO_BF16 = ("V100", "T4", "P100", "P4")  # GPUs without bf16: precision auto is fp16 there (also 2 bytes)


def max_examples() -> int:
    raw = os.environ.get(var.PREFLIGHT_MAX_EXAMPLES, "")
    try:
        return max(1, int(raw)) if raw else DEFAULT_MAX_EXAMPLES
    except ValueError:
        raise ConfigError(f"environment variable {var.PREFLIGHT_MAX_EXAMPLES}={raw!r} is not an integer") from None


def run(cfg: RunConfig) -> PreflightStatus:
    """The pre-flight of the job in cfg.manifest; TrainerError subclasses (exit 65, 74, 78) as the trainer raises
    them."""
    job = job_mod.read_job(cfg.manifest)
    return check(job, cfg)


def check(job: FineTuneJob, cfg: RunConfig) -> PreflightStatus:
    started = time.monotonic()
    spec = job.spec
    where = job_mod.places(spec, cfg)
    log.info("pre-flight of %s: %s on %s", job.metadata.name, spec.task.type, spec.model.source)
    where.checkpoints.ensure_writable()
    where.output.ensure_writable()
    # TODO(ownership): once finetune_trainer.ownership lands, refuse output and checkpoint paths that belong to
    # another job here (ownership.problem), so such a job fails before any GPU is held.
    task = tasks.for_spec(spec)
    source = job_mod.model_source(spec, cfg, where.cache)
    shape = job_mod.model_shape(spec, task, source)
    device, precision = _precision(spec)
    if (device_bytes := device_memory(spec)[0]) is not None:  # the training state alone: before the data
        memory.state_fits(spec, shape, processes(spec), precision, device, device_bytes)
    tok = load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code, task)
    train, val = job_mod.load_splits(spec, cfg, task, where.cache)
    limit = max_examples()
    fp = data_mod.tokenizer_fingerprint(tok)
    train_enc, train_stats = _split(train, task, tok, where, fp, limit)
    val_stats = _split(val, task, tok, where, fp, limit)[1] if val is not None else None
    sampled = train_stats.checked < train_stats.examples or (val_stats is not None and
                                                             val_stats.checked < val_stats.examples)
    world = processes(spec)
    steps_per_epoch, total_steps = _steps(spec, train_enc, train_stats.examples, world)
    plan_doc, plan = _plan(spec, shape, train_enc)
    estimate = _estimate(spec, shape, cfg, train_stats, val_stats, total_steps, world)
    log.info("pre-flight passed: %d training examples (%d tokens, longest %d), %d steps; %s", train_stats.examples,
             train_stats.tokens, train_stats.longest, total_steps, plan.describe())
    return PreflightStatus(
        train=train_stats, validation=val_stats, sampled=sampled, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, memory_plan=plan_doc, estimate=estimate,
        token_cache=None if sampled or where.tokens is None else str(where.tokens / "tokens"),
        seconds=round(time.monotonic() - started, 1))


def processes(spec: FineTuneJobSpec) -> int:
    r = spec.resources
    return r.workers * max(1, r.gpus_per_worker)


def _split(split: data_mod.Split, task: Task, tok: Any, where: job_mod.Places, fp: str,
           limit: int) -> tuple[data_mod.Encoded, SplitStats]:
    """Check and tokenise a split (into the token cache), or a seeded sample of one too large to read whole."""
    total = len(split)
    if total > limit:
        log.info("dataset.%s has %d examples: checking a sample of %d", split.name, total, limit)
        picked = np.sort(np.random.default_rng(0).choice(total, size=limit, replace=False))
        sample = split.select(picked)
        task.check(sample)
        enc = task.encode(sample, tok)
    else:
        enc = job_mod.encode_split(split, task, tok, where, fp, write_cache=True)
    cost = enc.cost()
    tokens = int(cost.sum()) if len(enc) == total else round(float(cost.mean()) * total)
    lengths = enc.lengths()
    return enc, SplitStats(examples=total, tokens=tokens, longest=int(lengths.max()) if len(lengths) else 0,
                           checked=len(enc))


def _steps(spec: FineTuneJobSpec, train: data_mod.Encoded, examples: int, world: int) -> tuple[int, int]:
    """Optimizer steps per epoch and in all, as the trainer's loop counts them."""
    hp = spec.hyperparameters
    if len(train) == examples:
        batches = len(data_mod.epoch_batches(train.cost(), hp.batch_size, hp.seed, 0, world, 0))
    else:
        batches = -(-examples // hp.batch_size) // world
    settings = LoopSettings.of(spec)
    return -(-batches // hp.gradient_accumulation_steps), settings.total_steps(batches)


def device_memory(spec: FineTuneJobSpec) -> tuple[float | None, str]:
    """Bytes of one device the job will train on, and where that figure comes from."""
    r = spec.resources
    if r.gpus_per_worker > 0:
        if spec.preflight.gpu_memory is not None:
            return quantity_value(spec.preflight.gpu_memory), "spec.preflight.gpuMemory"
        labels = r.node_selector or {}
        if (mib := labels.get(GPU_MEMORY_LABEL, "")).isdigit():
            return float(mib) * 2**20, f"nodeSelector {GPU_MEMORY_LABEL}"
        product = labels.get(throughput.PRODUCT_LABEL, "")
        if (m := re.search(r"(\d+)GB", product.upper())) is not None:
            return float(m[1]) * 1e9, f"nodeSelector {throughput.PRODUCT_LABEL} ({m[1]}GB in its name)"
        return None, "unknown"
    if r.memory is not None:
        return quantity_value(r.memory) / max(1, r.gpus_per_worker, 1), "spec.resources.memory"
    return None, "unknown"


def _precision(spec: FineTuneJobSpec) -> tuple[str, str]:
    """(device type, precision) the trainer pods will use, as modeling.choose_precision resolves them there."""
    requested = spec.hyperparameters.precision
    if spec.resources.gpus_per_worker > 0:
        product = (spec.resources.node_selector or {}).get(throughput.PRODUCT_LABEL, "").upper()
        if requested == "auto":
            requested = "fp16" if any(g in product for g in NO_BF16) else "bf16"
        return "cuda", requested
    return "cpu", "fp32" if requested in ("auto", "fp16") else requested


def _plan(spec: FineTuneJobSpec, shape: memory.ModelShape,
          train: data_mod.Encoded) -> tuple[PreflightMemory, memory.Plan]:
    """The memory plan for the requested devices: ConfigError naming the field to change when it cannot fit; made
    but not judged when the device's memory is unknown."""
    device, precision = _precision(spec)
    device_bytes, source = device_memory(spec)
    baseline = memory.process_baseline() if device == "cpu" else 0.0
    plan = memory.for_job(spec, shape, processes(spec), precision, device, device_bytes or 0.0,
                          memory.DataShape.of(train), baseline, check=device_bytes is not None)
    report = plan.report()
    doc = PreflightMemory(sharding=plan.sharding, reason=plan.reason[:512], per_device_bytes=report.per_device_bytes,
                          device_bytes=round(device_bytes) if device_bytes is not None else None,
                          device_memory_from=source, fits=plan.fits(device) if device_bytes is not None else None,
                          breakdown=report.breakdown)
    return doc, plan


def _estimate(spec: FineTuneJobSpec, shape: memory.ModelShape, cfg: RunConfig, train: SplitStats,
              val: SplitStats | None, total_steps: int, world: int) -> PreflightEstimate | None:
    hp = spec.hyperparameters
    non_embedding = max(1, shape.parameters - shape.embedding)
    share = shape.trainable / max(1, shape.parameters)
    flops = throughput.flops_per_token(non_embedding, share, hp.activation_checkpointing)
    cpu_flops = None
    if spec.resources.gpus_per_worker == 0 and spec.preflight.tokens_per_second is None:
        cpu = spec.resources.cpu
        threads = max(1, int(quantity_value(cpu))) if cpu is not None else cfg.threads
        cpu_flops = throughput.measure_cpu_flops(threads)
    rate = throughput.for_spec(spec, flops, cpu_flops)
    if rate.tokens_per_second <= 0:
        return None
    mean = train.tokens / max(1, train.examples)
    train_tokens = total_steps * hp.gradient_accumulation_steps * hp.batch_size * world * mean
    evaluations = (total_steps // hp.eval_every_steps + 1) if val is not None and hp.eval_every_steps else (
        1 if val is not None else 0)
    gpus = spec.resources.workers * spec.resources.gpus_per_worker
    est = throughput.estimate(train_tokens, val.tokens if val is not None else 0.0, evaluations,
                              rate.tokens_per_second, world, gpus)
    return PreflightEstimate(tokens_per_second=round(rate.tokens_per_second, 1), basis=rate.basis[:512],
                             wall_seconds=est.wall_seconds, wall=est.wall, gpu_seconds=est.gpu_seconds)


def summary(found: PreflightStatus) -> str:
    """What `finetune validate --data` prints: the data, the steps, the plan and the time."""
    lines = []
    for name, s in (("train", found.train), ("validation", found.validation)):
        if s is not None:
            how = f" (checked a sample of {s.checked})" if s.checked < s.examples else ""
            lines.append(f"{name}: {s.examples} examples, {s.tokens} tokens, longest {s.longest} tokens{how}")
    lines.append(f"steps: {found.steps_per_epoch} per epoch, {found.total_steps} in all")
    plan = found.memory_plan
    device = f"{plan.device_bytes / 1e9:.2f} GB ({plan.device_memory_from})" if plan.device_bytes else (
        "unknown: not checked (set spec.preflight.gpuMemory, or resources.memory for CPU jobs)")
    verdict = "" if plan.fits is None else ("; fits" if plan.fits else "; does NOT fit")
    lines.append(f"memory plan: sharding {plan.sharding}, {plan.per_device_bytes / 1e9:.2f} GB per device of "
                 f"{device}{verdict}")
    if found.estimate is not None:
        e = found.estimate
        gpu = f", {e.gpu_seconds / 3600:.2f} GPU-hours" if e.gpu_seconds else ""
        lines.append(f"estimate: {e.wall}{gpu} at {e.tokens_per_second:g} tokens/s per device ({e.basis})")
    if found.token_cache:
        lines.append(f"tokenised data written to {found.token_cache}")
    return "\n".join(lines)
