"""`helm lint` and `helm template` with default and non-default values: what the chart renders, offline.

The same manifests are validated by the API server in test_cluster.py; here each property the chart promises (one
replica, restricted security context, least-privilege RBAC, gated monitoring, the CRD verbatim) gets a readable test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import __version__
from finetune_api import crd as crd_module
from finetune_operator import metrics, settings

from .conftest import CHART, MONITORING_APIS, VALUES_DIR, Helm, env_of, find, one
from .pss import restricted_violations

VALUE_FILES = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
OPERATOR_ENV = {
    "FINETUNE_NAMESPACES", "FINETUNE_TRAINER_IMAGE", "FINETUNE_ALLOWED_REGISTRIES", "FINETUNE_METRICS_PORT",
    "FINETUNE_HEALTH_PORT", "FINETUNE_PROGRESS_PORT", "FINETUNE_PROGRESS_URL", "FINETUNE_PROGRESS_KEY",
    "FINETUNE_LOG_LEVEL", "FINETUNE_LOG_FORMAT", "FINETUNE_RESYNC_SECONDS", "FINETUNE_WORKERS",
    "FINETUNE_GRACE_PERIOD_SECONDS", "FINETUNE_START_TIMEOUT_SECONDS", "FINETUNE_PEERING", "FINETUNE_LEADER_ELECTION",
    "FINETUNE_LEASE_NAME", "FINETUNE_KUEUE", "POD_NAMESPACE", "POD_NAME", "POD_ID", "PYTHONDONTWRITEBYTECODE",
    "FINETUNE_PREFLIGHT", "FINETUNE_PREFLIGHT_CPU", "FINETUNE_PREFLIGHT_MEMORY", "FINETUNE_PREFLIGHT_NODE_SELECTOR",
    "FINETUNE_PREFLIGHT_TOLERATIONS", "FINETUNE_PREFLIGHT_QUEUE",
}


@pytest.fixture(scope="module")
def default(helm: Helm) -> list[dict[str, Any]]:
    return helm.render()


@pytest.fixture(scope="module")
def namespaced(helm: Helm) -> list[dict[str, Any]]:
    return helm.render(["namespaced.yaml"], api_versions=MONITORING_APIS, namespace="platform")


# ------------------------------------------------------------------------------------------------- lint and schema


@pytest.mark.parametrize("values_file", [None, *VALUE_FILES])
def test_lint_strict(helm: Helm, values_file: str | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values_file:
        args += ["--values", str(VALUES_DIR / values_file)]
    out = helm.run(*args)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("operator.logLevel=LOUD", "value must be one of"),
        ("ports.metrics=ninety", "want integer"),
        ("crds.enabled=maybe", "want boolean"),
        ("operator.watchNamespaces=team-a", "want array"),
        ("operator.watchNamespaces={Team_A}", "does not match pattern"),
        ("image.digest=latest", "does not match pattern"),
        ("operator.resyncSeconds=1", "minimum"),
        ("resources.requests.cpu=lots", "does not match pattern"),
        ("replicas=2", "additional properties 'replicas' not allowed"),
        ("replicaCount=6", "maximum"),
        ("operator.namespaces={a}", "additional properties 'namespaces' not allowed"),
        ("metrics.serviceMonitor.enable=true", "additional properties 'enable' not allowed"),
        ("resources.request.cpu=1", "additional properties 'request' not allowed"),
    ],
)
def test_schema_rejects(helm: Helm, setting: str, error: str) -> None:
    proc = helm.run(*helm.template_args(sets=[setting]), check=False)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert error in proc.stderr, proc.stderr


@pytest.mark.parametrize("values_file", VALUE_FILES)
def test_renders_with_non_default_values(helm: Helm, values_file: str) -> None:
    assert find(helm.render([values_file]), "Deployment")


# ------------------------------------------------------------------------------------------------------ the CRD


def test_crd_is_the_generated_one(default: list[dict[str, Any]]) -> None:
    rendered = one(default, "CustomResourceDefinition", "finetunejobs.finetune.dev")
    generated = crd_module.crd()
    assert rendered["spec"] == generated["spec"]
    assert generated["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_switches(helm: Helm) -> None:
    assert not find(helm.render(sets=["crds.enabled=false"]), "CustomResourceDefinition")
    unkept = one(helm.render(sets=["crds.keep=false"]), "CustomResourceDefinition")
    assert "annotations" not in unkept["metadata"]


def test_peering_crds_only_with_peering(default: list[dict[str, Any]], namespaced: list[dict[str, Any]]) -> None:
    assert [c["metadata"]["name"] for c in find(default, "CustomResourceDefinition")] == ["finetunejobs.finetune.dev"]
    names = {c["metadata"]["name"] for c in find(namespaced, "CustomResourceDefinition")}
    assert names == {"finetunejobs.finetune.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


# ----------------------------------------------------------------------------------------------- the Deployment


def test_one_replica_recreate(default: list[dict[str, Any]], namespaced: list[dict[str, Any]]) -> None:
    """kopf has no per-object locks: never two operators, not even during a rollout."""
    for objects in (default, namespaced):
        spec = one(objects, "Deployment")["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}


def test_standby_replicas_need_leader_election(helm: Helm) -> None:
    spec = one(helm.render(sets=["replicaCount=2"]), "Deployment")["spec"]
    assert spec["replicas"] == 2 and spec["strategy"] == {"type": "Recreate"}
    proc = helm.run(*helm.template_args(sets=["replicaCount=2", "operator.leaderElection.enabled=false"]), check=False)
    assert proc.returncode != 0 and "replicaCount > 1 needs operator.leaderElection.enabled" in proc.stderr
    single = helm.render(sets=["operator.leaderElection.enabled=false"])
    assert env_of(one(single, "Deployment"))["FINETUNE_LEADER_ELECTION"] == "false"
    assert not find(single, "Role"), "no Lease access without leader election"


def test_operator_pod_meets_restricted_pss(default: list[dict[str, Any]], namespaced: list[dict[str, Any]]) -> None:
    for objects in (default, namespaced):
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        assert restricted_violations(pod) == []
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_probes_hit_the_health_port(default: list[dict[str, Any]]) -> None:
    container = one(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8080, "progress": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}  # the leader only
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"] == {"memory": "512Mi"}


def test_default_env(default: list[dict[str, Any]]) -> None:
    env = env_of(one(default, "Deployment"))
    assert set(env) == OPERATOR_ENV
    assert env["FINETUNE_NAMESPACES"] == ""
    assert env["FINETUNE_TRAINER_IMAGE"] == f"ghcr.io/finetune-operator/finetune-trainer:{__version__}"
    assert env["FINETUNE_START_TIMEOUT_SECONDS"] == "300"
    assert env["FINETUNE_ALLOWED_REGISTRIES"] == ""
    assert env["FINETUNE_PROGRESS_URL"] == "http://ft-finetune-operator.finetune-system.svc:8081"
    assert env["FINETUNE_PROGRESS_KEY"] == {"secretKeyRef": {"name": "ft-finetune-operator-progress-key",
                                                             "key": "key"}}
    assert env["FINETUNE_PEERING"] == ""
    assert env["FINETUNE_KUEUE"] == "false"
    assert (env["FINETUNE_LEADER_ELECTION"], env["FINETUNE_LEASE_NAME"]) == ("true", "ft-finetune-operator")
    assert (env["FINETUNE_LOG_LEVEL"], env["FINETUNE_LOG_FORMAT"]) == ("INFO", "json")
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert (env["FINETUNE_PREFLIGHT"], env["FINETUNE_PREFLIGHT_CPU"], env["FINETUNE_PREFLIGHT_MEMORY"],
            env["FINETUNE_PREFLIGHT_NODE_SELECTOR"], env["FINETUNE_PREFLIGHT_TOLERATIONS"],
            env["FINETUNE_PREFLIGHT_QUEUE"]) == ("true", "250m", "2Gi", "", "", "")
    image = one(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/finetune-operator/finetune-operator:{__version__}"


def test_preflight_values_reach_the_operator(helm: Helm) -> None:
    """The pre-flight's placement and queue, from values to the settings the operator parses."""
    settings = pytest.importorskip("finetune_operator.settings")
    objects = helm.render(sets=["preflight.enabled=false", "preflight.memory=3Gi", "preflight.nodeSelector.pool=cpu",
                                "preflight.nodeSelector.zone=a", "preflight.tolerations[0].key=cpu-only",
                                "preflight.tolerations[0].operator=Exists", "preflight.queueName=cpu-queue"])
    env = {k: v for k, v in env_of(one(objects, "Deployment")).items() if isinstance(v, str)}
    parsed = settings.Settings.from_env({**env, "FINETUNE_PROGRESS_KEY": "k" * 48})
    assert (parsed.preflight, parsed.preflight_memory, parsed.preflight_node_selector, parsed.preflight_queue) == (
        False, "3Gi", (("pool", "cpu"), ("zone", "a")), "cpu-queue")
    assert json.loads(parsed.preflight_tolerations) == [{"key": "cpu-only", "operator": "Exists"}]


