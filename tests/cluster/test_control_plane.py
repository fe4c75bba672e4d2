"""Smoke tests of the test control plane: each checks a semantic that a mock API server would get wrongly.

They prove the cluster the operator's tests run against is real: CEL validation, scheduling of GPU requests, the Job
controller (Indexed jobs, podFailurePolicy, evictions), garbage collection, optimistic concurrency, RBAC and quotas.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import GPU_RESOURCE, TEST_NODE_LABEL, ApiError, ControlPlane

pytestmark = pytest.mark.cluster


# ---------------------------------------------------------------------------------------------------------- helpers


def job_manifest(
    name: str,
    gpus: int = 1,
    completions: int = 1,
    parallelism: int = 1,
    indexed: bool = False,
    backoff_limit: int = 6,
    pod_failure_policy: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A batch/v1 Job whose single container ("main") requests ``gpus`` nvidia.com/gpu."""
    resources = {"limits": {GPU_RESOURCE: str(gpus)}} if gpus else {}
    spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": parallelism,
        "backoffLimit": backoff_limit,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "registry.invalid/trainer:test", "resources": resources}],
            }
        },
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    if pod_failure_policy is not None:
        spec["podFailurePolicy"] = {"rules": pod_failure_policy}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def create_job(cp: ControlPlane, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = cp.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)
    return job


def get_job(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    return job


def job_pods(cp: ControlPlane, namespace: str, job_name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cp.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=batch.kubernetes.io/job-name%3D{job_name}"
    )["items"]
    return pods


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), None)


def is_running_ready(pod: dict[str, Any]) -> bool:
    ready = condition(pod, "Ready")
    return pod.get("status", {}).get("phase") == "Running" and ready is not None and ready["status"] == "True"


def running_pods(cp: ControlPlane, namespace: str, job_name: str, count: int) -> list[dict[str, Any]]:
    """Waits until ``count`` pods of the Job are Running and Ready (scheduled and started by kwok)."""

    def ready() -> list[dict[str, Any]] | None:
        pods = [p for p in job_pods(cp, namespace, job_name) if is_running_ready(p)]
        return pods if len(pods) >= count else None

    return cp.wait_for(ready, timeout=60, desc=f"{count} running pod(s) of job {namespace}/{job_name}")


def job_condition(cp: ControlPlane, namespace: str, name: str, type_: str, timeout: float = 60) -> dict[str, Any]:
    def met() -> dict[str, Any] | None:
        cond = condition(get_job(cp, namespace, name), type_)
        return cond if cond is not None and cond["status"] == "True" else None

    return cp.wait_for(met, timeout=timeout, desc=f"job {namespace}/{name} condition {type_}=True")


# ------------------------------------------------------------------------------------------------------------ tests


def test_server_reports_the_stamped_release(control_plane: ControlPlane) -> None:
    """Helm refuses charts with kubeVersion constraints when the server says v0.0.0; the build stamps the release."""
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.34.")
    assert version["clientVersion"]["gitVersion"] == version["serverVersion"]["gitVersion"]
    assert control_plane.helm("version", "--short").stdout.startswith("v3.")


