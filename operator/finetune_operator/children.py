"""A FineTuneJob's children on the API: create them, control the live Job, clean up (drift repair: repair.py).

Every child create goes through `Children.create_one`, where a 409 means "already done" (a restarted operator, an
earlier pass that failed half-way, a watch that is behind) unless the object there belongs to someone else: that is
a refusal (`NameConflict`), and a foreign object is never adopted or changed. A 422 (the API server, or an admission
policy, finds the object invalid) is a refusal too, and a permanent one: the children already made for the job are
deleted again, so a job that can never run leaves nothing behind. An admission webhook that cannot be called (Kueue's,
while Kueue is down) refuses the Job only: the ConfigMap and Secret made before it are reused when the create is
retried, and no Job exists that Kueue has not seen. The live Job's `suspend` is written only as suspend_owner.py
decides; under Kueue the Workload's `spec.active` is written instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from finetune_api import names
from finetune_api.spec import FineTuneJobSpec
from finetune_operator import builders, gang, suspend_owner
from finetune_operator.caches import Caches
from finetune_operator.k8s import ApiError, Kube
from finetune_operator.kinds import by_kind
from finetune_operator.observe import JobView, PodView, WorkloadView, summarize_job
from finetune_operator.progress import job_token
from finetune_operator.record import Key

log = logging.getLogger(__name__)

WORKLOAD = by_kind("Workload")


@dataclass(frozen=True)
class Created:
    """The outcome of one create: the object (new, or already there and ours), or why it cannot be ours."""

    obj: dict[str, Any] | None = None
    existed: bool = False  # answered 409, and the object there is ours
    conflict: str | None = None  # another owner's object holds the name: left alone
    stale: bool = False  # owned by an earlier FineTuneJob of the same name, which garbage collection is removing
    invalid: str | None = None  # the API server refused the object (422): permanent, nothing will change that
    unavailable: str | None = None  # an admission webhook could not be called (Kueue down): retried with backoff

    @property
    def refused(self) -> bool:
        return self.obj is None


@dataclass(frozen=True)
class CreateResult:
    """The outcome of creating all children: the Job, or the refusal that stopped the creation."""

    job: JobView | None = None
    refusal: Created | None = None


def owned(obj: dict[str, Any], owner: builders.Owner) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner.uid and r.get("controller") for r in refs)


def stale_owner(obj: dict[str, Any], owner: builders.Owner) -> bool:
    """Owned by an earlier FineTuneJob of the same name (deleted; garbage collection is on its way)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == names.KIND and r.get("name") == owner.name and r.get("uid") != owner.uid
               for r in refs)


