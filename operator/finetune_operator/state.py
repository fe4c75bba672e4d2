"""The phase and condition state machine: a pure function from what the operator observed to the new status.

`compute_status(previous, observation)` is all the policy there is; the controller only gathers the observation and
writes the result when it differs. Succeeded and Failed are final: later observations (a TTL-deleted Job, a fixed
image) never bring a finished job back to life.

Failures a kubelet reports without ending the pod are surfaced here too: a missing Secret or key
(CreateContainerConfigError) and an image that cannot be pulled (ErrImagePull, ImagePullBackOff) make the job
Pending with that reason at once, naming the Secret and key or the image, and fail it once a pod has waited
`start_timeout` seconds; an OOM kill is reported with the advice to raise `resources.memory`, retried once, and the
second fails the job. The operator then deletes the Job (`STOPS_THE_JOB`), whose pods hold their nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finetune_api import exitcodes
from finetune_api.progress import ProgressReport
from finetune_api.status import TERMINAL_PHASES, FineTuneJobStatus, OutputStatus
from finetune_api.times import humanize_eta, parse_time
from finetune_operator import conditions as cond
from finetune_operator import preflight as pf
from finetune_operator import queueing, suspend_owner
from finetune_operator.observe import JobCondition, JobView, PodView, WorkloadView
from finetune_operator.progress import apply_report

# Reasons (CamelCase, stable: dashboards and alerts match on them).
INVALID_SPEC = "InvalidSpec"
NAME_CONFLICT = "NameConflict"
STORAGE_CONFLICT = "StorageConflict"
JOB_CREATED = "JobCreated"
PODS_PENDING = "PodsPending"
PODS_RUNNING = "PodsRunning"
UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL = "ImagePullBackOff"
CONTAINER_CONFIG = "CreateContainerConfigError"
QUOTA_EXCEEDED = "QuotaExceeded"
FAILED_CREATE = "FailedCreate"
WEBHOOK_UNAVAILABLE = "AdmissionWebhookUnavailable"  # the Job create was refused: a webhook (Kueue's) did not answer
WAITING_FOR_ADMISSION = queueing.WAITING_FOR_ADMISSION
ADMITTED = queueing.ADMITTED
SUSPENDED = "Suspended"
RESUMED = "Resumed"
COMPLETED = "Completed"
BACKOFF_LIMIT = "BackoffLimitExceeded"
DEADLINE = "DeadlineExceeded"
POD_FAILURE_POLICY = "PodFailurePolicy"
RESTARTING_WORKERS = "RestartingWorkers"
CANCELLED = "Cancelled"
OOM_KILLED = "OOMKilled"
VALIDATING = "Validating"  # the pre-flight runs
PREFLIGHT_PASSED = "PreflightPassed"
PREFLIGHT_SUSPENDED = "PreflightSuspended"  # someone else (Kueue without a queue for it) holds the pre-flight Job
PREFLIGHT_QUEUED = "PreflightQueued"  # the pre-flight waits for Kueue to admit it through its own (CPU) LocalQueue
OOM_KILLS_TO_FAIL = 2  # the first OOM kill is retried (a leak or one long batch may not recur), the second fails
EXIT_REASONS = {
    exitcodes.DATA_ERROR: "DataError",
    exitcodes.CONFIG_ERROR: "ConfigError",
    exitcodes.STORAGE_ERROR: "StorageError",
}
IMAGE_WAIT_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                      "RegistryUnavailable", "SignatureValidationFailed")
# Failed reasons after which the Job is deleted (its pods hold their nodes; a Workload Kueue gave up on, its queue slot)
STOPS_THE_JOB = frozenset({IMAGE_PULL, CONTAINER_CONFIG, OOM_KILLED, queueing.REQUEUING_LIMIT})
MAX_TRAINER_MESSAGE = 4096
# The kubelet's words for a missing Secret or key (pkg/kubelet/kubelet_pods.go, the secret manager's NotFound).
_SECRET_MISSING = re.compile(r'secrets? "([^"]+)" not found')
_KEY_MISSING = re.compile(r"couldn't find key (\S+) in Secret [^/\s]+/(\S+)")
# How `_secret_problem` words a Secret or key it could name; `_named_secret` finds them again in a message.
_NO_KEY = "has no key"
_NO_SECRET = "does not exist"
_NAMED = re.compile(rf'cannot start: (Secret "[^"]+" ({_NO_SECRET}|{_NO_KEY} "[^"]+"))')
_PULL_PREFIX = re.compile(r'^(Back-off pulling image "[^"]*"(: )?)?((ErrImagePull|RegistryUnavailable|'
                          r'SignatureValidationFailed): )?')


@dataclass(frozen=True)
class Observation:
    """Everything one reconcile pass saw, already reduced to plain facts."""

    now: str
    generation: int | None = None
    workers: int = 1
    output_storage: str = ""
    suspend_requested: bool = False
    cancel_requested: bool = False
    job_name: str | None = None
    job: JobView | None = None
    workload: WorkloadView | None = None  # Kueue's Workload of the Job (watched only with the Kueue integration)
    pods: tuple[PodView, ...] = ()
    restarts: int = 0
    gpu_seconds: float = 0.0
    create_failure: str | None = None  # the Job controller's latest FailedCreate message, when it has no pods
    conflict: str | None = None
    storage_conflict: str | None = None  # an older live job writes where this one would (sharing.py)
    unavailable: str | None = None  # the Job create was refused because an admission webhook could not be called
    invalid: str | None = None
    report: ProgressReport | None = None
    restarting: str | None = None  # why a broken torchrun group is being stopped and restarted (gang.py)
    secret_refs: tuple[tuple[str, str, str], ...] = ()  # (what uses it, Secret, key): builders.secret_references
    start_timeout: float = 0.0  # seconds a pod may fail to start before the job fails; 0: it waits for ever
    memory: str | None = None  # spec.resources.memory, for the advice after an OOM kill
    preflight: pf.PreflightView | None = None  # the pre-flight, when the job has one; `pods` are its pods until the Job
    preflight_memory: str = ""  # the operator's memory for pre-flight pods, for the advice after an OOM kill


def _live(pods: tuple[PodView, ...]) -> list[PodView]:
    return [p for p in pods if p.phase not in ("Succeeded", "Failed") and not p.deleting]


def _secret_problem(pod: PodView, refs: tuple[tuple[str, str, str], ...]) -> str:
    """Which Secret and key the pod lacks, and what in the spec asked for it (the operator cannot read Secrets: the
    kubelet's message and the job's own references tell)."""
    said = pod.waiting_message or ""
    if (m := _KEY_MISSING.search(said)) is not None:
        key, secret = m.groups()
        users = [use for use, s, k in refs if (s, k) == (secret, key)]
        what = f'Secret "{secret}" {_NO_KEY} "{key}"'
    elif (m := _SECRET_MISSING.search(said)) is not None:
        secret = m[1]
        users = [f'{use} needs its key "{k}"' for use, s, k in refs if s == secret]
        what = f'Secret "{secret}" {_NO_SECRET}'
    else:
        users = [f'{use}: Secret "{s}" key "{k}"' for use, s, k in refs]
        what = said or "a Secret or key it reads is missing"
    return f"pod {pod.name} cannot start: {what}" + (f" ({', '.join(users)})" if users else "")


def _start_problem(pod: PodView, refs: tuple[tuple[str, str, str], ...]) -> tuple[str, str] | None:
    """A container the kubelet cannot start: its image cannot be pulled, or a Secret it reads is missing."""
    if pod.waiting_reason in IMAGE_WAIT_REASONS:
        detail = _PULL_PREFIX.sub("", pod.waiting_message or "") or pod.waiting_reason or ""
        return IMAGE_PULL, f'pod {pod.name} cannot pull image "{pod.image}": {detail}'
    if pod.waiting_reason == CONTAINER_CONFIG:
        return CONTAINER_CONFIG, _secret_problem(pod, refs)
    return None


def _wait_note(timeout: float) -> str:
    if timeout <= 0:
        return "; the pods keep waiting for it (FINETUNE_START_TIMEOUT_SECONDS is 0)"
    return f"; the job fails if a pod cannot start for {humanize_eta(timeout)}"


def pending_problem(pods: tuple[PodView, ...], create_failure: str | None,
                    refs: tuple[tuple[str, str, str], ...] = (), timeout: float = 0.0) -> tuple[str, str] | None:
    """Why workers are not running, in the order a user should fix things; None when nothing is wrong yet."""
    live = _live(pods)
    if create_failure and not live:
        return (QUOTA_EXCEEDED if "exceeded quota" in create_failure else FAILED_CREATE), create_failure
    for p in live:
        if p.unschedulable:
            return UNSCHEDULABLE, f"pod {p.name}: {p.unschedulable}"
    problems = [problem for p in live if (problem := _start_problem(p, refs)) is not None]
    problems.sort(key=lambda rm: rm[0] != IMAGE_PULL)  # an image first: without it no Secret is ever read
    if problems:
        reason, message = problems[0]
        return reason, message + _wait_note(timeout)
    return None


def start_deadline(pods: tuple[PodView, ...], timeout: float) -> float | None:
    """When the earliest pod that cannot start (see `pending_problem`) has waited `timeout` (epoch seconds), or None."""
    if timeout <= 0:
        return None
    since = [parse_time(p.accepted_at or p.created) for p in _live(pods) if _start_problem(p, ()) is not None]
    known = [t for t in since if t is not None]
    return min(known) + timeout if known else None


def _gave_up(obs: Observation) -> tuple[str, str] | None:
    """A failure the operator decides (the Job would wait or retry for ever): repeated OOM kills, a pod that could
    not start within `start_timeout`, or a Workload Kueue deactivated for good."""
    if (kueue_gave_up := queueing.gave_up(obs.workload)) is not None:
        return kueue_gave_up
    oom = sorted((p for p in obs.pods if p.phase == "Failed" and p.terminated_reason == OOM_KILLED),
                 key=lambda p: (parse_time(p.finished_at) or 0.0, p.name))
    if len(oom) >= OOM_KILLS_TO_FAIL:
        return OOM_KILLED, (f"the trainer was killed for exceeding its memory limit (OOMKilled) {len(oom)} times, "
                            f"last in pod {oom[-1].name}; not retried again: {memory_advice(obs.memory)}")
    return _could_not_start(obs)


def _could_not_start(obs: Observation) -> tuple[str, str] | None:
    """A pod that could not start (missing Secret or key, image that cannot be pulled) for `start_timeout`."""
    deadline = start_deadline(obs.pods, obs.start_timeout)
    now = parse_time(obs.now)
    if deadline is None or now is None or now < deadline:
        return None
    live = sorted(_live(obs.pods), key=lambda p: (parse_time(p.accepted_at or p.created) or 0.0, p.name))
    reason, message = next(problem for p in live if (problem := _start_problem(p, obs.secret_refs)) is not None)
    return reason, (f"{message}; gave up after {humanize_eta(obs.start_timeout)} "
                    "(FINETUNE_START_TIMEOUT_SECONDS): the Job and its pods were deleted")


def memory_advice(memory: str | None) -> str:
    limit = f"larger spec.resources.memory (now {memory})" if memory else "spec.resources.memory set (none is now)"
    return (f"re-create the FineTuneJob with a {limit}, or a smaller hyperparameters.batchSize or maxSeqLength "
            "(resources are immutable)")


def _oom_notice(obs: Observation) -> tuple[str, str] | None:
    """The latest pod failure was an OOM kill and the job is restarting: say so while the replacement starts."""
    pod = _latest_failed(obs.pods)
    if pod is None or pod.terminated_reason != OOM_KILLED:
        return None
    return OOM_KILLED, (f"pod {pod.name} was killed for exceeding its memory limit (OOMKilled); restarting from the "
                        f"latest checkpoint, and a second OOM kill fails the job: {memory_advice(obs.memory)}")


def _latest_failed(pods: tuple[PodView, ...], codes: tuple[int, ...] | None = None) -> PodView | None:
    failed = [p for p in pods if p.phase == "Failed" and p.exit_code is not None
              and (codes is None or p.exit_code in codes)]
    failed.sort(key=lambda p: (parse_time(p.finished_at) or 0.0, p.name))
    return failed[-1] if failed else None


def failure(job_cond: JobCondition, pods: tuple[PodView, ...], memory: str | None = None) -> tuple[str, str]:
    """(reason, message) for a failed Job, with the trainer's own words when a permanent exit code ended it, and the
    advice on memory when the last failure was an OOM kill."""
    if job_cond.reason == POD_FAILURE_POLICY:
        pod = _latest_failed(pods, exitcodes.PERMANENT)
        if pod is not None and pod.exit_code is not None:
            said = (pod.terminated_message or "").strip()[-MAX_TRAINER_MESSAGE:]
            desc = exitcodes.DESCRIPTIONS.get(pod.exit_code, "")
            text = f"trainer exited with code {pod.exit_code} ({desc})" + (f": {said}" if said else "")
            return EXIT_REASONS.get(pod.exit_code, POD_FAILURE_POLICY), text
        return POD_FAILURE_POLICY, job_cond.message or "a pod failure policy rule failed the Job"
    if job_cond.reason == BACKOFF_LIMIT:
        pod = _latest_failed(pods)
        detail = ""
        if pod is not None:
            why = f" ({pod.terminated_reason})" if pod.terminated_reason else ""
            detail = f"; last failure: pod {pod.name} exited with code {pod.exit_code}{why}"
            if pod.terminated_reason == OOM_KILLED:
                return OOM_KILLED, (f"{job_cond.message or 'Job has reached the specified backoff limit'}{detail}: "
                                    f"the trainer exceeded its memory limit; {memory_advice(memory)}")
        return BACKOFF_LIMIT, (job_cond.message or "Job has reached the specified backoff limit") + detail
    if job_cond.reason == DEADLINE:
        return DEADLINE, job_cond.message or "Job was active longer than runPolicy.activeDeadlineSeconds"
    return job_cond.reason or "JobFailed", job_cond.message or "the Job failed"


def _set(st: FineTuneJobStatus, type_: str, status: str, reason: str, message: str, obs: Observation) -> None:
    st.conditions, _ = cond.set_condition(st.conditions, type_, status, reason, message, obs.generation, obs.now)


def _clear(st: FineTuneJobStatus, type_: str, reason: str, message: str, obs: Observation) -> None:
    """Turn a condition False only if it exists: absent conditions stay absent."""
    if cond.find(st.conditions, type_) is not None:
        _set(st, type_, "False", reason, message, obs)


def _first_start(pods: tuple[PodView, ...], job: JobView | None) -> str | None:
    starts = sorted(p.started_at for p in pods if p.started_at)
    return starts[0] if starts else (job.start_time if job else None)


def compute_status(prev: FineTuneJobStatus, obs: Observation) -> FineTuneJobStatus:
    """The status this observation calls for. Never mutates `prev`."""
    st = _compute(prev, obs)
    _kstatus(st, obs)
    return st


def _compute(prev: FineTuneJobStatus, obs: Observation) -> FineTuneJobStatus:
    st = prev.model_copy(deep=True)
    st.observed_generation = obs.generation
    if prev.phase in TERMINAL_PHASES:
        return apply_report(st, obs.report) if obs.report is not None else st

    if obs.invalid is not None:
        st.phase = "Failed"
        _set(st, "Failed", "True", INVALID_SPEC, obs.invalid, obs)
        st.completion_time = st.completion_time or obs.now
        return st
    if obs.cancel_requested:
        st.phase = "Failed"
        _set(st, "Failed", "True", CANCELLED, "runPolicy.cancel is true: the pods were stopped and the Job removed; "
             "the status and the checkpoints are kept", obs)
        _clear(st, "Running", CANCELLED, "cancelled", obs)
        st.completion_time = st.completion_time or obs.now
        return st
    if obs.conflict is not None or obs.storage_conflict is not None:
        st.phase = "Pending"
        reason, message = ((NAME_CONFLICT, obs.conflict) if obs.conflict is not None
                           else (STORAGE_CONFLICT, obs.storage_conflict))
        _set(st, "Created", "False", reason, str(message), obs)
        return st
    if (held := cond.find(st.conditions, "Created")) is not None and held.reason == STORAGE_CONFLICT:
        st.conditions = [c for c in st.conditions or [] if c is not held]  # no longer held: the pre-flight or Job next
    if obs.unavailable is not None:
        st.phase = "Pending"
        _set(st, "Created", "False", WEBHOOK_UNAVAILABLE, obs.unavailable, obs)
        return st
    if obs.preflight is not None and obs.preflight.report is not None:
        _preflight_passed(st, obs.preflight, obs)
    job = obs.job
    if job is None:
        if obs.preflight is not None:
            _validating(st, obs.preflight, obs)
        st.phase = st.phase or "Pending"
        return st

    st.job_name = job.name
    children = "ConfigMap and progress Secret" + (" and rendezvous Service" if obs.workers > 1 else "")
    _set(st, "Created", "True", JOB_CREATED, f"Job {job.name} exists with its {children}", obs)
    st.restarts = obs.restarts
    st.gpu_seconds = round(obs.gpu_seconds, 1)
    if suspend_owner.holder(job, obs.workload).kueue:
        st.queue = queueing.queue_status(job, obs.workload)
    if obs.report is not None:
        st = apply_report(st, obs.report)
    if not (_ended(st, job, obs) or _given_up(st, job, obs) or _held(st, job, obs)):
        _progressing(st, job, obs)
    return st


def _preflight_passed(st: FineTuneJobStatus, view: pf.PreflightView, obs: Observation) -> None:
    """What the pre-flight found goes to status.preflight, and Validated says it passed."""
    found = view.report
    assert found is not None
    st.preflight = found
    plan = found.memory_plan
    fits = {True: "fits", False: "does not fit", None: "not checked (device memory unknown)"}[plan.fits]
    est = f"; estimated {found.estimate.wall}" if found.estimate is not None else ""
    _set(st, "Validated", "True", PREFLIGHT_PASSED,
         f"{found.train.examples} training examples ({found.train.tokens} tokens, longest {found.train.longest}), "
         f"{found.total_steps} steps; memory plan {plan.per_device_bytes / 1e9:.2f} GB per device: {fits}{est}", obs)


def _validating(st: FineTuneJobStatus, view: pf.PreflightView, obs: Observation) -> None:
    """Before the GPU Job: the pre-flight runs, cannot start, is held, or failed (at once, with the trainer's
    words; no GPU was ever requested)."""
    decided = _preflight_failure(view, obs) if view.state == pf.FAILED else _could_not_start(obs)
    if decided is not None:
        reason, message = decided
        st.phase = "Failed"
        _set(st, "Failed", "True", reason, message, obs)
        _set(st, "Validated", "False", reason, message, obs)
        _clear(st, "Running", reason, message, obs)
        st.completion_time = st.completion_time or obs.now
        return
    st.phase = "Pending"
    problem = pending_problem(obs.pods, obs.create_failure, obs.secret_refs, obs.start_timeout)
    pod = next((p.name for p in _live(obs.pods)), None)
    if problem is not None:
        reason, message = problem[0], f"pre-flight {problem[1]}"
    elif view.state == pf.SUSPENDED and view.queue_name:
        reason = PREFLIGHT_QUEUED
        message = (f"the pre-flight waits for Kueue to admit it through LocalQueue {view.queue_name} (CPU only; no "
                   "GPU quota is held)")
    elif view.state == pf.SUSPENDED:
        reason = PREFLIGHT_SUSPENDED
        message = ("the pre-flight Job was suspended by someone else (Kueue's manageJobsWithoutQueueName?), and no "
                   "GPU Job is made until it passes: give pre-flights a CPU LocalQueue (FINETUNE_PREFLIGHT_QUEUE, "
                   "chart preflight.queueName) or set spec.preflight.enabled to false")
    elif view.state == pf.STALE:
        reason, message = VALIDATING, "the spec changed before the job started: checking it again"
    else:
        reason = VALIDATING
        message = ((f"pre-flight pod {pod}: " if pod else "pre-flight: ") + "reading and checking the data, "
                   "tokenising it and planning memory on CPU; no GPU is requested until it passes")
    _set(st, "Running", "False", reason, message, obs)


def _preflight_failure(view: pf.PreflightView, obs: Observation) -> tuple[str, str]:
    job = view.job
    assert job is not None and job.failure is not None
    reason, message = failure(job.failure, view.pods)
    if reason == OOM_KILLED:
        message = (f"the pre-flight pod exceeded its memory ({obs.preflight_memory or 'the operator setting'}, "
                   "FINETUNE_PREFLIGHT_MEMORY): raise the chart's preflight.memory, or set spec.preflight.enabled to "
                   "false")
    elif reason == DEADLINE:
        message = (f"it did not finish within {humanize_eta(pf.DEADLINE_SECONDS)} (is the data or the model "
                   "reachable?); set spec.preflight.enabled to false to skip it")
    return reason, f"pre-flight: {message}"


def _fail(st: FineTuneJobStatus, job: JobView, obs: Observation, reason: str, message: str) -> None:
    st.phase = "Failed"
    _set(st, "Failed", "True", reason, message, obs)
    _clear(st, "Running", reason, message, obs)
    st.start_time = st.start_time or _first_start(obs.pods, job)
    st.completion_time = st.completion_time or obs.now


def _given_up(st: FineTuneJobStatus, job: JobView, obs: Observation) -> bool:
    """Failed by the operator's own decision (`_gave_up`); the reconcile pass then deletes the Job."""
    if (decided := _gave_up(obs)) is None:
        return False
    _fail(st, job, obs, *decided)
    return True


def _ended(st: FineTuneJobStatus, job: JobView, obs: Observation) -> bool:
    """Succeeded or Failed, as the Job's conditions say (final from here on)."""
    if job.success is not None:
        st.phase = "Succeeded"
        _set(st, "Succeeded", "True", COMPLETED, f"all {obs.workers} worker(s) finished training", obs)
        _clear(st, "Running", COMPLETED, "training finished", obs)
        st.start_time = st.start_time or _first_start(obs.pods, job)
        st.completion_time = st.completion_time or job.completion_time or obs.now
        if st.output is None and obs.output_storage:
            st.output = OutputStatus(path=obs.output_storage)
        return True
    if (failed := job.failure) is not None:
        _fail(st, job, obs, *failure(failed, obs.pods, obs.memory))
        return True
    return False


def _held(st: FineTuneJobStatus, job: JobView, obs: Observation) -> bool:
    """Not running on purpose: a broken group being restarted, queued by Kueue, or suspended by the user."""
    if obs.restarting is not None and not obs.suspend_requested:
        st.phase = "Pending"
        _set(st, "Running", "False", RESTARTING_WORKERS, obs.restarting, obs)
        return True
    if not job.suspend:
        return False
    who = suspend_owner.holder(job, obs.workload)
    if who.kueue and not obs.suspend_requested:
        reason, message = queueing.waiting(who, job, obs.workload)
        st.phase = "Queued"
        _set(st, "Queued", "True", reason, message, obs)
        _clear(st, "Running", reason, "queued", obs)
        return True
    st.phase = "Suspended"
    how = ("its Workload is deactivated, so Kueue stopped the pods (each saved a checkpoint) and freed its quota; "
           "false activates it, and training resumes from the checkpoint once Kueue admits it again" if who.kueue
           else "pods were stopped and resume from the latest checkpoint")
    _set(st, "Suspended", "True", SUSPENDED, f"runPolicy.suspend is true: {how}", obs)
    _clear(st, "Running", SUSPENDED, "suspended", obs)
    return True