def test_helm_accepts_a_chart_with_a_kube_version_constraint(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Helm checks Chart.yaml's kubeVersion against the server's version: v0.0.0 from an unstamped build fails."""
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        'apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: ">=1.30.0-0"\n', encoding="utf-8"
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n  k: v\n", encoding="utf-8"
    )
    namespace = f"helm-{uuid.uuid4().hex[:6]}"
    try:
        control_plane.helm("install", "probe", str(chart), "-n", namespace, "--create-namespace", "--wait")
        assert control_plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/probe")["data"] == {"k": "v"}
    finally:
        control_plane.helm("uninstall", "probe", "-n", namespace, check=False)
        control_plane.delete_namespace(namespace)


def test_nodes_advertise_gpus_through_the_python_client(control_plane: ControlPlane) -> None:
    from kubernetes import client

    with control_plane.api_client() as api:
        nodes = client.CoreV1Api(api).list_node(label_selector=f"{TEST_NODE_LABEL}=true").items
    assert len(nodes) == 4
    for node in nodes:
        assert node.status.allocatable[GPU_RESOURCE] == "8"
        assert node.status.allocatable["cpu"] == "32"
        assert node.status.allocatable["memory"] == "256Gi"
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True"
        assert node.metadata.labels["nvidia.com/gpu.present"] == "true"


def test_crd_cel_rule_rejects_violating_object(control_plane: ControlPlane, namespace: str) -> None:
    group = f"cel{uuid.uuid4().hex[:6]}.finetune.dev"
    control_plane.apply(
        textwrap.dedent(
            f"""\
            apiVersion: apiextensions.k8s.io/v1
            kind: CustomResourceDefinition
            metadata:
              name: widgets.{group}
            spec:
              group: {group}
              names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}}
              scope: Namespaced
              versions:
              - name: v1
                served: true
                storage: true
                schema:
                  openAPIV3Schema:
                    type: object
                    properties:
                      spec:
                        type: object
                        properties:
                          replicas: {{type: integer}}
                          maxReplicas: {{type: integer}}
                        x-kubernetes-validations:
                        - rule: "self.replicas <= self.maxReplicas"
                          message: "replicas must not exceed maxReplicas"
            """
        )
    )
    try:
        crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{group}"

        def established() -> bool:
            cond = condition(control_plane.request("GET", crd_path), "Established")
            return cond is not None and cond["status"] == "True"

        control_plane.wait_for(established, desc="CRD Established")
        path = f"/apis/{group}/v1/namespaces/{namespace}/widgets"

        def widget(name: str, replicas: int) -> dict[str, Any]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"replicas": replicas, "maxReplicas": 3},
            }

        # The new resource path can lag "Established" by a moment: retry the valid create on 404 only.
        def create_valid() -> bool:
            try:
                control_plane.request("POST", path, widget("ok", 2))
            except ApiError as exc:
                if exc.status == 404:
                    return False
                raise
            return True

        control_plane.wait_for(create_valid, desc="valid Widget created")
        with pytest.raises(ApiError) as rejected:
            control_plane.request("POST", path, widget("too-many", 5))
        assert rejected.value.status == 422
        assert rejected.value.reason == "Invalid"
        assert "replicas must not exceed maxReplicas" in rejected.value.body["message"]
    finally:
        control_plane.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)


def test_gpu_job_pod_scheduled_to_kwok_node_and_running(control_plane: ControlPlane, namespace: str) -> None:
    create_job(control_plane, namespace, job_manifest("one-gpu", gpus=1))
    (pod,) = running_pods(control_plane, namespace, "one-gpu", 1)
    assert pod["spec"]["nodeName"] in control_plane.node_names
    assert condition(pod, "PodScheduled")["status"] == "True"  # type: ignore[index]
    assert pod["status"]["podIP"]


def test_pod_requesting_too_many_gpus_is_unschedulable(control_plane: ControlPlane, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "greedy"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "registry.invalid/x", "resources": {"limits": {GPU_RESOURCE: "100"}}}
            ],
        },
    }
    control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)

    def unschedulable() -> dict[str, Any] | None:
        cond = condition(control_plane.get_pod(namespace, "greedy"), "PodScheduled")
        return cond if cond is not None and cond["status"] == "False" else None

    cond = control_plane.wait_for(unschedulable, desc="PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert f"Insufficient {GPU_RESOURCE}" in cond["message"]
    pod_now = control_plane.get_pod(namespace, "greedy")
    assert pod_now["status"]["phase"] == "Pending"
    assert not pod_now["spec"].get("nodeName")


def test_deleting_job_garbage_collects_its_pods(control_plane: ControlPlane, namespace: str) -> None:
    create_job(control_plane, namespace, job_manifest("doomed", gpus=1, completions=2, parallelism=2))
    running_pods(control_plane, namespace, "doomed", 2)
    control_plane.request(
        "DELETE",
        f"/apis/batch/v1/namespaces/{namespace}/jobs/doomed",
        {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
    )
    control_plane.wait_for(lambda: not job_pods(control_plane, namespace, "doomed"), timeout=60, desc="pods collected")


def test_dependent_of_deleted_owner_is_collected(control_plane: ControlPlane, namespace: str) -> None:
    cms = f"/api/v1/namespaces/{namespace}/configmaps"
    owner = control_plane.request("POST", cms, {"metadata": {"name": "owner"}, "data": {"k": "v"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    control_plane.request("POST", cms, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    # A dependent whose owner never existed (or is already gone) is collected as well.
    ghost = {"apiVersion": "v1", "kind": "ConfigMap", "name": "ghost", "uid": str(uuid.uuid4())}
    control_plane.request("POST", cms, {"metadata": {"name": "orphan", "ownerReferences": [ghost]}})
    control_plane.request("DELETE", f"{cms}/owner")

    def gone(name: str) -> bool:
        try:
            control_plane.request("GET", f"{cms}/{name}")
        except ApiError as exc:
            return exc.status == 404
        return False

    control_plane.wait_for(lambda: gone("child"), timeout=60, desc="child ConfigMap collected")
    control_plane.wait_for(lambda: gone("orphan"), timeout=60, desc="ConfigMap with dangling owner collected")


def test_stale_resource_version_write_conflicts(control_plane: ControlPlane, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    created = control_plane.request("POST", path, {"metadata": {"name": "cas"}, "data": {"v": "1"}})
    stale = dict(created, data={"v": "2"})
    control_plane.request("PUT", f"{path}/cas", stale)  # moves resourceVersion on
    with pytest.raises(ApiError) as conflict:
        control_plane.request("PUT", f"{path}/cas", dict(created, data={"v": "3"}))
    assert conflict.value.status == 409
    assert conflict.value.reason == "Conflict"
    assert control_plane.request("GET", f"{path}/cas")["data"] == {"v": "2"}


def test_narrow_role_is_enforced_by_rbac(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.apply(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: ServiceAccount
            metadata: {name: narrow}
            ---
            apiVersion: rbac.authorization.k8s.io/v1
            kind: Role
            metadata: {name: configmap-reader}
            rules:
            - apiGroups: [""]
              resources: [configmaps]
              verbs: [get, list]
            ---
            apiVersion: rbac.authorization.k8s.io/v1
            kind: RoleBinding
            metadata: {name: narrow-reads-configmaps}
            roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-reader}
            subjects:
            - {kind: ServiceAccount, name: narrow}
            """
        ),
        namespace=namespace,
    )
    user = f"system:serviceaccount:{namespace}:narrow"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
    cms = f"/api/v1/namespaces/{namespace}/configmaps"
    # Allowed by the Role: list configmaps (as the API and as kubectl).
    assert control_plane.request("GET", cms, as_user=user, as_groups=groups)["kind"] == "ConfigMapList"
    control_plane.kubectl("get", "configmaps", "-n", namespace, as_user=user, as_groups=groups)
    # Everything else is denied with 403 Forbidden.
    denied_calls = [
        ("POST", cms, {"metadata": {"name": "nope"}}),
        ("GET", f"/api/v1/namespaces/{namespace}/secrets", None),
        ("GET", "/api/v1/namespaces/default/configmaps", None),
        ("DELETE", f"{cms}/kube-root-ca.crt", None),
    ]
    for method, path, body in denied_calls:
        with pytest.raises(ApiError) as denied:
            control_plane.request(method, path, body, as_user=user, as_groups=groups)
        assert (denied.value.status, denied.value.reason) == (403, "Forbidden"), (method, path)
    refused = control_plane.kubectl("create", "configmap", "nope", "-n", namespace, as_user=user, check=False)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr
    can_i = control_plane.kubectl("auth", "can-i", "delete", "configmaps", "-n", namespace, as_user=user, check=False)
    assert can_i.stdout.strip() == "no"


