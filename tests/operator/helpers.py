"""Shared test data for the operator tests: a valid spec, and FineTuneJob manifests built from it."""

from __future__ import annotations

import copy
from typing import Any

from finetune_api.spec import FineTuneJobSpec

BASE_SPEC: dict[str, Any] = {
    "task": {"type": "sequence-classification", "labels": ["negative", "positive"]},
    "model": {"source": "org/tiny-model"},
    "dataset": {"train": "s3://bucket/train.jsonl"},
    "hyperparameters": {"maxSteps": 10},
    "output": {"storage": "s3://bucket/out"},
    "resources": {"workers": 1, "gpusPerWorker": 1},
}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with top-level sections replaced (`resources={...}`) or merged (`merge_resources={...}`)."""
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        if key.startswith("merge_"):
            section = _camel(key.removeprefix("merge_"))
            spec[section] = {**spec.get(section, {}), **value}
        else:
            spec[_camel(key)] = value
    return spec


def spec(**overrides: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec_dict(**overrides))


def output_of(name: str, namespace: str) -> str:
    """Each job's own output.storage in `manifest` (two live jobs writing to one place: the newer is held back)."""
    return f"s3://bucket/{namespace}/{name}"


def manifest(name: str, namespace: str, **overrides: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec_dict(**{"output": {"storage": output_of(name, namespace)}, **overrides}),
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def merge_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` applied to ``base`` as a JSON merge patch (RFC 7386) does: objects merge, null removes a key."""
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = v
    return out