def test_env_is_what_the_operator_reads(default: list[dict[str, Any]]) -> None:
    """Every FINETUNE_* variable the chart sets parses with the operator's own settings loader."""
    env = {k: v for k, v in env_of(one(default, "Deployment")).items() if isinstance(v, str)}
    env["FINETUNE_PROGRESS_KEY"] = "k" * 48
    parsed = settings.Settings.from_env(env)
    assert parsed.clusterwide
    assert parsed.progress_url == "http://ft-finetune-operator.finetune-system.svc:8081"
    assert parsed.trainer_image == f"ghcr.io/finetune-operator/finetune-trainer:{__version__}"
    assert parsed.log_format == "json"
    source = (CHART.parents[1] / "operator" / "finetune_operator" / "settings.py").read_text()
    unknown = {n for n in env if n.startswith("FINETUNE_") and f'"{n}"' not in source}
    assert unknown == set(), "the chart sets variables the operator never reads"


def test_non_default_env(namespaced: list[dict[str, Any]]) -> None:
    deployment = one(namespaced, "Deployment", "ftop")
    env = env_of(deployment)
    assert env["FINETUNE_NAMESPACES"] == "team-a,team-b"
    assert env["FINETUNE_TRAINER_IMAGE"] == "registry.example.com/ml/finetune-trainer:0.1.0-cuda12"
    assert env["FINETUNE_ALLOWED_REGISTRIES"] == "registry.example.com/ml/,ghcr.io/finetune-operator/"
    assert env["FINETUNE_PROGRESS_URL"] == "https://progress.example.com:8443"
    assert env["FINETUNE_PROGRESS_KEY"] == {"secretKeyRef": {"name": "finetune-progress-key", "key": "hmac"}}
    assert env["FINETUNE_PEERING"] == "finetune"
    assert env["FINETUNE_METRICS_PORT"] == "19090"
    assert env["HTTPS_PROXY"] == "http://proxy.example.com:3128"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == (
        "registry.example.com/ml/finetune-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert pod["serviceAccountName"] == "finetune-sa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
    assert not find(namespaced, "Secret"), "an existing key Secret must not be replaced"


def test_progress_key_secret(default: list[dict[str, Any]]) -> None:
    secret = one(default, "Secret", "ft-finetune-operator-progress-key")
    assert len(secret["data"]["key"]) == 64  # base64 of 48 random characters: above the operator's 16-byte minimum


def test_service_exposes_metrics_and_progress(default: list[dict[str, Any]]) -> None:
    service = one(default, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"metrics": 9090, "progress": 8081}
    pod_labels = one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# ------------------------------------------------------------------------------------------------------- RBAC


def _rules(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(g, r, v) for rule in obj.get("rules", []) for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]]