def _progressing(st: FineTuneJobStatus, job: JobView, obs: Observation) -> None:
    """Admitted and not suspended: Running once every worker is up, else Pending with the reason why not."""
    queued = cond.find(st.conditions, "Queued")
    if (queued is not None and queued.status == "True") or (
            queued is None and suspend_owner.holder(job, obs.workload).kueue):  # admitted without waiting
        _set(st, "Queued", "False", ADMITTED, queueing.admitted(obs.workload), obs)
    if cond.is_true(st.conditions, "Suspended"):
        _set(st, "Suspended", "False", RESUMED, "resumed from the latest checkpoint", obs)

    running = [p for p in obs.pods if p.phase == "Running" and not p.deleting]
    problem = pending_problem(obs.pods, obs.create_failure, obs.secret_refs, obs.start_timeout)
    # Running means training can progress: every torchrun worker is up. Messages carry no counts, so pods
    # starting one by one do not each cost a status write.
    # Workers that already finished count as up: between the last pod's exit and the Job's Complete condition the
    # job is still Running, not Pending.
    up = {p.index for p in running} | {p.index for p in obs.pods if p.phase == "Succeeded"}
    if up and len(up) >= obs.workers and problem is None:
        st.phase = "Running"
        _set(st, "Running", "True", PODS_RUNNING, f"all {obs.workers} worker pod(s) are running", obs)
        st.start_time = st.start_time or _first_start(tuple(running), job) or obs.now
        return
    st.phase = "Pending"
    reason, message = problem or _oom_notice(obs) or (PODS_PENDING, f"waiting for {obs.workers} worker pod(s) to start")
    _set(st, "Running", "False", reason, message, obs)


