"""One job, start to finish: resolve locations, load and check data, load the model, train, write the output.

The order is chosen so that mistakes surface early and cheaply: storage is probed and the data is checked and
tokenised before the model's weights are loaded, and all of it before the first optimizer step.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_api.manifest import FineTuneJob, load_job
from finetune_api.spec import FineTuneJobSpec, checkpoint_storage, resolved_columns
from finetune_trainer import data as data_mod
from finetune_trainer import errors
from finetune_trainer.checkpoint import CheckpointManager, is_io_error, rfc3339, write_json_atomic
from finetune_trainer.config import RunConfig
from finetune_trainer.distributed import Dist, init_from_env
from finetune_trainer.errors import ConfigError, StorageError, TrainerError
from finetune_trainer.evaluation import Evaluator, format_confusion
from finetune_trainer.locations import DATA_SUFFIXES, Location, Storage, expand_files, fetch, resolve, storage
from finetune_trainer.loop import LoopSettings, StopSignal, Trainer, seed_everything
from finetune_trainer.modeling import (
    apply_lora,
    choose_precision,
    load_model,
    load_tokenizer,
    trainable_summary,
)
from finetune_trainer.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a finished run reports back to the console (and what tests inspect)."""

    job: str
    metrics: dict[str, float]
    extras: dict[str, Any]
    output_uri: str
    output_path: Path
    steps: int
    seconds: float
    samples_per_second: float
    resumed_from: int | None


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


def agree(dist: Dist, error: TrainerError | None) -> None:
    """Raise the same error on every rank if any rank failed, so no rank waits forever in a collective."""
    found = [e for e in dist.gather((type(error).__name__, error.message) if error else None) if e]
    if found:
        cls = getattr(errors, found[0][0], TrainerError)
        raise cls(found[0][1])


def task_info(spec: FineTuneJobSpec) -> data_mod.TaskInfo:
    return data_mod.TaskInfo(
        type=spec.task.type, columns=resolved_columns(spec), labels=spec.task.labels,
        num_labels=spec.task.num_labels, max_seq_length=spec.hyperparameters.max_seq_length,
        source_prefix=spec.task.source_prefix or "",
    )


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
        raise errors.DataError(f"dataset.{name} {uri}: no data files found (looked in {path})")
    return data_mod.load_files(name, uri, files, ds.format, work_cache)


def load_splits(spec: FineTuneJobSpec, cfg: RunConfig, work_cache: Path) -> tuple[data_mod.Split,
                                                                                 data_mod.Split | None]:
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
        data_mod.check_split(train, task_info(spec))  # report rows by their original position first
        train, val = data_mod.split_off(train, ds.validation_split, spec.hyperparameters.seed)
    if ds.max_samples is not None and len(train) > ds.max_samples:
        train = train.select(range(ds.max_samples))
    return train, val


def prepare_data(spec: FineTuneJobSpec, cfg: RunConfig, tok: Any, work_cache: Path, token_cache: Path | None,
                 write_cache: bool) -> tuple[data_mod.Encoded, data_mod.Encoded | None]:
    """Load, check and tokenise both splits (reusing the token cache)."""
    task = task_info(spec)
    train, val = load_splits(spec, cfg, work_cache)
    for split in (train, val):
        if split is not None:
            data_mod.check_split(split, task)
    fp = data_mod.tokenizer_fingerprint(tok)
    train_enc = data_mod.encode_cached(train, task, tok, token_cache, fp, write_cache)
    val_enc = data_mod.encode_cached(val, task, tok, token_cache, fp, write_cache) if val is not None else None
    log.info("data: %d training and %d validation examples, %.1f tokens per training example on average",
             len(train_enc), len(val_enc) if val_enc is not None else 0, float(train_enc.lengths().mean()))
    return train_enc, val_enc


