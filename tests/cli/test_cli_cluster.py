"""`finetune` and `kubectl finetune` against the real test cluster and the real operator, read as a user reads them.

kwok plays the kubelet, so the trainers are driven by hand: progress is pushed to the operator with the job's own
token (as the trainer does) and pods are finished through kwok annotations. kwok's nodes serve no container logs, so
`logs` is checked up to the point where the API server would call a kubelet: which pods, what is said when a worker
has no logs yet, and what is said when there are no pods. Streaming real log lines is left to the real-node tests.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import ControlPlane
from tests.operator.cluster_support import (
    OperatorProcess,
    ftj_events,
    get_ftj,
    get_or_none,
    pods_of,
    service_account_kubeconfig,
    wait_phase,
    wait_running_pods,
)
from tests.operator.helpers import manifest, output_of

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


def cli(cp: ControlPlane, *argv: str, exe: str = "finetune", kubeconfig: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**cp.env(), "PATH": f"{BIN}{os.pathsep}{cp.env()['PATH']}", "COLUMNS": "200"}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    argv_ = [exe, *argv] if exe != "kubectl" else [str(cp.binaries.kubectl), *argv]
    return subprocess.run(argv_, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def on_terminal(cp: ControlPlane, *argv: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `finetune ARGV` with a pseudo-terminal as its stdout; (exit code, everything it wrote, its stderr)."""
    env = {**cp.env(), "PATH": f"{BIN}{os.pathsep}{cp.env()['PATH']}", "COLUMNS": "200"}
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(["finetune", *argv], env=env, stdout=secondary, stderr=subprocess.PIPE)
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    code = proc.wait(timeout=10)
    assert proc.stderr is not None
    return code, b"".join(chunks).decode(), proc.stderr.read().decode()


def apply(cp: ControlPlane, body: dict[str, Any]) -> None:
    """As a user does: `kubectl apply -f` of a manifest."""
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))


def push(op: OperatorProcess, cp: ControlPlane, ns: str, name: str, report: dict[str, Any]) -> None:
    """What the trainer does: POST its progress with the job's token from the Secret."""
    secret = cp.request("GET", f"/api/v1/namespaces/{ns}/secrets/{name}-progress")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert op.post_progress(ns, name, token, report) == 202