class Children:
    """Child objects of FineTuneJobs through the API; the caches say what exists."""

    def __init__(self, kube: Kube, caches: Caches, ctx: builders.BuildContext, progress_key: bytes) -> None:
        self.kube = kube
        self.caches = caches
        self.ctx = ctx
        self.progress_key = progress_key

    # ------------------------------------------------------------------------------------------------ create

    async def create(self, owner: builders.Owner, spec: FineTuneJobSpec,
                     job: dict[str, Any] | None = None) -> CreateResult:
        """ConfigMap (and, for multi-pod jobs, the Service) together, then the Secret (owned by the ConfigMap), then
        the Job that uses them: the trainer Job, or `job` (the pre-flight's). Stops at the first refusal; an invalid
        child (422) undoes the others first."""
        children = [builders.build_configmap(owner, spec)]
        if builders.needs_service(spec):
            children.append(builders.build_service(owner))
        first = await asyncio.gather(*(self.create_one(owner, c) for c in children), return_exceptions=True)
        for result in first:
            if isinstance(result, BaseException):
                raise result
        made = [r.obj for r in first if isinstance(r, Created) and r.obj is not None]
        for result in first:
            assert isinstance(result, Created)
            if result.refused:
                return await self._refusal(owner, result, made)
        configmap = first[0]
        assert isinstance(configmap, Created) and configmap.obj is not None
        secret = await self.create_one(owner, self.secret(owner, configmap.obj["metadata"]["uid"]))
        if secret.invalid is not None:
            return await self._refusal(owner, secret, made)
        created = await self.create_one(owner, job or builders.build_job(owner, spec, self.ctx))
        if created.obj is None:  # a webhook that did not answer keeps what was made: the retry reuses it (409)
            return await self._refusal(owner, created, made)
        return CreateResult(job=summarize_job(created.obj))

    async def create_job(self, owner: builders.Owner, spec: FineTuneJobSpec) -> CreateResult:
        """The trainer Job alone, once the pre-flight passed (its ConfigMap, Secret and Service exist); an invalid
        one (422) deletes them as `create` does."""
        created = await self.create_one(owner, builders.build_job(owner, spec, self.ctx))
        if created.obj is None:
            inputs = [builders.build_configmap(owner, spec)]
            if builders.needs_service(spec):
                inputs.append(builders.build_service(owner))
            return await self._refusal(owner, created, inputs)
        return CreateResult(job=summarize_job(created.obj))

    async def _refusal(self, owner: builders.Owner, refusal: Created, made: list[dict[str, Any]]) -> CreateResult:
        """A refused child stops the creation. If it is invalid, the job can never run: the children made for it
        (in this pass or an earlier one) are deleted, the ConfigMap taking its Secret along (garbage collection),
        so nothing lingers. A conflict keeps them: the job proceeds once the name is freed."""
        if refusal.invalid is not None:
            for obj in reversed(made):
                meta = obj["metadata"]
                await self.kube.delete(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"],
                                       propagation="Background")
                log.info("%s/%s: deleted %s %s: the job cannot run", owner.namespace, owner.name, obj["kind"],
                         meta["name"])
        return CreateResult(refusal=refusal)

    async def create_one(self, owner: builders.Owner, child: dict[str, Any]) -> Created:
        """Create one child; a 409 is "already done" when the object there is ours."""
        kind, child_name = child["kind"], child["metadata"]["name"]
        try:
            created = await self.kube.create(child)
        except ApiError as exc:
            if exc.invalid:
                log.warning("%s/%s: the API server refused %s %s: %s", owner.namespace, owner.name, kind, child_name,
                            exc.message)
                return Created(invalid=f"the API server refused the {kind} built from this spec: {exc.message}")
            if exc.webhook_unavailable:
                log.warning("%s/%s: %s %s not created, an admission webhook did not answer: %s", owner.namespace,
                            owner.name, kind, child_name, exc.message)
                return Created(unavailable=f"the API server refused to create {kind} {child_name} because an "
                                           f"admission webhook with failurePolicy Fail could not be called (Kueue's, "
                                           f"when Kueue is down): {exc.message}; retrying with backoff")
            if not exc.conflict:
                raise
            if kind == "Secret":
                return Created(obj=child, existed=True)  # Secrets are never read: the deterministic name is trusted
            return await self._existing(owner, child, exc)
        if kind == "Job":
            log.info("%s/%s: created Job %s", owner.namespace, owner.name, child_name)
        return Created(obj=created)

    async def _existing(self, owner: builders.Owner, child: dict[str, Any], exc: ApiError) -> Created:
        """After a 409: the existing object if it is ours, else why it is not (NameConflict, or a stale owner)."""
        kind, child_name = child["kind"], child["metadata"]["name"]
        existing = await self.kube.get(child["apiVersion"], kind, owner.namespace, child_name)
        if existing is None:
            raise kopf.TemporaryError(f"{kind} {child_name} vanished during create", delay=1.0) from exc
        if owned(existing, owner):
            return Created(obj=existing, existed=True)
        if stale_owner(existing, owner):
            return Created(stale=True)
        return Created(conflict=f"{kind} {child_name} already exists and is not owned by this FineTuneJob; "
                                f"it is left alone (rename the FineTuneJob or delete the {kind})")

    def secret(self, owner: builders.Owner, configmap_uid: str) -> dict[str, Any]:
        token = job_token(self.progress_key, owner.namespace, owner.name, owner.uid)
        return builders.build_secret(owner, token, configmap_uid)

    # ------------------------------------------------------------------------------------------- the live Job

    async def sync_job(self, key: Key, spec: FineTuneJobSpec, job: JobView,
                       actions: suspend_owner.Actions) -> JobView:
        """Carry allowed spec edits (backoffLimit, activeDeadlineSeconds) to the live Job, and its `suspend` where the
        operator holds it (suspend_owner.py decided `actions`). Returns the Job as patched."""
        if job.finished:
            return job
        patch = builders.job_patch(spec, job.live_spec, actions.job_suspend, actions.mark)
        if not patch:
            return job
        await self.kube.patch("batch/v1", "Job", key[0], job.name, patch)
        log.info("%s/%s: updated Job %s: %s", *key, job.name, patch)
        if actions.job_suspend is not None:
            return dataclasses.replace(job, suspend=actions.job_suspend, suspended_by=actions.mark)
        return job

    async def set_workload_active(self, key: Key, workload: WorkloadView, active: bool) -> None:
        """Kueue's way to suspend and resume a job it holds: deactivate or activate its Workload."""
        try:
            await self.kube.patch(WORKLOAD.api_version, WORKLOAD.kind, key[0], workload.name,
                                  builders.workload_patch(active))
        except ApiError as exc:
            if exc.not_found:
                return  # replaced or deleted meanwhile: the next pass sees the new one
            raise
        log.info("%s/%s: %s Workload %s", *key, "activated" if active else "deactivated", workload.name)

    async def delete_job(self, key: Key, job: JobView, why: str) -> None:
        """Delete a Job the operator failed (its pods go too: background propagation)."""
        if await self.kube.delete("batch/v1", "Job", key[0], job.name, propagation="Background"):
            log.info("%s/%s: deleted Job %s: %s", *key, job.name, why)

    async def evict_group(self, key: Key, pods: list[PodView], doomed: set[str], broken: PodView) -> None:
        """Kueue holds `suspend` of its Jobs, so their broken groups are stopped by evicting the survivors instead
        (ignored by the pod failure policy like any disruption); the Job controller replaces them, and a replacement
        that meets a dying member exits 76 (peer lost), also ignored, until the whole group is new."""
        for pod in gang.survivors(pods, doomed, broken):
            if pod.deleting:
                continue  # already on its way out (evicted in an earlier pass)
            if await self.kube.evict(key[0], pod.name, pod.uid):
                log.info("%s/%s: evicted pod %s: worker %d failed and its group must restart", *key, pod.name,
                         broken.index)

    # ---------------------------------------------------------------------------------------------- clean up

    async def clean_up(self, key: Key, owner: builders.Owner, why: str) -> None:
        """Delete the Job (and with it the pods), the Service if there is one, then the ConfigMap, whose garbage
        collection takes the Secret along. The ConfigMap goes last: its absence means "cleaned", so an interrupted
        clean-up resumes."""
        ns = owner.namespace
        for job in self.caches.jobs_of(key, owner.uid):
            await self.kube.delete("batch/v1", "Job", ns, job.name, propagation="Background")
        cm = await self.kube.get("v1", "ConfigMap", ns, builders.configmap_name(owner))
        if cm is None or not owned(cm, owner):
            return
        if self.caches.bound("services"):  # the watch cache says whether there is one (single-pod jobs have none)
            services = [s.name for s in self.caches.services_of(key, owner.uid)]
        else:
            svc = await self.kube.get("v1", "Service", ns, builders.service_name(owner))
            services = [builders.service_name(owner)] if svc is not None and owned(svc, owner) else []
        for service in services:
            await self.kube.delete("v1", "Service", ns, service)
        await self.kube.delete("v1", "ConfigMap", ns, builders.configmap_name(owner), propagation="Background")
        log.info("%s/%s: children deleted: %s", *key, why)

