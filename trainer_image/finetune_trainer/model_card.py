"""README.md in the output: the model card, through huggingface_hub's ModelCard and ModelCardData, so the hub and
its tools read the metadata (base model, task, evaluation results as a model-index).

It is made from the manifest and metrics.json's document: base model, task and labels, data sources, method and
hyperparameters, the metrics of the written model with the confusion matrix, which step became the model and why,
training time, and the FineTuneJob's name and uid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_api.manifest import FineTuneJob
from finetune_api.times import humanize_eta
from finetune_trainer.locations import HUB_ID
from finetune_trainer.tasks.base import Task
from finetune_trainer.tracking import flat_params

CARD_FILE = "README.md"
LIBRARY = {"full": "transformers", "lora": "peft"}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ intro }}

## Task

{{ task }}

## Data

| split | source | examples |
|---|---|---|
{% for row in data %}| {{ row | join(" | ") }} |
{% endfor %}
## Training

{{ training }}

| hyperparameter | value |
|---|---|
{% for name, value in hyperparameters %}| `{{ name }}` | {{ value }} |
{% endfor %}
## Evaluation

{{ model }}

| metric | value |
|---|---|
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}{% if confusion %}
Confusion matrix (rows: true label, columns: predicted label):

{{ confusion }}
{% endif %}
## Files

{{ files }}
"""


def _hub_id(source: str) -> str | None:
    """A model or dataset source that is a hub id (the card's metadata may name it), not a path or URI."""
    return source if HUB_ID.match(source) and not Path(source).exists() else None


def _confusion_table(cm: dict[str, Any]) -> str:
    labels = [str(x) for x in cm["labels"]]
    head = "| true \\ predicted | " + " | ".join(labels) + " |"
    rule = "|---|" + "---|" * len(labels)
    rows = [f"| **{labels[i]}** | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm["matrix"])]
    return "\n".join([head, rule, *rows])


def model_card(job: FineTuneJob, doc: dict[str, Any], files: list[str], task: Task) -> Any:
    """The ModelCard for a finished job; `doc` is metrics.json's document, `files` what the output folder holds,
    `task` the objective (its pipeline tag and what it says of itself)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    spec, meta = job.spec, job.metadata
    uid = (meta.model_extra or {}).get("uid")
    namespace = meta.namespace
    source = spec.model.source
    ds = spec.dataset
    validation = ds.validation or (f"{ds.validation_split:.0%} of the training data" if ds.validation_split else None)
    metrics: dict[str, float] = doc.get("metrics", {})
    eval_results = [EvalResult(task_type=task.pipeline_tag, dataset_type=validation or ds.train,
                               dataset_name=f"{meta.name} validation data", dataset_split="validation",
                               metric_type=name, metric_name=name, metric_value=round(value, 6))
                    for name, value in metrics.items() if name != "trainLoss"] if validation else []
    tags = ["finetune-operator", task.name, *(["lora"] if spec.method.type == "lora" else [])]
    data = ModelCardData(
        base_model=_hub_id(source), library_name=LIBRARY[spec.method.type], pipeline_tag=task.pipeline_tag, tags=tags,
        datasets=[ds.train] if ds.format == "hub" else None, model_name=meta.name,
        eval_results=eval_results or None, metrics=sorted(k for k in metrics if k != "trainLoss") or None,
    )
    who = f"`{namespace}/{meta.name}`" if namespace else f"`{meta.name}`"
    revision = f" (revision `{spec.model.revision}`)" if spec.model.revision else ""
    intro = (f"Fine-tuned from `{source}`{revision} for **{task.name}** by the FineTuneJob {who} (uid "
             f"`{uid or 'none: run locally'}`) with finetune-operator.")
    task_text = task.card_text()
    data_rows = [["train", f"`{ds.train}`", str(doc.get("trainExamples", ""))]]
    if validation:
        data_rows.append(["validation", f"`{validation}`", str(doc.get("validationExamples", ""))])
    seconds = doc.get("trainSecondsTotal", doc.get("trainSeconds", 0.0))
    training = (f"{'LoRA' if spec.method.type == 'lora' else 'Full'} fine-tuning, {doc.get('step')} of "
                f"{doc.get('totalSteps')} optimizer steps ({doc.get('epoch')} epoch(s) completed) in "
                f"{humanize_eta(seconds)} of training time ({seconds:.1f} s), precision {doc.get('precision')}, "
                f"{doc.get('processes')} process(es); finished {doc.get('finishedAt')}.")
    settings = flat_params("", spec.hyperparameters.model_dump(by_alias=True, exclude_none=True, mode="json"))
    for block, values in spec.task.model_dump(by_alias=True, exclude={"type"}, exclude_none=True, mode="json").items():
        if isinstance(values, dict):  # an objective's own settings block (task.dpo)
            settings.update(flat_params(block, values))
    if spec.method.lora:
        settings.update(flat_params("lora", spec.method.lora.model_dump(by_alias=True, exclude_none=True,
                                                                        mode="json")))
    hyper = [(name, f"`{value}`") for name, value in settings.items()]
    chosen = doc.get("output") or {}
    model = f"The model is the weights of step {chosen.get('step')}: {chosen.get('reason')}." if chosen else ""
    confusion = _confusion_table(doc["confusionMatrix"]) if doc.get("confusionMatrix") else ""
    listing = "\n".join(f"- `{name}`" + (f": {what}" if (what := FILE_NOTES.get(name)) else "") for name in files)
    if "loss.png" in files:
        listing += "\n\n![loss curves](loss.png)"
    return ModelCard.from_template(
        data, template_str=TEMPLATE, title=meta.name, intro=intro, task=task_text, data=data_rows,
        training=training, hyperparameters=hyper, model=model, confusion=confusion, files=listing,
        metrics=[(k, f"{v:.4f}") for k, v in metrics.items()])


FILE_NOTES = {
    "metrics.json": "final metrics, confusion matrix, which step became the model and why",
    "metrics.jsonl": "every logged training step and every evaluation, one JSON line each",
    "loss.png": "training and validation loss and the chosen metric over the steps",
    "tensorboard": "TensorBoard event files (`tensorboard --logdir tensorboard`)",
    "merged": "the LoRA adapter merged into the base model",
}


def write_model_card(folder: Path, job: FineTuneJob, doc: dict[str, Any], task: Task) -> Path:
    """README.md in `folder` (replacing the one peft writes for adapters)."""
    files = sorted({p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name != "checkpoints"}
                   | {CARD_FILE, "metrics.json"})
    path = folder / CARD_FILE
    model_card(job, doc, files, task).save(path)
    return path
