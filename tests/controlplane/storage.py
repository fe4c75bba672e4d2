"""The demo's storage on the real node: the claims examples/sentiment.yaml and examples/sentiment-cpu.yaml name
(``models``, ``datasets``, ``runs``), each a local PersistentVolume on the node, of a StorageClass made for them,
bound to its claim in one namespace.

Each volume is a folder on the host that examples/stage_demo.py fills as a platform team pre-loads a claim (the
packaged all-MiniLM-L6-v2 and the example data, copied: the pods see only the claim). ``runs`` belongs to the
trainer's uid (the operator's security context); the inputs are read-only to it. ``make cluster`` stages them in the
``default`` namespace, the node tests in each test's tenant namespace.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune_operator.builders import PVC_ROOT, RUN_AS_USER

from .cluster import ApiError, ControlPlane
from .node import NODE_NAME

REPO = Path(__file__).resolve().parents[2]
STAGE_DEMO = REPO / "examples" / "stage_demo.py"
CLAIMS = ("models", "datasets", "runs")  # the claims the sentiment examples read and write
WRITABLE = "runs"


@dataclass(frozen=True)
class NodeStorage:
    """The claims of one namespace, each a local PersistentVolume in a folder ``root/<claim>`` of the host."""

    root: Path
    namespace: str
    storage_class: str
    volumes: tuple[str, ...]

    def host_path(self, location: str) -> Path:
        """Where a ``pvc://claim/path`` (or the pod's ``/mnt/pvc/claim/path``) lies on the host."""
        for prefix in ("pvc://", f"{PVC_ROOT}/"):
            if location.startswith(prefix):
                return self.root / location.removeprefix(prefix)
        raise AssertionError(f"{location} is not on a claim")


def stage_demo_claims(root: Path) -> None:
    """The example's inputs as examples/stage_demo.py stages them (copies), and an empty ``runs`` owned by the
    trainer's uid; each claim's folder belongs to the pods' group (their fsGroup: the kubelet warns about a shared
    volume of another group)."""
    subprocess.run([sys.executable, str(STAGE_DEMO), "--pvc-root", str(root), "--copy"], check=True,
                   capture_output=True, text=True, timeout=300)
    (root / WRITABLE).mkdir(exist_ok=True)
    shutil.chown(root / WRITABLE, RUN_AS_USER, RUN_AS_USER)
    for claim in CLAIMS:
        shutil.chown(root / claim, group=RUN_AS_USER)


def provide_storage(cp: ControlPlane, namespace: str, root: Path, name: str) -> NodeStorage:
    """A StorageClass ``name`` (no provisioner, bound when a pod needs it, as local volumes are), one local PV per claim
    pinned to the real node, and the claims in ``namespace`` bound to them."""
    cp.request("POST", "/apis/storage.k8s.io/v1/storageclasses", {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"})
    volumes = []
    for claim in CLAIMS:
        pv = f"{name}-{claim}"
        cp.request("POST", "/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": name,
                "persistentVolumeReclaimPolicy": "Retain", "local": {"path": str(root / claim)},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}]}]}},
                "claimRef": {"namespace": namespace, "name": claim},
            }})
        cp.request("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": name, "volumeName": pv,
                     "resources": {"requests": {"storage": "2Gi"}}}})
        volumes.append(pv)
    for claim in CLAIMS:
        cp.wait_for(lambda c=claim: cp.request(  # type: ignore[misc]
            "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{c}").get("status", {}).get("phase")
            == "Bound", timeout=60, desc=f"claim {namespace}/{claim} bound")
    return NodeStorage(root, namespace, name, tuple(volumes))


def remove_storage(cp: ControlPlane, storage: NodeStorage) -> None:
    for path in [f"/api/v1/persistentvolumes/{pv}" for pv in storage.volumes] + [
            f"/apis/storage.k8s.io/v1/storageclasses/{storage.storage_class}"]:
        try:
            cp.request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise
