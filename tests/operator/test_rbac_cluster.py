"""The operator works with exactly the least-privilege RBAC the README lists, and no more.

The operator runs as a ServiceAccount bound to OPERATOR_RULES (plus a Role for its Lease); a full job lifecycle and a
progress push must work under it, and the ServiceAccount must not be able to read Secrets anywhere.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.operator.cluster_support import (
    OPERATOR_RULES,
    OperatorProcess,
    create_ftj,
    grant,
    operator_errors,
    pods_of,
    revoke,
    wait_phase,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster


def test_operator_runs_with_least_privilege(control_plane: ControlPlane, finetune_crd: None, namespace: str,
                                            tmp_path: Path) -> None:
    cp = control_plane
    suffix = uuid.uuid4().hex[:6]
    sa, lease = f"finetune-operator-{suffix}", f"ftop-rbac-{suffix}"
    kubeconfig = grant(cp, namespace, sa, OPERATOR_RULES, lease, namespace, tmp_path / "kubeconfig")
    try:
        who = f"system:serviceaccount:{namespace}:{sa}"
        for verb in ("get", "list", "watch"):
            answer = cp.kubectl("auth", "can-i", verb, "secrets", "-A", f"--as={who}", check=False).stdout.strip()
            assert answer == "no", f"the operator must not {verb} Secrets"
        op = OperatorProcess(cp, tmp_path, lease=lease, KUBECONFIG=str(kubeconfig),
                             FINETUNE_LEASE_NAMESPACE=namespace)
        op.start()
        try:
            create_ftj(cp, manifest("rbac", namespace, run_policy={"ttlSecondsAfterFinished": 1}))
            wait_phase(cp, namespace, "rbac", "Running", timeout=30)
            secret = cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets/rbac-progress")
            token = base64.b64decode(secret["data"]["token"]).decode()
            assert op.post_progress(namespace, "rbac", token, {"step": 3, "totalSteps": 6}) == 202
            cp.wait_for(lambda: (cp.request("GET", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/"
                                                   "finetunejobs/rbac").get("status", {}).get("progress") or {})
                        .get("step") == 3, timeout=10, desc="progress in status")
            cp.finish_pod(namespace, pods_of(cp, namespace, "rbac", live_only=True)[0]["metadata"]["name"])
            wait_phase(cp, namespace, "rbac", "Succeeded", timeout=30)
            cp.wait_for(lambda: not cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps?labelSelector="
                                                      "finetune.dev%2Fjob-name%3Drbac")["items"],
                        timeout=20, desc="TTL clean-up allowed")
            assert operator_errors(op) == []
            assert "403" not in op.log_text(), "no request was forbidden"
        finally:
            op.stop()
    finally:
        revoke(cp, sa, namespace)
