"""Small frozen summaries of the Jobs and Pods the operator watches.

The watch caches hold these instead of whole objects: a thousand jobs with their pods stay a few megabytes, and
the state machine reads exactly the facts it needs, so tests build them directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from finetune_api import names
from finetune_operator.builders import GPU_RESOURCE
from finetune_operator.labels import (
    JOB_COMPLETION_INDEX,
    JOB_CONTROLLER_UID,
    JOB_NAME,
    KUEUE_QUEUE,
    SPEC_HASH,
    SUSPENDED_BY,
)


def controller_uid(meta: dict[str, Any], kind: str | None = None) -> str | None:
    """uid of the object's controller owner (optionally only when it is of `kind`)."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and (kind is None or ref.get("kind") == kind):
            return ref.get("uid")
    return None


@dataclass(frozen=True)
class JobCondition:
    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class JobView:
    """What the operator needs from a batch/v1 Job."""

    name: str
    namespace: str
    uid: str
    owner_uid: str | None
    suspend: bool = False
    backoff_limit: int | None = None
    active_deadline_seconds: int | None = None
    queue_name: str | None = None
    suspended_by: str | None = None  # the operator's mark on a suspension of its own (suspend_owner.py)
    completions: int = 1
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    conditions: tuple[JobCondition, ...] = ()
    start_time: str | None = None
    completion_time: str | None = None
    created: str | None = None
    spec_hash: str | None = None  # the pre-flight Job's: the spec it checked
    deleting: bool = False

    def condition(self, type_: str) -> JobCondition | None:
        for c in self.conditions:
            if c.type == type_ and c.status == "True":
                return c
        return None

    @property
    def success(self) -> JobCondition | None:
        """The condition saying the Job succeeded: `Complete`, or `SuccessCriteriaMet`, which the Job controller
        sets first, while it still stops the remaining pods (Kubernetes 1.31+)."""
        return self.condition("Complete") or self.condition("SuccessCriteriaMet")

    @property
    def failure(self) -> JobCondition | None:
        """The condition saying the Job failed: `Failed`, or `FailureTarget`, set first while pods are stopped."""
        return self.condition("Failed") or self.condition("FailureTarget")

    @property
    def finished(self) -> bool:
        """The outcome is decided: nothing the operator does to the Job or its children can change it any more."""
        return self.success is not None or self.failure is not None

    @property
    def live_spec(self) -> dict[str, Any]:
        return {"suspend": self.suspend, "backoffLimit": self.backoff_limit,
                "activeDeadlineSeconds": self.active_deadline_seconds}


@dataclass(frozen=True)
class PodView:
    """What the operator needs from one trainer pod."""

    name: str
    uid: str
    job_uid: str | None
    index: int = 0
    phase: str = "Pending"
    node: str | None = None
    deleting: bool = False
    gpus: int = 0
    unschedulable: str | None = None  # the scheduler's message
    waiting_reason: str | None = None
    waiting_message: str | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None
    terminated_message: str | None = None
    disrupted: bool = False
    started_at: str | None = None
    finished_at: str | None = None
    created: str | None = None
    image: str | None = None  # the trainer container's image, as the pod spec names it
    accepted_at: str | None = None  # status.startTime: when the kubelet took the pod on and began to start it


def summarize_job(body: dict[str, Any]) -> JobView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    conds = tuple(
        JobCondition(type=c.get("type", ""), status=c.get("status", ""), reason=c.get("reason") or "",
                     message=c.get("message") or "")
        for c in status.get("conditions") or []
    )
    return JobView(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
        owner_uid=controller_uid(meta, names.KIND),
        suspend=bool(spec.get("suspend")),
        backoff_limit=spec.get("backoffLimit"),
        active_deadline_seconds=spec.get("activeDeadlineSeconds"),
        queue_name=(meta.get("labels") or {}).get(KUEUE_QUEUE),
        suspended_by=(meta.get("annotations") or {}).get(SUSPENDED_BY),
        completions=int(spec.get("completions") or 1),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        conditions=conds,
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        created=meta.get("creationTimestamp"),
        spec_hash=(meta.get("annotations") or {}).get(SPEC_HASH),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _gpus(spec: dict[str, Any]) -> int:
    total = 0
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE)
        with contextlib.suppress(TypeError, ValueError):
            total += int(value or 0)
    return total


def summarize_pod(body: dict[str, Any]) -> PodView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    unschedulable = None
    disrupted = False
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            unschedulable = c.get("message") or "the scheduler found no node for the pod"
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            disrupted = True
    waiting_reason = waiting_message = None
    exit_code = term_reason = term_message = None
    started_at = finished_at = None
    statuses = status.get("containerStatuses") or []
    for cs in statuses:
        state = cs.get("state") or {}
        if "waiting" in state:
            waiting_reason = state["waiting"].get("reason")
            waiting_message = state["waiting"].get("message")
        if "running" in state:
            started_at = state["running"].get("startedAt")
        if "terminated" in state:
            t = state["terminated"]
            exit_code = t.get("exitCode")
            term_reason = t.get("reason")
            term_message = t.get("message")
            started_at = t.get("startedAt") or started_at
            finished_at = t.get("finishedAt")
        break  # one container: the trainer
    try:
        index = int(annotations.get(JOB_COMPLETION_INDEX) or labels.get(JOB_COMPLETION_INDEX) or 0)
    except ValueError:
        index = 0
    return PodView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        job_uid=labels.get(JOB_CONTROLLER_UID) or controller_uid(meta, "Job"),
        index=index,
        phase=status.get("phase") or "Pending",
        node=spec.get("nodeName"),
        deleting=bool(meta.get("deletionTimestamp")),
        gpus=_gpus(spec),
        unschedulable=unschedulable,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        exit_code=exit_code,
        terminated_reason=term_reason,
        terminated_message=term_message,
        disrupted=disrupted,
        started_at=started_at if (started_at or status.get("phase") != "Running") else status.get("startTime"),
        finished_at=finished_at,
        created=meta.get("creationTimestamp"),
        image=next((c.get("image") for c in spec.get("containers") or []), None),
        accepted_at=status.get("startTime"),
    )


