"""The chart on the real control plane: install, server-side validation, RBAC as the operator and as tenants, and the
restricted Pod Security admission for the operator and for the trainer Jobs it builds.

The cluster is shared by the whole session, so every release and namespace here has a unique name, and the CRDs stay
(`crds.keep`): other tests use them. kwok plays the kubelet, so the operator pod "runs" without running the image:
enough for admission, scheduling and `helm install --wait`, not for the operator's behaviour (tests/operator does that).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from finetune_operator import builders
from tests.controlplane.cluster import ControlPlane, KubectlError

from .conftest import CHART, REPO, VALUES_DIR

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}
CHART_CRDS = ("finetunejobs.finetune.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def adopt_crds(cp: ControlPlane, release: str, namespace: str) -> None:
    """Let this release take over CRDs another release or test created (Helm adopts objects carrying its marks)."""
    for name in CHART_CRDS:
        if cp.kubectl("get", "crd", name, check=False).returncode != 0:
            continue
        cp.kubectl("annotate", "crd", name, "--overwrite", f"meta.helm.sh/release-name={release}",
                   f"meta.helm.sh/release-namespace={namespace}")
        cp.kubectl("label", "crd", name, "--overwrite", "app.kubernetes.io/managed-by=Helm")


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    fullname: str
    notes: str

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"


def install(cp: ControlPlane, name: str, namespace: str, *args: str) -> Release:
    adopt_crds(cp, name, namespace)
    out = cp.helm("install", name, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s",
                  "--set", "crds.keep=true", *args)
    fullname = name if "finetune-operator" in name else f"{name}-finetune-operator"
    return Release(name, namespace, fullname, out.stdout)


@pytest.fixture(scope="module")
def tenants(control_plane: ControlPlane) -> Iterator[tuple[str, str]]:
    """Two tenant namespaces, both enforcing the restricted Pod Security Standard."""
    names = (unique("tenant-a"), unique("tenant-b"))
    for ns in names:
        control_plane.create_namespace(ns, labels=RESTRICTED)
    yield names
    for ns in names:
        control_plane.delete_namespace(ns)


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane) -> Iterator[Release]:
    """The chart with default values, in a namespace that enforces `restricted`: the operator pod must be admitted."""
    namespace = unique("finetune-system")
    control_plane.create_namespace(namespace, labels=RESTRICTED)
    rel = install(control_plane, unique("ft"), namespace)
    yield rel
    control_plane.helm("uninstall", rel.name, "--namespace", namespace, "--wait", check=False)
    control_plane.delete_namespace(namespace)


def can_i(cp: ControlPlane, user: str, verb: str, resource: str, namespace: str | None = None,
          subresource: str | None = None, groups: tuple[str, ...] = ()) -> bool:
    args = ["auth", "can-i", verb, resource]
    args += ["--namespace", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    proc = cp.kubectl(*args, as_user=user, as_groups=groups, check=False)
    answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


# ------------------------------------------------------------------------------------------- server validation


def _server_validate(cp: ControlPlane, manifests: str) -> None:
    """Strict server-side dry run: the API server's OpenAPI schemas, unknown fields rejected, admission included.

    Hooks (kopf peering objects, checked after a real install) and Prometheus Operator kinds (no such CRDs in the
    test cluster) are left out; their shape is tested offline in test_template.py.
    """
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    kept = [d for d in docs if "helm.sh/hook" not in (d["metadata"].get("annotations") or {})
            and not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(kept) >= 5
    cp.kubectl("apply", "--dry-run=server", "--validate=strict", "--server-side", "--force-conflicts",
               "--field-manager=helm-dry-run", "-f", "-", input=yaml.safe_dump_all(kept))


@pytest.mark.parametrize("values_file", [None, "namespaced.yaml", "minimal.yaml"])
def test_rendered_manifests_validate_on_the_server(control_plane: ControlPlane, tenants: tuple[str, str],
                                                   values_file: str | None) -> None:
    namespace = unique("render")
    control_plane.create_namespace(namespace, labels=RESTRICTED)
    try:
        args = ["template", "ft", str(CHART), "--namespace", namespace,
                "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                "--api-versions", "monitoring.coreos.com/v1/PrometheusRule"]
        if values_file:
            args += ["--values", str(VALUES_DIR / values_file)]
        if values_file == "namespaced.yaml":
            args += ["--set-json", f"operator.watchNamespaces={json.dumps(list(tenants))}",
                     "--set", f"metrics.dashboard.namespace={namespace}"]
        _server_validate(control_plane, control_plane.helm(*args).stdout)
    finally:
        control_plane.delete_namespace(namespace)


# --------------------------------------------------------------------------------------------------- install


def test_install_creates_crd_rbac_and_deployment(control_plane: ControlPlane, release: Release) -> None:
    crd = json.loads(control_plane.kubectl("get", "crd", "finetunejobs.finetune.dev", "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release.name
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    control_plane.kubectl("get", "clusterrole", release.fullname, f"{release.fullname}-edit",
                          f"{release.fullname}-view")
    control_plane.kubectl("get", "clusterrolebinding", release.fullname)
    control_plane.kubectl("-n", release.namespace, "get", "role,rolebinding", f"{release.fullname}-leader")
    deployment = json.loads(control_plane.kubectl("-n", release.namespace, "get", "deployment", release.fullname,
                                                  "-o", "json").stdout)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["status"].get("availableReplicas") == 1, "the restricted namespace admitted the operator pod"
    assert "finetunejobs" in control_plane.kubectl("api-resources", "--api-group=finetune.dev").stdout
    assert f"kubectl -n {release.namespace} rollout status deployment/{release.fullname}" in release.notes


def test_upgrade_keeps_the_progress_key_and_uninstall_keeps_the_crd(control_plane: ControlPlane) -> None:
    namespace = unique("lifecycle")
    control_plane.create_namespace(namespace)
    rel = install(control_plane, unique("life"), namespace)
    secret = f"{rel.fullname}-progress-key"

    def key() -> str:
        return control_plane.kubectl("-n", namespace, "get", "secret", secret, "-o",
                                     "jsonpath={.data.key}").stdout

    try:
        before = key()
        assert len(before) == 64
        upgraded = control_plane.helm("upgrade", rel.name, str(CHART), "--namespace", namespace, "--reuse-values",
                                      "--set", "operator.logLevel=DEBUG",
                                      "--set", "metrics.serviceMonitor.enabled=true", "--wait", "--timeout", "120s")
        assert key() == before, "an upgrade must not rotate the key: running trainers would lose their tokens"
        # no Prometheus Operator in this cluster: the ServiceMonitor is skipped, and NOTES says so
        assert "does not serve monitoring.coreos.com/v1 ServiceMonitor" in upgraded.stdout
    finally:
        control_plane.helm("uninstall", rel.name, "--namespace", namespace, "--wait")
    assert control_plane.kubectl("-n", namespace, "get", "deployment", rel.fullname, check=False).returncode != 0
    control_plane.kubectl("get", "crd", "finetunejobs.finetune.dev")  # kept: deleting it deletes every FineTuneJob
    control_plane.delete_namespace(namespace)


# --------------------------------------------------------------------------------------------- operator RBAC

# Every API call of operator/finetune_operator, as (verb, resource, subresource), from k8s.py and its callers
# (controller.py, leader.py) plus kopf's watch streams (handlers.py: FineTuneJobs, and Jobs, Pods, ConfigMaps and
# Services by label).
OPERATOR_CALLS = [
    ("list", "finetunejobs.finetune.dev", None), ("watch", "finetunejobs.finetune.dev", None),
    ("patch", "finetunejobs.finetune.dev", "status"),
    ("list", "jobs.batch", None), ("watch", "jobs.batch", None), ("get", "jobs.batch", None),
    ("create", "jobs.batch", None), ("patch", "jobs.batch", None), ("delete", "jobs.batch", None),
    ("list", "pods", None), ("watch", "pods", None), ("create", "pods", "eviction"),
    ("list", "configmaps", None), ("watch", "configmaps", None),
    ("get", "configmaps", None), ("create", "configmaps", None), ("patch", "configmaps", None),
    ("delete", "configmaps", None),
    ("list", "services", None), ("watch", "services", None),
    ("get", "services", None), ("create", "services", None), ("delete", "services", None),
    ("create", "secrets", None),
    ("update", "finetunejobs.finetune.dev", "finalizers"),
    ("create", "events", None), ("list", "events", None),
]
# What the operator must never be able to do.
OPERATOR_DENIED = [
    ("get", "secrets", None), ("list", "secrets", None), ("watch", "secrets", None), ("delete", "secrets", None),
    ("get", "finetunejobs.finetune.dev", None), ("update", "finetunejobs.finetune.dev", None),
    ("patch", "finetunejobs.finetune.dev", None),
    ("delete", "finetunejobs.finetune.dev", None), ("create", "pods", None), ("create", "pods", "exec"),
    ("delete", "pods", None), ("patch", "pods", None),
    ("get", "pods", "log"), ("create", "serviceaccounts", "token"),
    ("create", "rolebindings.rbac.authorization.k8s.io", None), ("escalate", "roles.rbac.authorization.k8s.io", None),
    ("impersonate", "serviceaccounts", None),
]


def test_operator_can_make_every_call_it_makes(control_plane: ControlPlane, release: Release,
                                               tenants: tuple[str, str]) -> None:
    missing = [
        f"{verb} {resource}{'/' + sub if sub else ''} in {ns}"
        for ns in (*tenants, release.namespace)
        for verb, resource, sub in OPERATOR_CALLS
        if not can_i(control_plane, release.service_account, verb, resource, ns, sub)
    ]
    # cluster-wide watches (kopf watches across namespaces when FINETUNE_NAMESPACES is empty)
    missing += [f"{verb} {resource} cluster-wide" for verb, resource, sub in OPERATOR_CALLS
                if verb in ("list", "watch") and not can_i(control_plane, release.service_account, verb, resource)]
    lease = f"leases.coordination.k8s.io/{release.fullname}"
    for verb in ("get", "update"):
        if not can_i(control_plane, release.service_account, verb, lease, release.namespace):
            missing.append(f"{verb} {lease}")
    if not can_i(control_plane, release.service_account, "create", "leases.coordination.k8s.io", release.namespace):
        missing.append("create leases")
    assert missing == []


def test_operator_cannot_read_secrets_or_escalate(control_plane: ControlPlane, release: Release,
                                                  tenants: tuple[str, str]) -> None:
    allowed = [
        f"{verb} {resource}{'/' + sub if sub else ''} in {ns or 'all namespaces'}"
        for ns in (tenants[0], release.namespace, "kube-system", None)
        for verb, resource, sub in OPERATOR_DENIED
        if can_i(control_plane, release.service_account, verb, resource, ns, sub)
    ]
    other_lease = "leases.coordination.k8s.io/someone-elses-lease"
    allowed += [f"{v} {other_lease}" for v in ("get", "update")
                if can_i(control_plane, release.service_account, v, other_lease, release.namespace)]
    allowed += [f"{v} leases in kube-system" for v in ("create", "update")
                if can_i(control_plane, release.service_account, v, "leases.coordination.k8s.io", "kube-system")]
    assert allowed == []


def test_a_secret_read_in_another_namespace_is_forbidden(control_plane: ControlPlane, release: Release,
                                                         tenants: tuple[str, str]) -> None:
    """Not just `can-i`: an actual GET of a tenant's Secret, as the operator, is refused by the API server."""
    control_plane.kubectl("-n", tenants[1], "create", "secret", "generic", "hf-token", "--from-literal=token=hf_x")
    proc = control_plane.kubectl("-n", tenants[1], "get", "secret", "hf-token", as_user=release.service_account,
                                 check=False)
    assert proc.returncode != 0 and "Forbidden" in proc.stderr
    proc = control_plane.kubectl("get", "secrets", "--all-namespaces", as_user=release.service_account, check=False)
    assert proc.returncode != 0 and "Forbidden" in proc.stderr