def _kstatus(st: FineTuneJobStatus, obs: Observation) -> None:
    """Ready, Reconciling and Stalled, the conditions kstatus reads (Flux's health checks, `kubectl wait
    --for=condition=Ready`, cli-utils), with the rules kstatus applies to a batch/v1 Job: healthy (Ready) once it
    runs, while suspended and after success; in progress (Reconciling, Ready=False) until its pods run; failed
    (Stalled) when it failed. Completion is `Succeeded`. Each carries the reason and message of the headline."""
    head = headline(st)
    if head is None:
        return
    phase, reason, message = head
    _set(st, "Ready", "True" if phase in ("Running", "Succeeded", "Suspended") else "False", reason, message, obs)
    if phase in ("Pending", "Queued"):
        _set(st, "Reconciling", "True", reason, message, obs)
    else:
        _clear(st, "Reconciling", reason, message, obs)
    if phase == "Failed":
        _set(st, "Stalled", "True", reason, message, obs)
    else:
        _clear(st, "Stalled", reason, message, obs)


_HEADLINE = {"Pending": "Running", "Queued": "Queued", "Running": "Running", "Succeeded": "Succeeded",
             "Failed": "Failed", "Suspended": "Suspended"}
WARNING_REASONS = frozenset({NAME_CONFLICT, STORAGE_CONFLICT, QUOTA_EXCEEDED, FAILED_CREATE, UNSCHEDULABLE,
                             IMAGE_PULL, CONTAINER_CONFIG, RESTARTING_WORKERS, OOM_KILLED, PREFLIGHT_SUSPENDED,
                             WEBHOOK_UNAVAILABLE}) \
    | queueing.WARNINGS
