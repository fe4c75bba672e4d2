"""The generated CRD on a real API server: `finetune validate` and the server give the same verdict on every
manifest (sent by the real kubectl, which reads YAML its own way), the field is named, and immutable fields stay
immutable. A mock server would accept all of these."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.manifest import validate_document, validate_files
from finetune_api.spec import quantity_sign
from finetune_operator import builders
from tests.api.test_manifests import BASE, MALFORMED, SELECTION_OK, mutate
from tests.controlplane.cluster import ApiError, ControlPlane

pytestmark = pytest.mark.cluster

# The server cannot see these: kind is fixed by the URL, and the server reports the name rule at metadata.name
# through the root CEL rule (checked separately below).
CLIENT_ONLY = {"wrong kind"}


def _path(namespace: str, name: str = "") -> str:
    base = f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs"
    return f"{base}/{name}" if name else base


def _create(cp: ControlPlane, namespace: str, doc: dict[str, Any]) -> Any:
    return cp.request("POST", _path(namespace) + "?fieldValidation=Strict", doc)


def _verdicts(cp: ControlPlane, namespace: str, path: Path) -> tuple[list[str], str | None]:
    """(what `finetune validate` reports, what the API server says when kubectl sends the file: None = accepted).
    A server-side dry run goes through the whole admission chain (schema, CEL) and stores nothing."""
    client = [str(p) for p in validate_files([str(path)])]
    sent = cp.kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    return client, (None if sent.returncode == 0 else sent.stderr)


@pytest.mark.parametrize(("doc", "field", "words"), [m[1:] for m in MALFORMED if m[0] not in CLIENT_ONLY],
                         ids=[m[0] for m in MALFORMED if m[0] not in CLIENT_ONLY])
def test_server_rejects_what_the_validator_rejects(finetune_crd: None, control_plane: ControlPlane, namespace: str,
                                                   tmp_path: Path, doc: dict, field: str, words: str) -> None:
    path = tmp_path / "job.json"  # JSON: the document reaches both sides exactly as written
    path.write_text(json.dumps(doc))
    client, server = _verdicts(control_plane, namespace, path)
    assert client and server is not None, f"validate: {client}; server: {server}"
    named = _field_paths(server)
    expected = ROOT_RULES.get(field, field)
    assert expected in named or any(p.startswith(f"{expected}[") for p in named), \
        f"the server does not name {expected}: {server}"
    if any(words in rule.message for rule in _all_rules()):
        assert words in server, "the server words a cross-field rule exactly as finetune validate does"
    with pytest.raises(ApiError) as err:  # and a real create leaves nothing behind
        _create(control_plane, namespace, doc)
    assert err.value.status in (400, 422), err.value.body
    assert control_plane.request("GET", _path(namespace))["items"] == [], "a rejected manifest left an object behind"


# How the API server names a field in an error: "<path>: Invalid value: ...", "<path>: Required value", ..., or, for a
# field the schema does not know, strict decoding's 'unknown field "<path>"'.
_NAMED = re.compile(r"(?:^|: |\* )(<nil>|(?:metadata|spec|kind)(?:\.[A-Za-z0-9_]+|\[\d+\])*): "
                    r"(?:Invalid value|Required value|Unsupported value|Too long|Too many|Forbidden|Duplicate value)"
                    r"|unknown field \"([^\"]+)\"", re.MULTILINE)


# What the server names for a rule of the object's root: a CEL rule may not point into metadata (fieldPath
# ".metadata.name" is refused as "must be a valid path"), so the length rule's path is <nil> and its message names it.
ROOT_RULES = {"metadata.name": "<nil>"}


def _field_paths(server: str) -> set[str]:
    """Every full field path the server's message names (not the last segment: ``spec``, ``value`` and ``name``
    end many paths); an element of a list (``labels[1]``) is named with its index."""
    return {a or b for a, b in _NAMED.findall(server)}


def _all_rules() -> list[Any]:
    from finetune_api.crd import _all_models

    return [rule for model in _all_models().values() for rule in model.rules]


# YAML as a person writes it: kubectl (go-yaml v2, then JSON) reads scalars differently from PyYAML, and the server's
# schema is strict. (case, fields changed in the template, accepted by both)
TEMPLATE = """apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: coercion
spec:
  task: {{type: sequence-classification, labels: {labels}}}
  model: {{source: org/model, trustRemoteCode: {trust}, revision: {revision}}}
  dataset: {{train: pvc://data/train.jsonl}}
  hyperparameters: {{epochs: {epochs}, learningRate: {lr}, batchSize: {batch}, seed: {seed}{extra}}}
  output: {{storage: pvc://runs/out}}
  resources: {{cpu: {cpu}, memory: {memory}}}
  runPolicy: {{suspend: {suspend}}}
"""
DEFAULTS = {"labels": "[neg, pos]", "trust": "false", "revision": "main", "epochs": "1", "lr": "0.0001",
            "batch": "16", "seed": "42", "extra": "", "cpu": "4", "memory": "8Gi", "suspend": "false"}
COERCION = [
    ("as written", {}, True),
    ("yes is a boolean", {"trust": "yes"}, True),
    ("y is a boolean to go-yaml", {"suspend": "y"}, True),
    ("On is a boolean", {"suspend": "On"}, True),
    ("a quoted yes is a string", {"trust": '"yes"'}, False),
    ("1e-4 is a number to go-yaml", {"lr": "1e-4"}, True),
    ("a quoted number is a string", {"lr": '"1e-4"'}, False),
    ("a whole float is sent as an integer", {"epochs": "2.0"}, True),
    ("a fractional integer", {"epochs": "2.5"}, False),
    ("a quoted integer", {"batch": '"16"'}, False),
    ("a boolean for an integer", {"batch": "true"}, False),
    ("hexadecimal", {"batch": "0x10"}, True),
    ("digit separators", {"seed": "1_000"}, True),
    ("a leading zero is octal", {"seed": "017"}, True),
    ("08 is a float to go-yaml", {"seed": "08"}, True),
    ("a date is a string", {"revision": "2024-01-01"}, True),
    ("a number for a string", {"revision": "1e5"}, False),
    ("an integer for a string", {"revision": "12"}, False),
    ("1:30 is a string to go-yaml", {"labels": "[1:30, neg]"}, True),
    ("labels y and n are booleans", {"labels": "[y, n]"}, False),
    ("labels yes and no are booleans", {"labels": "[yes, no]"}, False),
    ("quoted labels y and n", {"labels": '["y", "n"]'}, True),
    ("a float cpu", {"cpu": "0.5"}, False),
    ("a whole float cpu", {"cpu": "2.0"}, True),
    ("memory in plain bytes with an exponent", {"memory": "1e9"}, True),
    ("a null field is pruned", {"lr": "null"}, True),
    ("~ is null", {"revision": "~"}, True),
    ("a snake_case field name", {"extra": ", max_steps: 10"}, False),
    ("NaN cannot be sent as JSON", {"lr": ".nan"}, False),
]


@pytest.mark.parametrize(("changes", "accepted"), [c[1:] for c in COERCION], ids=[c[0] for c in COERCION])
def test_validate_and_kubectl_agree_on_yaml_scalars(finetune_crd: None, control_plane: ControlPlane, namespace: str,
                                                     tmp_path: Path, changes: dict[str, str], accepted: bool) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(TEMPLATE.format(**{**DEFAULTS, **changes}))
    client, server = _verdicts(control_plane, namespace, path)
    assert (client == [], server is None) == (accepted, accepted), f"validate: {client}; server: {server}"


# Quantities the CRD pattern admits but Kubernetes may not parse, and the other way round (the CEL isQuantity and
# quantity_sign must agree; the pattern is checked on both sides too).
QUANTITIES = ["1e2.5", "1.", "1.e3", ".5", "+.5", "1e-20", "-1", "0", "0m", "00", "1e99999999999999999999",
              "1e9223372036854775807", "1e9223372036854775808", "9999999999999999999999999999G", "1Ki", "1k", "1E",
              "1e", "1Ei", "+1", "1E-2", "0.0000000001", "10Mm", "1KiB", -3, 0, 7]


def test_quantities_get_the_same_verdict_from_validate_and_the_server(finetune_crd: None, control_plane: ControlPlane,
                                                                      namespace: str, tmp_path: Path) -> None:
    verdicts = {}
    for i, q in enumerate(QUANTITIES):
        path = tmp_path / f"q{i}.json"
        path.write_text(json.dumps(mutate("spec.resources", {"cpu": q})))
        client, server = _verdicts(control_plane, namespace, path)
        verdicts[q] = (client == [], server is None)
    assert {q: v for q, v in verdicts.items() if v[0] != v[1]} == {}
    assert verdicts["1e2.5"] == verdicts[0] == (False, False) and verdicts["1."] == verdicts[7] == (True, True)
    assert quantity_sign("1e2.5") is None and quantity_sign("-1") == -1


def test_jobs_built_from_admitted_edge_cases_are_admitted_too(finetune_crd: None, control_plane: ControlPlane,
                                                              namespace: str) -> None:
    """The other half of the promise: a spec at the edge of what the CRD admits builds a Job the API server admits
    (no 422 later). The Job is sent as a server-side dry run."""
    edges = {
        "resources": {"cpu": "1e-20", "memory": "1.e3", "nodeSelector": {"a" * 253 + "/" + "b" * 63: "v" * 63,
                                                                          "empty": ""},
                      "tolerations": [{"operator": "Exists"},
                                      {"key": "x", "operator": "Exists", "effect": "NoExecute",
                                       "tolerationSeconds": -5},
                                      {"key": "example.com/gpu", "value": "a.b-c_d", "effect": "NoSchedule"}]},
        "credentials": {"hubToken": {"name": "hf", "key": ".token"}},
        "dataset": {"train": "pvc://data/a..b/./x..", "validation": "pvc://data/..."},
    }
    doc = copy.deepcopy(BASE)
    doc["spec"].update(edges)
    created = _create(control_plane, namespace, doc)
    meta = created["metadata"]
    owner = builders.Owner(name=meta["name"], namespace=namespace, uid=meta["uid"])
    spec = validate_document(created)[0]
    assert spec is not None
    job = builders.build_job(owner, spec.spec, builders.BuildContext(trainer_image="registry.example.com/t:1",
                                                                     progress_url="http://operator:8081"))
    control_plane.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All", job)


def test_server_reports_cel_messages_verbatim(finetune_crd: None, control_plane: ControlPlane, namespace: str) -> None:
    with pytest.raises(ApiError) as err:
        _create(control_plane, namespace, mutate("spec.hyperparameters.maxSteps", 10))
    assert "exactly one of hyperparameters.epochs or hyperparameters.maxSteps must be set" in err.value.body["message"]
    with pytest.raises(ApiError) as err:
        _create(control_plane, namespace, mutate("metadata.name", "n" * 60))
    assert "must be at most 52 characters" in err.value.body["message"]


def test_examples_are_accepted_and_defaults_applied(finetune_crd: None, control_plane: ControlPlane,
                                                    namespace: str) -> None:
    from tests.api.test_manifests import EXAMPLES

    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        doc["metadata"].pop("namespace", None)
        created = _create(control_plane, namespace, doc)
        spec = created["spec"]
        assert spec["runPolicy"]["backoffLimit"] == 3 or "backoffLimit" in doc["spec"].get("runPolicy", {})
        assert spec["hyperparameters"]["seed"] == 42
        assert spec["checkpointing"]["keepLast"] >= 1


@pytest.mark.parametrize("doc", [d for _, d in SELECTION_OK], ids=[n for n, _ in SELECTION_OK])
def test_server_accepts_the_selection_and_tracking_fields(finetune_crd: None, control_plane: ControlPlane,
                                                          namespace: str, doc: dict) -> None:
    """The CEL side of the selection rules accepts what the Python side accepts (the rejections are in MALFORMED)."""
    created = _create(control_plane, namespace, copy.deepcopy(doc))
    assert created["spec"]["tracking"]["tensorboard"] == doc["spec"].get("tracking", {}).get("tensorboard", True)
    assert created["spec"].get("checkpointing", {}).get("selectBest") == doc["spec"].get("checkpointing", {}).get(
        "selectBest")


def test_immutable_fields_and_allowed_edits(finetune_crd: None, control_plane: ControlPlane, namespace: str) -> None:
    obj = _create(control_plane, namespace, copy.deepcopy(BASE))
    name = obj["metadata"]["name"]
    merge = "application/merge-patch+json"
    for patch, message in [
        ({"spec": {"task": {"labels": ["a", "b", "c"]}}}, "task is immutable"),
        ({"spec": {"model": {"source": "pvc://models/other"}}}, "model is immutable"),
        ({"spec": {"dataset": {"train": "pvc://data/other.jsonl"}}}, "dataset is immutable"),
        ({"spec": {"hyperparameters": {"learningRate": 0.1}}}, "hyperparameters are immutable"),
        ({"spec": {"resources": {"gpusPerWorker": 4}}}, "resources are immutable"),
        ({"spec": {"resources": {"image": "ghcr.io/acme/trainer:2"}}}, "resources are immutable"),
    ]:
        with pytest.raises(ApiError) as err:
            control_plane.request("PATCH", _path(namespace, name), patch, content_type=merge)
        assert message in err.value.body["message"]
    patched = control_plane.request("PATCH", _path(namespace, name),
                                    {"spec": {"runPolicy": {"suspend": True, "backoffLimit": 7}}}, content_type=merge)
    assert patched["spec"]["runPolicy"] == {**patched["spec"]["runPolicy"], "suspend": True, "backoffLimit": 7}
    assert patched["metadata"]["generation"] == 2


def test_status_is_a_subresource(finetune_crd: None, control_plane: ControlPlane, namespace: str) -> None:
    obj = _create(control_plane, namespace, copy.deepcopy(BASE))
    name = obj["metadata"]["name"]
    merge = "application/merge-patch+json"
    # Writing status through the main resource is silently dropped; through /status it sticks.
    control_plane.request("PATCH", _path(namespace, name), {"status": {"phase": "Running"}}, content_type=merge)
    assert "status" not in control_plane.request("GET", _path(namespace, name)) or \
        control_plane.request("GET", _path(namespace, name))["status"].get("phase") is None
    control_plane.request("PATCH", _path(namespace, name) + "/status", {"status": {"phase": "Running"}},
                          content_type=merge)
    assert control_plane.request("GET", _path(namespace, name))["status"]["phase"] == "Running"
    with pytest.raises(ApiError) as err:
        control_plane.request("PATCH", _path(namespace, name) + "/status", {"status": {"phase": "Exploded"}},
                              content_type=merge)
    assert "status.phase" in err.value.body["message"]