def test_operator_permissions_have_no_wildcards(control_plane: ControlPlane, release: Release,
                                                tenants: tuple[str, str]) -> None:
    out = control_plane.kubectl("auth", "can-i", "--list", "--namespace", tenants[0],
                                as_user=release.service_account).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    resource_rows = [r for r in rows if not r[0].startswith("[")]  # non-resource URL rows start with "[]"
    assert resource_rows
    for row in resource_rows:
        verbs = " ".join(row[1:])
        assert row[0] != "*" and "*." not in row[0], row
        assert "[*]" not in verbs and " *" not in verbs, row


# ------------------------------------------------------------------------------------------ single-namespace mode


def test_single_namespace_mode_grants_only_the_watched_namespace(control_plane: ControlPlane,
                                                                 tenants: tuple[str, str]) -> None:
    namespace = unique("finetune-ns")
    control_plane.create_namespace(namespace, labels=RESTRICTED)
    watched, other = tenants
    rel = install(control_plane, unique("single"), namespace, "--set-json", f"operator.watchNamespaces=[\"{watched}\"]",
                  "--set", "operator.peering.enabled=true", "--set", "rbac.aggregateToDefaultRoles=false")
    try:
        sa = rel.service_account
        assert can_i(control_plane, sa, "create", "jobs.batch", watched)
        assert can_i(control_plane, sa, "patch", "finetunejobs.finetune.dev", watched, "status")
        assert can_i(control_plane, sa, "patch", "kopfpeerings.kopf.dev", watched)
        assert not can_i(control_plane, sa, "create", "jobs.batch", other)
        assert not can_i(control_plane, sa, "list", "finetunejobs.finetune.dev", other)
        assert not can_i(control_plane, sa, "list", "finetunejobs.finetune.dev")  # nothing cluster-wide
        assert not can_i(control_plane, sa, "list", "clusterkopfpeerings.kopf.dev")
        # the post-install hook created the peering object kopf needs in the watched namespace
        control_plane.kubectl("-n", watched, "get", "kopfpeerings.kopf.dev", rel.fullname)
    finally:
        control_plane.helm("uninstall", rel.name, "--namespace", namespace, "--wait", check=False)
        control_plane.delete_namespace(namespace)


