"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok.

Why not a mock: the behaviours that break operators in production (resourceVersion conflicts, CEL validation, the Job
controller, garbage collection, scheduling of GPU requests, RBAC, quotas) only exist in the real components. The
binaries are built from their published Go modules by ``build.sh`` into a cache outside the repository; this module
starts them as local processes on loopback ports, with kwok acting as the kubelet of a few fake GPU nodes.

The core is stdlib-only (plus the ``openssl`` CLI for certificates); ``api_client()`` imports the ``kubernetes``
package lazily.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

CONTROLPLANE_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = CONTROLPLANE_DIR / "build.sh"
KWOK_STAGES = CONTROLPLANE_DIR / "kwok" / "stages.yaml"

# Annotations read by the kwok Stages in kwok/stages.yaml (the fake kubelet).
FINISH_ANNOTATION = "kwok.finetune.dev/finish"
EXIT_CODE_ANNOTATION = "kwok.finetune.dev/exit-code"
REASON_ANNOTATION = "kwok.finetune.dev/reason"
MESSAGE_ANNOTATION = "kwok.finetune.dev/message"
FINISH_DELAY_ANNOTATION = "kwok.finetune.dev/finish-delay"
START_DELAY_ANNOTATION = "kwok.finetune.dev/start-delay"
TERMINATION_EXIT_CODE_ANNOTATION = "kwok.finetune.dev/termination-exit-code"

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
TEST_NODE_LABEL = "finetune.dev/test-node"
GPU_RESOURCE = "nvidia.com/gpu"

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the "kubernetes" Service
POD_CIDR = "10.244.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBELET_CLIENT = "kube-apiserver-kubelet-client"
# The real node's address (node.py: its pod bridge's own IP). The API server advertises it as the endpoint of the
# `kubernetes` Service, since Endpoints may not hold a loopback address; the node forwards it to 127.0.0.1. Nothing
# listens there, and nothing uses the Service, while no real node runs.
NODE_IP = "10.245.0.1"

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached."""


class BuildError(ControlPlaneError):
    """build.sh failed: no Go toolchain, no module proxy, or a compile error."""


class ApiError(ControlPlaneError):
    """A non-2xx answer of the API server; ``status`` is the HTTP code and ``body`` the decoded Status object."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> {status}: {message}")

    @property
    def reason(self) -> str:
        """The Status reason (Conflict, Forbidden, Invalid, NotFound, ...)."""
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; unlike CalledProcessError the message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


# --------------------------------------------------------------------------------------------------------------------
# Waiting