def test_no_wildcards_anywhere(default: list[dict[str, Any]], namespaced: list[dict[str, Any]]) -> None:
    for objects in (default, namespaced):
        for obj in find(objects, "ClusterRole") + find(objects, "Role"):
            for group, resource, verb in _rules(obj):
                assert "*" not in (group, resource, verb), obj["metadata"]["name"]


def test_secrets_are_never_readable(default: list[dict[str, Any]], namespaced: list[dict[str, Any]]) -> None:
    for objects in (default, namespaced):
        for obj in find(objects, "ClusterRole") + find(objects, "Role"):
            verbs = {v for g, r, v in _rules(obj) if g == "" and r == "secrets"}
            assert verbs <= {"create"}, obj["metadata"]["name"]


def test_clusterwide_mode_uses_one_clusterrole(default: list[dict[str, Any]]) -> None:
    rules = set(_rules(one(default, "ClusterRole", "ft-finetune-operator")))
    assert ("batch", "jobs", "create") in rules
    assert ("finetune.dev", "finetunejobs/status", "patch") in rules
    assert ("kopf.dev", "clusterkopfpeerings", "patch") not in rules  # peering off by default
    binding = one(default, "ClusterRoleBinding", "ft-finetune-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ft-finetune-operator",
                                    "namespace": "finetune-system"}]
    # the only Role: the Lease, in the release namespace
    assert [(r["metadata"]["namespace"], r["metadata"]["name"]) for r in find(default, "Role")] == [
        ("finetune-system", "ft-finetune-operator-leader")]


