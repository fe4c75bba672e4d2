"""The objectives the API knows (`spec.task.type`), one module each that defines `DEFINITION`; adding an objective
is adding a module here and its trainer module of the same name, then `make crds`."""

from __future__ import annotations

import importlib
import pkgutil

from finetune_api.tasks.base import TaskDefinition


def _discover() -> dict[str, TaskDefinition]:
    found = [importlib.import_module(f"{__name__}.{m.name}").DEFINITION for m in pkgutil.iter_modules(__path__)
             if m.name != "base"]
    return {d.name: d for d in sorted(found, key=lambda d: (d.position, d.name))}


TASKS: dict[str, TaskDefinition] = _discover()


def higher_is_better() -> frozenset[str]:
    """Metrics for which a higher value is better, over every objective (a name means the same everywhere)."""
    direction: dict[str, bool] = {}
    for definition in TASKS.values():
        for metric in definition.all_metrics():
            if direction.setdefault(metric.name, metric.higher_is_better) != metric.higher_is_better:
                raise ValueError(f"metric {metric.name} has two directions")
    return frozenset(name for name, higher in direction.items() if higher)
