"""The REAL operator (`python -m finetune_operator`) as a subprocess against the test cluster, and API helpers.

Every process dies with pytest (PR_SET_PDEATHSIG) even if a fixture's teardown never runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from finetune_operator import kinds
from tests.controlplane.cluster import ApiError, ControlPlane, _die_with_parent, _free_ports

PROGRESS_KEY = "operator-test-progress-key-0123456789"
ALLOWED_REGISTRIES = "registry.example.com,ghcr.io/finetune-operator"
TRAINER_IMAGE = "registry.example.com/finetune-trainer:test"
FTJ = "/apis/finetune.dev/v1alpha1"


class OperatorProcess:
    """One operator process with its own ports, log file and (by default) its own lease."""

    def __init__(self, cp: ControlPlane, log_dir: Path, lease: str | None = None, **env: str) -> None:
        self.cp = cp
        self.health_port, self.metrics_port, self.progress_port = _free_ports(3)
        self.lease = lease or f"ftop-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir / f"operator-{self.lease}-{self.health_port}.log"
        self.env = {
            **cp.env(),
            "FINETUNE_BIND_ADDRESS": "127.0.0.1",
            "FINETUNE_HEALTH_PORT": str(self.health_port),
            "FINETUNE_METRICS_PORT": str(self.metrics_port),
            "FINETUNE_PROGRESS_PORT": str(self.progress_port),
            "FINETUNE_PROGRESS_URL": f"http://127.0.0.1:{self.progress_port}",
            "FINETUNE_PROGRESS_KEY": PROGRESS_KEY,
            "FINETUNE_TRAINER_IMAGE": TRAINER_IMAGE,
            "FINETUNE_ALLOWED_REGISTRIES": ALLOWED_REGISTRIES,
            "FINETUNE_RESYNC_SECONDS": "3",
            "FINETUNE_STATUS_SETTLE_SECONDS": "1",
            "FINETUNE_LEASE_NAME": self.lease,
            "FINETUNE_LEASE_NAMESPACE": "default",
            "FINETUNE_LEASE_DURATION_SECONDS": "3",
            "FINETUNE_LOG_LEVEL": "INFO",
            # kwok's pods run no program, so no pre-flight could pass: these tests start at the trainer Job (the
            # pre-flight is proven in tests/operator/test_preflight.py and on the real node).
            "FINETUNE_PREFLIGHT": "false",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> OperatorProcess:
        assert not self.alive, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it; closed when we reap the child
        log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log.close()
        if wait_ready:
            self.cp.wait_for(self.ready, timeout=timeout, desc=f"operator ready (log {self.log_path})")
        return self

    def _get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return self._get(self.health_port, "/readyz")[0] == 200

    def healthy(self) -> bool:
        return self._get(self.health_port, "/healthz")[0] == 200

    def metrics(self) -> str:
        status, text = self._get(self.metrics_port, "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return text

    def post_progress(self, namespace: str, name: str, token: str | None, payload: Any) -> int:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.progress_port}/v1/progress/{namespace}/{name}",
            data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def __enter__(self) -> OperatorProcess:
        """``with OperatorProcess(...) as op``: started (and Ready) inside, stopped on the way out."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (the lease is handed over on a clean exit)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as when a node dies or the OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ------------------------------------------------------------------------------------------------- API helpers


def create_ftj(cp: ControlPlane, body: dict[str, Any]) -> dict[str, Any]:
    ns = body["metadata"]["namespace"]
    result: dict[str, Any] = cp.request("POST", f"{FTJ}/namespaces/{ns}/finetunejobs", body)
    return result


