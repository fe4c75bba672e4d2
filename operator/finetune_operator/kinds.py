"""Every kind the operator reads or writes, declared once.

One `Kind` says what the operator may do with a resource (its RBAC rule, with the reason), where it is on the API
(the request paths of k8s.py), and, for a watched kind, which cache it fills and how an object finds its FineTuneJob.
The kopf handlers register one watch and one index per watched kind, `Caches` holds one view per watched kind, k8s.py
routes requests by this table, and helm/chartgen.py writes the chart's rules from it (the chart's
`finetune-operator.namespacedRules`), so a new kind is one entry here. A kind of an `integration` (Kueue's
Workloads) is watched and granted only where that integration is enabled: the chart's `kueue.enabled`, and the
operator's `FINETUNE_KUEUE` when the API serves the kind.

Standard library only: helm/chartgen.py loads this file by its path, before the project is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

KUEUE = "kueue"  # the integration with Kueue: its Workloads are watched (read-only but for `spec.active`)
INTEGRATIONS = (KUEUE,)


@dataclass(frozen=True)
class Watch:
    """How a watched kind feeds its cache: kopf index `<cache>_by_owner`, `Caches.<cache>`."""

    cache: str
    summary: str  # the observe.py function that turns an object into the small view the cache keeps
    key: str  # the observe.py function that gives an object's FineTuneJob key (namespace, name), or None
    selected: bool = True  # watched through the children's label selector (Kueue's Workloads carry none of ours)


@dataclass(frozen=True)
class Sub:
    """A subresource the operator uses, with its own verbs."""

    name: str
    verbs: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    verbs: tuple[str, ...]  # what the operator may do with it: its RBAC rule
    why: str  # the rule's comment in the chart
    subresources: tuple[Sub, ...] = ()
    watch: Watch | None = None
    integration: str | None = None  # watched and granted only with this integration enabled
    leader: bool = False  # the leader-election Lease: granted by the chart's leader Role, in the operator's namespace

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        """The API path prefix: /api/v1 or /apis/<group>/<version>."""
        return f"/apis/{self.api_version}" if self.group else f"/api/{self.version}"


KINDS: tuple[Kind, ...] = (
    Kind("FineTuneJob", "finetune.dev", "v1alpha1", "finetunejobs", ("list", "watch"),
         "FineTuneJobs: kopf lists and watches them; the operator writes status only (never spec, never metadata).",
         subresources=(
             Sub("status", ("patch",), "The one status write of a reconcile pass."),
             Sub("finalizers", ("update",), "Children carry a blocking controller ownerReference to their "
                 "FineTuneJob; where the OwnerReferencesPermissionEnforcement admission plugin is on, that needs "
                 "update on the owner's finalizers."),
         )),
    Kind("Job", "batch", "v1", "jobs", ("get", "list", "watch", "create", "patch", "delete"),
         "The trainer's batch/v1 Job: watched through a label selector, created, patched (suspend, backoffLimit, "
         "deadline; never a Kueue-held suspend) and deleted after ttlSecondsAfterFinished; get only after a 409.",
         watch=Watch("jobs", "summarize_job", "owner_key")),
    Kind("Pod", "", "v1", "pods", ("list", "watch"),
         "The trainer pods: watched, never written. The surviving workers of a Kueue job whose torchrun group broke "
         "are evicted (Kueue holds the Job's suspend); an eviction is not a pod write.",
         subresources=(Sub("eviction", ("create",), "Evicting the survivors of a broken group under Kueue."),),
         watch=Watch("pods", "summarize_pod", "owner_key")),
    Kind("ConfigMap", "", "v1", "configmaps", ("get", "list", "watch", "create", "patch", "delete"),
         "The rendered spec the trainer reads: watched through the same label selector, so a deleted or hand-edited "
         "one is put back; get only after a 409.",
         watch=Watch("configmaps", "summarize_configmap", "owner_key")),
    Kind("Service", "", "v1", "services", ("get", "list", "watch", "create", "delete"),
         "The headless rendezvous Service of multi-node jobs: watched and repaired like the ConfigMap.",
         watch=Watch("services", "summarize_service", "owner_key")),
    Kind("Secret", "", "v1", "secrets", ("create",),
         "The per-job progress-token Secret: created, never read (garbage collection deletes it with its "
         "ConfigMap). No get/list/watch/delete, so no tenant Secret is readable or removable."),
    Kind("Event", "", "v1", "events", ("create", "list"),
         "Events on FineTuneJobs, and the Job controller's FailedCreate events (e.g. a pod refused by a quota)."),
    Kind("Workload", "kueue.x-k8s.io", "v1beta2", "workloads", ("list", "watch", "patch"),
         "Kueue's Workload of each Job: watched (no label selector: Kueue copies none of ours) for the queue, "
         "admission, flavors and evictions the status shows; patched only to set spec.active, which is how a "
         "user suspend frees the quota under Kueue.",
         watch=Watch("workloads", "summarize_workload", "workload_key", selected=False), integration=KUEUE),
    Kind("Lease", "coordination.k8s.io", "v1", "leases", ("create", "get", "update"),
         "Leader election: the operator's own Lease.", leader=True),
)


def by_kind(kind: str) -> Kind:
    return next(k for k in KINDS if k.kind == kind)


def watched(integrations: frozenset[str] | set[str] = frozenset()) -> tuple[Kind, ...]:
    """The kinds watched into caches, those of disabled integrations left out."""
    return tuple(k for k in KINDS if k.watch is not None and (k.integration is None or k.integration in integrations))


def rules(integrations: frozenset[str] | set[str] = frozenset()) -> list[dict[str, list[str]]]:
    """The operator's namespaced RBAC rules (a ClusterRole, or a Role per watched namespace) as plain dicts."""
    out: list[dict[str, list[str]]] = []
    for k in KINDS:
        if k.leader or (k.integration is not None and k.integration not in integrations):
            continue
        out.append({"apiGroups": [k.group], "resources": [k.plural], "verbs": list(k.verbs)})
        out += [{"apiGroups": [k.group], "resources": [f"{k.plural}/{s.name}"], "verbs": list(s.verbs)}
                for s in k.subresources]
    return out
