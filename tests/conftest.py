"""Suite-wide fixtures. The real control plane (etcd, kube-apiserver, controllers, scheduler, kwok) comes from the
cluster plugin; tests that need it carry the `cluster` marker."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest_plugins = ["tests.conftest_cluster_plugin"]


@pytest.fixture(scope="session")
def finetune_crd(control_plane):  # type: ignore[no-untyped-def]
    """The generated FineTuneJob CRD, installed once per session and Established before any test uses it.

    Server-side apply with the field manager `finetune-tests`; the Helm tests install the chart with its own CRD copy
    disabled (crds.enabled=false) so that both can share one control plane.
    """
    from finetune_api.crd import CRD_PATH

    control_plane.apply(CRD_PATH.read_text())

    def established() -> bool:
        # Polled rather than `kubectl wait`, which fails outright while the new CRD has no conditions yet.
        crd = control_plane.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                           "finetunejobs.finetune.dev")
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in (crd.get("status") or {}).get("conditions") or [])

    control_plane.wait_for(established, timeout=60, desc="the FineTuneJob CRD Established")
    return None
