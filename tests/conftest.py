"""Suite-wide fixtures. The real control plane (etcd, kube-apiserver, controllers, scheduler, kwok) comes from the
cluster plugin; tests that need it carry the `cluster` marker."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest_plugins = ["tests.conftest_cluster_plugin", "tests.conftest_guard_plugin"]

LONG_TIMEOUT = 900  # seconds; the default (--timeout in pyproject.toml) is for everything else
_TRAINER_TESTS = Path(__file__).resolve().parent / "trainer"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that really train (marked slow or e2e, or under tests/trainer/) get a longer deadline, unless they set
    their own with @pytest.mark.timeout."""
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        if item.get_closest_marker("slow") or item.get_closest_marker("e2e") or \
                Path(str(item.fspath)).is_relative_to(_TRAINER_TESTS):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT))


@pytest.fixture(scope="session")
def finetune_crd(control_plane):  # type: ignore[no-untyped-def]
    """The generated FineTuneJob CRD, installed once per session and Established before any test uses it.

    Server-side apply with the field manager `finetune-tests`; the Helm tests install the chart with its own CRD copy
    disabled (crds.enabled=false) so that both can share one control plane.
    """
    from finetune_api.crd import CRD_PATH

    CRD_NAME = "finetunejobs.finetune.dev"

    control_plane.apply(CRD_PATH.read_text())

    # Polled rather than `kubectl wait`: that fails outright ("accessor error") when it reads the CRD before the
    # API server has written any condition.
    def established() -> bool:
        crd = control_plane.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
        return any(c.get("type") == "Established" and c.get("status") == "True"
                   for c in (crd.get("status") or {}).get("conditions") or [])

    control_plane.wait_for(established, timeout=60, desc=f"CRD {CRD_NAME} to be Established")
    return None
