"""One job, start to finish: resolve locations, plan memory, load and check data, load the model, train, write the
output.

The order is chosen so that mistakes surface early and cheaply: QLoRA without a GPU fails first; storage is probed;
the model's configuration is read (no weights); the data is checked and tokenised (or read from the token cache the
pre-flight wrote); the memory plan, for the widest batch of that data, fails a job that cannot fit; only then are the
weights loaded, and all of it before the first optimizer step.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_api.manifest import FineTuneJob, load_job
from finetune_api.spec import FineTuneJobSpec, checkpoint_storage, quantization_of, task_metrics
from finetune_trainer import data as data_mod
from finetune_trainer import memory, quantization, tasks
from finetune_trainer.checkpoint import CheckpointManager, is_io_error
from finetune_trainer.config import RunConfig
from finetune_trainer.distributed import Dist, init_from_env
from finetune_trainer.errors import ConfigError, DataError, Interrupted
from finetune_trainer.evaluation import Evaluator
from finetune_trainer.history import RunLog
from finetune_trainer.locations import DATA_SUFFIXES, Location, Storage, expand_files, fetch, resolve, storage
from finetune_trainer.loop import LoopSettings, Trainer, TrainResult, seed_everything
from finetune_trainer.model_card import CARD_FILE, write_model_card
from finetune_trainer.modeling import (
    Precision,
    apply_lora,
    choose_precision,
    frozen_dtype,
    load_model,
    load_tokenizer,
    merged_adapter,
    meta_model,
    trainable_in_fp32,
    trainable_summary,
)
from finetune_trainer.output import METRICS_FILE, metrics_document, write_output
from finetune_trainer.plots import PLOT_FILE, chosen_metric, plot_history
from finetune_trainer.progress import Progress
from finetune_trainer.selection import Selection
from finetune_trainer.sharded_checkpoint import full_state_dict
from finetune_trainer.sharding import Layout, Wrapped
from finetune_trainer.signals import StopSignal
from finetune_trainer.tasks.base import Task
from finetune_trainer.tracking import for_job

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a finished run reports back to the console (and what tests inspect)."""

    job: str
    task: Task
    result: TrainResult
    output_uri: str
    output_path: Path
    seconds: float
    files: list[str]  # what the output folder holds
    trackers: list[str]  # where else the metrics went (one line each)


@dataclass(frozen=True)
class Places:
    """Where this run reads and writes."""

    cache: Path  # downloads, the datasets cache, staging of remote storage
    checkpoints: Storage
    output: Storage
    tokens: Path | None  # the token cache's folder


def read_job(path: Path) -> FineTuneJob:
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist")
    try:
        return load_job(path)
    except ValueError as exc:
        raise ConfigError(f"manifest {path} is not a valid FineTuneJob: {exc}") from None
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"manifest {path} cannot be read: {str(exc).splitlines()[0]}") from None


def s3_options(spec: FineTuneJobSpec) -> dict[str, Any]:
    """fsspec/s3fs options from the spec (keys themselves come from AWS_* variables set from Secrets)."""
    s3 = spec.credentials.s3 if spec.credentials else None
    client: dict[str, Any] = {}
    if s3 and s3.endpoint_url:
        client["endpoint_url"] = s3.endpoint_url
    if s3 and s3.region:
        client["region_name"] = s3.region
    return {"client_kwargs": client} if client else {}


def places(spec: FineTuneJobSpec, cfg: RunConfig) -> Places:
    cache = cfg.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune"
    opts = s3_options(spec)
    ckpt = storage(checkpoint_storage(spec), cfg.pvc_root, cache, opts, "checkpointing.storage")
    out = storage(spec.output.storage, cfg.pvc_root, cache, opts, "output.storage")
    # Tokenised data lives beside the checkpoints (a volume that outlives the pod) unless those are remote.
    return Places(cache, ckpt, out, ckpt.local / ".cache" if not ckpt.remote else cache)


