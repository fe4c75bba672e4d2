"""Pytest plugin: one real Kubernetes control plane per session for tests marked ``cluster`` or ``e2e``.

Enable it with ``pytest_plugins = ["tests.conftest_cluster_plugin"]`` in ``tests/conftest.py``. The ``control_plane``
fixture builds the binaries on first use (tests/controlplane/build.sh; minutes when cold, progress on stderr) and
starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok once per session. If the binaries cannot
be built, cluster tests ERROR loudly; they are skipped only when FINETUNE_SKIP_CLUSTER=1 is set explicitly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # "tests.controlplane" must import however pytest was started
    sys.path.insert(0, str(_REPO_ROOT))

from tests.controlplane.cluster import BuildError, ControlPlane, ControlPlaneError, build_binaries  # noqa: E402

SKIP_ENV = "FINETUNE_SKIP_CLUSTER"
CLUSTER_MARKERS = ("cluster", "e2e")
_LOGS_KEY = pytest.StashKey[Path]()


def _skip_requested() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


def pytest_configure(config: pytest.Config) -> None:
    """Registers the markers (so --strict-markers accepts them)."""
    config.addinivalue_line(
        "markers", "cluster: runs against the real test control plane (etcd, kube-apiserver, controllers, kwok)"
    )
    config.addinivalue_line("markers", "e2e: end-to-end test of the operator against the real test control plane")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test that uses the control plane as ``cluster`` (so ``-m 'not cluster'`` deselects it), and skips
    them all, visibly, when FINETUNE_SKIP_CLUSTER=1."""
    skip = pytest.mark.skip(reason=f"{SKIP_ENV}=1: cluster tests disabled explicitly")
    for item in items:
        uses_cluster = "control_plane" in getattr(item, "fixturenames", ())
        if uses_cluster and item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.cluster)
        if _skip_requested() and (uses_cluster or any(item.get_closest_marker(m) for m in CLUSTER_MARKERS)):
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds missing control-plane binaries before the first test, outside every test's deadline (pytest-timeout):
    a cold build takes minutes. A failure is reported by the `control_plane` fixture, which tries again."""
    wanted = ("control_plane", "helm", "promql_check_bin")  # every fixture that takes a binary from build.sh
    if _skip_requested() or not any(set(wanted) & set(getattr(i, "fixturenames", ())) for i in session.items):
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    uncaptured = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with uncaptured, contextlib.suppress(BuildError):
        build_binaries()


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane: admin kubeconfig, kubectl/helm helpers, finish_pod/evict_pod (see ControlPlane)."""
    if _skip_requested():
        pytest.skip(f"{SKIP_ENV}=1: cluster tests disabled explicitly")
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def uncaptured() -> contextlib.AbstractContextManager[None]:
        """Lets output reach the terminal: a cold build takes minutes and must not look hung."""
        return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()

    problem = None
    try:
        with uncaptured():
            binaries = build_binaries()
    except BuildError as exc:
        problem = (
            f"cannot build the test control plane: {exc}\n"
            f"Install Go (>= 1.26) and let it reach the Go module proxy, or set {SKIP_ENV}=1 to skip cluster tests."
        )
    if problem:
        pytest.fail(problem, pytrace=False)
    cp = ControlPlane(binaries, workdir=tmp_path_factory.mktemp("controlplane"))
    try:
        cp.start()
    except ControlPlaneError as exc:
        problem = f"cannot start the test control plane: {exc}"
    if problem:
        pytest.fail(problem, pytrace=False)
    request.config.stash[_LOGS_KEY] = cp.logs_dir
    with uncaptured():
        sys.stderr.write(f"\n[control plane] up in {cp.startup_seconds:.1f}s; KUBECONFIG={cp.kubeconfig}\n")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards (the namespace controller empties it)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(name, labels={"finetune.dev/test": "true"})
    yield name
    control_plane.delete_namespace(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    """On a failed cluster test, say where the component logs are."""
    report = yield
    logs = item.config.stash.get(_LOGS_KEY, None)
    if (
        isinstance(report, pytest.TestReport)
        and report.failed
        and logs is not None
        and "control_plane" in getattr(item, "fixturenames", ())
    ):
        files = "\n".join(f"  {p}" for p in sorted(logs.glob("*.log")))
        report.sections.append(("control-plane logs", f"component logs in {logs}:\n{files}"))
    return report
