"""The trainer image on the real node, under the security context the operator gives trainer pods (taken from the
operator's own Job builder, not copied): the entry point runs, the root filesystem refuses writes, logs come back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.spec import FineTuneJobSpec
from finetune_operator.builders import BuildContext, Owner, build_job
from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import RealNode

from .support import REPO, logs, pod_manifest, run_to_completion, terminated

pytestmark = pytest.mark.node

EXAMPLE = REPO / "examples" / "sentiment.yaml"


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


def test_trainer_image_runs_under_the_operators_security_context(
    control_plane: ControlPlane, real_node: RealNode, node_images: ProductImages,
    restricted_namespace: Callable[[str], str],
) -> None:
    ns = restricted_namespace("trainer")
    shape = trainer_pod_shape(node_images.trainer, ns)
    container_security = shape.container_security
    assert container_security["readOnlyRootFilesystem"] is True and container_security["runAsNonRoot"] is True
    assert "/tmp" in {m["mountPath"] for m in shape.mounts}, "the read-only image needs a writable /tmp"

    def container(name: str, command: list[str]) -> dict[str, Any]:
        return {"name": name, "image": node_images.trainer, "imagePullPolicy": "IfNotPresent", "command": command,
                "securityContext": container_security, "volumeMounts": shape.mounts}

    pod = pod_manifest("trainer", [
        container("help", ["python", "-m", "finetune_trainer", "--help"]),
        # The image's own files (its virtualenv) are on the root filesystem.
        container("write-root-fs", ["python", "-c", "import os; print('uid', os.getuid(), 'gid', os.getgid(), "
                                                    "flush=True); open('/opt/finetune/written-at-run-time', 'w')"]),
    ], pod_security=shape.pod_security, volumes=shape.volumes)
    done = run_to_completion(control_plane, ns, pod)

    help_text = logs(control_plane, ns, "trainer", "help")
    assert terminated(done, "help")["exitCode"] == 0, help_text
    assert "usage: finetune-trainer" in help_text, help_text

    refused = logs(control_plane, ns, "trainer", "write-root-fs")
    assert terminated(done, "write-root-fs")["exitCode"] == 1, refused
    assert "Read-only file system" in refused, refused
    # The kubelet ran them as the builder said.
    assert f"uid {container_security['runAsUser']} gid {container_security['runAsGroup']}" in refused, refused
