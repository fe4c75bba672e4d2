"""The reconcile pass of one FineTuneJob: observe, act on the children, write the status once, then post Events.

A pass reads only its record and the watch caches. Each branch (invalid spec, finished job, children to create,
a running Job to tend) acts on the children and returns what it observed; `state.compute_status` turns that into the
new status, which is written once, at the end, only when it differs from what is stored; the Events of the change
follow the write (as JobSet does), so an Event never announces a status that was not written. One pass makes at most
the missing creates, one Job patch, one ConfigMap or Service repair, one status patch and one Event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_api import errors
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import TERMINAL_PHASES, FineTuneJobStatus
from finetune_api.times import format_time, parse_time
from finetune_operator import builders, gang, image_policy, preflight, sharing, state, suspend_owner
from finetune_operator import conditions as cond
from finetune_operator.caches import Caches
from finetune_operator.children import Children, Created
from finetune_operator.k8s import ApiError, Kube
from finetune_operator.ledger import Ledger
from finetune_operator.ledger import update as update_ledger
from finetune_operator.metrics import Metrics
from finetune_operator.observe import JobView, PodView, WorkloadView
from finetune_operator.record import JobRecord, Key
from finetune_operator.repair import Repair
from finetune_operator.settings import Settings
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

STALE_OWNER_RETRY = 2.0  # a same-named child of a deleted FineTuneJob is being garbage-collected
QUOTA_RECHECK = 10.0  # seconds between looks at a pod-less Job's FailedCreate events
CREATE_GRACE = 2.0  # seconds a new Job may have no pods before its FailedCreate events are read


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
        return None, errors.describe(exc, "spec")


@dataclass(frozen=True)
class Pass:
    """What one pass works from: the record and what it held when the pass began."""

    key: Key
    record: JobRecord
    body: dict[str, Any]  # the FineTuneJob at the start of the pass (Events refer to this version)
    owner: builders.Owner
    prev: FineTuneJobStatus
    now: float

    def seen(self, **facts: Any) -> state.Observation:
        return state.Observation(now=format_time(self.now), generation=self.body["metadata"].get("generation"),
                                 **facts)


@dataclass
class Reconciler:
    """One pass per call of `reconcile(key)`; the runner guarantees that one key is never in two passes at once."""

    settings: Settings
    kube: Kube
    metrics: Metrics
    clock: Callable[[], float]
    records: dict[Key, JobRecord]
    caches: Caches
    children: Children
    repair: Repair
    queue: WorkQueue[Key]  # passes ask for their next look through it (settle time, TTL, FailedCreate re-checks)

    async def reconcile(self, key: Key) -> None:
        record = self.records.get(key)
        if record is None or record.body["metadata"].get("deletionTimestamp"):
            return  # garbage collection removes the children; nothing blocks the deletion
        body = record.body
        p = Pass(key=key, record=record, body=body, now=self.clock(), prev=parse_status(body.get("status")),
                 owner=builders.Owner(name=key[1], namespace=key[0], uid=body["metadata"]["uid"]))
        spec, invalid = spec_problem(body)
        if spec is None:
            obs: state.Observation | None = p.seen(invalid=invalid)
        elif p.prev.phase in TERMINAL_PHASES:
            obs = self._observe_finished(p)
        elif spec.run_policy.cancel:  # children first: a crash in between repeats this branch, never leaves pods
            await self.children.clean_up(p.key, p.owner, "the job was cancelled")
            obs = p.seen(cancel_requested=True)
        else:
            obs = await self._observe(p, spec)
        new = p.prev if obs is None else state.compute_status(p.prev, obs)
        if obs is not None and not self._settling(p, new) and await self._write(p, new):
            await self._announce(p, new)
        if obs is not None and obs.unavailable is not None:  # after the status says so: back off like any API error
            raise ApiError("POST", "Job", 500, obs.unavailable)
        if spec is not None and new.phase in TERMINAL_PHASES:
            if obs is not None and record.report is obs.report:
                record.report = None  # the status holds it now (one that came in meanwhile waits for the next pass)
            await self._stop(p, new)
            await self._expire(p, spec, new)

    # ------------------------------------------------------------------------------------------- observe

    @staticmethod
    def _observe_finished(p: Pass) -> state.Observation | None:
        """A finished job: only a late report (the output) or a new generation is news."""
        if p.record.report is not None:
            return p.seen(report=p.record.report)
        if p.prev.observed_generation != p.body["metadata"].get("generation"):
            return p.seen()
        return None

    async def _observe(self, p: Pass, spec: FineTuneJobSpec) -> state.Observation:
        """An unfinished job: create the children if its Job is missing (after the pre-flight passed), else tend the
        Job; then look at it."""
        job = self.caches.job(p.key, p.owner.uid, builders.job_name(p.owner))
        checked = self._preflight_of(p, spec)
        if job is not None:
            return await self._observe_job(p, spec, job, tend=True, checked=checked)
        if (problem := image_policy.problem(spec, self.settings.allowed_registries)) is not None:
            return p.seen(invalid=problem)
        others = (r.footprint for k, r in self.records.items() if k != p.key)
        if (shared := sharing.conflict(p.record.footprint, others)) is not None:
            return p.seen(storage_conflict=shared)  # no pod, not even the pre-flight, while the older job is live
        if preflight.required(spec, self.children.ctx.preflight) and (checked is None or
                                                                     checked.state != preflight.PASSED):
            return await self._preflight(p, spec, checked)
        passed = checked is not None and checked.state == preflight.PASSED
        result = await (self.children.create_job(p.owner, spec) if passed else self.children.create(p.owner, spec))
        if result.refusal is not None:
            return self._refused(p, result.refusal)
        assert result.job is not None
        if p.record.created_at is None:
            p.record.created_at = p.now
        return await self._observe_job(p, spec, result.job, tend=False, checked=checked)

    def _preflight_of(self, p: Pass, spec: FineTuneJobSpec) -> preflight.PreflightView | None:
        """The job's pre-flight Job and its pods as the caches hold them, judged against the spec as it is now."""
        job = self.caches.job(p.key, p.owner.uid, preflight.job_name(p.owner))
        pods = tuple(self.caches.pods_of(p.key, job.uid)) if job is not None else ()
        return preflight.view(job, pods, preflight.spec_hash(spec))

    async def _preflight(self, p: Pass, spec: FineTuneJobSpec,
                         checked: preflight.PreflightView | None) -> state.Observation:
        """Before the GPU Job: create the pre-flight (after its inputs), or replace one that checked an older spec,
        and look at it. Its pods are the job's pods until the GPU Job exists."""
        if checked is None:
            if self.caches.configmap(p.key, p.owner.uid, builders.configmap_name(p.owner)) is not None:
                await self.repair(p.record, p.key, p.owner, spec)  # a spec edited since: the new one
            result = await self.children.create(p.owner, spec,
                                                preflight.build_job(p.owner, spec, self.children.ctx))
            if result.refusal is not None:
                return self._refused(p, result.refusal)
            assert result.job is not None
            checked = preflight.PreflightView(preflight.RUNNING, result.job)
        elif checked.state == preflight.STALE and checked.job is not None and not checked.job.deleting:
            await self.children.delete_job(p.key, checked.job, "it checked an earlier version of the spec")
        pods = checked.pods
        if (deadline := state.start_deadline(pods, self.settings.start_timeout_seconds)) is not None:
            self.queue.add(p.key, max(0.0, deadline - p.now))  # a pre-flight pod that cannot start: fail it on time
        failed_create = None
        if checked.job is not None and checked.state == preflight.RUNNING:
            failed_create = await self._create_failure(p, checked.job, list(pods))
        return p.seen(preflight=checked, pods=pods, create_failure=failed_create,
                      secret_refs=builders.secret_references(p.owner, spec),
                      start_timeout=self.settings.start_timeout_seconds,
                      preflight_memory=self.children.ctx.preflight.memory)

    @staticmethod
    def _refused(p: Pass, refusal: Created) -> state.Observation:
        if refusal.stale:
            raise kopf.TemporaryError("a child of a deleted FineTuneJob with this name is still being removed",
                                      delay=STALE_OWNER_RETRY)
        if refusal.invalid is not None:  # permanent: Failed/InvalidSpec, nothing left behind
            return p.seen(invalid=refusal.invalid)
        if refusal.unavailable is not None:  # Kueue down: said in the status, retried with backoff
            return p.seen(unavailable=refusal.unavailable)
        return p.seen(conflict=refusal.conflict)

    async def _observe_job(self, p: Pass, spec: FineTuneJobSpec, job: JobView, tend: bool,
                           checked: preflight.PreflightView | None = None) -> state.Observation:
        """The Job, its pods and its Workload: the ledger, a broken group, why pods are missing."""
        pods = self.caches.pods_of(p.key, job.uid)
        workload = self.caches.workload_of(p.key, job.uid)
        ledger = p.record.ledger = update_ledger(p.record.ledger, job, pods, p.prev.restarts, p.prev.gpu_seconds,
                                                 p.now)
        broken = None
        if tend:
            job, broken = await self._tend(p, spec, job, pods, workload)
        self.metrics.add_delta(self.metrics.gpu_seconds, *p.key, ledger.gpu_seconds)
        if (deadline := state.start_deadline(tuple(pods), self.settings.start_timeout_seconds)) is not None:
            self.queue.add(p.key, max(0.0, deadline - p.now))  # a pod that cannot start: fail it on time
        return p.seen(
            workers=spec.resources.workers,
            output_storage=spec.output.storage,
            suspend_requested=spec.run_policy.suspend,
            job_name=job.name,
            job=job,
            workload=workload,
            pods=tuple(pods),
            restarts=ledger.restarts,
            gpu_seconds=ledger.gpu_seconds,
            create_failure=await self._create_failure(p, job, pods),
            report=p.record.report,
            restarting=self._restarting(spec, ledger, broken),
            secret_refs=builders.secret_references(p.owner, spec),
            start_timeout=self.settings.start_timeout_seconds,
            memory=None if spec.resources.memory is None else str(spec.resources.memory),
            preflight=checked if checked is not None and checked.report is not None else None,
        )

    @staticmethod
    def _restarting(spec: FineTuneJobSpec, ledger: Ledger, broken: PodView | None) -> str | None:
        """Why the group is restarting: a broken group the operator stops, or one that stopped by itself just now."""
        workers = spec.resources.workers
        if broken is not None:
            return gang.restart_message(broken, workers)
        if (cause := gang.regrouping(workers, ledger.fresh_causes)) is not None:
            return gang.restart_message(cause, workers, others_stopped=True)
        return None

    async def _tend(self, p: Pass, spec: FineTuneJobSpec, job: JobView, pods: list[PodView],
                    workload: WorkloadView | None) -> tuple[JobView, PodView | None]:
        """An existing Job: restart a broken torchrun group (gang.py), write its suspension as suspend_owner.py
        decides (the Job's suspend, or under Kueue the Workload's active), carry spec edits, repair the children.
        Returns the Job as patched and the failed member that broke its group, if any."""
        ledger = p.record.ledger
        assert ledger is not None
        kueue = suspend_owner.holder(job, workload).kueue
        broken = None
        if not job.finished and not (kueue and job.suspend):  # a Kueue-suspended Job is Kueue's (queued, preempted)
            broken = gang.broken_member(spec.resources.workers, pods, ledger.doomed, ledger.stopped)
        actions = suspend_owner.decide(spec, job, workload, restarting=broken is not None)
        job = await self.children.sync_job(p.key, spec, job, actions)
        if actions.workload_active is not None and workload is not None:
            await self.children.set_workload_active(p.key, workload, actions.workload_active)
        if broken is not None and actions.evict_broken_group:
            await self.children.evict_group(p.key, pods, ledger.doomed, broken)
        if not job.finished and await self.repair(p.record, p.key, p.owner, spec):
            self.queue.add(p.key, STALE_OWNER_RETRY)
        return job, broken

    async def _create_failure(self, p: Pass, job: JobView, pods: list[PodView]) -> str | None:
        """Why a Job that should have pods has none (a quota, an admission policy refusing them): the latest of the
        Job controller's FailedCreate Events. Pod creates are the Job controller's, so their refusals reach the
        operator only as Events on the Job; they are listed at most once per QUOTA_RECHECK per job, and only while
        the Job is short of pods."""
        record = p.record
        live = [pod for pod in pods if pod.phase not in ("Succeeded", "Failed")]
        if job.suspend or job.finished or live or job.active or job.succeeded >= job.completions:
            # (every index succeeded: the Job is about to be Complete, not short of pods)
            record.create_failure_checked, record.create_failure = 0.0, None
            return None
        if job.start_time is None:
            # The Job controller has not synced this Job yet (a backlog after a burst): its first sync sets startTime
            # even when every pod create fails, and that update comes through the Job watch. Until then no Event
            # can exist, so none is listed.
            return None
        age = p.now - (parse_time(job.created) or p.now)
        if age < CREATE_GRACE:  # the Job controller has not had its chance yet: look again then
            self.queue.add(p.key, CREATE_GRACE - age)
            return None
        if p.now - record.create_failure_checked >= QUOTA_RECHECK:
            events = await self.kube.job_events(p.key[0], job.uid, "FailedCreate")
            events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            record.create_failure_checked = p.now
            record.create_failure = events[-1].get("message") if events else None
        self.queue.add(p.key, QUOTA_RECHECK)
        return record.create_failure

    # ------------------------------------------------------------------------------------- write, announce

    def _settling(self, p: Pass, new: FineTuneJobStatus) -> bool:
        """Just created and nothing wrong: pods usually run within moments, and one write (Running) beats two
        (Pending, then Running); a queued Job's Workload usually comes within a second with Kueue's reason, which is
        the first thing worth writing. A problem (Unschedulable, QuotaExceeded, ...) is written at once."""
        created = p.record.created_at
        if p.prev.phase is not None or created is None or p.now - created >= self.settings.settle_seconds:
            return False
        head = state.headline(new)
        if head is None or head[:2] not in state.SETTLING:
            return False
        self.queue.add(p.key, created + self.settings.settle_seconds - p.now)
        return True

    async def _write(self, p: Pass, new: FineTuneJobStatus) -> bool:
        """The pass's one status write, when anything worth writing changed. False: nothing was written."""
        patch = state.status_patch(p.body.get("status") or {}, new)
        if patch is None:
            return False
        ns, name = p.key
        try:
            updated = await self.kube.patch_ftj_status(ns, name, patch)
        except ApiError as exc:
            if exc.not_found:
                return False  # deleted meanwhile
            raise
        p.record.last_status_write = self.clock()
        self.metrics.status_writes.labels(namespace=ns).inc()
        if p.record.uid == updated["metadata"].get("uid"):
            p.record.wrote(updated)  # our own write's result; its watch event queues the next pass anyway
        self.metrics.add_delta(self.metrics.restarts, ns, name, new.restarts)
        self.metrics.add_delta(self.metrics.checkpoints, ns, name, new.checkpoints.count if new.checkpoints else 0)
        return True

    async def _announce(self, p: Pass, new: FineTuneJobStatus) -> None:
        """The Events of a written change: a new phase, or a new reason explaining it."""
        for kind, reason, message in state.transition_events(p.prev, new):
            log.info("%s/%s: %s (%s) %s", *p.key, new.phase, reason, message)
            await self.kube.post_event(p.body, kind, reason, message)

    # ------------------------------------------------------------------------------------------ finished

    async def _stop(self, p: Pass, new: FineTuneJobStatus) -> None:
        """A job the operator failed itself (pods that cannot start, repeated OOM kills) still has a running Job, whose
        pods hold their nodes: delete it, after the status said why (so a crash in between repeats only this)."""
        failed = cond.find(new.conditions, "Failed")
        if failed is None or failed.status != "True" or failed.reason not in state.STOPS_THE_JOB:
            return
        for job in self.caches.jobs_of(p.key, p.owner.uid):
            if not job.finished:
                await self.children.delete_job(p.key, job, failed.reason)

    async def _expire(self, p: Pass, spec: FineTuneJobSpec, new: FineTuneJobStatus) -> None:
        """After `ttlSecondsAfterFinished`, delete the children (once); until then, come back when it is due.
        A cancelled job's children go at once, also a Job the watch showed only after the cancel."""
        if (state.headline(new) or ("", "", ""))[1] == state.CANCELLED and self.caches.jobs_of(p.key, p.owner.uid):
            await self.children.clean_up(p.key, p.owner, "the job was cancelled")
            return
        ttl = spec.run_policy.ttl_seconds_after_finished
        if ttl is None or p.record.cleaned:
            return
        done = parse_time(new.completion_time) or p.now
        if p.now < done + ttl:
            self.queue.add(p.key, done + ttl - p.now)
            return
        await self.children.clean_up(p.key, p.owner, "ttlSecondsAfterFinished passed")
        p.record.cleaned = True