def model_source(spec: FineTuneJobSpec, cfg: RunConfig, work_cache: Path) -> str:
    loc = resolve(spec.model.source, cfg.pvc_root, "model.source")
    if loc.hub is not None:
        return loc.hub
    if loc.remote is not None:
        return str(fetch(loc, work_cache, s3_options(spec)))
    assert loc.path is not None
    if not loc.path.exists():
        raise ConfigError(f"model.source {spec.model.source} not found (looked in {loc.path})")
    return str(loc.path)


def _split(name: str, uri: str, spec: FineTuneJobSpec, cfg: RunConfig, work_cache: Path,
           hub_split: str) -> data_mod.Split:
    ds = spec.dataset
    loc: Location = resolve(uri, cfg.pvc_root, f"dataset.{name}")
    if loc.hub is not None and (ds.format not in ("auto", "hub") or Path(uri).suffix.lower() in DATA_SUFFIXES):
        loc = Location(uri, path=Path(uri))  # a file name that does not exist, not a hub dataset
    if ds.format == "hub" or (loc.hub is not None and ds.format == "auto"):
        return data_mod.load_hub(name, uri, hub_split, ds.subset, work_cache)
    path = loc.path if loc.path is not None else fetch(loc, work_cache, s3_options(spec))
    files = expand_files(path)
    if not files:
        raise DataError(f"dataset.{name} {uri}: no data files found (looked in {path})")
    return data_mod.load_files(name, uri, files, ds.format, work_cache)


def load_splits(spec: FineTuneJobSpec, cfg: RunConfig, task: Task,
                work_cache: Path) -> tuple[data_mod.Split, data_mod.Split | None]:
    ds = spec.dataset
    train = _split("train", ds.train, spec, cfg, work_cache, ds.train_split)
    val: data_mod.Split | None = None
    if ds.validation:
        if ds.format == "hub":
            # A hub dataset's validation is a split name of the same dataset, or another dataset's "validation".
            try:
                val = data_mod.load_hub("validation", ds.train, ds.validation, ds.subset, work_cache)
            except ConfigError:
                val = data_mod.load_hub("validation", ds.validation, "validation", ds.subset, work_cache)
        else:
            val = _split("validation", ds.validation, spec, cfg, work_cache, "validation")
    elif ds.validation_split:
        task.check(train)  # report rows by their original position first
        train, val = data_mod.split_off(train, ds.validation_split, spec.hyperparameters.seed)
    if ds.max_samples is not None and len(train) > ds.max_samples:
        train = train.select(range(ds.max_samples))
    return train, val


def prepare_data(spec: FineTuneJobSpec, cfg: RunConfig, task: Task, tok: Any, where: Places,
                 write_cache: bool) -> tuple[data_mod.Encoded, data_mod.Encoded | None]:
    """Load, check and tokenise both splits; a split in the token cache (the pre-flight's, or an earlier pod's) was
    checked when it was tokenised, and is neither checked nor tokenised again."""
    train, val = load_splits(spec, cfg, task, where.cache)
    fp = data_mod.tokenizer_fingerprint(tok)
    train_enc = encode_split(train, task, tok, where, fp, write_cache)
    val_enc = encode_split(val, task, tok, where, fp, write_cache) if val is not None else None
    log.info("data: %d training and %d validation examples, %.1f tokens per training example on average",
             len(train_enc), len(val_enc) if val_enc is not None else 0, float(train_enc.lengths().mean()))
    return train_enc, val_enc


def model_shape(spec: FineTuneJobSpec, task: Task, source: str) -> memory.ModelShape:
    """The job's model (head and adapters included) built on the meta device: its shape, no weights read."""
    meta = meta_model(task, source, spec.model.revision, spec.model.trust_remote_code, spec.method.type,
                      spec.method.lora)
    return memory.model_shape(meta)