def test_operator_never_writes_spec_or_reads_cluster_scope(default: list[dict[str, Any]]) -> None:
    """No update/patch on finetunejobs (GitOps: the spec is the user's), no CRD, Namespace or Node access."""
    rules = set(_rules(one(default, "ClusterRole", "ft-finetune-operator")))
    assert {v for g, r, v in rules if r == "finetunejobs"} == {"list", "watch"}
    assert {v for g, r, v in rules if r == "finetunejobs/finalizers"} == {"update"}
    assert {r for _, r, _ in rules} <= {"finetunejobs", "finetunejobs/status", "finetunejobs/finalizers", "jobs",
                                        "pods", "pods/eviction", "configmaps", "services", "secrets", "events"}


def test_kueue_workloads_are_granted_only_with_kueue_enabled(default: list[dict[str, Any]], helm: Helm) -> None:
    """The rules come from operator/finetune_operator/kinds.py; Kueue's Workloads only with `kueue.enabled`, and then
    list, watch and patch (spec.active: a user suspend), nothing else."""
    from finetune_operator import kinds

    rules = set(_rules(one(default, "ClusterRole", "ft-finetune-operator")))
    assert not [r for g, r, v in rules if g == "kueue.x-k8s.io"]
    assert rules == {(g, r, v) for rule in kinds.rules() for g in rule["apiGroups"] for r in rule["resources"]
                     for v in rule["verbs"]}
    enabled = helm.render(sets=["kueue.enabled=true"])
    rules = set(_rules(one(enabled, "ClusterRole", "ft-finetune-operator")))
    assert {(r, v) for g, r, v in rules if g == "kueue.x-k8s.io"} == {("workloads", v) for v in ("list", "watch",
                                                                                                  "patch")}
    assert env_of(one(enabled, "Deployment"))["FINETUNE_KUEUE"] == "auto"


def test_leader_election_role_is_pinned_to_its_lease(default: list[dict[str, Any]]) -> None:
    role = one(default, "Role", "ft-finetune-operator-leader")
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["ft-finetune-operator"],
         "verbs": ["get", "update"]},
    ]
    binding = one(default, "RoleBinding", "ft-finetune-operator-leader")
    assert binding["roleRef"]["name"] == "ft-finetune-operator-leader"


def test_namespaced_mode_uses_a_role_per_namespace(namespaced: list[dict[str, Any]]) -> None:
    roles = [r for r in find(namespaced, "Role") if r["metadata"]["name"] == "ftop"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    operator_cluster_roles = [r for r in find(namespaced, "ClusterRole")
                              if not r["metadata"]["name"].endswith(("-edit", "-view"))]
    assert operator_cluster_roles == [], "single-namespace mode must grant nothing cluster-wide"
    assert not find(namespaced, "ClusterRoleBinding")
    for role in roles:
        rules = set(_rules(role))
        assert ("batch", "jobs", "create") in rules
        assert ("kopf.dev", "kopfpeerings", "patch") in rules
    bindings = [b for b in find(namespaced, "RoleBinding") if b["metadata"]["name"] == "ftop"]
    assert len(bindings) == 2
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "finetune-sa", "namespace": "platform"}]
    one(namespaced, "Role", "ftop-leader", namespace="platform")


def test_namespaced_and_clusterwide_rules_are_the_same_list(default: list[dict[str, Any]],
                                                            namespaced: list[dict[str, Any]]) -> None:
    clusterwide = set(_rules(one(default, "ClusterRole", "ft-finetune-operator")))
    per_namespace = set(_rules(one(namespaced, "Role", "ftop", namespace="team-a")))
    peering = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert clusterwide == per_namespace - peering


