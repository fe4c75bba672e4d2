"""The reconcile loop: gather what the watches saw, let the pure modules decide, write only what changed.

kopf supplies the watch streams (FineTuneJobs, and the operator's own Jobs, Pods, ConfigMaps and Services through
server-side label selectors) and feeds this controller; the controller owns a work queue with per-job exclusivity,
retries with backoff and a periodic resync. One pass = at most the missing creates, one Job patch, one ConfigMap or
Service repair, one status patch, one Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_api import names
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import TERMINAL_PHASES, FineTuneJobStatus
from finetune_operator import builders, gang, image_policy, state
from finetune_operator.k8s import ApiError, Kube
from finetune_operator.ledger import Ledger
from finetune_operator.ledger import update as update_ledger
from finetune_operator.metrics import JobSample, Metrics
from finetune_operator.observe import (
    ConfigMapView,
    JobView,
    PodView,
    ServiceView,
    data_digest,
    format_time,
    parse_time,
    service_shape,
    summarize_job,
)
from finetune_operator.progress import ProgressReport, job_token, merge_reports, token_valid
from finetune_operator.settings import Settings
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, FineTuneJob name)
PROGRESS_MIN_INTERVAL = 2.0  # seconds between progress-driven status writes of one job
QUOTA_RECHECK = 10.0  # seconds between looks at a pod-less Job's FailedCreate events
STALE_OWNER_RETRY = 2.0  # a same-named child of a deleted FineTuneJob is being garbage-collected
CREATE_GRACE = 2.0  # seconds a new Job may have no pods before its FailedCreate events are read
SECRET_RETRIES = 3  # passes that try the progress Secret again after its ConfigMap was recreated (GC race)


@dataclass
class CreateResult:
    job: JobView | None = None
    conflict: str | None = None
    stale: bool = False


def _rv(body: dict[str, Any]) -> int | None:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def parse_status(raw: dict[str, Any] | None) -> FineTuneJobStatus:
    """Stored status, tolerating fields this version does not know (they are dropped on the next write)."""
    raw = dict(raw or {})
    known = {f.alias or n for n, f in FineTuneJobStatus.model_fields.items()}
    try:
        return FineTuneJobStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError as exc:
        log.warning("ignoring unreadable status: %s", exc.errors()[:3])
        return FineTuneJobStatus()


def spec_problem(body: dict[str, Any]) -> tuple[FineTuneJobSpec | None, str | None]:
    """Parse the spec; one the models reject is a permanent failure (the CRD normally refuses it first)."""
    try:
        return FineTuneJobSpec.model_validate(body.get("spec") or {}), None
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(p) for p in err["loc"])
            parts.append(f"spec.{loc}: {err['msg'].removeprefix('Value error, ')}" if loc else err["msg"])
        return None, "; ".join(parts)


class Controller:
    """Caches, queue and the reconcile pass. Everything API-shaped goes through `self.kube`."""

    def __init__(self, settings: Settings, kube: Kube, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.clock = clock
        self.ctx = builders.BuildContext(trainer_image=settings.trainer_image, progress_url=settings.progress_url,
                                         grace_period_seconds=settings.grace_period_seconds)
        self.queue: WorkQueue[Key] = WorkQueue()
        self.ftjs: dict[Key, dict[str, Any]] = {}
        self.jobs_index: Any = None  # kopf.Index[Key, JobView], bound at startup
        self.pods_index: Any = None  # kopf.Index[Key, PodView]
        self.configmaps_index: Any = None  # kopf.Index[Key, ConfigMapView]; None: no drift repair
        self.services_index: Any = None  # kopf.Index[Key, ServiceView]
        self.secret_retries: dict[Key, int] = {}
        self.ledgers: dict[Key, Ledger] = {}
        self.reports: dict[Key, ProgressReport] = {}
        self.created_at: dict[Key, float] = {}
        self.last_status_write: dict[Key, float] = {}
        self.create_failures: dict[Key, tuple[float, str | None]] = {}
        self.cleaned: set[Key] = set()
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        metrics.bind_jobs(self.samples)

    # ------------------------------------------------------------------------------------------ watch intake

    def bind_indices(self, jobs: Any, pods: Any, configmaps: Any = None, services: Any = None) -> None:
        self.jobs_index, self.pods_index = jobs, pods
        self.configmaps_index, self.services_index = configmaps, services

    def observe_ftj(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self.forget(key)
            return
        body = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
        current = self.ftjs.get(key)
        if current is not None and current["metadata"].get("uid") != meta.get("uid"):
            self.forget(key)  # same name, new object: nothing of the old one applies
            current = None
        if current is None:  # first sight: counters count growth from here on, not the history
            status = body.get("status") or {}
            self.metrics.add_delta(self.metrics.restarts, *key, status.get("restarts"))
            self.metrics.add_delta(self.metrics.checkpoints, *key, (status.get("checkpoints") or {}).get("count"))
        new_rv, old_rv = _rv(body), (_rv(current) if current is not None else None)
        if current is None or new_rv is None or old_rv is None or new_rv >= old_rv:
            self.ftjs[key] = body
        self.synced.set()
        self.queue.add(key)

    def observe_child(self, key: Key | None) -> None:
        if key is not None and key in self.ftjs:
            self.queue.add(key)

    def forget(self, key: Key) -> None:
        self.ftjs.pop(key, None)
        self.ledgers.pop(key, None)
        self.reports.pop(key, None)
        self.created_at.pop(key, None)
        self.last_status_write.pop(key, None)
        self.create_failures.pop(key, None)
        self.secret_retries.pop(key, None)
        self.cleaned.discard(key)
        self.queue.forget(key)
        self.metrics.forget(*key)

    def samples(self) -> Iterable[JobSample]:
        for key, body in list(self.ftjs.items()):
            status = body.get("status") or {}
            progress = status.get("progress") or {}
            report = self.reports.get(key)
            yield JobSample(
                namespace=key[0], name=key[1], phase=status.get("phase"),
                step=report.step if report and report.step is not None else progress.get("step"),
                loss=report.loss if report and report.loss is not None else progress.get("loss"),
                samples_per_second=(report.samples_per_second if report and report.samples_per_second is not None
                                    else progress.get("samplesPerSecond")),
                eta_seconds=(report.eta_seconds if report and report.eta_seconds is not None
                             else progress.get("etaSeconds")),
            )

    # ------------------------------------------------------------------------------------------- progress

    def accept_report(self, namespace: str, name: str, token: str, payload: Any) -> tuple[int, str]:
        """Authenticate and record one progress push; returns (HTTP status, message). Status follows within 2 s."""
        key = (namespace, name)
        body = self.ftjs.get(key)
        uid = (body or {}).get("metadata", {}).get("uid")
        if body is None or not uid or not token or not token_valid(self.settings.progress_key, namespace, name, uid,
                                                                   token):
            self.metrics.progress_reports.labels(result="unauthorized").inc()
            return 401, "invalid token for this job"
        try:
            report = ProgressReport.model_validate(payload)
        except ValidationError as exc:
            self.metrics.progress_reports.labels(result="invalid").inc()
            return 400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        self.reports[key] = merge_reports(self.reports.get(key), report)
        self.metrics.progress_reports.labels(result="accepted").inc()
        wait = self.last_status_write.get(key, 0.0) + PROGRESS_MIN_INTERVAL - self.clock()
        self.queue.add(key, max(0.0, wait))
        return 202, "accepted"

    # ------------------------------------------------------------------------------------------- workers

    def start(self) -> None:
        for i in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"reconcile-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="resync"))

    async def stop(self) -> None:
        self.queue.shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _resync(self) -> None:
        """Every resync period, look at every job again (the steady state then writes nothing)."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            keys = list(self.ftjs)
            spread = self.settings.resync_seconds / 2
            for i, key in enumerate(keys):
                self.queue.add(key, spread * i / max(len(keys), 1))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            if key is None:
                return
            started = time.perf_counter()
            try:
                await self.reconcile(key)
            except kopf.TemporaryError as exc:
                delay = self.queue.retry(key, exc.delay)
                self.metrics.reconciles.labels(result="retry").inc()
                log.info("%s/%s: %s; retrying in %.1fs", *key, exc, delay)
            except ApiError as exc:
                if exc.namespace_terminating:
                    self.metrics.reconciles.labels(result="ok").inc()
                    log.debug("%s/%s: namespace is being deleted; nothing to do", *key)
                    continue
                delay = self.queue.retry(key)
                self.metrics.reconciles.labels(result="retry" if exc.retryable else "error").inc()
                self.metrics.reconcile_errors.labels(cause=f"api_{exc.status}").inc()
                level = logging.INFO if exc.retryable and self.queue.failures(key) < 5 else logging.WARNING
                log.log(level, "%s/%s: API error (%s); retrying in %.1fs", *key, exc, delay)
            except Exception:
                delay = self.queue.retry(key)
                self.metrics.reconciles.labels(result="error").inc()
                self.metrics.reconcile_errors.labels(cause="exception").inc()
                log.exception("%s/%s: reconcile failed; retrying in %.1fs", *key, delay)
            else:
                self.queue.succeeded(key)
                self.metrics.reconciles.labels(result="ok").inc()
            finally:
                self.queue.done(key)
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.metrics.queue_depth.set(len(self.queue))

    # ------------------------------------------------------------------------------------------- lookups

    def _jobs(self, key: Key) -> list[JobView]:
        if self.jobs_index is None:
            return []
        try:
            return list(self.jobs_index.get(key, ()))
        except RuntimeError:  # the index changed while iterating: take a fresh look next pass
            return []

    @staticmethod
    def _cached(index: Any, key: Key) -> list[Any]:
        try:
            return list(index.get(key, ()))
        except RuntimeError:  # the index changed while iterating
            return []

    def _pods(self, key: Key, job_uid: str) -> list[PodView]:
        if self.pods_index is None:
            return []
        return [p for p in list(self.pods_index.get(key, ())) if p.job_uid == job_uid]

    # ------------------------------------------------------------------------------------------- the pass

    async def reconcile(self, key: Key) -> None:
        body = self.ftjs.get(key)
        if body is None:
            return
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return  # garbage collection removes the children; nothing blocks the deletion
        ns, name = key
        owner = builders.Owner(name=name, namespace=ns, uid=meta["uid"])
        now = self.clock()
        prev_raw = body.get("status") or {}
        prev = parse_status(prev_raw)
        spec, invalid = spec_problem(body)
        generation = meta.get("generation")
        if spec is None:
            obs = state.Observation(now=format_time(now), generation=generation, invalid=invalid)
            await self._write(key, body, prev, state.compute_status(prev, obs))
            return
        if prev.phase in TERMINAL_PHASES:
            await self._finished(key, body, spec, prev, now)
            return

        job = next((j for j in self._jobs(key) if j.owner_uid == owner.uid), None)
        result: CreateResult | None = None
        if job is None:
            if (problem := image_policy.problem(spec, self.settings.allowed_registries)) is not None:
                obs = state.Observation(now=format_time(now), generation=generation, invalid=problem)
                await self._write(key, body, prev, state.compute_status(prev, obs))
                return
            result = await self._create_children(owner, spec)
            if result.stale:
                raise kopf.TemporaryError("a child of a deleted FineTuneJob with this name is still being removed",
                                          delay=STALE_OWNER_RETRY)
            if result.conflict is not None:
                obs = state.Observation(now=format_time(now), generation=generation, conflict=result.conflict)
                await self._write(key, body, prev, state.compute_status(prev, obs))
                return
            job = result.job
            if key not in self.created_at:
                self.created_at[key] = now
        assert job is not None

        pods = self._pods(key, job.uid)
        ledger = self.ledgers[key] = update_ledger(self.ledgers.get(key), job, pods, prev.restarts,
                                                   prev.gpu_seconds, now)
        broken = None
        if result is None:
            job, broken = await self._tend(key, owner, spec, job, pods, ledger)
        obs = state.Observation(
            now=format_time(now),
            generation=generation,
            workers=spec.resources.workers,
            output_storage=spec.output.storage,
            suspend_requested=spec.run_policy.suspend,
            job_name=job.name,
            job=job,
            pods=tuple(pods),
            restarts=ledger.restarts,
            gpu_seconds=ledger.gpu_seconds,
            create_failure=await self._create_failure(key, job, pods, now),
            report=self.reports.get(key),
            restarting=gang.restart_message(broken, spec.resources.workers) if broken is not None else None,
        )
        new = state.compute_status(prev, obs)
        self.metrics.add_delta(self.metrics.gpu_seconds, ns, name, ledger.gpu_seconds)
        created = self.created_at.get(key)
        if prev.phase is None and created is not None and now - created < self.settings.settle_seconds \
                and state.headline(new) is not None and state.headline(new)[:2] == ("Pending", state.PODS_PENDING):
            # Just created and nothing wrong: pods usually run within moments, and one write (Running) beats two.
            # A problem (Unschedulable, QuotaExceeded, ...) is written at once.
            self.queue.add(key, created + self.settings.settle_seconds - now)
            return
        await self._write(key, body, prev, new)
        if new.phase in TERMINAL_PHASES:
            self.reports.pop(key, None)
            self._schedule_ttl(key, spec, new, now)

    async def _tend(self, key: Key, owner: builders.Owner, spec: FineTuneJobSpec, job: JobView,
                    pods: list[PodView], ledger: Ledger) -> tuple[JobView, PodView | None]:
        """An existing Job: restart a broken torchrun group (gang.py), carry spec edits, repair the children.
        Returns the Job as patched and the failed member that broke its group, if any."""
        kueue = job.queue_name is not None
        broken = None
        if not job.finished and not (kueue and job.suspend):  # a Kueue-suspended Job is Kueue's (queued, preempted)
            broken = gang.broken_member(spec.resources.workers, pods, ledger.doomed, ledger.stopped)
        job = await self._sync_job(key, spec, job, hold=broken is not None and not kueue)
        if broken is not None and kueue:
            await self._evict_group(key, pods, ledger.doomed, broken)
        if not job.finished:
            await self._repair_children(key, owner, spec)
        return job, broken

    async def _finished(self, key: Key, body: dict[str, Any], spec: FineTuneJobSpec, prev: FineTuneJobStatus,
                        now: float) -> None:
        """A finished job: record a late output report, then clean children up once its TTL has passed."""
        report = self.reports.pop(key, None)
        if report is not None:
            obs = state.Observation(now=format_time(now), generation=body["metadata"].get("generation"),
                                    report=report)
            await self._write(key, body, prev, state.compute_status(prev, obs))
        else:
            generation = body["metadata"].get("generation")
            if prev.observed_generation != generation:
                await self._write(key, body, prev, state.compute_status(prev, state.Observation(
                    now=format_time(now), generation=generation)))
        ttl = spec.run_policy.ttl_seconds_after_finished
        if ttl is None or key in self.cleaned:
            return
        done = parse_time(prev.completion_time) or now
        if now < done + ttl:
            self.queue.add(key, done + ttl - now)
            return
        await self._cleanup(key, body)
        self.cleaned.add(key)

    def _schedule_ttl(self, key: Key, spec: FineTuneJobSpec, new: FineTuneJobStatus, now: float) -> None:
        ttl = spec.run_policy.ttl_seconds_after_finished
        if ttl is not None:
            done = parse_time(new.completion_time) or now
            self.queue.add(key, max(0.0, done + ttl - now))

    async def _cleanup(self, key: Key, body: dict[str, Any]) -> None:
        """Delete the Job (and with it the pods), the Service if there is one, then the ConfigMap, whose garbage
        collection takes the Secret along. The ConfigMap goes last: its absence means "cleaned", so an interrupted
        clean-up resumes."""
        ns, name = key
        owner = builders.Owner(name=name, namespace=ns, uid=body["metadata"]["uid"])
        for job in self._jobs(key):
            if job.owner_uid == owner.uid:
                await self.kube.delete("batch/v1", "Job", ns, job.name, propagation="Background")
        cm = await self.kube.get("v1", "ConfigMap", ns, builders.configmap_name(owner))
        if cm is None or not self._owned(cm, owner):
            return
        if self.services_index is not None:  # the watch cache says whether there is one (single-pod jobs have none)
            services = [s.name for s in self._cached(self.services_index, key) if s.owner_uid == owner.uid]
        else:
            svc = await self.kube.get("v1", "Service", ns, builders.service_name(owner))
            services = [builders.service_name(owner)] if svc is not None and self._owned(svc, owner) else []
        for service in services:
            await self.kube.delete("v1", "Service", ns, service)
        await self.kube.delete("v1", "ConfigMap", ns, builders.configmap_name(owner), propagation="Background")
        log.info("%s/%s: children deleted after ttlSecondsAfterFinished", ns, name)

    @staticmethod
    def _owned(obj: dict[str, Any], owner: builders.Owner) -> bool:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(r.get("uid") == owner.uid and r.get("controller") for r in refs)

    @staticmethod
    def _stale_owner(obj: dict[str, Any], owner: builders.Owner) -> bool:
        """Owned by an earlier FineTuneJob of the same name (deleted; garbage collection is on its way)."""
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(r.get("kind") == names.KIND and r.get("name") == owner.name and r.get("uid") != owner.uid
                   for r in refs)

    async def _create_children(self, owner: builders.Owner, spec: FineTuneJobSpec) -> CreateResult:
        """ConfigMap (and, for multi-pod jobs, the Service) together, then the Secret (owned by the ConfigMap), then
        the Job that uses them.

        A 409 is "already there" (a restarted operator, or an earlier pass that failed half-way) unless the existing
        object has another owner: that is a NameConflict and nothing is adopted or changed.
        """
        children = [builders.build_configmap(owner, spec)]
        if builders.needs_service(spec):
            children.append(builders.build_service(owner))
        first = await asyncio.gather(*(self._create_one(owner, c) for c in children), return_exceptions=True)
        for result in first:
            if isinstance(result, BaseException):
                raise result
        for result in first:
            if isinstance(result, CreateResult):
                return result
        configmap = first[0]
        assert isinstance(configmap, dict)
        token = job_token(self.settings.progress_key, owner.namespace, owner.name, owner.uid)
        await self._create_one(owner, builders.build_secret(owner, token, configmap["metadata"]["uid"]))
        job = await self._create_one(owner, builders.build_job(owner, spec, self.ctx))
        if isinstance(job, CreateResult):
            return job
        return CreateResult(job=summarize_job(job))

    async def _create_one(self, owner: builders.Owner, child: dict[str, Any]) -> dict[str, Any] | CreateResult:
        """The created (or already existing, ours) object, or a CreateResult saying why not."""
        kind, child_name = child["kind"], child["metadata"]["name"]
        try:
            created = await self.kube.create(child)
            if kind == "Job":
                log.info("%s/%s: created Job %s", owner.namespace, owner.name, child_name)
            return created
        except ApiError as exc:
            if not exc.conflict:
                raise
            if kind == "Secret":
                return child  # the operator may not read Secrets; its deterministic name is trusted (README)
            return await self._existing(owner, child, exc)

    async def _existing(self, owner: builders.Owner, child: dict[str, Any],
                        exc: ApiError) -> dict[str, Any] | CreateResult:
        """After a 409: the existing object if it is ours, else why it is not (NameConflict, or a stale owner)."""
        kind, child_name = child["kind"], child["metadata"]["name"]
        existing = await self.kube.get(child["apiVersion"], kind, owner.namespace, child_name)
        if existing is None:
            raise kopf.TemporaryError(f"{kind} {child_name} vanished during create", delay=1.0) from exc
        if self._owned(existing, owner):
            return existing
        if self._stale_owner(existing, owner):
            return CreateResult(stale=True)
        return CreateResult(conflict=f"{kind} {child_name} already exists and is not owned by this FineTuneJob; "
                                     f"it is left alone (rename the FineTuneJob or delete the {kind})")

    async def _evict_group(self, key: Key, pods: list[PodView], doomed: set[str], broken: PodView) -> None:
        """Kueue owns `suspend` of its Jobs, so their broken groups are stopped by evicting the survivors instead
        (ignored by the pod failure policy like any disruption); the Job controller replaces them, and a replacement
        that meets a dying member exits 76 (peer lost), also ignored, until the whole group is new."""
        for pod in gang.survivors(pods, doomed, broken):
            if pod.deleting:
                continue  # already on its way out (evicted in an earlier pass)
            if await self.kube.evict(key[0], pod.name, pod.uid):
                log.info("%s/%s: evicted pod %s: worker %d failed and its group must restart", *key, pod.name,
                         broken.index)

    async def _sync_job(self, key: Key, spec: FineTuneJobSpec, job: JobView, hold: bool = False) -> JobView:
        """Carry allowed spec edits (suspend, backoffLimit, activeDeadlineSeconds) to the live Job, and keep it
        suspended while `hold` (a broken torchrun group is being stopped). Returns the Job as patched."""
        if job.finished:
            return job
        patch = builders.job_spec_patch(spec, job.live_spec, kueue_managed=job.queue_name is not None, hold=hold)
        if not patch:
            return job
        await self.kube.patch("batch/v1", "Job", key[0], job.name, patch)
        log.info("%s/%s: updated Job %s: %s", *key, job.name, patch["spec"])
        if "suspend" in patch["spec"]:
            return dataclasses.replace(job, suspend=patch["spec"]["suspend"])
        return job

    async def _repair_children(self, key: Key, owner: builders.Owner, spec: FineTuneJobSpec) -> None:
        """Put the ConfigMap and the Service (multi-pod jobs) back as the builders say: recreate a missing one, patch
        (ConfigMap data) or recreate (Service) a drifted one. Compared against the watch caches, so a steady job costs
        no request. A spec edit refreshes the ConfigMap the same way (restarted pods read the new configuration).
        Foreign objects are never touched: a create answered 409 with another owner is a logged conflict."""
        if self.configmaps_index is None or self.services_index is None:
            return  # no caches to compare against (drift repair needs the ConfigMap and Service watches)
        desired_cm = builders.build_configmap(owner, spec)
        cms: list[ConfigMapView] = self._cached(self.configmaps_index, key)
        cm = next((c for c in cms if c.owner_uid == owner.uid and c.name == desired_cm["metadata"]["name"]), None)
        if cm is None:
            try:
                created = await self.kube.create(desired_cm)
            except ApiError as exc:  # 409: already there (the watch is behind), ours or someone else's
                if not exc.conflict:
                    raise
                existing = await self._existing(owner, desired_cm, exc)
                if not isinstance(existing, dict):
                    self._repair_refused(key, existing)
                elif existing.get("data") != desired_cm["data"]:
                    await self.kube.patch("v1", "ConfigMap", owner.namespace, desired_cm["metadata"]["name"],
                                          {"data": desired_cm["data"]})
            else:
                log.info("%s/%s: ConfigMap %s recreated", *key, desired_cm["metadata"]["name"])
                self.secret_retries[key] = SECRET_RETRIES
                await self._recreate_secret(key, owner, created["metadata"]["uid"])
        else:
            if not cm.deleting and cm.data_digest != data_digest(desired_cm["data"]):
                await self.kube.patch("v1", "ConfigMap", owner.namespace, cm.name, {"data": desired_cm["data"]})
                log.info("%s/%s: ConfigMap %s put back to the spec", *key, cm.name)
            if self.secret_retries.get(key):
                await self._recreate_secret(key, owner, cm.uid)

        if not builders.needs_service(spec):
            return
        desired_svc = builders.build_service(owner)
        svcs: list[ServiceView] = self._cached(self.services_index, key)
        svc = next((s for s in svcs if s.owner_uid == owner.uid and s.name == desired_svc["metadata"]["name"]), None)
        if svc is not None and not svc.deleting and svc.shape != service_shape(desired_svc["spec"]):
            await self.kube.delete("v1", "Service", owner.namespace, svc.name)
            log.info("%s/%s: Service %s differed from the spec; recreating it", *key, svc.name)
            svc = None
        if svc is None:
            created = await self._create_one(owner, desired_svc)
            if isinstance(created, dict):
                log.info("%s/%s: Service %s recreated", *key, desired_svc["metadata"]["name"])
            else:
                self._repair_refused(key, created)

    async def _recreate_secret(self, key: Key, owner: builders.Owner, configmap_uid: str) -> None:
        """The progress Secret is owned by the ConfigMap: a recreated ConfigMap needs a new one. The old one may still
        be on its way out (garbage collection), answering 409; a few later passes try again (Secrets are not read)."""
        tries = self.secret_retries.get(key, 0)
        if tries <= 0:
            return
        token = job_token(self.settings.progress_key, owner.namespace, owner.name, owner.uid)
        try:
            await self.kube.create(builders.build_secret(owner, token, configmap_uid))
        except ApiError as exc:
            if not exc.conflict:
                raise
            self.secret_retries[key] = tries - 1
            if tries > 1:
                self.queue.add(key, STALE_OWNER_RETRY)
            return
        self.secret_retries.pop(key, None)

    def _repair_refused(self, key: Key, result: CreateResult) -> None:
        if result.stale:
            self.queue.add(key, STALE_OWNER_RETRY)
        elif result.conflict is not None:
            log.warning("%s/%s: %s", *key, result.conflict)

    async def _create_failure(self, key: Key, job: JobView, pods: list[PodView], now: float) -> str | None:
        """Why a running Job has no pods (quota, admission), from the Job controller's FailedCreate events."""
        live = [p for p in pods if p.phase not in ("Succeeded", "Failed")]
        if job.suspend or job.finished or live or job.active or job.succeeded >= job.completions:
            # (every index succeeded: the Job is about to be Complete, not short of pods)
            self.create_failures.pop(key, None)
            return None
        if job.start_time is None:
            # The Job controller has not synced this Job yet (a backlog after a burst): its first sync sets startTime
            # even when every pod create fails, and that update comes through the Job watch. Until then no Event
            # can exist, so none is listed (at 1,000 new jobs this saved nearly one LIST per job).
            return None
        age = now - (parse_time(job.created) or now)
        if age < CREATE_GRACE:  # the Job controller has not had its chance yet: look again then
            self.queue.add(key, CREATE_GRACE - age)
            return None
        checked, message = self.create_failures.get(key, (0.0, None))
        if now - checked >= QUOTA_RECHECK:
            events = await self.kube.job_events(key[0], job.uid, "FailedCreate")
            events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            message = events[-1].get("message") if events else None
            self.create_failures[key] = (now, message)
        self.queue.add(key, QUOTA_RECHECK)
        return message

    async def _write(self, key: Key, body: dict[str, Any], prev: FineTuneJobStatus, new: FineTuneJobStatus) -> None:
        patch = state.status_patch(body.get("status") or {}, new)
        if patch is None:
            return
        ns, name = key
        try:
            updated = await self.kube.patch_ftj_status(ns, name, patch)
        except ApiError as exc:
            if exc.not_found:
                return  # deleted meanwhile
            raise
        self.last_status_write[key] = self.clock()
        self.metrics.status_writes.labels(namespace=ns).inc()
        current = self.ftjs.get(key)
        if current is not None and current["metadata"].get("uid") == updated["metadata"].get("uid"):
            self.observe_ftj_quiet(updated)
        self.metrics.add_delta(self.metrics.restarts, ns, name, new.restarts)
        count = new.checkpoints.count if new.checkpoints else 0
        self.metrics.add_delta(self.metrics.checkpoints, ns, name, count)
        event = state.transition_event(prev, new)
        if event is not None:
            kind, reason, message = event
            log.info("%s/%s: %s (%s) %s", ns, name, new.phase, reason, message)
            await self.kube.post_event(body, kind, reason, message)

    def observe_ftj_quiet(self, body: dict[str, Any]) -> None:
        """Cache our own write's result without queueing another pass (the watch event will follow anyway)."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        current = self.ftjs.get(key)
        new_rv, old_rv = _rv(body), (_rv(current) if current is not None else None)
        if current is None or new_rv is None or old_rv is None or new_rv >= old_rv:
            self.ftjs[key] = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