def _output_model(model: Any, tok: Any, spec: FineTuneJobSpec, out: Storage) -> None:
    """save_pretrained (tokenizer included); LoRA writes the adapter and, if asked, the merged model in merged/."""
    out.local.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out.local))
    tok.save_pretrained(str(out.local))
    if spec.method.type == "lora" and spec.output.merge_adapter:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out.local / "merged"))
        tok.save_pretrained(str(out.local / "merged"))


def run(cfg: RunConfig) -> Outcome:
    """Run the job in cfg.manifest; raise TrainerError subclasses for permanent failures and Interrupted on SIGTERM."""
    job = read_job(cfg.manifest)
    spec = job.spec
    hp = spec.hyperparameters
    stop = StopSignal(cfg.grace_period)
    stop.install()
    torch.set_num_threads(cfg.threads)
    dist = init_from_env()
    try:
        return _run(job, spec, hp, cfg, dist, stop)
    finally:
        stop.uninstall()
        if dist.enabled:
            # The DDP wrapper's reducer holds the process group; reference cycles can keep it alive until interpreter
            # finalisation, where gloo's worker threads then abort the process (SIGABRT, "terminate called without
            # an active exception", seen once in CI). Free it while the interpreter is whole, then tear down.
            gc.collect()
        dist.close()