def wait_for(
    fn: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.2,
    desc: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Polls ``fn`` until it returns something truthy and returns that; raises TimeoutError naming ``desc``.

    Tests wait on observable state with a deadline, never with fixed sleeps: fast when the cluster is fast, bounded when
    it is not. Exceptions listed in ``ignore`` count as "not yet" (the last one is reported on timeout).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = fn()
        except ignore as exc:
            result, last_error = None, exc
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {desc}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------------------------
# Binaries


@dataclass(frozen=True)
class Binaries:
    """Paths of the cached control-plane binaries, as reported by build.sh."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path
    # Not part of the control plane: the PromQL parser for tests/helm/test_promql.py. Optional so that a Binaries built
    # without it (older build.sh output, hand-made instances) stays valid.
    promql_check: Path | None = None
    # The real node's programs (tests/controlplane/node.py), built only with ``build_binaries(with_node=True)``.
    kubelet: Path | None = None
    kube_proxy: Path | None = None
    coredns: Path | None = None
    pause: Path | None = None
    # Kueue's controller manager (tests/controlplane/kueue.py), built only with ``build_binaries(with_kueue=True)``;
    # its module's CRDs and webhook configurations lie beside it.
    kueue: Path | None = None

    @classmethod
    def parse(cls, build_output: str) -> Binaries:
        """Reads the ``BIN <component> <path>`` lines that build.sh prints on stdout."""
        paths: dict[str, Path] = {}
        for line in build_output.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[0] == "BIN":
                paths[parts[1].replace("-", "_")] = Path(parts[2])
        try:
            return cls(**paths)
        except TypeError as exc:
            raise BuildError(f"build.sh printed an incomplete list of binaries: {sorted(paths)}") from exc

    def missing(self) -> list[Path]:
        """Binaries that are not (or no longer) executable files."""
        return [p for p in vars(self).values() if p is not None and not (p.is_file() and os.access(p, os.X_OK))]


def build_binaries(stream: IO[str] | None = None, with_node: bool = False, with_kueue: bool = False) -> Binaries:
    """Builds missing binaries with build.sh (minutes when cold; a file check when cached) and returns their paths;
    ``with_node`` adds the real node's kubelet, kube-proxy, CoreDNS and pause, ``with_kueue`` Kueue.

    build.sh's progress is forwarded line by line to ``stream`` (default: stderr) so a long first build is visibly
    alive; its last lines are also put into the BuildError message, so a failure explains itself.
    """
    if shutil.which("bash") is None:
        raise BuildError("bash is required to run tests/controlplane/build.sh")
    out = stream if stream is not None else sys.stderr
    flags = [flag for flag, wanted in (("--with-node", with_node), ("--with-kueue", with_kueue)) if wanted]
    argv = ["bash", str(BUILD_SCRIPT), *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    stdout_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stdout_chunks.append(proc.stdout.read() if proc.stdout else ""))
    reader.start()
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        out.write(line)
        out.flush()
        tail = [*tail[-30:], line]
    returncode = proc.wait()
    reader.join()
    if returncode != 0:
        raise BuildError(f"{' '.join(argv[1:])} failed with exit code {returncode}:\n{''.join(tail)}")
    binaries = Binaries.parse("".join(stdout_chunks))
    if missing := binaries.missing():
        raise BuildError(f"build.sh succeeded but these binaries are missing: {missing}")
    return binaries


# --------------------------------------------------------------------------------------------------------------------
# Certificates (openssl CLI: always present where Go builds, and keeps the core free of Python dependencies)

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
[alt]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = {service_ip}
"""


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def _ec_key(path: Path, cwd: Path) -> None:
    # P-256 keys are generated in milliseconds, unlike RSA; every component accepts them.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=cwd)


@dataclass(frozen=True)
class _Certs:
    pki: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    sa_key: Path
    sa_pub: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (crt, key)

    def issue(self, name: str, subject: str, ext: str, sans: Sequence[str] = ()) -> tuple[Path, Path]:
        """A key and a certificate signed by the CA; ``ext`` is a section of the openssl config (client or server, the
        server SANs being localhost, 127.0.0.1 and the kubernetes Service names), or with ``sans`` (``IP:...``,
        ``DNS:...``) a serving certificate for exactly those."""
        key, csr, crt = self.pki / f"{name}.key", self.pki / f"{name}.csr", self.pki / f"{name}.crt"
        cnf = extfile = self.pki / "openssl.cnf"
        if sans:
            extfile, ext = self.pki / f"{name}.ext", "ext"
            extfile.write_text(
                "[ext]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n"
                f"extendedKeyUsage = serverAuth\nsubjectAltName = {', '.join(sans)}\n"
            )
        _ec_key(key, self.pki)
        _openssl("req", "-new", "-config", str(cnf), "-key", str(key), "-out", str(csr), "-subj", subject, cwd=self.pki)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca_crt), "-CAkey", str(self.ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "365", "-extfile", str(extfile), "-extensions", ext, cwd=self.pki,
        )  # fmt: skip
        return crt, key


def _make_certs(pki: Path, clients: Mapping[str, str]) -> _Certs:
    """Creates a CA, the API server's serving cert, a service-account key pair and client certs (name -> subject)."""
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the openssl CLI is required to create the control plane's certificates")
    pki.mkdir(parents=True, exist_ok=True)
    cnf = pki / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF.format(service_ip=SERVICE_IP))
    ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
    _ec_key(ca_key, pki)
    _openssl(
        "req", "-x509", "-new", "-config", str(cnf), "-key", str(ca_key), "-out", str(ca_crt), "-days", "3650",
        "-subj", "/CN=finetune-test-ca", "-extensions", "ca", cwd=pki,
    )  # fmt: skip

    sa_key, sa_pub = pki / "sa.key", pki / "sa.pub"
    _ec_key(sa_key, pki)
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub), cwd=pki)
    certs = _Certs(pki, ca_crt, ca_key, pki / "kube-apiserver.crt", pki / "kube-apiserver.key", sa_key, sa_pub, {})
    certs.issue("kube-apiserver", "/CN=kube-apiserver", "server")
    certs.clients.update({name: certs.issue(name, subject, "client") for name, subject in clients.items()})
    return certs