def test_tenant_roles_aggregate(default: list[dict[str, Any]], helm: Helm) -> None:
    edit = one(default, "ClusterRole", "ft-finetune-operator-edit")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert ("finetune.dev", "finetunejobs", "create") in _rules(edit)
    assert not any(r == "finetunejobs/status" and v in ("patch", "update") for _, r, v in _rules(edit))
    view = one(default, "ClusterRole", "ft-finetune-operator-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {v for _, _, v in _rules(view)} == {"get", "list", "watch"}
    minimal = helm.render(["minimal.yaml"])
    assert not find(minimal, "ClusterRole", "ft-finetune-operator-edit")
    assert not find(minimal, "ServiceAccount")
    assert one(minimal, "ClusterRoleBinding")["subjects"][0]["name"] == "platform-provided-sa"


def test_service_account_name_required_without_create(helm: Helm) -> None:
    proc = helm.run(*helm.template_args(sets=["serviceAccount.create=false"]), check=False)
    assert proc.returncode != 0 and "serviceAccount.name is required" in proc.stderr


def test_peering_objects_are_post_install_hooks(helm: Helm, namespaced: list[dict[str, Any]]) -> None:
    peerings = find(namespaced, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    for p in peerings:
        assert p["metadata"]["name"] == "finetune"
        assert p["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    clusterwide = helm.render(sets=["operator.peering.enabled=true"])
    peering = one(clusterwide, "ClusterKopfPeering", "ft-finetune-operator")
    assert "helm.sh/hook" in peering["metadata"]["annotations"]
    rules = set(_rules(one(clusterwide, "ClusterRole", "ft-finetune-operator")))
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in rules
    assert env_of(one(clusterwide, "Deployment"))["FINETUNE_PEERING"] == "ft-finetune-operator"


# ------------------------------------------------------------------------------------------------- network policy


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector evaluated the way the API does (matchLabels and matchExpressions, ANDed)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def test_network_policy_is_off_by_default(default: list[dict[str, Any]]) -> None:
    assert not find(default, "NetworkPolicy")


def test_network_policy_admits_trainer_pods_of_watched_namespaces_only(namespaced: list[dict[str, Any]]) -> None:
    from finetune_operator import builders

    policy = one(namespaced, "NetworkPolicy")
    deployment = one(namespaced, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"], pod_labels), "the policy must select the operator pods"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert set(rules) == ports == {"progress", "metrics", "health"}, "every named port exists on the container"

    (peer,) = rules["progress"]["from"]
    trainer = builders.labels(builders.Owner(name="bert-sst2", namespace="team-a", uid="u"))
    assert _selects(peer["podSelector"], trainer), "the labels the operator gives trainer pods must be admitted"
    assert not _selects(peer["podSelector"], {"app": "curl"})
    assert not _selects(peer["podSelector"], pod_labels)
    namespaces = peer["namespaceSelector"]
    for ns, admitted in (("team-a", True), ("team-b", True), ("team-c", False)):
        assert _selects(namespaces, {"kubernetes.io/metadata.name": ns}) is admitted, ns
    assert rules["metrics"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert "from" not in rules["health"], "kubelet probes come from the node"


def test_network_policy_cluster_wide_admits_every_namespace(helm: Helm) -> None:
    policy = one(helm.render(sets=["networkPolicy.enabled=true"]), "NetworkPolicy")
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert rules["progress"]["from"][0]["namespaceSelector"] == {}
    assert "from" not in rules["metrics"], "no metricsFrom: any scraper"


# ------------------------------------------------------------------------------------------------- monitoring


def test_monitoring_needs_the_capability(helm: Helm) -> None:
    """Enabled but no monitoring.coreos.com/v1 in the cluster: nothing rendered (and NOTES warns)."""
    sets = ["metrics.serviceMonitor.enabled=true", "metrics.prometheusRule.enabled=true"]
    assert not find(helm.render(sets=sets), "ServiceMonitor")
    assert not find(helm.render(sets=sets), "PrometheusRule")
    assert not find(helm.render(api_versions=MONITORING_APIS), "ServiceMonitor"), "rendered although disabled"


def test_service_monitor(namespaced: list[dict[str, Any]]) -> None:
    monitor = one(namespaced, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # honorLabels: per-job series keep the job's namespace in `namespace` (not exported_namespace)
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "honorLabels": True,
                                             "interval": "15s", "scrapeTimeout": "5s"}]
    service = one(namespaced, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["platform"]}


def test_prometheus_rule_alerts(namespaced: list[dict[str, Any]]) -> None:
    rule = one(namespaced, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"FineTuneJobFailed", "FineTuneJobStuckPending", "FineTuneJobNoProgress",
                           "FineTuneOperatorReconcileErrors", "FineTuneOperatorDown"}
    assert alerts["FineTuneJobStuckPending"]["for"] == "10m"
    assert "finetune_job_step[30m]" in alerts["FineTuneJobNoProgress"]["expr"]
    assert alerts["FineTuneJobFailed"]["annotations"]["summary"] == \
        "FineTuneJobs failed in namespace {{ $labels.namespace }}", "Prometheus templates must survive Helm"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["expr"].count("(") == alert["expr"].count(")")


def _metric_names(promql: str) -> set[str]:
    return {m for m in re.findall(r"\b(finetune_[a-z0-9_]+)", promql)}


def _expressions(namespaced: list[dict[str, Any]]) -> list[str]:
    rule = one(namespaced, "PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    board = json.loads(one(namespaced, "ConfigMap", "ftop-dashboard")["data"]["finetune-operator.json"])
    exprs += [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard(namespaced: list[dict[str, Any]], default: list[dict[str, Any]]) -> None:
    assert not find(default, "ConfigMap")
    cm = one(namespaced, "ConfigMap", "ftop-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    board = json.loads(cm["data"]["finetune-operator.json"])
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Jobs by phase", "Progress (optimizer step)", "Training loss", "Samples per second",
                   "GPU-hours per namespace (time range)"):
        assert wanted in titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert "{{namespace}}/{{name}}" in cm["data"]["finetune-operator.json"], "Grafana legends must survive Helm"


def test_metric_names_exist_in_the_operator(namespaced: list[dict[str, Any]]) -> None:
    """Alerts and panels on a metric the operator does not export would stay silent forever."""
    source = metrics.__file__ and open(metrics.__file__).read()  # noqa: SIM115 - read once
    exported = set(re.findall(r"[\"'](finetune_[a-z0-9_]+)[\"']", source))
    used = set().union(*(_metric_names(e) for e in _expressions(namespaced)))
    # prometheus_client adds _total/_bucket/_count/_sum to counters and histograms
    base = {re.sub(r"_(total|bucket|count|sum|created)$", "", m) for m in used}
    missing = {m for m in base if m not in exported and f"{m}_total" not in exported}
    assert missing == set(), f"used but not exported by operator/finetune_operator/metrics.py: {sorted(missing)}"


# ------------------------------------------------------------------------------------------------------ names


def test_names_fit_and_labels_are_consistent(helm: Helm) -> None:
    objects = helm.render(release="team-" + "x" * 48)  # Helm's longest release name: 53 characters
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", obj["kind"]
        for value in labels.values():
            assert len(value) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]?", value), value


def test_every_document_is_namespaced_correctly(default: list[dict[str, Any]]) -> None:
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for obj in default:
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], obj["kind"]
        else:
            assert obj["metadata"]["namespace"] == "finetune-system", obj["kind"]


def test_template_output_is_plain_yaml(helm: Helm) -> None:
    """No stray template text or tabs; every document parses and has apiVersion/kind/metadata.name."""
    text = helm.template(["namespaced.yaml"], api_versions=MONITORING_APIS)
    assert "\t" not in text and "<no value>" not in text
    for doc in yaml.safe_load_all(text):
        if doc:
            assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"]["name"]


def test_packaged_chart_renders_the_same(helm: Helm, tmp_path: Path) -> None:
    """What `helm package` ships (minus .helmignore'd files) renders like the source folder, dashboard included."""
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("finetune-operator-*.tgz")
    sets = ["metrics.dashboard.enabled=true", "progressKey.existingSecret=key"]  # no random key: outputs comparable
    args = helm.template_args(sets=sets)
    packaged = helm.run(*[str(archive) if a == str(CHART) else a for a in args]).stdout
    assert packaged == helm.template(sets=sets)
