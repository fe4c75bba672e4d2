"""Pure builders: every child object of a FineTuneJob as a plain dict, from the spec and the operator's settings.

Nothing here talks to the API, reads the clock or the environment, so the same inputs give byte-identical objects
(tests compare whole objects) and a restarted operator rebuilds exactly what it created before. Names are
deterministic, so a second create answers 409 instead of making a duplicate.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from finetune_api import exitcodes, kubeyaml, names
from finetune_api import trainer_env as env_names
from finetune_api.progress import progress_path
from finetune_api.spec import FineTuneJobSpec, SecretKeyRef, checkpoint_storage
from finetune_operator import suspend_owner
from finetune_operator.labels import (
    CONFIG,
    KUEUE_PREFERRED_TOPOLOGY,
    KUEUE_PRIORITY,
    KUEUE_QUEUE,
    KUEUE_REQUIRED_TOPOLOGY,
    PROGRESS_TOKEN,
    RENDEZVOUS,
    SUSPENDED_BY,
    TRAINER,
    child_labels,
    selector,
)

CONTAINER = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
CONFIG_DIR = "/etc/finetune"
CONFIG_KEY = "job.yaml"
PVC_ROOT = "/mnt/pvc"
TOKEN_KEY = "token"
TRAINER_METRICS_PORT = 9400
RENDEZVOUS_PORT = 29500
RUN_AS_USER = 1000


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob the children belong to."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class PreflightContext:
    """The operator settings that shape the pre-flight pod (preflight.py)."""

    enabled: bool = True
    cpu: str = "250m"  # request only: it may use what the node has free
    memory: str = "2Gi"  # request and limit
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: str = ""  # a JSON list of Kubernetes tolerations, as the setting gives it
    queue_name: str | None = None  # a Kueue LocalQueue for pre-flights (CPU quota only)


@dataclass(frozen=True)
class BuildContext:
    """The operator settings that shape children (kept apart from Settings so builders stay trivially testable)."""

    trainer_image: str
    progress_url: str  # base URL; the job's path is appended
    grace_period_seconds: int = 120
    preflight: PreflightContext = PreflightContext()


def job_name(owner: Owner) -> str:
    return owner.name


def service_name(owner: Owner) -> str:
    return owner.name


def configmap_name(owner: Owner) -> str:
    return f"{owner.name}-config"


def secret_name(owner: Owner) -> str:
    return f"{owner.name}-progress"


def progress_url(ctx: BuildContext, owner: Owner) -> str:
    return ctx.progress_url.rstrip("/") + progress_path(owner.namespace, owner.name)


def labels(owner: Owner, component: str = TRAINER) -> dict[str, str]:
    return child_labels(owner.name, component)


def owner_reference(owner: Owner) -> dict[str, Any]:
    """Controller reference: garbage collection deletes the children with the FineTuneJob, no finalizer needed."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(owner: Owner, name: str, component: str,
                   extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner, component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }


def trainer_manifest(owner: Owner, spec: FineTuneJobSpec) -> dict[str, Any]:
    """The FineTuneJob as the trainer reads it: identity plus the spec with every default filled in."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
        "spec": spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }


def build_configmap(owner: Owner, spec: FineTuneJobSpec) -> dict[str, Any]:
    text = kubeyaml.dump(trainer_manifest(owner, spec))  # read back with kubeyaml.load_all by the trainer
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(owner, configmap_name(owner), CONFIG),
        "data": {CONFIG_KEY: text},
    }


def build_secret(owner: Owner, token: str, configmap_uid: str) -> dict[str, Any]:
    """The job's progress token; immutable because it is derived from the job's identity and never changes.

    Owned by the job's ConfigMap, not by the FineTuneJob: garbage collection then removes it with the ConfigMap
    (at the TTL clean-up or with the FineTuneJob), so the operator needs only `create` on Secrets, never `delete`.
    """
    meta = child_metadata(owner, secret_name(owner), PROGRESS_TOKEN)
    meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": configmap_name(owner),
                                "uid": configmap_uid, "controller": True, "blockOwnerDeletion": False}]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "immutable": True,
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def needs_service(spec: FineTuneJobSpec) -> bool:
    """Only a multi-pod job needs the rendezvous Service: one pod rendezvouses on 127.0.0.1, and skipping it saves a
    write per job and the EndpointSlice churn the Service would cause in the control plane."""
    return spec.resources.workers > 1


def build_service(owner: Owner) -> dict[str, Any]:
    """Headless Service: gives pod <job>-0 a DNS name for the torchrun rendezvous, before it is Ready.
    Built only for multi-pod jobs (needs_service)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, service_name(owner), RENDEZVOUS),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(owner.name),
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": TRAINER_METRICS_PORT, "targetPort": TRAINER_METRICS_PORT,
                 "protocol": "TCP"},
            ],
        },
    }


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by pvc:// locations -> read-only? Inputs are mounted read-only, storage read-write."""
    claims: dict[str, bool] = {}
    inputs = [spec.model.source, spec.model.init_from, spec.dataset.train, spec.dataset.validation]
    outputs = [checkpoint_storage(spec), spec.output.storage]
    for location, read_only in [*((loc, True) for loc in inputs), *((loc, False) for loc in outputs)]:
        if location and location.startswith("pvc://"):
            claim = location.removeprefix("pvc://").split("/", 1)[0]
            claims[claim] = claims.get(claim, True) and read_only
    return dict(sorted(claims.items()))