def get_ftj(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cp.request("GET", f"{FTJ}/namespaces/{ns}/finetunejobs/{name}")
    return result


def patch_ftj(cp: ControlPlane, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = cp.request("PATCH", f"{FTJ}/namespaces/{ns}/finetunejobs/{name}", patch,
                                        content_type="application/merge-patch+json")
    return result


def get_or_none(cp: ControlPlane, path: str) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = cp.request("GET", path)
        return result
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def jobs_of(cp: ControlPlane, ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
    return items


def pods_of(cp: ControlPlane, ns: str, name: str, live_only: bool = False) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cp.request(
        "GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=finetune.dev%2Fjob-name%3D{name}")["items"]
    if live_only:
        items = [p for p in items if not p["metadata"].get("deletionTimestamp")
                 and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    return items


def ftj_events(cp: ControlPlane, ns: str, name: str, after: str | None = None,
               timeout: float = 10.0) -> list[dict[str, Any]]:
    """The FineTuneJob's Events; with `after`, once an Event of that reason exists. The operator posts an Event just
    after the status write it announces, so a test that has just seen the status polls for the Event."""
    def get() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = cp.request(
            "GET", f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.kind=FineTuneJob,"
                   f"involvedObject.name={name}")["items"]
        return items

    if after is None:
        return get()
    found: list[dict[str, Any]] = cp.wait_for(lambda: (lambda e: e if any(x["reason"] == after for x in e) else None)(
        get()), timeout=timeout, desc=f"a {after} Event on {ns}/{name}")
    return found


def condition(ftj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (ftj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c  # type: ignore[no-any-return]
    return None


def wait_phase(cp: ControlPlane, ns: str, name: str, phase: str, timeout: float = 30.0,
               reason: tuple[str, str] | None = None) -> dict[str, Any]:
    """Wait until status.phase is `phase` (and condition type has `reason` when given)."""

    def check() -> dict[str, Any] | None:
        ftj = get_ftj(cp, ns, name)
        if (ftj.get("status") or {}).get("phase") != phase:
            return None
        if reason is not None:
            c = condition(ftj, reason[0])
            if c is None or c["reason"] != reason[1]:
                return None
        return ftj

    def describe() -> str:
        try:
            return json.dumps(get_ftj(cp, ns, name).get("status"), indent=1)
        except ApiError as exc:
            return str(exc)

    try:
        return cp.wait_for(check, timeout=timeout, desc=f"{ns}/{name} phase {phase} {reason or ''}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\nlast status: {describe()}") from None


def wait_running_pods(cp: ControlPlane, ns: str, name: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        pods = [p for p in pods_of(cp, ns, name, live_only=True) if p.get("status", {}).get("phase") == "Running"]
        return pods if len(pods) >= count else None

    return cp.wait_for(check, timeout=timeout, desc=f"{count} running pod(s) of {ns}/{name}")


def subset_mismatches(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` (as the API server returns it, with defaults added) differs from `expected`."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        out: list[str] = []
        for k, v in expected.items():
            out += subset_mismatches(v, actual.get(k), f"{path}.{k}")
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += subset_mismatches(e, a, f"{path}[{i}]")
        return out
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


def operator_errors(process: OperatorProcess) -> list[str]:
    return [line for line in process.log_text().splitlines()
            if " ERROR " in line or "Traceback" in line or '"level": "ERROR"' in line]


# ------------------------------------------------------------------------------------------------- RBAC

# The operator's namespaced rules, as the chart grants them (both come from operator/finetune_operator/kinds.py), with
# Kueue's Workloads: an operator started after Kueue's CRDs were installed watches them.
OPERATOR_RULES: list[dict[str, Any]] = kinds.rules({kinds.KUEUE})
LEASE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"],
     "resourceNames": ["LEASE"]},
]


def service_account_kubeconfig(cp: ControlPlane, ns: str, sa: str, path: Path) -> Path:
    token = cp.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {"expirationSeconds": 3600}})["status"]["token"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cp.server, "certificate-authority-data":
                                               base64.b64encode(cp.ca_cert.read_bytes()).decode()}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa}}],
        "current-context": "c",
    }))
    return path


def grant(cp: ControlPlane, namespace: str, name: str, rules: list[dict[str, Any]], lease: str,
          lease_namespace: str, path: Path) -> Path:
    """A ServiceAccount bound to `rules` cluster-wide plus LEASE_RULES for `lease`; returns its kubeconfig."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    cp.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
               {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    cp.request("POST", f"{rbac}/clusterroles", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                                                "metadata": {"name": name}, "rules": rules})
    cp.request("POST", f"{rbac}/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": subject})
    lease_rules = json.loads(json.dumps(LEASE_RULES).replace("LEASE", lease))
    cp.request("POST", f"{rbac}/namespaces/{lease_namespace}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
        "rules": lease_rules})
    cp.request("POST", f"{rbac}/namespaces/{lease_namespace}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}, "subjects": subject})
    return service_account_kubeconfig(cp, namespace, name, path)


def revoke(cp: ControlPlane, name: str, lease_namespace: str) -> None:
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for path in (f"{rbac}/clusterrolebindings/{name}", f"{rbac}/clusterroles/{name}",
                 f"{rbac}/namespaces/{lease_namespace}/rolebindings/{name}",
                 f"{rbac}/namespaces/{lease_namespace}/roles/{name}"):
        with contextlib.suppress(ApiError):
            cp.request("DELETE", path)