def _run(job: FineTuneJob, spec: FineTuneJobSpec, hp: Any, cfg: RunConfig, dist: Dist,
         stop: StopSignal) -> Outcome:
    started = time.monotonic()
    name = job.metadata.name
    work_cache = cfg.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune"
    opts = s3_options(spec)
    ckpt_uri = checkpoint_storage(spec)
    ckpt_store = storage(ckpt_uri, cfg.pvc_root, work_cache, opts, "checkpointing.storage")
    out_store = storage(spec.output.storage, cfg.pvc_root, work_cache, opts, "output.storage")
    # Tokenised data lives beside the checkpoints (a volume that outlives the pod) unless those are remote.
    token_cache = ckpt_store.local / ".cache" if not ckpt_store.remote else work_cache
    log.info("job %s: %s on %s, %d process(es), device %s, %d thread(s)", name, spec.task.type, spec.model.source,
             dist.world, dist.device, cfg.threads)

    error: TrainerError | None = None
    if dist.main:
        try:
            ckpt_store.ensure_writable()
            out_store.ensure_writable()
        except TrainerError as exc:
            error = exc
    agree(dist, error)

    source = model_source(spec, cfg, work_cache)
    tok = load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code, spec.task.type)

    # Rank 0 checks and tokenises first (and writes the cache); the others then read it.
    encoded: tuple[data_mod.Encoded, data_mod.Encoded | None] | None = None
    error = None
    if dist.main:
        try:
            encoded = prepare_data(spec, cfg, tok, work_cache, token_cache, write_cache=True)
        except TrainerError as exc:
            error = exc
    agree(dist, error)
    if not dist.main:
        encoded = prepare_data(spec, cfg, tok, work_cache, token_cache, write_cache=False)
    assert encoded is not None
    train_enc, val_enc = encoded

    task = task_info(spec)
    seed_everything(hp.seed)
    model = load_model(task, source, spec.model.revision, spec.model.trust_remote_code, tok)
    if spec.method.type == "lora":
        lora = spec.method.lora
        model = apply_lora(model, task, lora.r if lora else 8, lora.alpha if lora else 16,
                           lora.dropout if lora else 0.05, lora.target_modules if lora else None)
    precision = choose_precision(hp.precision, dist.device)
    log.info("model: %s; precision %s", trainable_summary(model), precision.name)

    ckpt = CheckpointManager(ckpt_store, spec.checkpointing.keep_last)
    progress = Progress(push_url=cfg.progress_url, push_token=cfg.progress_token,
                        push_interval=cfg.progress_interval, enabled=dist.main,
                        on_write=lambda doc, final: ckpt.write_progress(doc, upload=final))
    progress.start(cfg.metrics_port)
    evaluator = None
    if val_enc is not None:
        evaluator = Evaluator(task, val_enc, tok, hp.batch_size * 2, dist.device,
                              lambda: precision.autocast(dist.device), dist.rank, dist.world, dist.gather)
    settings = LoopSettings(
        batch_size=hp.batch_size, grad_accum=hp.gradient_accumulation_steps, learning_rate=hp.learning_rate,
        scheduler=hp.lr_scheduler.type, warmup_ratio=hp.lr_scheduler.warmup_ratio, weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm, seed=hp.seed, epochs=hp.epochs, max_steps=hp.max_steps,
        eval_every=hp.eval_every_steps, checkpoint_every=spec.checkpointing.every_steps,
        checkpoint_every_epoch=spec.checkpointing.every_epoch,
    )
    try:
        trainer = Trainer(model=model, train=train_enc, pad_id=tok.pad_token_id, settings=settings,
                          precision=precision, dist=dist, checkpoints=ckpt, checkpoint_uri=ckpt_uri,
                          evaluator=evaluator, progress=progress, stop=stop, progress_bar=cfg.progress_bar,
                          log_interval=cfg.progress_interval)
        result = trainer.run()
        metrics = result.metrics
        out_error: TrainerError | None = None
        if dist.main:
            try:
                _output_model(model, tok, spec, out_store)
                doc = {
                    "job": name, "task": spec.task.type, "model": spec.model.source, "method": spec.method.type,
                    "step": result.state.step, "totalSteps": trainer.total_steps, "epoch": result.state.epoch,
                    "metrics": metrics, "precision": precision.name, "processes": dist.world,
                    "trainSeconds": round(result.train_seconds, 3),
                    "trainCpuSeconds": round(result.train_cpu_seconds, 3),
                    "samplesPerSecond": round(result.samples_per_second, 3),
                    "tokensPerSecond": round(result.tokens_per_second, 1),
                    "resumedFrom": result.resumed_from, "lossCurve": result.state.loss_curve,
                    "trainExamples": len(train_enc),
                    "validationExamples": len(val_enc) if val_enc else 0,
                    "finishedAt": rfc3339(),
                }
                if "confusionMatrix" in result.extras:
                    doc["confusionMatrix"] = result.extras["confusionMatrix"]
                write_json_atomic(out_store.local / "metrics.json", doc)
                for entry in sorted(out_store.local.iterdir(), key=lambda p: p.name == "metrics.json"):
                    out_store.publish(entry.name)
            except StorageError as exc:
                out_error = exc
            except Exception as exc:
                if not is_io_error(exc):
                    raise
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
                out_error = StorageError(f"cannot write the output to {spec.output.storage} ({out_store.local}): "
                                         f"{reason}")
        agree(dist, out_error)
        progress.update(urgent=False, state="finished", metrics=metrics,
                        output={"path": spec.output.storage, "metrics": metrics}, etaSeconds=0)
    finally:
        progress.close()
    return Outcome(name, metrics, result.extras, spec.output.storage, out_store.local, result.state.step,
                   time.monotonic() - started, result.samples_per_second, result.resumed_from)


def summary(outcome: Outcome) -> str:
    """What a person running `finetune run` wants to see at the end."""
    lines = [f"finished {outcome.job}: {outcome.steps} steps in {outcome.seconds:.1f}s "
             f"({outcome.samples_per_second:.1f} training samples/s)"
             + (f", resumed from step {outcome.resumed_from}" if outcome.resumed_from is not None else "")]
    order = ["accuracy", "f1Macro", "mse", "perplexity", "chrf", "evalLoss", "trainLoss"]
    shown = [f"{k} {outcome.metrics[k]:.4f}" for k in order if k in outcome.metrics]
    lines.append("  ".join(shown))
    cm = outcome.extras.get("confusionMatrix")
    if cm:
        lines.append("confusion matrix (rows: true label, columns: predicted):")
        lines.append(format_confusion(cm["matrix"], cm["labels"]))
    lines.append(f"model and metrics.json written to {outcome.output_uri} ({outcome.output_path})")
    return "\n".join(lines)