def secret_references(owner: Owner, spec: FineTuneJobSpec) -> tuple[tuple[str, str, str], ...]:
    """(what uses it, Secret, key) for every Secret the trainer pods read: each SecretKeyRef anywhere in the spec
    (by its field path), and the job's progress token. The operator cannot read Secrets; when a pod cannot start
    for want of one, this names it and the field that asked for it."""
    found: list[tuple[str, str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, SecretKeyRef):
            found.append((path, node.name, node.key))
        elif isinstance(node, BaseModel):
            for name, field in type(node).model_fields.items():
                walk(getattr(node, name), f"{path}.{field.alias or name}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(spec, "spec")
    return (*found, ("the operator's progress token", secret_name(owner), TOKEN_KEY))


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def trainer_env(owner: Owner, spec: FineTuneJobSpec, ctx: BuildContext) -> list[dict[str, Any]]:
    """Environment of the trainer container. Credentials (hub, s3, MLflow's URI and login) only as secretKeyRef:
    values never enter the Job."""
    env: list[dict[str, Any]] = [
        {"name": env_names.PVC_ROOT, "value": PVC_ROOT},
        {"name": env_names.METRICS_PORT, "value": str(TRAINER_METRICS_PORT)},
        {"name": env_names.PROGRESS_URL, "value": progress_url(ctx, owner)},
        {"name": env_names.PROGRESS_TOKEN,
         "valueFrom": {"secretKeyRef": {"name": secret_name(owner), "key": TOKEN_KEY}}},
        {"name": env_names.TERMINATION_LOG, "value": "/dev/termination-log"},
        {"name": env_names.GRACE_PERIOD, "value": str(ctx.grace_period_seconds)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    creds = spec.credentials
    if creds and creds.hub_token:
        env.append(_secret_env("HF_TOKEN", creds.hub_token))
    if creds and creds.s3:
        env.append(_secret_env("AWS_ACCESS_KEY_ID", creds.s3.access_key_id))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", creds.s3.secret_access_key))
        if creds.s3.session_token:
            env.append(_secret_env("AWS_SESSION_TOKEN", creds.s3.session_token))
        if creds.s3.endpoint_url:
            env.append({"name": "AWS_ENDPOINT_URL", "value": creds.s3.endpoint_url})
        if creds.s3.region:
            env.append({"name": "AWS_DEFAULT_REGION", "value": creds.s3.region})
    mlflow = spec.tracking.mlflow
    if mlflow:
        env.append(_secret_env(env_names.MLFLOW_TRACKING_URI, mlflow.tracking_uri))
        for name, ref in ((env_names.MLFLOW_TRACKING_USERNAME, mlflow.username),
                          (env_names.MLFLOW_TRACKING_PASSWORD, mlflow.password),
                          (env_names.MLFLOW_TRACKING_TOKEN, mlflow.token)):
            if ref is not None:
                env.append(_secret_env(name, ref))
    return env


def trainer_command(owner: Owner, spec: FineTuneJobSpec) -> list[str]:
    """One process: the trainer itself; else torchrun through the trainer's launcher, which exits with the workers'
    own code (plain torchrun exits 1 on any failure, hiding the permanent codes from the podFailurePolicy)."""
    workers = spec.resources.workers
    procs = max(spec.resources.gpus_per_worker, 1)
    if workers == 1 and procs == 1:
        return ["python", "-m", "finetune_trainer", f"{CONFIG_DIR}/{CONFIG_KEY}"]
    master = "127.0.0.1" if workers == 1 else f"{job_name(owner)}-0.{service_name(owner)}"
    return [
        "python",
        "-m",
        "finetune_trainer.launch",
        f"--nnodes={workers}",
        f"--nproc_per_node={procs}",
        "--node_rank=$(JOB_COMPLETION_INDEX)",
        f"--master_addr={master}",
        f"--master_port={RENDEZVOUS_PORT}",
        "-m",
        "finetune_trainer",
        f"{CONFIG_DIR}/{CONFIG_KEY}",
    ]


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    r = spec.resources
    amounts: dict[str, str] = {}
    if r.cpu is not None:
        amounts["cpu"] = str(r.cpu)
    if r.memory is not None:
        amounts["memory"] = str(r.memory)
    if r.gpus_per_worker:
        amounts[GPU_RESOURCE] = str(r.gpus_per_worker)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def volumes(owner: Owner, spec: FineTuneJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": configmap_name(owner)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for i, (claim, read_only) in enumerate(pvc_claims(spec).items()):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
    return volumes, mounts


def pod_failure_policy() -> dict[str, Any]:
    """Bad data/config/storage fails the Job at once; disruptions (eviction, preemption, node loss) cost no retry, and
    neither does a worker that only lost its peers (the failure that broke the group is counted on its own pod)."""
    return {
        "rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(exitcodes.PERMANENT)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "Ignore",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [exitcodes.PEER_LOST]}},
        ]
    }


def trainer_container(owner: Owner, spec: FineTuneJobSpec, ctx: BuildContext,
                      mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The one container of a trainer pod: restricted, read-only root, credentials only by reference."""
    r = spec.resources
    return {
        "name": CONTAINER,
        "image": r.image or ctx.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(owner, spec),
        "env": trainer_env(owner, spec, ctx),
        "ports": [
            {"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }


def container_security_context() -> dict[str, Any]:
    """Restricted: non-root, no privilege escalation, no capabilities, read-only root, RuntimeDefault seccomp."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_spec(owner: Owner, spec: FineTuneJobSpec, ctx: BuildContext) -> dict[str, Any]:
    """The trainer pods' spec: no service-account token, restricted security context, placement from the spec."""
    r = spec.resources
    pod_volumes, mounts = volumes(owner, spec)
    out: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": ctx.grace_period_seconds,
        "securityContext": pod_security_context(),
        "containers": [trainer_container(owner, spec, ctx, mounts)],
        "volumes": pod_volumes,
    }
    if needs_service(spec):
        out["subdomain"] = service_name(owner)
    if r.node_selector:
        out["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in r.tolerations]
    if r.priority_class_name:
        out["priorityClassName"] = r.priority_class_name
    return out


def kueue_labels(spec: FineTuneJobSpec) -> dict[str, str]:
    """The Job's Kueue labels: its LocalQueue and WorkloadPriorityClass."""
    rp = spec.run_policy
    out = {KUEUE_QUEUE: rp.queue_name} if rp.queue_name else {}
    if rp.priority_class:
        out[KUEUE_PRIORITY] = rp.priority_class
    return out


def topology_annotations(spec: FineTuneJobSpec) -> dict[str, str]:
    """Kueue's Topology-Aware Scheduling request on the pod template (its one pod set)."""
    topology = spec.resources.topology
    if topology is None:
        return {}
    if topology.required:
        return {KUEUE_REQUIRED_TOPOLOGY: topology.required}
    return {KUEUE_PREFERRED_TOPOLOGY: topology.preferred} if topology.preferred else {}


def build_job(owner: Owner, spec: FineTuneJobSpec, ctx: BuildContext) -> dict[str, Any]:
    r, rp = spec.resources, spec.run_policy
    suspend, mark = suspend_owner.at_creation(spec)
    template_meta: dict[str, Any] = {"labels": labels(owner)}
    if annotations := topology_annotations(spec):
        template_meta["annotations"] = annotations
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": r.workers,
        "parallelism": r.workers,
        "backoffLimit": rp.backoff_limit,
        "suspend": suspend,
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": template_meta, "spec": pod_spec(owner, spec, ctx)},
    }
    if rp.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = rp.active_deadline_seconds
    metadata = child_metadata(owner, job_name(owner), TRAINER, kueue_labels(spec))
    if mark is not None:
        metadata["annotations"] = {SUSPENDED_BY: mark}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def job_patch(spec: FineTuneJobSpec, current: dict[str, Any], suspend: bool | None = None,
              mark: str | None = None) -> dict[str, Any]:
    """The merge patch that brings a live Job's mutable fields to the spec; empty when nothing differs.

    `current` holds the Job's live backoffLimit and activeDeadlineSeconds. `suspend` is what suspend_owner decided
    (None: the operator does not hold the switch, or it is already right); it is written with the operator's mark
    (`mark`, or the mark removed), so that a suspension without the mark is known to be someone else's.
    """
    rp = spec.run_policy
    patch: dict[str, Any] = {}
    if suspend is not None:
        patch["spec"] = {"suspend": suspend}
        patch["metadata"] = {"annotations": {SUSPENDED_BY: mark}}
    edits = {}
    if current.get("backoffLimit") != rp.backoff_limit:
        edits["backoffLimit"] = rp.backoff_limit
    if current.get("activeDeadlineSeconds") != rp.active_deadline_seconds:
        edits["activeDeadlineSeconds"] = rp.active_deadline_seconds
    if edits:
        patch.setdefault("spec", {}).update(edits)
    return patch


def workload_patch(active: bool) -> dict[str, Any]:
    """Kueue's way to suspend a job it admits: deactivate its Workload (Kueue evicts it and frees the quota), marked as
    the operator's doing; activate it again to resume."""
    return {"spec": {"active": active},
            "metadata": {"annotations": {SUSPENDED_BY: None if active else suspend_owner.BY_USER}}}
