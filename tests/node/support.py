"""Helpers of the real-node tests: the chart installed as a user installs it, plain pods on the node, their logs.

Everything goes through the API server, kubectl and helm, as a platform engineer's first steps on a real cluster do
(README, "Try it on a real cluster"); issue-level scenarios (FineTuneJobs running as real pods) build on these.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune_api.spec import FineTuneJobSpec
from finetune_operator.builders import BuildContext, Owner, build_job
from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import NODE_NAME, node_scheduling

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "finetune-operator"
EXAMPLE = REPO / "examples" / "sentiment.yaml"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}
# Generous: a pod's first start on a loaded 2-core machine includes unpacking nothing (images are imported), but the
# operator's Python start and its first readiness probe take several seconds.
POD_TIMEOUT = 180.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Release:
    """An installed chart release: the operator Deployment, its Service and its Lease are named ``fullname``."""

    name: str
    namespace: str
    fullname: str
    watched: tuple[str, ...]

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name}"


def user_values(images: ProductImages, watch: list[str]) -> dict[str, Any]:
    """The values a user sets to run the chart on a cluster with this node: the images `make images` printed, the
    namespaces to watch, and the node's label and taint (README, "Try it on a real cluster")."""
    return {
        **images.helm_values(),
        **node_scheduling(),
        "operator": {"watchNamespaces": watch, "logFormat": "text"},
    }


def install_operator(cp: ControlPlane, images: ProductImages, namespace: str, watch: list[str],
                     workdir: Path, values: dict[str, Any] | None = None) -> Release:
    """``helm install --wait`` of the chart into ``namespace`` (Ready through the pod's real probes), with ``values``
    on top of the user's. The session installs the CRD itself (the ``finetune_crd`` fixture), so the chart's copy is
    left out."""
    name = unique("ft")
    given = workdir / f"{name}-values.yaml"
    given.write_text(yaml.safe_dump(user_values(images, watch), sort_keys=False))
    extra = workdir / f"{name}-extra-values.yaml"
    extra.write_text(yaml.safe_dump(values or {}, sort_keys=False))
    cp.helm("install", name, str(CHART), "--namespace", namespace, "--values", str(given), "--values", str(extra),
            "--set", "crds.enabled=false", "--wait", "--timeout", f"{int(POD_TIMEOUT)}s", timeout=POD_TIMEOUT + 60)
    return Release(name, namespace, f"{name}-finetune-operator", tuple(watch))


def operator_pods(cp: ControlPlane, release: Release) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cp.request(
        "GET", f"/api/v1/namespaces/{release.namespace}/pods?labelSelector={release.selector}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def lease_holder(cp: ControlPlane, release: Release) -> str | None:
    lease = cp.get(f"/apis/coordination.k8s.io/v1/namespaces/{release.namespace}/leases/{release.fullname}")
    holder: str | None = (lease or {}).get("spec", {}).get("holderIdentity")
    return holder


def pod_manifest(name: str, containers: list[dict[str, Any]], pod_security: dict[str, Any] | None = None,
                 **spec: Any) -> dict[str, Any]:
    """A plain pod on the real node (its label and taint), never restarted."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "finetune-node-tests"}},
        "spec": {
            **node_scheduling(),
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            **({"securityContext": pod_security} if pod_security else {}),
            "containers": containers,
            **spec,
        },
    }


def restricted_container(name: str, image: str, command: list[str], user: int = 65532) -> dict[str, Any]:
    """A container the restricted Pod Security level admits."""
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": user,
            "runAsGroup": user,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def run_to_completion(cp: ControlPlane, namespace: str, pod: dict[str, Any],
                      timeout: float = POD_TIMEOUT) -> dict[str, Any]:
    """Creates the pod and waits until it is Succeeded or Failed; returns it. The pod must land on the real node."""
    name = pod["metadata"]["name"]
    cp.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)

    def finished() -> dict[str, Any] | None:
        current = cp.get_pod(namespace, name)
        return current if current.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        done = cp.wait_for(finished, timeout=timeout, interval=0.5, desc=f"pod {namespace}/{name} to finish")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\npod: {json.dumps(cp.get_pod(namespace, name).get('status'), indent=1)}") from None
    assert done["spec"].get("nodeName") == NODE_NAME, f"pod ran on {done['spec'].get('nodeName')}, not the real node"
    return done


def terminated(pod: dict[str, Any], container: str) -> dict[str, Any]:
    """``state.terminated`` of one container (exitCode, reason, message)."""
    for status in pod["status"].get("containerStatuses", []):
        if status["name"] == container:
            state: dict[str, Any] = status["state"].get("terminated") or {}
            return state
    raise AssertionError(f"no status of container {container}: {pod['status']}")


def logs(cp: ControlPlane, namespace: str, pod: str, container: str | None = None) -> str:
    """``kubectl logs``: the API server fetches them from the kubelet."""
    args = ["-n", namespace, "logs", pod] + (["-c", container] if container else [])
    return cp.kubectl(*args).stdout


@dataclass(frozen=True)
class TrainerPodShape:
    """What a trainer pod gets from the operator's Job builder beyond its job's own config and claims."""

    pod_security: dict[str, Any]
    container_security: dict[str, Any]
    volumes: list[dict[str, Any]]  # the scratch volumes (/tmp, /dev/shm): emptyDirs
    mounts: list[dict[str, Any]]


def trainer_pod_shape(image: str, namespace: str, example: Path = EXAMPLE) -> TrainerPodShape:
    """The security contexts and scratch volumes of the Job the operator builds for the example manifest."""
    spec = FineTuneJobSpec.model_validate(yaml.safe_load(example.read_text())["spec"])
    job = build_job(Owner("sentiment-minilm", namespace, "uid-of-the-example"), spec,
                    BuildContext(trainer_image=image, progress_url="http://finetune-operator.invalid:8081/"))
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    scratch = {v["name"] for v in pod_spec["volumes"] if "emptyDir" in v}
    return TrainerPodShape(pod_spec["securityContext"], container["securityContext"],
                           [v for v in pod_spec["volumes"] if v["name"] in scratch],
                           [m for m in container["volumeMounts"] if m["name"] in scratch])