def report(step: int, total: int = 400, checkpoint: int | None = None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body: dict[str, Any] = {"state": "running", "step": step, "totalSteps": total, "epoch": step / total,
                            "loss": 0.6931, "learningRate": 4e-5, "samplesPerSecond": 55.5, "etaSeconds": 3000,
                            "updatedAt": now, "metrics": {"evalAccuracy": 0.75}}
    if checkpoint is not None:
        body["checkpoint"] = {"step": checkpoint, "path": f"s3://bucket/out/checkpoints/checkpoint-{checkpoint}",
                              "time": now, "count": 1}
    return body


def eta_minutes(text: str) -> int:
    """`49m` -> 49 (the ETA counts down while the test runs, by how much depends on the machine's load)."""
    m = re.fullmatch(r"(\d+)m(\d\ds)?", text)
    assert m is not None, f"ETA {text!r}"
    return int(m[1])


def wait_status(cp: ControlPlane, ns: str, name: str, check: Any, timeout: float = 15) -> dict[str, Any]:
    return cp.wait_for(lambda: (lambda o: o if check(o.get("status") or {}) else None)(get_ftj(cp, ns, name)),
                       timeout=timeout, desc=f"{ns}/{name} status")


def test_list_status_checkpoints_watch(control_plane: ControlPlane, namespace: str,
                                       operator: OperatorProcess) -> None:
    cp, ns = control_plane, namespace
    apply(cp, manifest("sentiment", ns, resources={"workers": 2, "gpusPerWorker": 1}))
    wait_running_pods(cp, ns, "sentiment", 2)
    wait_phase(cp, ns, "sentiment", "Running")
    push(operator, cp, ns, "sentiment", report(120, checkpoint=100))
    wait_status(cp, ns, "sentiment", lambda s: (s.get("progress") or {}).get("step") == 120)

    listed = cli(cp, "list", "-n", ns)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "CHECKPOINT", "RESTARTS", "AGE", "REASON"]
    cells = row.split()
    assert cells[:5] == ["sentiment", "Running", "30%", "120/400", "0.6931"]
    assert 40 <= eta_minutes(cells[5]) <= 50, "the ETA (3000 s when reported) counts down"
    assert cells[6:9] == ["step", "100", "0"] and cells[-1] == "PodsRunning"

    everywhere = cli(cp, "finetune", "list", "-A", exe="kubectl")
    assert everywhere.returncode == 0, everywhere.stderr
    assert everywhere.stdout.splitlines()[0].startswith("NAMESPACE ")
    assert any(line.split()[:3] == [ns, "sentiment", "Running"] for line in everywhere.stdout.splitlines())
    as_json = json.loads(cli(cp, "list", "-n", ns, "-o", "json").stdout)
    assert as_json["kind"] == "List" and [i["metadata"]["name"] for i in as_json["items"]] == ["sentiment"]
    assert cli(cp, "list", "-n", ns, "-o", "name").stdout == "finetunejobs.finetune.dev/sentiment\n"

    status = cli(cp, "status", "sentiment", "-n", ns)
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "Phase:         Running (PodsRunning)\n" in text
    assert "Message:       all 2 worker pod(s) are running\n" in text
    assert "Progress:      [#######.................] 30.0%  step 120/400, epoch 0.30\n" in text
    assert 40 <= eta_minutes(re.search(r"^ETA:\s+(\S+)$", text, re.MULTILINE)[1]) <= 50  # type: ignore[index]
    assert "Loss:          0.6931 (lr 4e-05, 55.5 samples/s)\n" in text
    assert "Metrics:       evalAccuracy=0.75\n" in text
    assert "Checkpoints:   1 written; latest step 100 at s3://bucket/out/checkpoints/checkpoint-100" in text
    assert "Restarts:      0\n" in text
    assert yaml.safe_load(cli(cp, "status", "sentiment", "-n", ns, "-o", "yaml").stdout)["status"]["progress"][
        "step"] == 120

    checkpoints = cli(cp, "checkpoints", "sentiment", "-n", ns)
    assert checkpoints.stdout.startswith(f"Storage:    {output_of('sentiment', ns)}/checkpoints\n"), checkpoints.stdout
    assert "Latest:     step 100\n" in checkpoints.stdout
    assert json.loads(cli(cp, "checkpoints", "sentiment", "-n", ns, "-o", "json").stdout)["latest"]["step"] == 100

    # watch: a line per change, then the end (exit 0 for Succeeded).
    env = {**cp.env(), "PATH": f"{BIN}{os.pathsep}{cp.env()['PATH']}"}
    watcher = subprocess.Popen(["finetune", "watch", "sentiment", "-n", ns, "--timeout", "90"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        assert first.startswith("sentiment  Running    [#######.................]   30.0%  step 120/400"), first
        push(operator, cp, ns, "sentiment", report(400, checkpoint=400))
        second = watcher.stdout.readline()
        assert "[########################]  100.0%  step 400/400" in second, second
        for pod in pods_of(cp, ns, "sentiment", live_only=True):
            cp.finish_pod(ns, pod["metadata"]["name"], exit_code=0, wait=False)
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    assert out.splitlines()[-2].startswith("sentiment  Succeeded  [########################]  100.0%")
    assert out.splitlines()[-1] == f"sentiment succeeded -> {output_of('sentiment', ns)}  (evalAccuracy=0.75)"
    # On a terminal the bar is redrawn in place; the end is printed on a line of its own.
    code, screen, errors = on_terminal(cp, "watch", "sentiment", "-n", ns)
    assert (code, errors) == (0, ""), errors
    assert screen.startswith("\r\x1b[Ksentiment  Succeeded  [########################]  100.0%"), screen
    assert screen.endswith(f"\r\nsentiment succeeded -> {output_of('sentiment', ns)}  (evalAccuracy=0.75)\r\n"), screen


def test_suspend_resume(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    cp, ns = control_plane, namespace
    apply(cp, manifest("pausable", ns))
    wait_phase(cp, ns, "pausable", "Running")
    done = cli(cp, "finetune", "suspend", "pausable", "-n", ns, exe="kubectl")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("finetunejobs.finetune.dev/pausable suspended: the trainer saves a checkpoint")
    wait_phase(cp, ns, "pausable", "Suspended")
    cp.wait_for(lambda: not pods_of(cp, ns, "pausable", live_only=True), timeout=30, desc="pods stopped")
    assert "Phase:         Suspended (Suspended)\n" in cli(cp, "status", "pausable", "-n", ns).stdout
    assert cli(cp, "suspend", "pausable", "-n", ns).stdout == \
        "finetunejobs.finetune.dev/pausable is already suspended (phase Suspended)\n"
    resumed = cli(cp, "resume", "pausable", "-n", ns)
    assert resumed.stdout == "finetunejobs.finetune.dev/pausable resumed: new pods continue from the latest " \
        "checkpoint\n"
    wait_phase(cp, ns, "pausable", "Running")
    assert cli(cp, "resume", "pausable", "-n", ns).stdout == \
        "finetunejobs.finetune.dev/pausable is not suspended (phase Running)\n"


def test_cancel_stops_the_pods_and_keeps_the_record(control_plane: ControlPlane, namespace: str,
                                                    operator: OperatorProcess) -> None:
    cp, ns = control_plane, namespace
    apply(cp, manifest("doomed", ns, resources={"workers": 2, "gpusPerWorker": 1}))
    wait_running_pods(cp, ns, "doomed", 2)
    wait_phase(cp, ns, "doomed", "Running")
    push(operator, cp, ns, "doomed", report(150, checkpoint=100))
    wait_status(cp, ns, "doomed", lambda s: (s.get("checkpoints") or {}).get("count") == 1)

    cancelled = cli(cp, "cancel", "doomed", "-n", ns)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("finetunejobs.finetune.dev/doomed cancelled: its pods stop")
    ftj = wait_phase(cp, ns, "doomed", "Failed", reason=("Failed", "Cancelled"))
    cp.wait_for(lambda: get_or_none(cp, f"/apis/batch/v1/namespaces/{ns}/jobs/doomed") is None, timeout=30,
                desc="Job deleted")
    cp.wait_for(lambda: not pods_of(cp, ns, "doomed"), timeout=60, desc="pods gone")
    assert get_or_none(cp, f"/api/v1/namespaces/{ns}/configmaps/doomed-config") is None
    assert get_or_none(cp, f"/api/v1/namespaces/{ns}/services/doomed") is None
    assert ftj["status"]["checkpoints"]["latest"]["step"] == 100, "the record of the checkpoints stays"
    assert ftj["status"]["completionTime"]
    event = next(e for e in ftj_events(cp, ns, "doomed", after="Cancelled") if e["reason"] == "Cancelled")
    assert event["type"] == "Normal", "a cancel the user asked for is not a warning"

    status = cli(cp, "status", "doomed", "-n", ns).stdout
    assert "Phase:         Failed (Cancelled)\n" in status
    assert "Checkpoints:   1 written; latest step 100" in status
    assert cli(cp, "cancel", "doomed", "-n", ns).stdout == \
        "finetunejobs.finetune.dev/doomed is already cancelled (phase Failed)\n"
    refused = cli(cp, "resume", "doomed", "-n", ns)
    assert refused.returncode == 1
    assert refused.stderr == "error: finetunejobs.finetune.dev/doomed was cancelled: it cannot resume; create a new " \
        "FineTuneJob to train again\n"
    undo = cp.kubectl("patch", "ftj", "doomed", "-n", ns, "--type=merge", "-p",
                      '{"spec": {"runPolicy": {"cancel": false}}}', check=False)
    assert undo.returncode != 0 and "runPolicy.cancel cannot be undone" in undo.stderr
    assert "the job was cancelled" in operator.log_text()


def test_cancel_before_the_job_exists(control_plane: ControlPlane, namespace: str,
                                      operator: OperatorProcess) -> None:
    """A manifest applied with cancel: true (GitOps) never starts pods."""
    cp, ns = control_plane, namespace
    apply(cp, manifest("never", ns, run_policy={"cancel": True}))
    wait_phase(cp, ns, "never", "Failed", reason=("Failed", "Cancelled"))
    assert get_or_none(cp, f"/apis/batch/v1/namespaces/{ns}/jobs/never") is None
    assert not pods_of(cp, ns, "never")


def test_logs_on_kwok(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    """kwok pods have no logs: check the messages up to the kubelet call (the real node tests read lines)."""
    cp, ns = control_plane, namespace
    missing = cli(cp, "logs", "nope", "-n", ns)
    assert missing.returncode == 1
    assert missing.stderr == f'error: finetunejob "nope" not found in namespace "{ns}"\n'

    apply(cp, manifest("queued", ns, run_policy={"queueName": "gpu-queue"}))
    wait_phase(cp, ns, "queued", "Queued")
    none = cli(cp, "logs", "queued", "-n", ns)
    assert none.returncode == 1
    assert none.stderr.startswith("error: finetunejobs.finetune.dev/queued has no pods (phase Queued, "
                                  "WaitingForAdmission: waiting for Kueue"), none.stderr

    # 2 workers x 16 GPUs: no 8-GPU node fits one; the pods exist but are never scheduled.
    apply(cp, manifest("huge", ns, resources={"workers": 2, "gpusPerWorker": 16}))
    wait_phase(cp, ns, "huge", "Pending", reason=("Running", "Unschedulable"))
    unscheduled = cli(cp, "logs", "huge", "-n", ns, "-f")
    assert unscheduled.returncode == 1
    lines = unscheduled.stderr.splitlines()
    assert len(lines) == 2, lines
    for index, line in enumerate(lines):
        assert line.startswith(f"worker {index} (pod huge-{index}-"), line
        assert "no logs yet: not scheduled to a node yet: Unschedulable: 0/" in line
    one = cli(cp, "logs", "huge", "-n", ns, "--worker", "1")
    assert one.stderr.startswith("worker 1 (pod huge-1-") and len(one.stderr.splitlines()) == 1
    earlier = cli(cp, "logs", "huge", "-n", ns, "--previous")
    assert earlier.returncode == 1
    assert earlier.stderr.startswith("error: finetunejobs.finetune.dev/huge has no ended pods (phase Pending, "
                                     "Unschedulable: "), earlier.stderr


def test_rbac_of_the_user_applies(control_plane: ControlPlane, namespace: str, operator: OperatorProcess,
                                  tmp_path: Path) -> None:
    """A user allowed to read FineTuneJobs in one namespace lists and reads them there, and is told why the rest
    is refused."""
    cp, ns = control_plane, namespace
    apply(cp, manifest("shared", ns))
    wait_phase(cp, ns, "shared", "Running")
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    cp.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
               {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "viewer"}})
    cp.request("POST", f"{rbac}/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "viewer"},
        "rules": [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "verbs": ["get", "list", "watch"]}]})
    cp.request("POST", f"{rbac}/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "viewer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "viewer"},
        "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": ns}]})
    config = service_account_kubeconfig(cp, ns, "viewer", tmp_path / "viewer.kubeconfig")
    user = f"system:serviceaccount:{ns}:viewer"

    def allowed() -> subprocess.CompletedProcess[str] | None:  # RBAC caches refresh within moments
        result = cli(cp, "list", "-n", ns, kubeconfig=config)
        return result if result.returncode == 0 else None

    assert "shared" in cp.wait_for(allowed, timeout=20, desc="the Role in effect").stdout
    assert cli(cp, "status", "shared", "-n", ns, kubeconfig=config).returncode == 0
    refused = cli(cp, "suspend", "shared", "-n", ns, kubeconfig=config)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        f'error: patch finetunejob shared: forbidden: finetunejobs.finetune.dev "shared" is forbidden: User "{user}" '
        'cannot patch resource "finetunejobs"'), refused.stderr
    everywhere = cli(cp, "list", "-A", kubeconfig=config)
    assert everywhere.returncode == 1 and "forbidden" in everywhere.stderr and "cluster scope" in everywhere.stderr
    assert get_ftj(cp, ns, "shared")["spec"]["runPolicy"]["suspend"] is False


def test_completion_offers_job_names(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    """`finetune __complete` and kubectl's plugin completion (kubectl_complete-finetune) list the jobs."""
    cp, ns = control_plane, namespace
    for name in ("alpha", "beta"):
        apply(cp, manifest(name, ns))
    own = cli(cp, "__complete", "-n", ns, "status", "")
    assert own.stdout == "alpha\nbeta\n:4\n", own.stdout
    via_kubectl = cli(cp, "__complete", "finetune", "watch", "-n", ns, "b", exe="kubectl")
    assert via_kubectl.stdout.splitlines()[0] == "beta", via_kubectl.stdout + via_kubectl.stderr
    namespaces = cli(cp, "__complete", "list", "-n", ns[:-3])
    assert ns in namespaces.stdout.splitlines()
