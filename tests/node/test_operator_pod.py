"""The chart's operator as a real pod on the real node: installed by ``helm install`` with the image built from
operator/Dockerfile into a namespace that enforces the restricted Pod Security level, as a user would.

What kwok cannot show and these tests do: the container starts from the image (command, user, read-only root
filesystem), its real probes make it Ready, it logs in with its service-account token through the ``kubernetes``
Service, wins its Lease, reconciles FineTuneJobs, serves /metrics to another pod through its Service over the pod
network, and a replacement pod takes over the Lease and the work without duplicating jobs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.controlplane.cluster import SERVICE_IP, ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import NODE_NAME

from .support import (
    EXAMPLE,
    POD_TIMEOUT,
    Release,
    lease_holder,
    logs,
    operator_pods,
    pod_manifest,
    ready,
    restricted_container,
    run_to_completion,
    terminated,
)

pytestmark = pytest.mark.node


def the_operator_pod(cp: ControlPlane, release: Release) -> dict[str, Any]:
    pods = operator_pods(cp, release)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def apply_example(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    """``kubectl apply`` of examples/sentiment.yaml under another name (the README's step), with storage of its own (two
    live jobs writing to one place would hold the younger back: StorageConflict) and without its pre-flight: these
    tests are about the operator's pod, and the trainer Job is what they watch it make (the pre-flight is
    tests/node/test_finetunejobs.py's)."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    manifest["spec"]["preflight"] = {"enabled": False}
    manifest["spec"]["output"]["storage"] = f"pvc://runs/{name}"
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    ftj: dict[str, Any] = cp.request("GET", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}")
    return ftj


def jobs_of(cp: ControlPlane, namespace: str, ftj: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = cp.request(
        "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs?labelSelector=finetune.dev%2Fjob-name%3D{ftj}")["items"]
    return jobs


def wait_for_job(cp: ControlPlane, namespace: str, ftj: dict[str, Any]) -> dict[str, Any]:
    name = ftj["metadata"]["name"]
    job: dict[str, Any] = cp.wait_for(lambda: next(iter(jobs_of(cp, namespace, name)), None), timeout=POD_TIMEOUT,
                                      desc=f"the operator to create the Job of FineTuneJob {namespace}/{name}")
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", ftj["metadata"]["uid"], True)
    return job


def exec_python(cp: ControlPlane, release: Release, pod: str, code: str) -> Any:
    """``kubectl exec`` (API server -> kubelet -> containerd) of a Python snippet that prints one JSON line."""
    out = cp.kubectl("-n", release.namespace, "exec", pod, "-c", "operator", "--", "python", "-c", code).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_operator_pod_is_ready_through_its_probes_and_wins_its_lease(
    control_plane: ControlPlane, operator_release: Release
) -> None:
    pod = the_operator_pod(control_plane, operator_release)
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert ready(pod), pod["status"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, "Ready through its probes, never restarted by them"
    holder = control_plane.wait_for(lambda: lease_holder(control_plane, operator_release), timeout=30,
                                    desc="the Lease to have a holder")
    assert holder.startswith(f"{name}-"), f"Lease held by {holder}, not by the pod {name}"
    assert "became leader" in logs(control_plane, operator_release.namespace, name)


def test_operator_logs_in_with_its_service_account_token_and_reconciles(
    control_plane: ControlPlane, operator_release: Release
) -> None:
    """Its only credential is the projected service-account token; with it, it reads and writes in the tenant
    namespace (the Job) and its own (the Lease) through the ``kubernetes`` Service."""
    pod = the_operator_pod(control_plane, operator_release)
    assert pod["spec"]["serviceAccountName"] == operator_release.fullname
    seen = exec_python(control_plane, operator_release, pod["metadata"]["name"], (
        "import json, os; d = '/var/run/secrets/kubernetes.io/serviceaccount'; "
        "files = sorted(f for f in os.listdir(d) if not f.startswith('..')); "
        "print(json.dumps({'host': os.environ.get('KUBERNETES_SERVICE_HOST'), 'files': files, "
        "'kubeconfig': os.environ.get('KUBECONFIG')}))"))
    assert seen == {"host": SERVICE_IP, "files": ["ca.crt", "namespace", "token"], "kubeconfig": None}
    tenant = operator_release.watched[0]
    ftj = apply_example(control_plane, tenant, "sentiment-login")
    wait_for_job(control_plane, tenant, ftj)


def test_operator_root_filesystem_is_read_only(control_plane: ControlPlane, operator_release: Release) -> None:
    pod = the_operator_pod(control_plane, operator_release)
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    seen = exec_python(control_plane, operator_release, pod["metadata"]["name"], (
        "import json, os\n"
        "def write(path):\n"
        "    try:\n"
        "        open(path, 'w').close(); return 'written'\n"
        "    except OSError as exc:\n"
        "        return exc.strerror\n"
        "print(json.dumps({'root': write('/opt/venv/at-run-time'), 'tmp': write('/tmp/at-run-time'), "
        "'uid': os.getuid()}))"))
    assert seen == {"root": "Read-only file system", "tmp": "written", "uid": 65532}


def test_metrics_are_scraped_through_the_service_from_a_pod(
    control_plane: ControlPlane, operator_release: Release, node_images: ProductImages,
    restricted_namespace: Callable[[str], str],
) -> None:
    ns = restricted_namespace("scraper")
    url = f"http://{operator_release.fullname}.{operator_release.namespace}.svc:9090/metrics"
    scrape = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=20).read().decode())"
    pod = pod_manifest("scraper", [restricted_container("scrape", node_images.operator, ["python", "-c", scrape])])
    done = run_to_completion(control_plane, ns, pod)
    text = logs(control_plane, ns, "scraper")
    assert terminated(done, "scrape")["exitCode"] == 0, text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # raises on malformed exposition
    assert "finetune_operator_reconcile" in families, sorted(families)
    undocumented = [name for name, f in families.items() if not f.documentation]
    assert not undocumented, f"metrics without HELP: {undocumented}"


