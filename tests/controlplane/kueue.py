"""Kueue's controller manager beside the scheduler: the real admission controller for FineTuneJobs' Jobs.

Built from its Go module by ``build.sh --with-kueue`` (the Kubernetes build module requires it, so both share one
version of the Kubernetes libraries), it runs as a host process of the test control plane, as a cluster's Kueue
Deployment would, with what a Deployment would get from its manifests put in place by hand:

- CRDs: the ones its module ships (``config/components/crd/bases``), served at v1beta2 only, the version its
  controller uses and the operator reads. The shipped CRDs store v1beta1 and convert through Kueue's webhook; with
  v1beta2 as the storage version nothing needs converting, so there is no conversion webhook, and no read of a
  Workload fails while Kueue is down.
- Webhooks: the configurations its module ships, reduced to the ones for batch/v1 Jobs (the only integration
  enabled) and Kueue's own kinds, pointing at ``https://127.0.0.1:<port>/<path>`` (``clientConfig.url``: a Service
  cannot point at loopback) with the suite's CA as caBundle, and served with a certificate that CA issued for
  127.0.0.1 (Kueue's internal certificate management is off). The Job webhooks only see namespaces labelled
  ``KUEUE_NAMESPACE_LABEL``, so the rest of the suite is untouched, also while Kueue is stopped (their failurePolicy
  is Fail: a labelled namespace cannot create Jobs then, as in a real cluster).
- Configuration: leader election off, ``integrations.frameworks: [batch/job]``, the VisibilityOnDemand API off (it
  needs an APIService), WaitForPodsReady off unless a test asks for it (v0.19 turns it on by default: the setting is
  spelled out), ``managedJobsNamespaceSelector`` the namespaces labelled ``KUEUE_NAMESPACE_LABEL`` (since v0.15 Kueue
  manages no Job outside it, queue name or not) and ``manageJobsWithoutQueueName`` false unless a test asks for it.
- Metrics: Kueue reads its metrics serving certificate from the fixed path ``/etc/kueue/metrics/certs`` and exits
  without one. It runs in a mount namespace of its own (``unshare --mount``) where a folder of this run is bound
  there, so nothing is written to the host's /etc but the empty mount point. Needs root, as the real node does.

``stop()`` and ``start()`` again model a Kueue outage (``restart(**config)`` changes its configuration).
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import ApiError, Component, ControlPlane, ControlPlaneError, _free_ports

KUEUE_NAMESPACE = "kueue-system"
KUEUE_NAMESPACE_LABEL = "finetune.dev/kueue"  # value "true": Kueue manages this namespace's Jobs (webhooks, controller)
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # fixed in Kueue's main.go when internal cert management is off
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"
SERVED_VERSION = "v1beta2"
_WEBHOOK_GROUPS = {"batch", "kueue.x-k8s.io"}  # the Job integration's webhooks and those of Kueue's own kinds


class KueueError(ControlPlaneError):
    """Kueue could not be installed or started."""


def served_crds(crd_dir: Path) -> list[dict[str, Any]]:
    """The module's CRDs with only the v1beta2 version, stored as such, and no conversion."""
    import yaml

    out = []
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        versions = [v for v in crd["spec"]["versions"] if v["name"] == SERVED_VERSION]
        if not versions:
            raise KueueError(f"{path.name} serves no {SERVED_VERSION}")
        for v in versions:
            v["served"], v["storage"] = True, True
        crd["spec"]["versions"] = versions
        crd["spec"].pop("conversion", None)
        out.append(crd)
    return out


def webhook_configurations(manifests: Path, url: str, ca_bundle: bytes, name_suffix: str) -> list[dict[str, Any]]:
    """The module's webhook configurations, reduced to Jobs and Kueue's kinds, pointing at ``url``; the Job webhooks
    only for namespaces labelled ``KUEUE_NAMESPACE_LABEL``."""
    import yaml

    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": f"{doc['metadata']['name']}-{name_suffix}"}
        kept = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= _WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": url.rstrip("/") + path, "caBundle": base64.b64encode(ca_bundle).decode()}
            if "batch" in groups:
                hook["namespaceSelector"] = {"matchLabels": {KUEUE_NAMESPACE_LABEL: "true"}}
            hook["timeoutSeconds"] = 10
            kept.append(hook)
        doc["webhooks"] = kept
        out.append(doc)
    return out


