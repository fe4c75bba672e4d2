"""The committed CRD is exactly what the models generate, and it teaches the API."""

from __future__ import annotations

import subprocess
import sys

import yaml

from finetune_api import crd


def _schema() -> dict:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_models() -> None:
    assert crd.CRD_PATH.read_text() == crd.render(), "crds/ is stale: run `make crds`"
    check = subprocess.run([sys.executable, "-m", "finetune_api.crd", "--check"], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stderr


def test_every_spec_and_status_field_has_a_description() -> None:
    missing = []

    def walk(node: dict, path: str) -> None:
        if path and "description" not in node:
            missing.append(path)
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if "items" in node and "properties" in node["items"]:
            for name, child in node["items"]["properties"].items():
                walk(child, f"{path}[].{name}")

    walk(_schema()["properties"]["spec"], "spec")
    walk(_schema()["properties"]["status"], "status")
    assert missing == []


def test_schema_is_structural() -> None:
    """No $ref, no null types, no JSON-Schema-2020 exclusive bounds: the API server would refuse them."""
    text = yaml.safe_dump(_schema())
    for forbidden in ("$ref", "type: 'null'", "title:", "$defs"):
        assert forbidden not in text

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "exclusiveMinimum" in node:
                assert node["exclusiveMinimum"] is True and "minimum" in node
            if "properties" in node:
                assert node.get("type") == "object"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(_schema())


def test_cel_rules_cover_the_cross_field_constraints() -> None:
    spec = _schema()["properties"]["spec"]
    rules = {r["message"]: r["rule"] for r in spec["properties"]["hyperparameters"]["x-kubernetes-validations"]}
    assert any("exactly one of hyperparameters.epochs" in m for m in rules)
    for field in ("task", "model", "dataset", "method", "hyperparameters", "output"):
        field_rules = [r["rule"] for r in spec["properties"][field]["x-kubernetes-validations"]]
        assert "self == oldSelf" in field_rules, field
    assert spec["properties"]["dataset"]["properties"]["validationSplit"]["exclusiveMaximum"] is True
    root_rules = [r["rule"] for r in _schema()["x-kubernetes-validations"]]
    assert any("size(self.metadata.name)" in r for r in root_rules)


def test_status_conditions_follow_kubernetes_conventions() -> None:
    cond = _schema()["properties"]["status"]["properties"]["conditions"]
    assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]
    item = cond["items"]
    assert set(item["required"]) >= {"type", "status", "reason", "message", "lastTransitionTime"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_printer_columns_show_phase_progress_loss_eta_age() -> None:
    names = [c["name"] for c in crd.crd()["spec"]["versions"][0]["additionalPrinterColumns"]]
    for wanted in ("Phase", "Progress", "Loss", "ETA", "Age"):
        assert wanted in names
    assert crd.crd()["spec"]["names"]["shortNames"] == ["ftj"]
