"""The task types the trainer knows, one module each: adding a task is adding a module here that defines `TASK`
(and the type and its columns in finetune_api.spec, which the CRD is generated from)."""

from __future__ import annotations

import importlib
import pkgutil

from finetune_api.spec import FineTuneJobSpec, resolved_columns
from finetune_trainer.tasks.base import Task, TaskInfo


def _discover() -> dict[str, type[Task]]:
    found: dict[str, type[Task]] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            task: type[Task] = importlib.import_module(f"{__name__}.{module.name}").TASK
            found[task.name] = task
    return found


TASKS = _discover()


def for_spec(spec: FineTuneJobSpec) -> Task:
    """The task object for a job's spec, with its columns, labels and lengths resolved."""
    info = TaskInfo(
        type=spec.task.type, columns=resolved_columns(spec), labels=spec.task.labels,
        num_labels=spec.task.num_labels, max_seq_length=spec.hyperparameters.max_seq_length,
        source_prefix=spec.task.source_prefix or "",
    )
    return TASKS[spec.task.type](info)