def _kubeconfig_text(server: str, ca: Path, crt: Path, key: Path, user: str) -> str:
    """A self-contained kubeconfig (data embedded) so it can be copied or used from another shell."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "finetune-test", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": "finetune-test", "context": {"cluster": "finetune-test", "user": user}}],
        "current-context": "finetune-test",
    }
    return json.dumps(config, indent=2)  # JSON is valid YAML; no yaml dependency needed


# --------------------------------------------------------------------------------------------------------------------
# Processes


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports; the sockets stay bound until all are chosen so no port is handed out twice."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """Child-side: SIGKILL this process when the parent dies, so a killed pytest leaves no control plane behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


@dataclass
class Component:
    """A started program: its process (group leader) and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after ``grace`` seconds; closes the log."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        # SIGKILL whatever is left in the group (a hung leader, or a grandchild it started).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.log_file.close()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _tls_get(url: str, context: ssl.SSLContext, timeout: float = 2.0) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "127.0.0.1", parts.port, context=context, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------------------------
# The control plane


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok with fake GPU nodes, on loopback.

    ``start()`` brings it up (under 30 s with cached binaries) and ``stop()`` terminates every process group; stop also
    runs at interpreter exit, and children die with their parent (PR_SET_PDEATHSIG) if the test process is killed.
    Component logs stay in ``logs_dir`` for post-mortems.
    """

    binaries: Binaries
    workdir: Path | None = None
    node_count: int = 4
    gpus_per_node: int = 8
    node_cpu: str = "32"
    node_memory: str = "256Gi"
    node_pods: str = "110"
    startup_timeout: float = 90.0

    kubeconfig: Path = field(init=False)
    logs_dir: Path = field(init=False)
    server: str = field(init=False, default="")
    node_names: list[str] = field(init=False, default_factory=list)
    startup_seconds: float = field(init=False, default=0.0)
    _components: list[Component] = field(init=False, default_factory=list)
    _certs: _Certs | None = field(init=False, default=None)
    _ssl: ssl.SSLContext | None = field(init=False, default=None)
    _owns_workdir: bool = field(init=False, default=False)
    _started: bool = field(init=False, default=False)
    _stop_hooks: list[Callable[[], None]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="finetune-controlplane-"))
            self._owns_workdir = True
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = self.workdir / "kubeconfig"
        self.logs_dir = self.workdir / "logs"

    # ---------------------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Starts every component and waits (with deadlines) until nodes are Ready and controllers serve."""
        if self._started:
            return self
        if missing := self.binaries.missing():
            raise ControlPlaneError(f"control-plane binaries missing: {missing}; run tests/controlplane/build.sh")
        t0 = time.monotonic()
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start(self) -> None:
        assert self.workdir is not None
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.startup_timeout
        certs = self._certs = _make_certs(
            self.workdir / "pki",
            {
                "admin": "/O=system:masters/CN=finetune-admin",
                "kube-controller-manager": "/CN=system:kube-controller-manager",
                "kube-scheduler": "/CN=system:kube-scheduler",
                "kwok": "/O=system:masters/CN=kwok-controller",  # plays the kubelet of many nodes
                # The API server's identity towards kubelets (kubectl logs/exec on the real node); node.py binds it
                # to system:kubelet-api-admin.
                KUBELET_CLIENT: f"/CN={KUBELET_CLIENT}",
            },
        )
        etcd_client, etcd_peer, api_port, kcm_port, sched_port = _free_ports(5)
        self.server = f"https://127.0.0.1:{api_port}"
        kubeconfigs = {}
        for name, (crt, key) in certs.clients.items():
            path = self.kubeconfig if name == "admin" else self.workdir / f"{name}.kubeconfig"
            path.write_text(_kubeconfig_text(self.server, certs.ca_crt, crt, key, name))
            path.chmod(0o600)
            kubeconfigs[name] = path
        kubelet_client_crt, kubelet_client_key = certs.clients[KUBELET_CLIENT]
        ctx = ssl.create_default_context(cafile=str(certs.ca_crt))
        admin_crt, admin_key = certs.clients["admin"]
        ctx.load_cert_chain(str(admin_crt), str(admin_key))
        self._ssl = ctx

        b = self.binaries
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        etcd = self.spawn(
            "etcd",
            [
                str(b.etcd),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",  # test data is disposable; fsync dominates latency on shared disks
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        self.wait_on(lambda: self._http_ok(f"{etcd_url}/health"), deadline, "etcd /health", etcd)

        apiserver = self.spawn(
            "kube-apiserver",
            [
                str(b.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--advertise-address={NODE_IP}",
                f"--secure-port={api_port}",
                f"--tls-cert-file={certs.server_crt}",
                f"--tls-private-key-file={certs.server_key}",
                f"--client-ca-file={certs.ca_crt}",
                "--authorization-mode=Node,RBAC",
                # On top of the default admission plugins (which include ResourceQuota and PodSecurity).
                "--enable-admission-plugins=NodeRestriction",
                # The node-lifecycle controller is off (see kube-controller-manager), so nothing would lift the
                # not-ready taint that this plugin puts on new nodes.
                "--disable-admission-plugins=TaintNodesByCondition",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={certs.sa_pub}",
                f"--service-account-signing-key-file={certs.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The real node (node.py) registers with the InternalIP of its bridge on this machine and serves its
                # API with a certificate of this CA; logs and exec reach it there, never through a name lookup.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client_crt}",
                f"--kubelet-client-key={kubelet_client_key}",
                f"--kubelet-certificate-authority={certs.ca_crt}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                "--v=1",
            ],
        )
        self.wait_on(lambda: self._api_ok("/readyz"), deadline, "kube-apiserver /readyz", apiserver)

        kcm = self.spawn(
            "kube-controller-manager",
            [
                str(b.kube_controller_manager),
                f"--kubeconfig={kubeconfigs['kube-controller-manager']}",
                f"--authentication-kubeconfig={kubeconfigs['kube-controller-manager']}",
                f"--authorization-kubeconfig={kubeconfigs['kube-controller-manager']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                # nodelifecycle would taint nodes NotReady whenever kwok's heartbeat lags on a loaded 2-core runner.
                "--controllers=*,-nodelifecycle",
                "--use-service-account-credentials=true",  # each controller acts as its own SA, as in real clusters
                f"--service-account-private-key-file={certs.sa_key}",
                f"--root-ca-file={certs.ca_crt}",
                f"--cluster-signing-cert-file={certs.ca_crt}",
                f"--cluster-signing-key-file={certs.ca_key}",
                "--cluster-name=finetune-test",
                "--leader-elect=false",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--v=1",
            ],
        )
        scheduler = self.spawn(
            "kube-scheduler",
            [
                str(b.kube_scheduler),
                f"--kubeconfig={kubeconfigs['kube-scheduler']}",
                f"--authentication-kubeconfig={kubeconfigs['kube-scheduler']}",
                f"--authorization-kubeconfig={kubeconfigs['kube-scheduler']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        kwok = self.spawn(
            "kwok",
            [
                str(b.kwok),
                f"--kubeconfig={kubeconfigs['kwok']}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--cidr={POD_CIDR}",
                "--node-lease-duration-seconds=40",
            ],
            # kwok reads ~/.kwok/kwok.yaml by default; a private HOME keeps a developer's config out of tests.
            env={"HOME": str(self.workdir)},
        )
        self._create_nodes()
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # controller health endpoints use self-signed certs on loopback
        self.wait_on(
            lambda: self._healthz(f"https://127.0.0.1:{kcm_port}/healthz", insecure),
            deadline,
            "kube-controller-manager /healthz",
            kcm,
        )
        self.wait_on(
            lambda: self._healthz(f"https://127.0.0.1:{sched_port}/healthz", insecure),
            deadline,
            "kube-scheduler /healthz",
            scheduler,
        )
        self.wait_on(self._nodes_ready, deadline, f"{self.node_count} kwok nodes Ready", kwok)
        # The ServiceAccount controller creating "default" proves the controller manager is really reconciling.
        self.wait_on(
            lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"),
            deadline,
            "ServiceAccount default/default (controller manager working)",
            kcm,
        )

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Runs ``hook`` at the start of ``stop()``, while the API server still answers (the real node's teardown)."""
        self._stop_hooks.append(hook)

    def stop(self) -> None:
        """Terminates the components in reverse start order (SIGTERM, SIGKILL after 5 s each), so the API server can
        still reach etcd while it shuts down; removes etcd's data but keeps the logs. Idempotent."""
        hooks, self._stop_hooks = self._stop_hooks, []
        for hook in reversed(hooks):
            try:
                hook()
            except Exception as exc:  # the control plane must stop whatever a hook did
                print(f"[control plane] stop hook {hook!r} failed: {exc}", file=sys.stderr)
        components, self._components = self._components, []
        for comp in reversed(components):
            comp.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)
        if self._started:
            atexit.unregister(self.stop)
            self._started = False

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Component:
        """Starts a component in its own process group, logging to ``logs_dir/<name>.log``; ``stop()`` ends it."""
        log_path = self.logs_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        log_file.write(f"$ {' '.join(argv)}\n".encode())
        log_file.flush()
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
        full_env.update(env or {})
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=full_env,
            start_new_session=True,  # own process group: stop() kills the whole group
            # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main thread.
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        comp = Component(name, proc, log_path, log_file)
        self._components.append(comp)
        return comp

    def stop_component(self, comp: Component, grace: float = 5.0) -> None:
        """Stops one component before the rest (the real node's teardown order)."""
        if comp in self._components:
            self._components.remove(comp)
            comp.stop(grace)

    def wait_on(self, fn: Callable[[], object], deadline: float, desc: str, comp: Component) -> None:
        """Polls ``fn`` until truthy or the monotonic ``deadline``; fails at once, with its log, if ``comp`` exits."""
        def check() -> object:
            if not comp.alive():
                raise ControlPlaneError(
                    f"{comp.name} exited with code {comp.proc.returncode} while waiting for {desc}; "
                    f"log {comp.log_path}:\n{comp.log_tail()}"
                )
            return fn()

        try:
            wait_for(check, timeout=max(0.1, deadline - time.monotonic()), interval=0.1, desc=desc)
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}; log {comp.log_path}:\n{comp.log_tail()}") from exc

    @staticmethod
    def _http_ok(url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=2)
        try:
            conn.request("GET", parts.path)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    @staticmethod
    def _healthz(url: str, context: ssl.SSLContext) -> bool:
        try:
            status, body = _tls_get(url, context)
        except OSError:
            return False
        return status == 200 and body.strip() == "ok"

    def _api_ok(self, path: str) -> bool:
        assert self._ssl is not None
        try:
            status, _ = _tls_get(self.server + path, self._ssl)
        except OSError:
            return False
        return status == 200

    def _exists(self, path: str) -> bool:
        return self.get(path) is not None

    def _create_nodes(self) -> None:
        """Registers the fake nodes (as a kubelet would); kwok then marks them Ready and keeps them alive."""
        resources = {"cpu": self.node_cpu, "memory": self.node_memory, "pods": self.node_pods}
        if self.gpus_per_node:
            resources[GPU_RESOURCE] = str(self.gpus_per_node)
        self.node_names = [f"kwok-gpu-node-{i}" for i in range(self.node_count)]
        for index, name in enumerate(self.node_names):
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        TEST_NODE_LABEL: "true",
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.count": str(self.gpus_per_node),
                        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    },
                },
                # No taints: there are no real nodes to keep pods away from, and CPU-only pods (an operator
                # Deployment, helm test hooks) must be schedulable too.
                "spec": {},
                "status": {
                    "allocatable": dict(resources),
                    "capacity": dict(resources),
                    "addresses": [
                        {"type": "InternalIP", "address": f"10.1.0.{index + 1}"},
                        {"type": "Hostname", "address": name},
                    ],
                    "nodeInfo": {"osImage": "kwok fake GPU node", "architecture": "amd64", "operatingSystem": "linux"},
                },
            }
            self.request("POST", "/api/v1/nodes", node)

    def _nodes_ready(self) -> bool:
        nodes = self.request("GET", f"/api/v1/nodes?labelSelector={TEST_NODE_LABEL}%3Dtrue")["items"]
        ready = [
            n
            for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        ]
        return len(ready) >= self.node_count

    # ------------------------------------------------------------------------------------------------------ helpers

    @property
    def ca_cert(self) -> Path:
        """CA that signed the API server's serving certificate (for clients that verify TLS)."""
        assert self._certs is not None
        return self._certs.ca_crt

    def issue_cert(self, name: str, subject: str, server_sans: Sequence[str] = ()) -> tuple[Path, Path]:
        """(certificate, key) signed by the cluster CA for ``subject`` (``/O=group/CN=user``): a client certificate,
        or with ``server_sans`` (``IP:10.0.0.1``, ``DNS:name``) a serving one (the real node's kubelet)."""
        if self._certs is None:
            raise ControlPlaneError("control plane not started")
        return self._certs.issue(name, subject, "server" if server_sans else "client", sans=server_sans)

    def issue_kubeconfig(self, name: str, subject: str) -> Path:
        """A kubeconfig with a new client certificate for ``subject`` (``/O=system:nodes/CN=system:node:NAME``)."""
        crt, key = self.issue_cert(name, subject)
        assert self.workdir is not None
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(_kubeconfig_text(self.server, self.ca_cert, crt, key, name))
        path.chmod(0o600)
        return path

    def component_logs(self) -> dict[str, Path]:
        """Log file per component (name -> path)."""
        return {p.stem: p for p in sorted(self.logs_dir.glob("*.log"))}

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and a PATH that finds the cached kubectl and helm first."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        extra = [str(self.binaries.kubectl.parent), str(self.binaries.helm.parent)]
        env["PATH"] = os.pathsep.join([*extra, env.get("PATH", "")])
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        as_user: str | None = None,
        as_groups: Iterable[str] | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the cached kubectl against this cluster; ``as_user``/``as_groups`` impersonate (--as/--as-group)."""
        argv = [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}"]
        if as_user:
            argv.append(f"--as={as_user}")
        argv += [f"--as-group={g}" for g in as_groups or ()]
        argv += list(args)
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def apply(self, yaml_text: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f -`` with server-side apply (field managers and conflicts as a controller sees them)."""
        args = ["apply", "--server-side", "--field-manager=finetune-tests", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        return self.kubectl(*args, input=yaml_text)

    def helm(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Runs the cached helm against this cluster."""
        argv = [str(self.binaries.helm), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(), check=False)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
        as_user: str | None = None,
        as_groups: Iterable[str] | None = None,
    ) -> Any:
        """Calls the API server as the admin (system:masters), or impersonating ``as_user``/``as_groups``; returns the
        decoded JSON and raises ApiError on a non-2xx answer (e.g. ``.status == 403`` for an RBAC denial)."""
        if self._ssl is None:
            raise ControlPlaneError("control plane not started")
        parts = urllib.parse.urlsplit(self.server)
        conn = http.client.HTTPSConnection(
            parts.hostname or "127.0.0.1", parts.port, context=self._ssl, timeout=timeout
        )
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = [("Accept", "application/json")]
        if data is not None:
            headers += [("Content-Type", content_type), ("Content-Length", str(len(data)))]
        if as_user:
            headers.append(("Impersonate-User", as_user))
        headers += [("Impersonate-Group", g) for g in as_groups or ()]
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for key, value in headers:
                conn.putheader(key, value)  # repeated Impersonate-Group headers need putheader, not a dict
            conn.endheaders(data)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            decoded: Any = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if not 200 <= resp.status < 300:
            raise ApiError(method, path, resp.status, decoded)
        return decoded

    def get(self, path: str) -> Any:
        """GET as the admin; None when the object does not exist (404), ApiError on any other failure."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def api_client(self) -> ApiClient:
        """A ``kubernetes.client.ApiClient`` for this cluster (admin credentials); imports ``kubernetes`` lazily."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def wait_for(
        self,
        fn: Callable[[], T | None],
        timeout: float = 30.0,
        interval: float = 0.2,
        desc: str = "condition",
        ignore: tuple[type[BaseException], ...] = (),
    ) -> T:
        """See the module-level ``wait_for``; on timeout the message also points at the component logs."""
        try:
            return wait_for(fn, timeout=timeout, interval=interval, desc=desc, ignore=ignore)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (control-plane logs: {self.logs_dir})") from None

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 30.0) -> None:
        """Creates a namespace and waits for its default ServiceAccount, without which pods are rejected."""
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}},
        )
        self.wait_for(
            lambda: self._exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            timeout=timeout,
            desc=f"ServiceAccount {name}/default",
        )

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 60.0) -> None:
        """Deletes a namespace (the namespace controller then removes its content); optionally waits until gone."""
        with contextlib.suppress(ApiError):
            self.request("DELETE", f"/api/v1/namespaces/{name}")
        if wait:
            self.wait_for(
                lambda: not self._exists(f"/api/v1/namespaces/{name}"), timeout=timeout, desc=f"namespace {name} gone"
            )

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod as JSON."""
        pod: dict[str, Any] = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        return pod

    def finish_pod(
        self,
        namespace: str,
        name: str,
        exit_code: int = 0,
        reason: str | None = None,
        message: str | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Makes the fake kubelet end the pod's containers with ``exit_code``: phase Succeeded if 0, else Failed.

        Works like a real container exit: the pod is annotated and kwok's ``pod-finish`` Stage writes the terminal
        phase and ``containerStatuses[*].state.terminated`` {exitCode, reason} through the status subresource, which
        is what the Job controller (backoffLimit, podFailurePolicy onExitCodes) reads. ``reason`` defaults to
        Completed / Error; pass e.g. "OOMKilled". The pod must be scheduled; it is finished once Running.
        Returns the pod (after it reached the terminal phase when ``wait``).
        """
        phase = "Succeeded" if exit_code == 0 else "Failed"
        annotations: dict[str, str | None] = {
            FINISH_ANNOTATION: phase,
            EXIT_CODE_ANNOTATION: str(exit_code),
            REASON_ANNOTATION: reason,
            MESSAGE_ANNOTATION: message,
        }
        self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {"metadata": {"annotations": annotations}},
            content_type="application/merge-patch+json",
        )
        if not wait:
            return self.get_pod(namespace, name)

        def finished() -> dict[str, Any] | None:
            pod = self.get_pod(namespace, name)
            return pod if pod.get("status", {}).get("phase") == phase else None

        return self.wait_for(finished, timeout=timeout, desc=f"pod {namespace}/{name} phase {phase}")

    def evict_pod(self, namespace: str, name: str, wait: bool = True, timeout: float = 30.0) -> None:
        """Evicts the pod through the Eviction API (as a node drain or the autoscaler would).

        The API server adds the DisruptionTarget condition (reason EvictionByEvictionAPI) and deletes the pod; kwok's
        ``pod-terminating`` Stage then moves it to Failed (exit 143) like a kubelet shutting the containers down, and
        ``pod-delete`` removes it once no finalizer is left. With ``wait``, returns once the pod is terminal or gone.
        """
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
        self.request("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", eviction)
        if not wait:
            return

        def stopped() -> bool:
            try:
                pod = self.get_pod(namespace, name)
            except ApiError as exc:
                if exc.status == 404:
                    return True
                raise
            return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")

        self.wait_for(stopped, timeout=timeout, desc=f"evicted pod {namespace}/{name} terminated")

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory per component (Linux /proc), to keep an eye on what the suite costs."""
        out = {}
        for comp in self._components:
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{comp.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[comp.name] = int(line.split()[1]) * 1024
        return out


def start_control_plane(workdir: Path | None = None, stream: IO[str] | None = None, **kwargs: Any) -> ControlPlane:
    """Builds missing binaries, then starts a ControlPlane (call ``stop()`` when done)."""
    return ControlPlane(build_binaries(stream), workdir=workdir, **kwargs).start()