def encode_split(split: data_mod.Split, task: Task, tok: Any, where: Places, tok_fp: str,
                 write_cache: bool) -> data_mod.Encoded:
    """A split checked and tokenised, through the token cache (the pre-flight writes it, the trainer pods read it)."""
    if (enc := data_mod.cached_tokens(split, task.info, where.tokens, tok_fp)) is not None:
        return enc
    task.check(split)
    return data_mod.encode_cached(split, task.info, lambda: task.encode(split, tok), where.tokens, tok_fp, write_cache)


def plan_memory(spec: FineTuneJobSpec, shape: memory.ModelShape, data: memory.DataShape, dist: Dist,
                precision: Precision) -> memory.Plan:
    """The sharding and per-device estimate for this job, for the widest batch of its data and, on CPU, with this
    process as it is now (libraries imported, data read) counted; ConfigError (exit 78) naming the field to change
    when it cannot fit."""
    device_bytes = memory.device_memory(dist.device, memory.local_processes())
    baseline = memory.process_baseline() if dist.device.type == "cpu" else 0.0
    plan = memory.for_job(spec, shape, dist.world, precision.name, dist.device.type, device_bytes, data, baseline)
    log.info("%s", plan.describe())
    return plan


def load_trainable(spec: FineTuneJobSpec, task: Task, source: str, tok: Any, dist: Dist,
                   precision: Precision) -> Any:
    """The pretrained model with the task's head (and LoRA adapters), seeded: a LoRA base in the compute precision
    (quantized with QLoRA), trainable parameters in fp32."""
    seed_everything(spec.hyperparameters.seed)
    dtype = frozen_dtype(spec.method.type, precision)
    quantized = quantization.load_kwargs(quantization_of(spec), dist.device, dtype)
    model = load_model(task, source, spec.model.revision, spec.model.trust_remote_code, tok, dtype, **quantized)
    if quantized:
        model = quantization.prepare(model)
    if spec.method.type == "lora":
        model = apply_lora(model, task, spec.method.lora)
    trainable_in_fp32(model)
    log.info("model: %s; precision %s%s", trainable_summary(model), precision.name,
             f"; frozen weights in {str(dtype).removeprefix('torch.')}" if dtype != torch.float32 else "")
    return model


def run(cfg: RunConfig) -> Outcome:
    """Run the job in cfg.manifest; raise TrainerError subclasses for permanent failures and Interrupted on SIGTERM."""
    job = read_job(cfg.manifest)
    stop = StopSignal(cfg.grace_period)
    stop.install()
    torch.set_num_threads(cfg.threads)
    dist = init_from_env()
    try:
        return _run(job, cfg, dist, stop)
    finally:
        stop.uninstall()
        if dist.enabled:
            # The DDP wrapper's reducer holds the process group; reference cycles can keep it alive until interpreter
            # finalisation, where gloo's worker threads then abort the process (SIGABRT, "terminate called without
            # an active exception"). Free it while the interpreter is whole, then tear down.
            gc.collect()
        dist.close()


