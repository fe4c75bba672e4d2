"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models (`make crds`).

pydantic's JSON Schema is turned into a Kubernetes structural schema: references inlined, Optional collapsed,
exclusive bounds rewritten, `title`s dropped, defaults kept, every model's cross-field `rules` emitted as CEL, and a
transition rule for every `Immutable` field.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_api import names
from finetune_api.rules import Immutable, SpecModel
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus

MAX_NAME_LENGTH = 52  # children append suffixes and Indexed Job pods append -<index>; DNS labels stop at 63
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{names.GROUP}_{names.PLURAL}.yaml"


def _all_models() -> dict[str, type[SpecModel]]:
    found: dict[str, type[SpecModel]] = {}
    todo: list[type] = [SpecModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found


def _structural(node: Any, defs: dict[str, Any], models: dict[str, type[SpecModel]]) -> Any:
    """Rewrite one pydantic JSON-schema node into an OpenAPI v3 structural-schema node."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").split("/")[-1]
        target = _structural(copy.deepcopy(defs[name]), defs, models)
        for key in ("description", "default"):
            if key in node:
                target[key] = node[key]
        # Field-level rules (immutability) join the model's own cross-field rules.
        rules = node.get("x-kubernetes-validations", []) + target.get("x-kubernetes-validations", [])
        if rules:
            target["x-kubernetes-validations"] = rules
        return target
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        return _optional(node, defs, models)
    if node.get("x-kubernetes-int-or-string"):
        return {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            **({"pattern": node["pattern"]} if "pattern" in node else {}),
            **({"description": node["description"]} if "description" in node else {}),
        }
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {k: _structural(v, defs, models) for k, v in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _structural(value, defs, models)
        elif key == "additionalProperties":
            continue  # extra="forbid": the API server prunes unknown fields; strict field validation rejects them
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)
    default = out.get("default")
    if default not in (None, {}) and "description" in out and "Default:" not in out["description"]:
        shown = str(default).lower() if isinstance(default, bool) else default
        out["description"] += f" Default: {shown}."  # kubectl explain shows descriptions, not defaults
    return out


def _optional(node: dict[str, Any], defs: dict[str, Any], models: dict[str, type[SpecModel]]) -> Any:
    """`T | None` becomes T itself (absent means None), keeping the outer node's description and default."""
    branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
    if len(branches) != 1:
        raise ValueError(f"cannot express union {branches} in a structural schema")
    inner = _structural(branches[0], defs, models)
    inner.update({k: v for k, v in node.items() if k not in ("default", "title")})
    if node.get("default") is not None:
        inner["default"] = node["default"]
    return inner


def _object_schema(model: type[SpecModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    models = _all_models()
    # Attach each model's cross-field rules and empty-object defaults before inlining.
    for name, schema in [*defs.items(), (model.__name__, raw)]:
        cls = models.get(name) or model
        if cls.rules:
            schema["x-kubernetes-validations"] = [
                {"rule": r.cel, "message": r.message, **({"fieldPath": r.field_path} if r.field_path else {})}
                for r in cls.rules
            ]
        for field_name, field in cls.model_fields.items():
            alias = field.alias or field_name
            if alias not in schema.get("properties", {}):
                continue
            if field.default_factory is not None:
                schema["properties"][alias]["default"] = {}
            for marker in field.metadata:
                if isinstance(marker, Immutable):
                    schema["properties"][alias]["x-kubernetes-validations"] = [marker.rule(alias)]
    return _structural(raw, defs, models)


def openapi_schema() -> dict[str, Any]:
    spec = _object_schema(FineTuneJobSpec)
    status = _object_schema(FineTuneJobStatus)
    return {
        "type": "object",
        "description": "FineTuneJob fine-tunes a pretrained language model (classification, causal-LM instruction "
        "tuning or seq2seq) on labelled data and records progress, checkpoints and the final model in status.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "Versioned schema of this object: finetune.dev/v1alpha1."},
            "kind": {"type": "string", "description": "FineTuneJob."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the Job, Service and pod "
                "names derived from it must fit 63-character DNS labels",
            },
            {
                "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with "
                "a letter): it names the job's headless Service",
            },
        ],
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent done."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1,
     "description": "Optimizer steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "description": "Estimated time left."},
    {"name": "Examples", "type": "integer", "jsonPath": ".status.preflight.train.examples",
     "description": "Training examples the pre-flight counted."},
    {"name": "Est", "type": "string", "jsonPath": ".status.preflight.estimate.wall",
     "description": "Training time the pre-flight estimated."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1,
     "description": "Restarts from a checkpoint."},
    {"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Failed\")].reason",
     "priority": 1, "description": "Why it failed."},
    {"name": "Queue", "type": "string", "jsonPath": ".status.queue.localQueue", "priority": 1,
     "description": "Kueue LocalQueue."},
    {"name": "Queued", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Queued\")].reason",
     "priority": 1, "description": "Why Kueue holds it (WaitingForQuota, Preempted, ...), or Admitted."},
    {"name": "Flavor", "type": "string", "jsonPath": ".status.queue.flavor", "priority": 1,
     "description": "ResourceFlavor of Kueue's admission."},
    {"name": "Requeues", "type": "integer", "jsonPath": ".status.queue.requeues", "priority": 1,
     "description": "Times Kueue evicted and requeued it."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{names.PLURAL}.{names.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": names.GROUP,
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": [names.SHORT_NAME],
                "categories": ["all", "finetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `make crds` (python -m finetune_api.crd) from operator/finetune_api. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv and argv[0] == "--check":
        current = CRD_PATH.read_text() if CRD_PATH.exists() else ""
        if current != text:
            print(f"{CRD_PATH} is stale: run `make crds`", file=sys.stderr)
            return 1
        return 0
    target = Path(argv[0]) if argv else CRD_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
