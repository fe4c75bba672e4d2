"""One real Kubernetes node beside the kwok GPU nodes: containerd runs the pods the kubelet is given.

kwok marks pods Running without running anything; this node runs them. Its parts:

- containerd (Debian's) with its own socket, root and state, the CRI plugin, runc, a locally built pause image as the
  sandbox image, and CNI from Debian's containernetworking-plugins (bridge + host-local + portmap; loopback is added
  by containerd);
- kubelet and kube-proxy (iptables mode) from the pinned Kubernetes build module, with client certificates of the
  cluster CA (``system:node:<name>``, ``system:kube-proxy``) and a serving certificate the API server verifies;
- CoreDNS (only the plugins in go/coredns) as a Deployment on this node behind the ``kube-dns`` Service. It serves the
  cluster domain and refuses everything else: it has no forward plugin, so no query leaves the machine.

Traffic stays on this machine. Pods live on a bridge of their own (``POD_CIDR``); a chain of ours in the filter
table's FORWARD lets them talk to each other and refuses anything they would send elsewhere. The node registers with
its bridge's address as InternalIP (``NODE_IP``; the kubelet refuses a loopback one), so ``kubectl logs``/``exec`` go
from the API server to the kubelet on this machine. The API server advertises the same address as the ``kubernetes``
Service's endpoint (Endpoints refuse loopback addresses); socat relays it to the API server on 127.0.0.1, so pods log
in through kube-proxy's rules as on any cluster.

The kubelet sets a few kernel settings when it starts (``KUBELET_SYSCTLS``: overcommit, panic on oops); they belong
to the shared machine, so they are put back as soon as the node is Ready.

Traps found on this kind of machine (see ../shared/reference/real-node-facts.md in the team's notes): without
CAP_SYS_RESOURCE runc cannot give a sandbox a negative oom_score_adj (``restrict_oom_score_adj``); cgroups are v1
(``failCgroupV1: false``); no systemd (cgroupfs driver).

The node joins with the label ``finetune.dev/real-node=true`` and a NoSchedule taint of the same key, so only pods
that ask for it (``node_scheduling()``) land here. Only one real node can run on a machine at a time (a lock in the
cache says so); its containerd root lives in the cache, so imported images survive between runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .cluster import (
    KUBELET_CLIENT,
    NODE_IP,
    SERVICE_IP,
    ApiError,
    Binaries,
    Component,
    ControlPlane,
    ControlPlaneError,
    _free_ports,
)
from .coredns import CLUSTER_DOMAIN, DNS_SERVICE_IP, coredns_manifests, yaml_stream
from .host import read_sysctl, remove_chains, sh, unmount_all, write_sysctl
from .images import (
    CACHE,
    Docker,
    ImageError,
    Steps,
    build_scratch_image,
    containerd_images,
    load_into_containerd,
    normalise_ref,
    scratch_image_tag,
)

NODE_NAME = "finetune-real-node"
NODE_LABEL = "finetune.dev/real-node"  # label (value "true") and NoSchedule taint key
POD_CIDR = "10.245.0.0/24"  # apart from kwok's fake pod IPs (10.244.0.0/16) and the Service range
# The node's InternalIP is its bridge's own address (cluster.NODE_IP). Not loopback: the kubelet refuses a loopback
# node IP, and Endpoints refuse loopback addresses. On this machine only: the API server reaches the kubelet there for
# logs and exec, and pods reach the API server there (the `kubernetes` Service's endpoint, forwarded to 127.0.0.1).
POD_GATEWAY = NODE_IP
# What the kubelet sets on start unless protectKernelDefaults (then it refuses to start). They are the host's, not the
# node's: restored as soon as the kubelet is up (it only sets them once).
KUBELET_SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
                   "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
BRIDGE = "ftnode0"
FORWARD_CHAIN = "FINETUNE-NODE-FWD"
# The kubelet evicts every pod once less than this share of the node's disk (nodefs, imagefs) is free; images are
# imported only when they leave more than that (images.disk_shortfall).
EVICT_PERCENT = 1.0
NODE_DIR = CACHE / "node"  # containerd's root (images) persists; run/ is wiped at every start
CNI_BIN_DIR = Path("/usr/lib/cni")
NEEDED_PROGRAMS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "iptables-save", "ip", "mount",
                   "socat")
NEEDED_CNI = ("bridge", "host-local", "loopback", "portmap")
# Pulls go nowhere: containerd's default registry host (`_default`, for every registry name) is the discard port on
# loopback, where nothing listens.
UNREACHABLE_REGISTRY = "http://127.0.0.1:9"
# Chains the kubelet, kube-proxy and the CNI plugins create in the host's tables; removed on stop.
OWN_CHAIN_PREFIXES = ("KUBE-", "CNI-", FORWARD_CHAIN)


class NodeError(ControlPlaneError):
    """The real node could not come up: the message names the component, the reason and its log tail."""


def node_scheduling() -> dict[str, Any]:
    """The part of a pod spec that puts a pod on the real node (and only there)."""
    return {
        "nodeSelector": {NODE_LABEL: "true"},
        "tolerations": [{"key": NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
    }


@dataclass
class RealNode:
    """The real node of a started ControlPlane. ``start()`` brings containerd, the network, the kubelet, kube-proxy and
    CoreDNS up and waits until the node is Ready and cluster DNS answers; ``stop()`` (also run by the control plane's
    ``stop()``) takes everything down and leaves the machine's network, mounts and tables as they were."""

    cp: ControlPlane
    binaries: Binaries
    steps: Steps = field(default_factory=lambda: Steps(prefix="node"))
    name: str = NODE_NAME
    startup_timeout: float = 180.0

    run_dir: Path = field(init=False, default=NODE_DIR / "run")
    containerd_root: Path = field(init=False, default=NODE_DIR / "containerd")
    socket: Path = field(init=False)
    kubelet_port: int = field(init=False, default=0)
    pause_image: str = field(init=False, default="")
    coredns_image: str = field(init=False, default="")
    startup_seconds: float = field(init=False, default=0.0)
    _lock: IO[str] | None = field(init=False, default=None)
    _components: dict[str, Component] = field(init=False, default_factory=dict)
    _restore_sysctls: dict[str, str] = field(init=False, default_factory=dict)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.socket = self.run_dir / "containerd" / "containerd.sock"

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> RealNode:
        if self._started:
            return self
        t0 = time.monotonic()
        self._preflight()
        self._take_lock()  # before anything is touched: another node's bridge and rules are not ours to remove
        self._started = True
        self.cp.on_stop(self.stop)
        assert self.binaries.pause is not None and self.binaries.coredns is not None
        # Known before containerd starts: the sandbox image is part of the CRI configuration.
        self.pause_image = scratch_image_tag("pause", self.binaries.pause)
        self.coredns_image = scratch_image_tag("coredns", self.binaries.coredns)
        try:
            with self.steps.step("clean up what an earlier run left"):
                self._cleanup_leftovers()
            with self.steps.step(f"network: bridge {BRIDGE} {POD_CIDR}, forward rules, API server on {NODE_IP}"):
                self._setup_network()
                self._start_api_forwarder()
            with self.steps.step("containerd"):
                self._start_containerd()
            with self.steps.step("pause and CoreDNS images"):
                self._node_images()
            with self.steps.step("kubelet: node Ready"):
                self._start_kubelet()
            with self.steps.step("kube-proxy: Service rules"):
                self._start_kube_proxy()
            with self.steps.step("CoreDNS: Ready behind the kube-dns Service"):
                self._start_coredns()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self.steps.log(f"node {self.name} Ready in {self.startup_seconds:.1f} s")
        return self

    def _deadline(self) -> float:
        return time.monotonic() + self.startup_timeout

    def _preflight(self) -> None:
        """What the node needs from the machine; each missing piece is named (never a silent skip)."""
        problems = []
        if os.geteuid() != 0:
            problems.append("must run as root (network namespaces, mounts, iptables, cgroups)")
        problems += [f"program {p} not found (Debian: docker.io / containerd, runc, iptables, iproute2)"
                     for p in NEEDED_PROGRAMS if shutil.which(p) is None]
        problems += [f"CNI plugin {CNI_BIN_DIR / p} missing (Debian: containernetworking-plugins)"
                     for p in NEEDED_CNI if not (CNI_BIN_DIR / p).is_file()]
        for name in ("kubelet", "kube_proxy", "coredns", "pause"):
            if getattr(self.binaries, name) is None:
                problems.append(f"{name} not built (build_binaries(with_node=True))")
        if len(str(self.socket)) > 100:
            problems.append(f"containerd socket path too long for a unix socket: {self.socket} (set FINETUNE_CACHE)")
        if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
            problems.append("br_netfilter is not loaded (modprobe br_netfilter): Service traffic between pods on "
                            "one bridge would bypass kube-proxy's rules")
        if problems:
            raise NodeError("the real node cannot start on this machine:\n  - " + "\n  - ".join(problems))

    def _take_lock(self) -> None:
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(NODE_DIR / "lock", "a+")  # noqa: SIM115 - held for the node's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise NodeError(f"another real node runs on this machine ({holder}); only one at a time") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, control plane {self.cp.workdir}\n")
        lock.flush()
        self._lock = lock

    # ---------------------------------------------------------------------------------------------- clean-up

    def _cleanup_leftovers(self) -> None:
        """An earlier run killed without its stop() (SIGKILL, a crash) may have left containers, mounts, a bridge and
        rules: containerd is started once on the old state to end its containers, then everything is removed."""
        state = self.run_dir / "containerd-state"
        if state.exists() and any(state.iterdir()):
            self.run_dir.joinpath("containerd").mkdir(parents=True, exist_ok=True)
            comp = self._spawn_containerd(name="containerd-cleanup")
            try:
                self.cp.wait_on(self._containerd_answers, self._deadline(), "containerd (clean-up) answers", comp)
                self._remove_all_containers()
            finally:
                self.cp.stop_component(comp)
        self._teardown_host()

    def _teardown_host(self) -> None:
        unmount_all(self.run_dir)
        # The kubelet also links every container log into /var/log/containers (a fixed path).
        for link in Path("/var/log/containers").glob("*.log"):
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(str(self.run_dir)):
                    link.unlink()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            sh("ip", "link", "delete", BRIDGE, check=False)
        remove_chains(OWN_CHAIN_PREFIXES)

    def stop(self) -> None:
        """Drains the node (pods deleted through the API, so the kubelet stops them and tears their network down),
        stops kube-proxy, the kubelet and containerd, and removes the bridge, rules, mounts and run directory.
        Idempotent; the containerd root (imported images) stays."""
        if not self._started:
            return
        self._started = False
        with self.steps.step(f"stop node {self.name}"):
            with contextlib.suppress(Exception):
                if "kubelet" in self._components and self._components["kubelet"].alive():
                    self._drain()
            for name in ("kube-proxy", "kubelet", "api-forwarder"):
                if name in self._components:
                    self.cp.stop_component(self._components.pop(name), grace=10)
            if self.binaries.kube_proxy is not None:
                sh(str(self.binaries.kube_proxy), "--cleanup", check=False)
            if "containerd" in self._components:
                with contextlib.suppress(Exception):
                    self._remove_all_containers()
                self.cp.stop_component(self._components.pop("containerd"))
            self._teardown_host()
            for name, value in self._restore_sysctls.items():
                with contextlib.suppress(OSError):
                    write_sysctl(name, value)
            with contextlib.suppress(ApiError, ControlPlaneError, OSError):
                self.cp.request("DELETE", f"/api/v1/nodes/{self.name}")
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _drain(self, timeout: float = 60.0) -> None:
        self.cp.request("PATCH", f"/api/v1/nodes/{self.name}", {"spec": {"unschedulable": True}},
                        content_type="application/merge-patch+json")
        for pod in self.pods():
            with contextlib.suppress(ApiError):
                meta = pod["metadata"]
                self.cp.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                {"gracePeriodSeconds": 2})
        with contextlib.suppress(TimeoutError):
            self.cp.wait_for(lambda: not self.pods(), timeout=timeout, interval=0.5, desc=f"node {self.name} drained")

    def pods(self) -> list[dict[str, Any]]:
        """Pods bound to this node (any namespace)."""
        items: list[dict[str, Any]] = self.cp.request(
            "GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.name}")["items"]
        return items

    # ---------------------------------------------------------------------------------------------- network

    def _setup_network(self) -> None:
        """The pods' bridge (created here: the node's address must exist before the kubelet starts) and the
        FORWARD rules: pod to pod on the bridge is accepted, anything a pod sends off the bridge is refused, and nothing
        is forwarded into it (the host itself reaches pods directly, not through FORWARD)."""
        prefix = POD_CIDR.split("/")[1]
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{POD_GATEWAY}/{prefix}", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1")):
            old = write_sysctl(key, value)
            if old is not None and old != value:
                self._restore_sysctls[key] = old
        sh("iptables", "-w", "-N", FORWARD_CHAIN)
        sh("iptables", "-w", "-A", FORWARD_CHAIN, "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")
        sh("iptables", "-w", "-A", FORWARD_CHAIN, "-i", BRIDGE, "-j", "REJECT")  # a pod sending elsewhere: refused
        sh("iptables", "-w", "-A", FORWARD_CHAIN, "-o", BRIDGE, "-j", "DROP")  # nothing routed in from outside
        sh("iptables", "-w", "-I", "FORWARD", "1", "-j", FORWARD_CHAIN)

    def _start_api_forwarder(self) -> None:
        """The API server listens on 127.0.0.1 only; pods reach it through the kubernetes Service, whose endpoint is
        NODE_IP:<port> (the advertised address): socat relays the TCP streams (TLS stays end to end)."""
        port = urllib.parse.urlsplit(self.cp.server).port
        comp = self._components["api-forwarder"] = self.cp.spawn("api-forwarder", [
            "socat", f"TCP-LISTEN:{port},bind={NODE_IP},fork,reuseaddr", f"TCP:127.0.0.1:{port}"])

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((NODE_IP, port or 0), timeout=1):
                return True
            return False

        self.cp.wait_on(listening, self._deadline(), f"the API server forwarded on {NODE_IP}:{port}", comp)

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "finetune-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nothing leaves the machine, so nothing to masquerade
                    "hairpinMode": True,  # a pod reaches itself through its own Service
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.run_dir / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    # ------------------------------------------------------------------------------------------- containerd

    def _containerd_config(self) -> str:
        cni_conf = self.run_dir / "cni"
        return f"""version = 2
root = "{self.containerd_root}"
state = "{self.run_dir / 'containerd-state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.pause_image}"
  # No CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj (every sandbox would fail to start).
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{self.run_dir / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{self.run_dir / 'registries'}"
"""

    def _registry_config(self) -> None:
        """Every registry resolves to a closed port on loopback: an image the node lacks fails to pull at once
        (ErrImagePull), and no pull ever looks a registry up or leaves the machine."""
        # containerd 1.6 refuses a hosts.toml without a [host] table ("invalid `host` tree") and then falls back to
        # the registry itself: both name the closed port.
        hosts = (f'server = "{UNREACHABLE_REGISTRY}"\n\n[host."{UNREACHABLE_REGISTRY}"]\n'
                 '  capabilities = ["pull", "resolve"]\n')
        path = self.run_dir / "registries" / "_default" / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hosts)

    def ctr(self) -> list[str]:
        """The ``ctr`` command line for this node's containerd."""
        return ["ctr", "--address", str(self.socket)]

    def _containerd_answers(self) -> bool:
        return self.socket.exists() and sh(*self.ctr(), "version", check=False, timeout=10).returncode == 0

    def _spawn_containerd(self, name: str = "containerd") -> Component:
        config = self.run_dir / "containerd.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(self._containerd_config())
        return self.cp.spawn(name, ["containerd", "--config", str(config), "--log-level", "info"])

    def _start_containerd(self) -> None:
        for d in (self.containerd_root, self.run_dir / "containerd", self.run_dir / "cni"):
            d.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "cni" / "10-finetune-node.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        self._registry_config()
        comp = self._components["containerd"] = self._spawn_containerd()
        self.cp.wait_on(self._containerd_answers, self._deadline(), "containerd answers on its socket", comp)

    def _remove_all_containers(self) -> None:
        ns = ["-n", "k8s.io"]
        for task in sh(*self.ctr(), *ns, "tasks", "ls", "-q", check=False).stdout.split():
            sh(*self.ctr(), *ns, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
        for task in sh(*self.ctr(), *ns, "tasks", "ls", "-q", check=False).stdout.split():
            sh(*self.ctr(), *ns, "tasks", "delete", "--force", task, check=False, timeout=30)
        containers = sh(*self.ctr(), *ns, "containers", "ls", "-q", check=False).stdout.split()
        if containers:
            sh(*self.ctr(), *ns, "containers", "delete", *containers, check=False)

    def load_images(self, tags: Iterable[str]) -> None:
        """Imports images (from Docker) that the node's containerd does not have yet."""
        load_into_containerd(self.ctr(), tags, self.steps, self.containerd_root, EVICT_PERCENT)

    def _node_images(self) -> None:
        assert self.binaries.coredns is not None and self.binaries.pause is not None
        try:
            present = containerd_images(self.ctr())
            if not {normalise_ref(self.pause_image), normalise_ref(self.coredns_image)} <= present:
                Docker.ensure_daemon()
                docker = Docker(self.steps)
                build_scratch_image(docker, "pause", self.binaries.pause)
                build_scratch_image(docker, "coredns", self.binaries.coredns)
                self.load_images([self.pause_image, self.coredns_image])
        except ImageError as exc:
            raise NodeError(f"the node's pause/CoreDNS images: {exc}") from exc

    # ----------------------------------------------------------------------------------------------- kubelet

    def _kubelet_config(self, serving: tuple[Path, Path], healthz_port: int) -> dict[str, Any]:
        crt, key = serving
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "tlsCertFile": str(crt),
            "tlsPrivateKeyFile": str(key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.cp.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "imageServiceEndpoint": f"unix://{self.socket}",
            # No systemd, cgroups v1 (hybrid) on these machines.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": "",  # pods get cluster DNS only: nothing of the host's resolvers
            "registerWithTaints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}],
            "podLogsDir": str(self.run_dir / "pod-logs"),
            "volumePluginDir": str(self.run_dir / "volume-plugins"),
            "maxPods": 30,
            # A shared disk may be fuller than the defaults allow: never evict test pods or collect the imported
            # images (which cannot be pulled back) for disk pressure.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": f"{EVICT_PERCENT:g}%",
                             "imagefs.available": f"{EVICT_PERCENT:g}%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "shutdownGracePeriod": "0s",
        }

    def _start_kubelet(self) -> None:
        assert self.binaries.kubelet is not None
        kubelet_dir = self.run_dir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.kubelet_port, healthz_port = _free_ports(2)
        kubeconfig = self.cp.issue_kubeconfig("kubelet", f"/O=system:nodes/CN=system:node:{self.name}")
        serving = self.cp.issue_cert("kubelet-serving", f"/CN={self.name}", server_sans=[f"IP:{NODE_IP}",
                                                                                          f"DNS:{self.name}"])
        # The API server's kubelet client (logs, exec, port-forward) may use the kubelet API.
        self.cp.apply(json.dumps({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "finetune-test:kube-apiserver-kubelet-client"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBELET_CLIENT}],
        }))
        config = self.run_dir / "kubelet.yaml"
        config.write_text(json.dumps(self._kubelet_config(serving, healthz_port), indent=2))
        host_sysctls = {name: read_sysctl(name) for name in KUBELET_SYSCTLS}
        comp = self._components["kubelet"] = self.cp.spawn("kubelet", [
            str(self.binaries.kubelet),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={kubelet_dir}",
            f"--cert-dir={self.run_dir / 'kubelet-pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={NODE_IP}",
            f"--node-labels={NODE_LABEL}=true",
            "--v=2",
        ])
        try:
            self.cp.wait_on(self._node_ready, self._deadline(), f"node {self.name} Ready", comp)
        finally:
            changed = {k: v for k, v in host_sysctls.items() if v is not None and read_sysctl(k) != v}
            for name, value in changed.items():
                write_sysctl(name, value)
            if changed:
                self.steps.log(f"restored the host's {', '.join(changed)} (the kubelet sets them at start)")

    def node(self) -> dict[str, Any] | None:
        """The Node object (None before it registered)."""
        node: dict[str, Any] | None = self.cp.get(f"/api/v1/nodes/{self.name}")
        return node

    def _node_ready(self) -> bool:
        node = self.node()
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -------------------------------------------------------------------------------------------- kube-proxy

    def _start_kube_proxy(self) -> None:
        assert self.binaries.kube_proxy is not None
        kubeconfig = self.cp.issue_kubeconfig("kube-proxy", "/CN=system:kube-proxy")
        healthz_port, metrics_port = _free_ports(2)
        config = self.run_dir / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "detectLocalMode": "ClusterCIDR",
            "healthzBindAddress": f"127.0.0.1:{healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{metrics_port}",
            "nodePortAddresses": ["primary"],  # NODE_IP: on this machine only
            # Leave the host's settings alone: no conntrack sizing, no route_localnet on every interface.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                          "udpTimeout": "0s", "udpStreamTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s",
                         "minSyncPeriod": "0s"},
        }, indent=2))
        comp = self._components["kube-proxy"] = self.cp.spawn("kube-proxy", [
            str(self.binaries.kube_proxy), f"--config={config}", "--v=2"])
        # Ready once the kubernetes Service has its rule (the Service every in-cluster client uses).
        def synced() -> bool:
            rules = sh("iptables-save", "-t", "nat", check=False).stdout
            return f"-d {SERVICE_IP}/32" in rules and "KUBE-SERVICES" in rules

        self.cp.wait_on(synced, self._deadline(), "kube-proxy's rule for the kubernetes Service", comp)

    # ------------------------------------------------------------------------------------------------ CoreDNS

    def _start_coredns(self) -> None:
        self.cp.apply(yaml_stream(coredns_manifests(self.coredns_image, node_scheduling())))
        kubelet = self._components["kubelet"]

        def available() -> bool:
            dep = self.cp.request("GET", "/apis/apps/v1/namespaces/kube-system/deployments/coredns")
            return int(dep.get("status", {}).get("availableReplicas") or 0) >= 1

        try:
            self.cp.wait_on(available, self._deadline(), "CoreDNS Deployment available", kubelet)
        except ControlPlaneError as exc:
            raise NodeError(f"{exc}\nCoreDNS pods: {self._pod_summary('kube-system', 'k8s-app=kube-dns')}") from None

    def _pod_summary(self, namespace: str, selector: str) -> str:
        with contextlib.suppress(Exception):
            pods = self.cp.request("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")["items"]
            return json.dumps([{"name": p["metadata"]["name"], "phase": p["status"].get("phase"),
                                "conditions": p["status"].get("conditions"),
                                "containers": p["status"].get("containerStatuses")} for p in pods], indent=1)[-3000:]
        return "(unavailable)"


