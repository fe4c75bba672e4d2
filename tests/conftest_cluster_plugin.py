"""Pytest plugin: one real Kubernetes control plane per session for tests marked ``cluster`` or ``e2e``, and one real
node in it for tests marked ``node``.

Enable it with ``pytest_plugins = ["tests.conftest_cluster_plugin"]`` in ``tests/conftest.py``. The ``control_plane``
fixture builds the binaries on first use (tests/controlplane/build.sh; minutes when cold, progress on stderr) and
starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok once per session. If the binaries cannot
be built, cluster tests ERROR loudly; they are skipped only when FINETUNE_SKIP_CLUSTER=1 is set explicitly.

The ``real_node`` fixture adds the real node (tests/controlplane/node.py) to that control plane the first time a test
asks for it, so runs without node tests never start it; ``node_images`` builds the operator and trainer images
(tests/controlplane/images.py) and loads them into the node. Where the node cannot come up, its tests FAIL with the
reason (component, log tail); they are skipped only when FINETUNE_SKIP_NODE=1 (or FINETUNE_SKIP_CLUSTER=1) is set.

The ``kueue`` fixture starts Kueue's controller manager (tests/controlplane/kueue.py) beside the scheduler the first
time a test asks for it, so runs without Kueue tests never build or start it.
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
from tests.controlplane.images import ImageError, ProductImages, Steps, build_product_images  # noqa: E402
from tests.controlplane.kueue import Kueue  # noqa: E402
from tests.controlplane.node import RealNode  # noqa: E402

SKIP_ENV = "FINETUNE_SKIP_CLUSTER"
SKIP_NODE_ENV = "FINETUNE_SKIP_NODE"
CLUSTER_MARKERS = ("cluster", "e2e")
NODE_FIXTURES = ("real_node", "node_images")
# The first test that asks for a node fixture pays for its set-up: a cold build of the node's programs and of both
# images, and their import into containerd, take minutes, far beyond one test's deadline (pytest-timeout).
NODE_SETUP_TIMEOUT = 3600
NODE_TESTS = "tests/node"  # under pytest-xdist, one worker runs every test here: the machine has one real node
_LOGS_KEY = pytest.StashKey[Path]()


def _skip_requested() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


def _skip_node_requested() -> bool:
    return _skip_requested() or os.environ.get(SKIP_NODE_ENV) == "1"


def pytest_configure(config: pytest.Config) -> None:
    """Registers the markers (so --strict-markers accepts them)."""
    config.addinivalue_line(
        "markers", "cluster: runs against the real test control plane (etcd, kube-apiserver, controllers, kwok)"
    )
    config.addinivalue_line("markers", "e2e: end-to-end test of the operator against the real test control plane")
    config.addinivalue_line("markers", "node: runs pods on the real node (kubelet, containerd) with the built images")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection and xdist's grouping read the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test that uses the control plane as ``cluster`` and every test that uses the real node as ``node``
    (so ``-m 'not cluster'`` / ``-m 'not node'`` deselect them), and skips them, visibly, when asked to.

    Under pytest-xdist the real-node tests come first (see ``pytest_xdist_make_scheduler``)."""
    skip = pytest.mark.skip(reason=f"{SKIP_ENV}=1: cluster tests disabled explicitly")
    skip_node = pytest.mark.skip(reason=f"{SKIP_NODE_ENV}=1: real-node tests disabled explicitly")
    paying = set(NODE_FIXTURES)
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if first := paying.intersection(fixtures):
            # Prepended: it wins over the test's own @pytest.mark.timeout, which does not count the set-up.
            item.add_marker(pytest.mark.timeout(NODE_SETUP_TIMEOUT), append=False)
            paying -= first
        uses_cluster = "control_plane" in fixtures
        uses_node = any(f in fixtures for f in NODE_FIXTURES) or item.get_closest_marker("node") is not None
        if uses_cluster and item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.cluster)
        if uses_node and item.get_closest_marker("node") is None:
            item.add_marker(pytest.mark.node)
        if _skip_requested() and (uses_cluster or any(item.get_closest_marker(m) for m in CLUSTER_MARKERS)):
            item.add_marker(skip)
        elif uses_node and _skip_node_requested():
            item.add_marker(skip_node)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: every worker orders the same way
        items.sort(key=lambda i: not i.nodeid.startswith(f"{NODE_TESTS}/"))  # stable: the real-node group first



