"""The job's output, written by rank 0 once training and the final evaluation are done: the fine-tuned model, the
files that describe it (the model card, the loss plot, the metric history), then metrics.json.

The model is `save_pretrained` with its tokenizer (for LoRA the adapter and, with `mergeAdapter`, the merged model in
merged/). metrics.json comes last, locally and in remote storage, so its presence means the output is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_api.times import format_time
from finetune_trainer.checkpoint import io_reason, is_io_error, write_json_atomic
from finetune_trainer.errors import StorageError
from finetune_trainer.locations import Storage
from finetune_trainer.loop import TrainResult

METRICS_FILE = "metrics.json"


def metrics_document(job: str, spec: FineTuneJobSpec, result: TrainResult, *, precision: str, processes: int,
                     train_examples: int, validation_examples: int,
                     memory: dict[str, Any] | None = None, dropped: dict[str, int] | None = None,
                     prepared: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """What metrics.json says: the final metrics and their extras (the confusion matrix), the loss curve,
    throughput, the step reached and where the run resumed from."""
    state = result.state
    doc: dict[str, Any] = {
        "job": job, "task": spec.task.type, "model": spec.model.source, "method": spec.method.type,
        "step": state.step, "totalSteps": result.total_steps, "epoch": state.epoch,
        "metrics": result.metrics, "precision": precision, "processes": processes,
        "trainSeconds": round(result.train_seconds, 3),
        "trainCpuSeconds": round(result.train_cpu_seconds, 3),
        "samplesPerSecond": round(result.samples_per_second, 3),
        "tokensPerSecond": round(result.tokens_per_second, 1),
        "trainSecondsTotal": round(state.train_seconds, 3),
        # What the objective prepared before the first step of this session (DPO: precomputed reference values).
        "prepareSeconds": round(prepared[0], 3), "prepareCpuSeconds": round(prepared[1], 3),
        "resumedFrom": result.resumed_from, "lossCurve": state.loss_curve,
        "trainExamples": train_examples,
        "validationExamples": validation_examples,
        "finishedAt": format_time(),
    }
    if result.choice is not None:
        doc["output"] = result.choice.wire()  # which step's weights the model is, and why
    if result.last_metrics is not None:
        doc["lastMetrics"] = result.last_metrics
    if dropped:
        doc["droppedExamples"] = dropped  # over-long examples left out per split (dataset.overLong drop)
    if memory:
        doc["memory"] = memory  # the memory plan and what each rank measured (finetune_trainer.job.memory_report)
    doc.update(result.extras)
    return doc


def save_model(model: Any, tok: Any, spec: FineTuneJobSpec, folder: Path,
               state_dict: dict[str, Any] | None = None, merge: Callable[[Path], Any] | None = None) -> None:
    """save_pretrained (tokenizer included); LoRA writes the adapter and, if asked, the merged model in merged/.
    A sharded model passes its gathered weights as `state_dict`, and `merge(folder)` builds the merged model where
    the trained one cannot be merged in place (sharded or quantized)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), state_dict=state_dict)
    tok.save_pretrained(str(folder))
    if spec.method.type == "lora" and spec.output.merge_adapter:
        merged = merge(folder) if merge is not None else model.merge_and_unload()
        merged.save_pretrained(str(folder / "merged"))
        tok.save_pretrained(str(folder / "merged"))


def write_output(store: Storage, spec: FineTuneJobSpec, model: Any, tok: Any,
                 metrics: Callable[[], dict[str, Any]],
                 describe: Callable[[Path, dict[str, Any]], None] | None = None, **saving: Any) -> None:
    """The model (`saving`: `save_model`'s options), then `describe(folder, document)` (the model card, the plot),
    then metrics.json (`metrics()`, asked once the model is written); then upload everything to remote storage,
    metrics.json last. StorageError when the storage cannot be written."""
    try:
        save_model(model, tok, spec, store.local, **saving)
        doc = metrics()
        if describe is not None:
            describe(store.local, doc)
        write_json_atomic(store.local / METRICS_FILE, doc)
        for entry in sorted(store.local.iterdir(), key=lambda p: p.name == METRICS_FILE):
            store.publish(entry.name)
    except StorageError:
        raise
    except Exception as exc:
        if not is_io_error(exc):
            raise
        raise StorageError(f"cannot write the output to {spec.output.storage} ({store.local}): "
                           f"{io_reason(exc)}") from exc
