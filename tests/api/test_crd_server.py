"""The generated CRD on a real API server: the schema and CEL rules reject what `finetune validate` rejects, with the
field named, and immutable fields stay immutable. A mock server would accept all of these."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from finetune_api.manifest import validate_document
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


@pytest.mark.parametrize(("doc", "field", "words"), [m[1:] for m in MALFORMED if m[0] not in CLIENT_ONLY],
                         ids=[m[0] for m in MALFORMED if m[0] not in CLIENT_ONLY])
def test_server_rejects_what_the_validator_rejects(finetune_crd: None, control_plane: ControlPlane, namespace: str,
                                                   doc: dict, field: str, words: str) -> None:
    assert validate_document(copy.deepcopy(doc))[0] is None
    with pytest.raises(ApiError) as err:
        _create(control_plane, namespace, doc)
    assert err.value.status in (400, 422), err.value.body
    message = err.value.body["message"]
    leaf = field.split(".")[-1]
    assert leaf in message, message
    listed = control_plane.request("GET", _path(namespace))
    assert listed["items"] == [], "a rejected manifest left an object behind"


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
