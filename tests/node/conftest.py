"""Fixtures of the real-node tests: restricted namespaces, and the chart's operator running as a real pod.

The node itself (``real_node``) and the images (``node_images``) come from tests/conftest_cluster_plugin.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import RealNode

from .support import RESTRICTED, Release, install_operator, unique


@pytest.fixture
def restricted_namespace(control_plane: ControlPlane) -> Iterator[Callable[[str], str]]:
    """Makes namespaces that enforce the restricted Pod Security Standard; deletes them after the test."""
    made: list[str] = []

    def make(prefix: str) -> str:
        name = unique(prefix)
        control_plane.create_namespace(name, labels=RESTRICTED)
        made.append(name)
        return name

    yield make
    for name in made:
        control_plane.delete_namespace(name)


@contextlib.contextmanager
def released(cp: ControlPlane, images: ProductImages, workdir: Path, values: dict[str, Any] | None = None,
             tenant_labels: dict[str, str] | None = None) -> Iterator[Release]:
    """The chart installed with the built operator image into a restricted namespace, watching one restricted tenant
    namespace (a cluster-wide operator would also act on other tests' FineTuneJobs; ``tenant_labels`` are added to
    the tenant's); uninstalled afterwards."""
    system = unique("finetune-system")
    tenant = unique("tenant")
    cp.create_namespace(system, labels=RESTRICTED)
    cp.create_namespace(tenant, labels={**RESTRICTED, **(tenant_labels or {})})
    release = install_operator(cp, images, system, [tenant], workdir, values)
    try:
        yield release
    finally:
        cp.helm("uninstall", release.name, "--namespace", system, "--wait", check=False)
        for name in (system, tenant):
            cp.delete_namespace(name)


@pytest.fixture(scope="module")
def operator_release(control_plane: ControlPlane, real_node: RealNode, node_images: ProductImages, finetune_crd: None,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart as a user installs it (see ``released``)."""
    with released(control_plane, node_images, tmp_path_factory.mktemp("release")) as release:
        yield release