def _run(job: FineTuneJob, cfg: RunConfig, dist: Dist, stop: StopSignal) -> Outcome:
    started = time.monotonic()
    name, spec = job.metadata.name, job.spec
    hp = spec.hyperparameters
    quantization.require_device(quantization_of(spec), dist.device)  # QLoRA without a GPU: exit 78 before anything
    where = places(spec, cfg)
    log.info("job %s: %s on %s, %d process(es), device %s, %d thread(s)", name, spec.task.type, spec.model.source,
             dist.world, dist.device, cfg.threads)
    dist.on_main(lambda: (where.checkpoints.ensure_writable(), where.output.ensure_writable()))
    # metrics.jsonl and the trackers (rank 0); a tracker that is misconfigured stops the job here, before any work.
    run_log = dist.on_main(lambda: RunLog(where.output.local, for_job(job, where.output.local))) or RunLog(None)
    task = tasks.for_spec(spec)
    source = model_source(spec, cfg, where.cache)
    precision = choose_precision(hp.precision, dist.device)
    shape = model_shape(spec, task, source)  # a configuration that cannot be read fails before the data is read
    device_bytes = memory.device_memory(dist.device, memory.local_processes())
    memory.state_fits(spec, shape, dist.world, precision.name, dist.device.type, device_bytes)  # before the data
    tok = load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code, task)
    train_enc, val_enc = _data_everywhere(spec, cfg, task, tok, where, dist)
    plan = plan_memory(spec, shape, memory.DataShape.of(train_enc), dist, precision)
    model = load_trainable(spec, task, source, tok, dist, precision)
    layout = Layout(plan.sharding, precision.autocast_dtype, precision.grad_scaling, hp.activation_checkpointing)

    ckpt = CheckpointManager(where.checkpoints, spec.checkpointing.keep_last)
    progress = Progress(push_url=cfg.progress_url, push_token=cfg.progress_token,
                        push_interval=cfg.progress_interval, enabled=dist.main,
                        on_write=lambda doc, final: ckpt.write_progress(doc, upload=final))
    progress.update(memory_plan=plan.report())
    progress.start(cfg.metrics_port)
    evaluator = _evaluator(task, val_enc, tok, hp.batch_size * 2, dist, precision, lockstep=plan.sharding == "fsdp")
    status: str | None = "FAILED"  # the trackers' end of the run
    try:
        trainer = Trainer(model=model, train=train_enc, pad_id=tok.pad_token_id, settings=LoopSettings.of(spec),
                          precision=precision, dist=dist, checkpoints=ckpt, evaluator=evaluator, progress=progress,
                          stop=stop, progress_bar=cfg.progress_bar, log_interval=cfg.progress_interval,
                          run_log=run_log, selection=Selection.of(spec), layout=layout)
        result = trainer.run()
        saving = output_saving(spec, task, source, tok, trainer.optimizer_step.wrapped)  # collective under FSDP
        used = memory_report(plan, trainer.optimizer_step.measured)
        dist.on_main(lambda: write_output(where.output, spec, model, tok, lambda: metrics_document(
            name, spec, result, precision=precision.name, processes=dist.world, train_examples=len(train_enc),
            validation_examples=len(val_enc) if val_enc else 0, memory=used),
            describe=lambda folder, doc: describe_output(folder, job, doc, result, run_log), **saving))
        output: dict[str, Any] = {"path": spec.output.storage, "metrics": result.metrics}
        if result.choice is not None:
            output.update(step=result.choice.step, model=result.choice.model, reason=result.choice.reason[:1024])
        progress.update(urgent=False, state="finished", metrics=result.metrics, output=output, eta_seconds=0)
        status = "FINISHED"
    except Interrupted:
        status = None  # a restart continues the run
        raise
    finally:
        done = [where.output.local / f for f in (METRICS_FILE, PLOT_FILE, CARD_FILE)] if status == "FINISHED" else []
        run_log.close(done, status)
        progress.close()
    files = _listing(where.output.local) if dist.main else []
    return Outcome(name, task, result, spec.output.storage, where.output.local, time.monotonic() - started, files,
                   run_log.describe())


def _data_everywhere(spec: FineTuneJobSpec, cfg: RunConfig, task: Task, tok: Any, where: Places,
                     dist: Dist) -> tuple[data_mod.Encoded, data_mod.Encoded | None]:
    """Rank 0 checks and tokenises first (and writes the cache); the others then read it."""
    encoded = dist.on_main(lambda: prepare_data(spec, cfg, task, tok, where, write_cache=True))
    if not dist.main:
        encoded = prepare_data(spec, cfg, task, tok, where, write_cache=False)
    assert encoded is not None
    return encoded


