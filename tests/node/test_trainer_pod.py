"""The trainer image on the real node, under the security context the operator gives trainer pods (taken from the
operator's own Job builder, not copied): the entry point runs, the root filesystem refuses writes, logs come back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import RealNode

from .support import logs, pod_manifest, run_to_completion, terminated, trainer_pod_shape

pytestmark = pytest.mark.node


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
    assert "usage: python -m finetune_trainer" in help_text, help_text  # named as it was invoked

    refused = logs(control_plane, ns, "trainer", "write-root-fs")
    assert terminated(done, "write-root-fs")["exitCode"] == 1, refused
    assert "Read-only file system" in refused, refused
    # The kubelet ran them as the builder said.
    assert f"uid {container_security['runAsUser']} gid {container_security['runAsGroup']}" in refused, refused