# ----------------------------------------------------------------------------------------------------- tenants


def _job_manifest(namespace: str, name: str) -> str:
    doc = yaml.safe_load((REPO / "examples" / "sentiment.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return yaml.safe_dump(doc)


def test_tenant_with_edit_manages_finetunejobs_in_its_namespace_only(
    control_plane: ControlPlane, release: Release, tenants: tuple[str, str]
) -> None:
    team_a, team_b = tenants
    alice, bob = f"alice-{team_a}", f"bob-{team_a}"
    control_plane.kubectl("-n", team_a, "create", "rolebinding", "alice-edit", "--clusterrole=edit", f"--user={alice}")
    control_plane.kubectl("-n", team_a, "create", "rolebinding", "bob-view", "--clusterrole=view", f"--user={bob}")
    # the clusterrole-aggregation controller copies the chart's rules into edit/view asynchronously
    control_plane.wait_for(lambda: can_i(control_plane, alice, "create", "finetunejobs.finetune.dev", team_a),
                           timeout=30, desc="edit aggregated FineTuneJob rules")
    control_plane.wait_for(lambda: can_i(control_plane, bob, "list", "finetunejobs.finetune.dev", team_a),
                           timeout=30, desc="view aggregated FineTuneJob rules")

    control_plane.kubectl("create", "-f", "-", input=_job_manifest(team_a, "alices-job"), as_user=alice)
    denied = control_plane.kubectl("create", "-f", "-", input=_job_manifest(team_b, "alices-job"), as_user=alice,
                                   check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr

    assert not can_i(control_plane, alice, "patch", "finetunejobs.finetune.dev", team_a, "status")
    assert can_i(control_plane, alice, "delete", "finetunejobs.finetune.dev", team_a)
    assert can_i(control_plane, bob, "get", "finetunejobs.finetune.dev", team_a)
    assert not can_i(control_plane, bob, "create", "finetunejobs.finetune.dev", team_a)
    assert not can_i(control_plane, bob, "get", "finetunejobs.finetune.dev", team_b)
    control_plane.kubectl("-n", team_a, "get", "finetunejob", "alices-job", as_user=bob)


# ------------------------------------------------------------------------------------------------ Pod Security


def _trainer_jobs(namespace: str) -> list[dict[str, Any]]:
    """The trainer Job the operator builds for every example manifest (single-node, LoRA, multi-node, Kueue)."""
    from finetune_api.manifest import load_job

    jobs = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        job = load_job(path)
        owner = builders.Owner(name=job.metadata.name, namespace=namespace, uid=str(uuid.uuid4()))
        ctx = builders.BuildContext(trainer_image="ghcr.io/finetune-operator/finetune-trainer:0.1.0",
                                    progress_url="http://ft-finetune-operator.finetune-system.svc:8081")
        jobs.append(builders.build_job(owner, job.spec, ctx))
    assert len(jobs) >= 4
    return jobs


@pytest.fixture
def priority_classes(control_plane: ControlPlane) -> Iterator[None]:
    """The PriorityClasses the examples name (admission refuses pods naming a missing one)."""
    created = []
    for job in _trainer_jobs("default"):
        name = job["spec"]["template"]["spec"].get("priorityClassName")
        if name and name not in created and control_plane.kubectl("get", "priorityclass", name,
                                                                  check=False).returncode != 0:
            control_plane.kubectl("create", "priorityclass", name, "--value=100", "--preemption-policy=Never")
            created.append(name)
    yield
    for name in created:
        control_plane.kubectl("delete", "priorityclass", name, check=False)


@pytest.mark.usefixtures("priority_classes")
def test_trainer_jobs_pass_restricted_pod_security(control_plane: ControlPlane, tenants: tuple[str, str]) -> None:
    namespace = tenants[1]
    for job in _trainer_jobs(namespace):
        # ownerReferences point at FineTuneJobs that do not exist: fine for admission, but the garbage collector would
        # delete the Job at once, so the test objects go without them.
        job["metadata"].pop("ownerReferences")
        job["spec"]["suspend"] = False
        job["metadata"]["labels"].pop("kueue.x-k8s.io/queue-name", None)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{job['metadata']['name']}-probe", "namespace": namespace},
               "spec": job["spec"]["template"]["spec"]}
        # Pods are what `enforce` rejects: a server-side dry run of the template as a Pod goes through admission.
        control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
        # Jobs are only warned about; any warning means the template would be refused when the Job creates pods.
        created = control_plane.kubectl("create", "-f", "-", input=json.dumps(job))
        assert "violate PodSecurity" not in created.stderr, created.stderr
        name = job["metadata"]["name"]
        control_plane.wait_for(
            lambda name=name: control_plane.kubectl("-n", namespace, "get", "pods", "-l",
                                                    f"batch.kubernetes.io/job-name={name}", "-o", "name").stdout,
            timeout=30, desc=f"pods of trainer Job {name} admitted",
        )
        control_plane.kubectl("-n", namespace, "delete", "job", name, "--cascade=background", "--wait=false")


def test_restricted_namespace_really_enforces(control_plane: ControlPlane, tenants: tuple[str, str]) -> None:
    """Negative control: the namespaces above would refuse a pod that breaks the profile."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root", "namespace": tenants[0]},
           "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}
    with pytest.raises(KubectlError, match="violates PodSecurity"):
        control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