def test_gpu_quota_makes_job_controller_fail_to_create_pod(control_plane: ControlPlane, namespace: str) -> None:
    quota_path = f"/api/v1/namespaces/{namespace}/resourcequotas"
    control_plane.request(
        "POST", quota_path, {"metadata": {"name": "gpus"}, "spec": {"hard": {f"requests.{GPU_RESOURCE}": "1"}}}
    )
    # Admission refuses pods while the quota controller has not yet computed status ("status unknown for quota").
    control_plane.wait_for(
        lambda: control_plane.request("GET", f"{quota_path}/gpus").get("status", {}).get("hard"),
        desc="quota status computed",
    )
    create_job(control_plane, namespace, job_manifest("over-quota", gpus=2))

    def failed_create_event() -> dict[str, Any] | None:
        events = control_plane.request(
            "GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3Dover-quota"
        )["items"]
        return next((e for e in events if e["reason"] == "FailedCreate"), None)

    event = control_plane.wait_for(failed_create_event, timeout=60, desc="FailedCreate event on the Job")
    assert event["type"] == "Warning"
    assert "exceeded quota" in event["message"]
    assert f"requests.{GPU_RESOURCE}" in event["message"]
    assert job_pods(control_plane, namespace, "over-quota") == []


def test_finished_pods_complete_an_indexed_job(control_plane: ControlPlane, namespace: str) -> None:
    create_job(control_plane, namespace, job_manifest("indexed", gpus=1, completions=2, parallelism=2, indexed=True))
    pods = running_pods(control_plane, namespace, "indexed", 2)
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]
    for pod in pods:
        finished = control_plane.finish_pod(namespace, pod["metadata"]["name"], exit_code=0)
        terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0
        assert terminated["reason"] == "Completed"
    job_condition(control_plane, namespace, "indexed", "Complete")
    status = get_job(control_plane, namespace, "indexed")["status"]
    assert status["succeeded"] == 2
    assert status["completedIndexes"] == "0,1"