@dataclass
class Kueue:
    """One Kueue controller manager for a control plane: ``install()`` once, then ``start()``/``stop()`` at will."""

    cp: ControlPlane
    binary: Path
    workdir: Path
    config: dict[str, Any] = field(default_factory=dict)  # merged over base_config() at each start
    startup_timeout: float = 90.0
    component: Component | None = field(init=False, default=None)
    webhook_port: int = field(init=False, default=0)
    health_port: int = field(init=False, default=0)
    metrics_port: int = field(init=False, default=0)
    _installed: bool = field(init=False, default=False)

    @property
    def version_dir(self) -> Path:
        return self.binary.parent

    @property
    def running(self) -> bool:
        return self.component is not None and self.component.alive()

    # ------------------------------------------------------------------------------------------------- install

    def install(self) -> Kueue:
        """Certificates, kubeconfig, namespace, CRDs and webhook configurations (once per control plane)."""
        if self._installed:
            return self
        if os.geteuid() != 0:
            raise KueueError("Kueue needs root here: it reads its metrics certificate from the fixed path "
                             f"{METRICS_CERT_DIR}, bound into its own mount namespace")
        if shutil.which("unshare") is None:
            raise KueueError("Kueue needs util-linux's unshare (its own mount namespace for the metrics certificate)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.webhook_port, self.health_port, self.metrics_port = _free_ports(3)
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        crt, key = self.cp.issue_cert("kueue-webhook", "/CN=kueue-webhook", server_sans=("IP:127.0.0.1",))
        shutil.copy(crt, certs / "tls.crt")
        shutil.copy(key, certs / "tls.key")
        self.kubeconfig = self.cp.issue_kubeconfig("kueue", "/O=system:masters/CN=kueue-controller")
        METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)  # the mount point (stays empty on the host)
        self.cp.create_namespace(KUEUE_NAMESPACE, labels={KUEUE_NAMESPACE_LABEL: "true"})
        for crd in served_crds(self.version_dir / "crds"):
            self.cp.apply(json.dumps(crd))
        for crd in served_crds(self.version_dir / "crds"):
            self._wait_established(crd["metadata"]["name"])
        url = f"https://127.0.0.1:{self.webhook_port}"
        suffix = f"{self.webhook_port}"
        for conf in webhook_configurations(self.version_dir / "webhook" / "manifests.yaml", url,
                                           self.cp.ca_cert.read_bytes(), suffix):
            kind = conf["kind"].lower() + "s"
            self.cp.request("POST", f"/apis/admissionregistration.k8s.io/v1/{kind}", conf)
        self._installed = True
        return self

    def _wait_established(self, name: str) -> None:
        def established() -> bool:
            crd = self.cp.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in (crd.get("status") or {}).get("conditions") or [])

        self.cp.wait_for(established, timeout=60, desc=f"CRD {name} Established")

    # --------------------------------------------------------------------------------------------- configuration

    def base_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "leaderElection": {"leaderElect": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(self.workdir / "certs")},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
            "manageJobsWithoutQueueName": False,
            "managedJobsNamespaceSelector": {"matchLabels": {KUEUE_NAMESPACE_LABEL: "true"}},
            "featureGates": {"VisibilityOnDemand": False},
            "clientConnection": {"qps": 100, "burst": 200},
        }

    def effective_config(self) -> dict[str, Any]:
        """The configuration of the next start: base_config() with ``config`` over it (None removes a key)."""
        merged = self.base_config()
        for key, value in self.config.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    # --------------------------------------------------------------------------------------------------- process

    def start(self) -> Kueue:
        """Starts the controller manager and waits until its webhooks answer (a dry-run Job create comes back
        suspended by Kueue's mutating webhook)."""
        self.install()
        if self.running:
            return self
        config_path = self.workdir / "config.yaml"
        config_path.write_text(json.dumps(self.effective_config(), indent=1))  # JSON is YAML
        script = (f"mount --bind {self.workdir / 'certs'} {METRICS_CERT_DIR} && "
                  f"exec {self.binary} --config={config_path} --zap-log-level=2 --zap-encoder=console")
        self.component = self.cp.spawn("kueue", ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                 script], env={"KUBECONFIG": str(self.kubeconfig)})
        deadline = time.monotonic() + self.startup_timeout
        self.cp.wait_on(self._ready, deadline, "Kueue /readyz", self.component)
        self.cp.wait_on(self._webhook_suspends, deadline, "Kueue's Job webhook", self.component)
        return self

    def stop(self) -> None:
        if self.component is not None:
            self.cp.stop_component(self.component)
            self.component = None

    def restart(self, **config: Any) -> Kueue:
        """Stops Kueue and starts it with ``config`` (top-level keys over the base configuration)."""
        self.stop()
        self.config = dict(config)
        return self.start()

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=2)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _webhook_suspends(self) -> bool:
        probe = {"apiVersion": "batch/v1", "kind": "Job",
                 "metadata": {"generateName": "kueue-probe-", "labels": {"kueue.x-k8s.io/queue-name": "probe"}},
                 "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                "containers": [{"name": "c", "image": "probe"}]}}}}
        try:
            job = self.cp.request("POST", f"/apis/batch/v1/namespaces/{KUEUE_NAMESPACE}/jobs?dryRun=All", probe)
        except ApiError:
            return False
        return bool(job["spec"].get("suspend"))

    def log_text(self) -> str:
        path = self.cp.logs_dir / "kueue.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------------------------------------ helpers

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates a Kueue object (ClusterQueue, LocalQueue, ResourceFlavor, WorkloadPriorityClass, Cohort)."""
        plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        ns = obj["metadata"].get("namespace")
        path = f"{KUEUE_API}/namespaces/{ns}/{plural}" if ns else f"{KUEUE_API}/{plural}"
        created: dict[str, Any] = self.cp.request("POST", path, {"apiVersion": f"kueue.x-k8s.io/{SERVED_VERSION}",
                                                                 **obj})
        return created

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        plural = kind.lower() + ("es" if kind.endswith("s") else "s")
        path = f"{KUEUE_API}/namespaces/{namespace}/{plural}/{name}" if namespace else f"{KUEUE_API}/{plural}/{name}"
        try:
            self.cp.request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cp.request("GET", f"{KUEUE_API}/namespaces/{namespace}/workloads")["items"]
        return items


def kueue_namespace_labels() -> dict[str, str]:
    """Labels of a namespace whose Jobs Kueue manages."""
    return {KUEUE_NAMESPACE_LABEL: "true"}