def preload_images(tags: Iterable[str], steps: Steps) -> bool:
    """Imports images into the real node's containerd while no node runs: a containerd of its own on the node's root
    (no CRI, its own socket and state), stopped afterwards. The node finds them present when it starts, so a cold
    ``make test`` imports the trainer's 6 GB beside the Go builds instead of inside the first node test. Skipped
    (False) while a real node runs on this machine: the node imports what it lacks itself."""
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    with open(NODE_DIR / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            steps.log("a real node runs on this machine: it imports the images it lacks itself")
            return False
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, importing images into the node's containerd\n")
        lock.flush()
        root = NODE_DIR / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ftnode-import-") as tmp:
            socket_path = Path(tmp) / "containerd.sock"
            config = Path(tmp) / "containerd.toml"
            config.write_text(f"""version = 2
root = "{root}"
state = "{Path(tmp) / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{socket_path}"
[ttrpc]
  address = "{socket_path}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
            log = Path(tmp) / "containerd.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            ctr = ["ctr", "--address", str(socket_path)]
            try:
                deadline = time.monotonic() + 60
                while sh(*ctr, "version", check=False, timeout=10).returncode != 0:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise NodeError(f"containerd (image import) did not answer: {log.read_text()[-3000:]}")
                    time.sleep(0.2)
                load_into_containerd(ctr, tags, steps, root, EVICT_PERCENT)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return True