def test_failed_pod_with_oomkilled_counts_against_backoff_limit(control_plane: ControlPlane, namespace: str) -> None:
    create_job(control_plane, namespace, job_manifest("oom", gpus=1, backoff_limit=0))
    (pod,) = running_pods(control_plane, namespace, "oom", 1)
    finished = control_plane.finish_pod(namespace, pod["metadata"]["name"], exit_code=137, reason="OOMKilled")
    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "OOMKilled")
    failed = job_condition(control_plane, namespace, "oom", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"


def test_pod_failure_policy_fail_job_on_exit_code(control_plane: ControlPlane, namespace: str) -> None:
    policy = [
        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
    ]
    create_job(control_plane, namespace, job_manifest("exit42", gpus=1, backoff_limit=6, pod_failure_policy=policy))
    (pod,) = running_pods(control_plane, namespace, "exit42", 1)
    control_plane.finish_pod(namespace, pod["metadata"]["name"], exit_code=42)
    failed = job_condition(control_plane, namespace, "exit42", "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "exit code 42" in failed["message"]


def test_evicted_pod_is_replaced_without_counting_a_failure(control_plane: ControlPlane, namespace: str) -> None:
    policy = [
        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
    ]
    create_job(control_plane, namespace, job_manifest("evictee", gpus=1, backoff_limit=0, pod_failure_policy=policy))
    (first,) = running_pods(control_plane, namespace, "evictee", 1)
    first_name = first["metadata"]["name"]
    pod_path = f"/api/v1/namespaces/{namespace}/pods/{first_name}"
    strategic = "application/strategic-merge-patch+json"
    # Our own finalizer keeps the evicted pod readable after the Job controller has dropped its tracking finalizer.
    control_plane.request(
        "PATCH", pod_path, {"metadata": {"finalizers": ["finetune.dev/hold"]}}, content_type=strategic
    )
    control_plane.evict_pod(namespace, first_name)

    evicted = control_plane.get_pod(namespace, first_name)
    assert evicted["metadata"].get("deletionTimestamp")
    assert evicted["status"]["phase"] == "Failed"
    disruption = condition(evicted, "DisruptionTarget")
    assert disruption is not None and disruption["reason"] == "EvictionByEvictionAPI"
    assert evicted["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143  # SIGTERM

    def replacement() -> dict[str, Any] | None:
        pods = [p for p in job_pods(control_plane, namespace, "evictee") if p["metadata"]["name"] != first_name]
        return next((p for p in pods if is_running_ready(p)), None)

    control_plane.wait_for(replacement, timeout=60, desc="replacement pod Running")
    job = get_job(control_plane, namespace, "evictee")
    assert not job["status"].get("failed"), job["status"]  # Ignore: the eviction is not a failure (backoffLimit 0)
    assert condition(job, "Failed") is None

    # Once the last finalizer is gone, the fake kubelet confirms the deletion and the pod disappears.
    control_plane.request(
        "PATCH",
        pod_path,
        {"metadata": {"$deleteFromPrimitiveList/finalizers": ["finetune.dev/hold"]}},
        content_type=strategic,
    )

    def gone() -> bool:
        try:
            control_plane.get_pod(namespace, first_name)
        except ApiError as exc:
            return exc.status == 404
        return False

    control_plane.wait_for(gone, timeout=30, desc="evicted pod deleted")