@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist (``make test`` runs two workers, each with its own control plane): every test of a module runs on
    one worker, in order, so that its module fixtures are made once, and every test of tests/node on one worker, the
    one that starts the machine's only real node. That group comes first: the longest starts at once, and the rest
    of the suite runs beside it on the other worker. (xdist's own ``loadgroup`` marks do not group under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RealNodeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return NODE_TESTS if module.startswith(f"{NODE_TESTS}/") else module

    config.option.loadscopereorder = False  # the collection's order, real-node group first (not the largest first)
    return RealNodeScheduling(config, log)  # type: ignore[arg-type]


def _uncaptured(request: pytest.FixtureRequest) -> contextlib.AbstractContextManager[None]:
    """Lets output reach the terminal: cold builds take minutes and must not look hung."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds missing control-plane binaries before the first test, outside every test's deadline (pytest-timeout):
    a cold build takes minutes. A failure is reported by the `control_plane` fixture, which tries again."""
    wanted = ("control_plane", "helm", "promql_check_bin")  # every fixture that takes a binary from build.sh
    if _skip_requested() or not any(set(wanted) & set(getattr(i, "fixturenames", ())) for i in session.items):
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    uncaptured = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with_kueue = any("kueue" in getattr(i, "fixturenames", ()) for i in session.items)
    with uncaptured, contextlib.suppress(BuildError):
        build_binaries(with_kueue=with_kueue)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane: admin kubeconfig, kubectl/helm helpers, finish_pod/evict_pod (see ControlPlane)."""
    if _skip_requested():
        pytest.skip(f"{SKIP_ENV}=1: cluster tests disabled explicitly")
    problem = None
    try:
        with _uncaptured(request):
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
    with _uncaptured(request):
        sys.stderr.write(f"\n[control plane] up in {cp.startup_seconds:.1f}s; KUBECONFIG={cp.kubeconfig}\n")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def real_node(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[RealNode]:
    """The real node of the session's control plane, started on first use (about 20 s once its programs are built;
    a cold build of kubelet, kube-proxy and CoreDNS adds minutes). Stopped at the end of the session."""
    if _skip_node_requested():
        pytest.skip(f"{SKIP_NODE_ENV}=1: real-node tests disabled explicitly")
    problem = None
    node = None
    try:
        with _uncaptured(request):
            binaries = build_binaries(with_node=True)
            node = RealNode(control_plane, binaries).start()
    except (ControlPlaneError, ImageError) as exc:
        problem = f"the real node did not come up: {exc}"
    if problem or node is None:
        pytest.fail(problem or "the real node did not come up", pytrace=False)
    try:
        yield node
    finally:
        with _uncaptured(request):
            node.stop()


@pytest.fixture(scope="session")
def node_images(real_node: RealNode, request: pytest.FixtureRequest) -> ProductImages:
    """The operator and trainer images of this tree (built from the repository's Dockerfiles, cached by content) in
    the real node's containerd."""
    problem = None
    try:
        with _uncaptured(request):
            steps = Steps()
            tags = build_product_images(steps)
            real_node.load_images([tags.operator, tags.trainer])
    except (ImageError, ControlPlaneError) as exc:
        problem = f"the operator and trainer images could not be built or loaded into the node: {exc}"
    if problem:
        pytest.fail(problem, pytrace=False)
    return tags


@pytest.fixture(scope="session")
def kueue_process(control_plane: ControlPlane, request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """Kueue's controller manager beside the control plane (CRDs, webhooks on loopback), installed on first use;
    stopped at the end of the session. Tests take it through ``kueue``, which starts it again if a test stopped it."""
    problem = None
    kueue = None
    try:
        with _uncaptured(request):
            binaries = build_binaries(with_kueue=True)
        assert binaries.kueue is not None
        kueue = Kueue(control_plane, binaries.kueue, tmp_path_factory.mktemp("kueue")).start()
    except ControlPlaneError as exc:
        problem = f"Kueue did not come up: {exc}"
    if problem or kueue is None:
        pytest.fail(problem or "Kueue did not come up", pytrace=False)
    try:
        yield kueue
    finally:
        kueue.stop()


@pytest.fixture
def kueue(kueue_process: Kueue) -> Iterator[Kueue]:
    """The session's Kueue, running with its base configuration; a test that stopped or reconfigured it leaves it
    that way only until the next test asks for it."""
    if kueue_process.config or not kueue_process.running:
        kueue_process.restart()
    yield kueue_process


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
