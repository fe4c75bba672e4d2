"""The objectives the trainer knows, one module each: adding one is adding a module here that defines `TASK`, named
like its API definition in finetune_api.tasks (from which the CRD is generated)."""

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
    """The task object for a job's spec, with its columns, settings and lengths resolved."""
    own = spec.task.model_dump(by_alias=True, exclude={"type"}, exclude_none=True, mode="json")
    info = TaskInfo(
        type=spec.task.type, columns=resolved_columns(spec), max_seq_length=spec.hyperparameters.max_seq_length,
        over_long=spec.dataset.over_long or "fail",
        mapped=tuple(sorted(spec.dataset.columns.model_dump(by_alias=True, exclude_none=True))), settings=own,
    )
    return TASKS[spec.task.type](info)