@dataclass(frozen=True)
class ConfigMapView:
    """What the operator needs from its ConfigMap: identity, owner, and a digest of `data` (drift detection)."""

    name: str
    uid: str
    owner_uid: str | None
    data_digest: str
    deleting: bool = False


@dataclass(frozen=True)
class ServiceView:
    """What the operator needs from its Service: identity, owner, and the fields the builders set."""

    name: str
    uid: str
    owner_uid: str | None
    shape: tuple[Any, ...]
    deleting: bool = False


def data_digest(data: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(data or {}, sort_keys=True).encode()).hexdigest()


def service_shape(spec: dict[str, Any] | None) -> tuple[Any, ...]:
    """The parts of a Service spec the operator sets, normalised (the API server fills in the rest)."""
    spec = spec or {}
    ports = tuple(sorted((p.get("name") or "", int(p.get("port") or 0), str(p.get("targetPort", p.get("port"))),
                          p.get("protocol") or "TCP") for p in spec.get("ports") or []))
    return (spec.get("clusterIP"), bool(spec.get("publishNotReadyAddresses")),
            tuple(sorted((spec.get("selector") or {}).items())), ports)


def summarize_configmap(body: dict[str, Any]) -> ConfigMapView:
    meta = body.get("metadata") or {}
    return ConfigMapView(name=meta.get("name", ""), uid=meta.get("uid", ""),
                         owner_uid=controller_uid(meta, names.KIND), data_digest=data_digest(body.get("data")),
                         deleting=bool(meta.get("deletionTimestamp")))


def summarize_service(body: dict[str, Any]) -> ServiceView:
    meta = body.get("metadata") or {}
    return ServiceView(name=meta.get("name", ""), uid=meta.get("uid", ""),
                       owner_uid=controller_uid(meta, names.KIND), shape=service_shape(body.get("spec")),
                       deleting=bool(meta.get("deletionTimestamp")))


@dataclass(frozen=True)
class Eviction:
    """One entry of a Workload's eviction statistics: why, and how often."""

    reason: str
    cause: str = ""  # Kueue's underlyingCause (e.g. RequeuingLimitExceeded for a Deactivated eviction)
    count: int = 0


@dataclass(frozen=True)
class WorkloadView:
    """What the operator needs from Kueue's Workload of its Job (kueue.x-k8s.io/v1beta2)."""

    name: str
    uid: str
    job_uid: str | None  # the Job that owns it (controller reference)
    queue_name: str | None = None  # the LocalQueue
    active: bool = True  # spec.active: false once deactivated (a user suspend, or Kueue's requeuing limit)
    suspended_by: str | None = None  # the operator's mark when it deactivated the Workload
    priority_class: str | None = None
    cluster_queue: str | None = None  # from the admission (quota reserved)
    flavors: tuple[tuple[str, str], ...] = ()  # (resource, ResourceFlavor) of the admission, every pod set
    conditions: tuple[JobCondition, ...] = ()
    evictions: tuple[Eviction, ...] = ()
    requeue_at: str | None = None  # when a PodsReady-timeout backoff ends
    deleting: bool = False

    def condition(self, type_: str) -> JobCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def is_true(self, type_: str) -> bool:
        c = self.condition(type_)
        return c is not None and c.status == "True"

    @property
    def requeues(self) -> int:
        """Times Kueue evicted the workload (preemption, PodsReady timeout, ...), each sending it back to its queue."""
        return sum(e.count for e in self.evictions)


def summarize_workload(body: dict[str, Any]) -> WorkloadView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    admission = status.get("admission") or {}
    flavors = sorted({(res, flavor) for ps in admission.get("podSetAssignments") or []
                      for res, flavor in (ps.get("flavors") or {}).items()})
    return WorkloadView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        job_uid=controller_uid(meta, "Job"),
        queue_name=spec.get("queueName") or None,
        active=spec.get("active", True) is not False,
        suspended_by=(meta.get("annotations") or {}).get(SUSPENDED_BY),
        priority_class=(spec.get("priorityClassRef") or {}).get("name"),
        cluster_queue=admission.get("clusterQueue"),
        flavors=tuple(flavors),
        conditions=tuple(JobCondition(type=c.get("type", ""), status=c.get("status", ""),
                                      reason=c.get("reason") or "", message=c.get("message") or "")
                         for c in status.get("conditions") or []),
        evictions=tuple(Eviction(reason=e.get("reason", ""), cause=e.get("underlyingCause") or "",
                                 count=int(e.get("count") or 0))
                        for e in (status.get("schedulingStats") or {}).get("evictions") or []),
        requeue_at=(status.get("requeueState") or {}).get("requeueAt"),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def workload_key(body: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, FineTuneJob name) of a Workload owned by a Job: the operator names each Job after its FineTuneJob.
    A Workload of someone else's Job maps to a key too; the cache read keeps only the one owned by the job's Job."""
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1":
            return meta.get("namespace", ""), ref.get("name", "")
    return None


def owner_key(body: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, FineTuneJob name) of a watched child, from the operator's label."""
    meta = body.get("metadata") or {}
    name = (meta.get("labels") or {}).get(JOB_NAME)
    return (meta.get("namespace", ""), name) if name else None