def _evaluator(task: Task, val_enc: data_mod.Encoded | None, tok: Any, batch_size: int, dist: Dist,
               precision: Precision, lockstep: bool) -> Evaluator | None:
    """The validation pass, when there is validation data; under FSDP every rank runs every batch (lockstep)."""
    if val_enc is None:
        return None
    return Evaluator(task.evaluate, val_enc, tok, batch_size, dist.device, lambda: precision.autocast(dist.device),
                     dist.rank, dist.world, dist.gather, lockstep=lockstep)


def _listing(folder: Path) -> list[str]:
    """The output's files for the end-of-run summary (folders end in /, hidden files left out)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))


def describe_output(folder: Path, job: FineTuneJob, doc: dict[str, Any], result: TrainResult, run_log: RunLog) -> None:
    """Beside the model, before metrics.json: metrics.jsonl as the state has it, loss.png and the model card. The
    plot and the card are descriptions: one that cannot be made is reported, and the output is still written."""
    state, spec = result.state, job.spec
    run_log.seal(state)
    select = spec.checkpointing.select_best
    metric = chosen_metric(state.history, select.metric if select else None, task_metrics(spec.task))
    model_step = result.choice.step if result.choice else state.step
    for what, make in (
            (PLOT_FILE, lambda: plot_history(state.history, folder / PLOT_FILE, f"{job.metadata.name}: "
                                             f"{spec.task.type} on {spec.model.source}", metric, model_step)),
            (CARD_FILE, lambda: write_model_card(folder, job, doc))):
        try:
            make()
        except Exception as exc:
            if is_io_error(exc):
                raise
            log.warning("cannot write %s: %s: %s", what, type(exc).__name__, exc)


def output_saving(spec: FineTuneJobSpec, task: Task, source: str, tok: Any, wrapped: Wrapped) -> dict[str, Any]:
    """How rank 0 saves the trained model (`output.save_model`'s options). Every rank calls it: under FSDP the full
    weights (the adapter for LoRA) are gathered here; a sharded or quantized LoRA base is not merged in place, the
    saved adapter is merged into the base loaded again in fp32."""
    lora = spec.method.type == "lora"
    saving: dict[str, Any] = {"state_dict": full_state_dict(wrapped, trainable_only=lora)}
    if lora and spec.output.merge_adapter and (wrapped.sharded or quantization_of(spec) != "none"):
        saving["merge"] = functools.partial(merge_into_fresh_base, spec, task, source, tok)
    return saving


def merge_into_fresh_base(spec: FineTuneJobSpec, task: Task, source: str, tok: Any, adapter: Path) -> Any:
    base = load_model(task, source, spec.model.revision, spec.model.trust_remote_code, tok)
    return merged_adapter(base, adapter)


def memory_report(plan: memory.Plan, measured: list[dict[str, int]] | None) -> dict[str, Any]:
    """metrics.json's `memory`: the plan (sharding, why, the estimate) and, per rank, what the first training step
    of this session measured (bytes of parameters, gradients, optimizer state and kept activations)."""
    doc: dict[str, Any] = plan.report().model_dump(by_alias=True, exclude_none=True)
    if measured is not None:
        doc["measuredPerRank"] = measured
    return doc


def summary(outcome: Outcome) -> str:
    """What a person running `finetune run` wants to see at the end: how far and how fast, which step became the
    model and why, its metrics, and where everything was written."""
    result = outcome.result
    lines = [f"finished {outcome.job}: {result.state.step} of {result.total_steps} steps in {outcome.seconds:.1f}s "
             f"({result.samples_per_second:.1f} training samples/s)"
             + (f", resumed from step {result.resumed_from}" if result.resumed_from is not None else "")]
    if result.choice is not None:
        lines.append(f"model: step {result.choice.step}, {result.choice.reason}")
    lines += outcome.task.summary(result.metrics, result.extras)
    where = outcome.output_uri + (f" ({outcome.output_path})" if str(outcome.output_path) != outcome.output_uri else "")
    lines.append(f"written to {where}: {', '.join(outcome.files)}")
    lines += outcome.trackers
    return "\n".join(lines)