# (phase, reason) that are the normal course of events, announced by the next one: no Event of their own (pods
# starting; the pre-flight checking; Kueue unsuspending the Job it admitted, announced as Admitted).
QUIET = frozenset({("Pending", PODS_PENDING), ("Pending", VALIDATING), ("Queued", queueing.STARTING)})


def headline(st: FineTuneJobStatus) -> tuple[str, str, str] | None:
    """(phase, reason, message) a person should read first: the condition that explains the phase."""
    if st.phase is None:
        return None
    created = cond.find(st.conditions, "Created")
    c = created if created is not None and created.status == "False" else cond.find(st.conditions,
                                                                                      _HEADLINE[st.phase])
    if c is None:
        return st.phase, st.phase, f"phase {st.phase}"
    return st.phase, c.reason, c.message


# (phase, reason) a just-created job passes through on its way: not written as its first status within the settle time.
SETTLING = frozenset({("Pending", PODS_PENDING), ("Queued", WAITING_FOR_ADMISSION)})


def transition_event(prev: FineTuneJobStatus, new: FineTuneJobStatus) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Kubernetes Event for a change of phase or of its explaining reason."""
    before, after = headline(prev), headline(new)
    if after is None or (before is not None and before[:2] == after[:2]):
        return None
    if after[:2] in QUIET:
        return None  # the normal course of events: announced by what comes next (Running, Admitted)
    phase, reason, message = after
    kind = "Warning" if (phase == "Failed" and reason != CANCELLED) or reason in WARNING_REASONS else "Normal"
    return kind, reason, f"{phase}: {message}"


def _named_secret(head: tuple[str, str, str] | None) -> str | None:
    """The missing Secret (and key) a CreateContainerConfigError headline names, if it names one: the kubelet's
    first report often cannot say (its Secret cache was not synced yet); a later one does."""
    if head is None or head[1] != CONTAINER_CONFIG:
        return None
    m = _NAMED.search(head[2])
    return m[1] if m else None


def secret_learned(prev: FineTuneJobStatus, new: FineTuneJobStatus) -> tuple[str, str, str] | None:
    """The Event for a missing-Secret report that now names the Secret (or key) the earlier Event could not: once
    per Secret and key named, since the phase and reason stay the same."""
    before, after = headline(prev), headline(new)
    named = _named_secret(after)
    if before is None or after is None or before[:2] != after[:2] or named is None or named == _named_secret(before):
        return None
    return "Warning", after[1], f"{after[0]}: {after[2]}"


def admission_event(prev: FineTuneJobStatus, new: FineTuneJobStatus) -> tuple[str, str, str] | None:
    """Kueue admitted a queued job: where (ClusterQueue, flavor). Pods starting are not announced, so this is the
    only news between Queued and Running."""
    before, after = cond.find(prev.conditions, "Queued"), cond.find(new.conditions, "Queued")
    if (before is not None and before.status != "True") or after is None or after.status != "False" \
            or after.reason != ADMITTED:
        return None
    return "Normal", after.reason, after.message


def transition_events(prev: FineTuneJobStatus, new: FineTuneJobStatus) -> list[tuple[str, str, str]]:
    """Every Event a written status change calls for, in order: the reconcile pass posts exactly these."""
    events = [admission_event(prev, new), transition_event(prev, new) or secret_learned(prev, new)]
    return [e for e in events if e is not None]


def merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning `old` into `new`: removed keys become null, nested maps recurse."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(before, dict) and isinstance(value, dict):
            patch[key] = merge_diff(before, value)
        else:
            patch[key] = value
    return patch


def dump_status(st: FineTuneJobStatus) -> dict[str, Any]:
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")


def status_patch(prev_raw: dict[str, Any], new: FineTuneJobStatus) -> dict[str, Any] | None:
    """The status merge patch, or None when nothing worth a write changed.

    `prev_raw` is the status as stored. GPU-seconds of a running job grow every second; they ride along with other
    changes and are written on their own only at the end, so a resync of a steady job writes nothing.
    """
    patch = merge_diff(prev_raw, dump_status(new))
    if not patch or (set(patch) == {"gpuSeconds"} and new.phase not in TERMINAL_PHASES):
        return None
    return patch
