"""Fixtures for the chart tests: the control plane's helm binary, a renderer, and helm/chartgen.py as a module.

`helm lint`/`helm template` need no cluster, but they do need the helm the control plane builds (v3, pinned in
tests/controlplane/build.sh): the chart is tested with the Helm version the project supports, not whatever is on PATH.
FINETUNE_HELM=/path/to/helm overrides it for quick local runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import BuildError, build_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "finetune-operator"
VALUES_DIR = Path(__file__).resolve().parent / "values"
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")


def load_chartgen() -> ModuleType:
    """helm/ is not a package; import the generator from its file."""
    spec = importlib.util.spec_from_file_location("chartgen", REPO / "helm" / "chartgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chartgen", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def chartgen() -> ModuleType:
    return load_chartgen()


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The control plane's helm (built or found in the cache by build.sh)."""
    if override := os.environ.get("FINETUNE_HELM"):
        return Path(override)
    try:
        return build_binaries().helm
    except BuildError as exc:
        if os.environ.get("FINETUNE_SKIP_CLUSTER") == "1":
            pytest.skip(f"FINETUNE_SKIP_CLUSTER=1 and no helm binary: {exc}")
        pytest.fail(f"cannot build helm with tests/controlplane/build.sh: {exc}", pytrace=False)


class Helm:
    """Runs helm offline (template, lint, show) on the chart; a kubeconfig is never needed or read."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=120,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
        return proc

    def template_args(
        self,
        values_files: Iterable[str | Path] = (),
        sets: Iterable[str] = (),
        api_versions: Iterable[str] = (),
        namespace: str = "finetune-system",
        release: str = "ft",
    ) -> list[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        for f in values_files:
            args += ["--values", str(VALUES_DIR / f if not Path(f).is_absolute() else f)]
        for s in sets:
            args += ["--set", s]
        for api in api_versions:
            args += ["--api-versions", api]
        return args

    def template(self, *args: Any, **kwargs: Any) -> str:
        return self.run(*self.template_args(*args, **kwargs)).stdout

    def render(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """`helm template` parsed into objects (empty documents dropped)."""
        return [d for d in yaml.safe_load_all(self.template(*args, **kwargs)) if d]


@pytest.fixture(scope="session")
def helm(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_bin, tmp_path_factory.mktemp("helm-home"))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
         ) -> list[dict[str, Any]]:
    """Objects of a kind (and name/namespace, when given)."""
    return [
        o for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
        ) -> dict[str, Any]:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    """The operator container's env as name -> value (or valueFrom)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


Render = Callable[..., list[dict[str, Any]]]
