"""The pre-flight: a small CPU-only Job from the trainer image that checks a FineTuneJob before any GPU is requested.

Pure: the Job as a dict, and what its state means. The reconcile pass creates it (deterministic name
`<name>-preflight`, owned by the FineTuneJob) once the ConfigMap and the progress Secret exist, and creates the GPU
Job only after it succeeded for the spec as it is now: the Job carries a hash of the spec it checked, and one that
checked an older spec (edited before the job started) is deleted and made again. Its pod runs
`python -m finetune_trainer --preflight`, with the trainer pods' security context, volumes and Secrets, its own small
CPU and memory requests, no GPU and its own placement; what it found comes back as its termination message (the JSON
of `PreflightStatus`), read from the pod the operator already watches, so it survives an operator restart.

Under Kueue the pre-flight never waits behind GPU quota: it requests no GPU, and with `FINETUNE_PREFLIGHT_QUEUE` it
carries a LocalQueue of its own (a CPU-only ClusterQueue); without one it carries no queue label, and a Kueue that
manages Jobs without a queue name (manageJobsWithoutQueueName) would hold it suspended for ever: the job then says so
(`PreflightSuspended`) and names the setting. The operator never changes the pre-flight Job's `suspend`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from finetune_api import exitcodes
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import PreflightStatus
from finetune_operator import builders
from finetune_operator.labels import KUEUE_QUEUE, PREFLIGHT, SPEC_HASH
from finetune_operator.observe import JobView, PodView

BACKOFF_LIMIT = 1  # a crash (a storage hiccup) is tried once more; bad data or configuration fails at once
DEADLINE_SECONDS = 3600  # a pre-flight that hangs (an unreachable store) fails the job instead of waiting for ever
RUNNING, PASSED, FAILED, STALE, SUSPENDED = "Running", "Passed", "Failed", "Stale", "Suspended"


def job_name(owner: builders.Owner) -> str:
    return f"{owner.name}-preflight"


def required(spec: FineTuneJobSpec, ctx: builders.PreflightContext) -> bool:
    """Whether the job goes through a pre-flight: on unless the operator or the job's spec turned it off."""
    return ctx.enabled and spec.preflight.enabled


def spec_hash(spec: FineTuneJobSpec) -> str:
    """What the pre-flight checked: the spec without runPolicy (suspending or a new backoffLimit changes nothing it
    looked at). A pre-flight Job of another hash checked a spec that has since changed."""
    checked = spec.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"run_policy"})
    return hashlib.sha256(json.dumps(checked, sort_keys=True).encode()).hexdigest()[:16]


def command() -> list[str]:
    return ["python", "-m", "finetune_trainer", "--preflight", f"{builders.CONFIG_DIR}/{builders.CONFIG_KEY}"]


def build_job(owner: builders.Owner, spec: FineTuneJobSpec, ctx: builders.BuildContext) -> dict[str, Any]:
    """The pre-flight Job: one pod, the trainer pods' security context, volumes and Secrets, no GPU, its own requests
    and placement; bad data or configuration fails it at once (the trainer's exit codes)."""
    pf = ctx.preflight
    volumes, mounts = builders.volumes(owner, spec)
    container = {
        "name": builders.CONTAINER,
        "image": spec.resources.image or ctx.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": command(),
        "env": builders.trainer_env(owner, spec, ctx),
        "resources": {"requests": {"cpu": pf.cpu, "memory": pf.memory}, "limits": {"memory": pf.memory}},
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": builders.container_security_context(),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": builders.pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if pf.node_selector:
        pod["nodeSelector"] = dict(pf.node_selector)
    if pf.tolerations:
        pod["tolerations"] = [dict(t) for t in json.loads(pf.tolerations)]
    meta = builders.child_metadata(owner, job_name(owner), PREFLIGHT,
                                   {KUEUE_QUEUE: pf.queue_name} if pf.queue_name else None)
    meta["annotations"] = {SPEC_HASH: spec_hash(spec)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": DEADLINE_SECONDS,
            "podFailurePolicy": builders.pod_failure_policy(),
            "template": {"metadata": {"labels": builders.labels(owner, PREFLIGHT)}, "spec": pod},
        },
    }


@dataclass(frozen=True)
class PreflightView:
    """The pre-flight as one pass sees it."""

    state: str  # Running, Passed, Failed, Stale (it checked an older spec), Suspended (someone else holds it)
    job: JobView | None = None
    pods: tuple[PodView, ...] = ()
    report: PreflightStatus | None = None  # what it found, once it passed
    queue_name: str | None = None


def report_of(pods: tuple[PodView, ...]) -> PreflightStatus | None:
    """The findings of the pod that passed: its termination message, the JSON of PreflightStatus."""
    for pod in pods:
        if pod.phase == "Succeeded" and pod.exit_code == exitcodes.OK and pod.terminated_message:
            try:
                return PreflightStatus.model_validate_json(pod.terminated_message.strip())
            except ValidationError:
                continue
    return None


def view(job: JobView | None, pods: tuple[PodView, ...], current_hash: str) -> PreflightView | None:
    """What the pre-flight Job says about the spec as it is now; None when there is none yet."""
    if job is None:
        return None
    if job.spec_hash != current_hash or job.deleting:
        return PreflightView(STALE, job, pods)
    if job.success is not None:
        return PreflightView(PASSED, job, pods, report_of(pods))
    if job.failure is not None:
        return PreflightView(FAILED, job, pods)
    if job.suspend:
        return PreflightView(SUSPENDED, job, pods, queue_name=job.queue_name)
    return PreflightView(RUNNING, job, pods)