def test_a_replacement_pod_takes_over_the_lease_and_the_work(
    control_plane: ControlPlane, operator_release: Release
) -> None:
    tenant = operator_release.watched[0]
    before = apply_example(control_plane, tenant, "sentiment-failover")
    job = wait_for_job(control_plane, tenant, before)
    old = the_operator_pod(control_plane, operator_release)["metadata"]["name"]
    control_plane.kubectl("-n", operator_release.namespace, "delete", "pod", old, "--wait=false")

    def replacement_leads() -> str | None:
        pods = [p for p in operator_pods(control_plane, operator_release) if p["metadata"]["name"] != old]
        holder = lease_holder(control_plane, operator_release) or ""
        new = [p["metadata"]["name"] for p in pods if ready(p) and holder.startswith(p["metadata"]["name"] + "-")]
        return new[0] if new else None

    new = control_plane.wait_for(replacement_leads, timeout=POD_TIMEOUT, interval=1,
                                 desc="a replacement operator pod Ready and holding the Lease")
    assert new != old
    # The old job is adopted, not made again; the new leader acts on it and on new work.
    control_plane.kubectl("-n", tenant, "patch", "finetunejob", "sentiment-failover", "--type=merge",
                          "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}))
    control_plane.wait_for(lambda: jobs_of(control_plane, tenant, "sentiment-failover")[0]["spec"].get("suspend"),
                           timeout=POD_TIMEOUT, desc="the new leader to suspend the existing Job")
    after = apply_example(control_plane, tenant, "sentiment-after-failover")
    wait_for_job(control_plane, tenant, after)
    kept = jobs_of(control_plane, tenant, "sentiment-failover")
    assert [j["metadata"]["uid"] for j in kept] == [job["metadata"]["uid"]], "the job was duplicated or replaced"
