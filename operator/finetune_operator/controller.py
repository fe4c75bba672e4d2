"""The operator's core, assembled: what the watches and the trainers report comes in here and becomes queued passes.

kopf feeds `observe_ftj` (FineTuneJobs) and `observe_child` (every other watched kind of kinds.py: the operator's
Jobs, Pods, ConfigMaps and Services, and Kueue's Workloads)
and fills the watch caches bound by `bind_indices`; the progress server feeds `accept_report`. Each updates the job's
record and queues its key; the runner hands keys to the reconcile pass, one at a time per key.

    intake (this module) -> records (record.py) + queue (workqueue.py) -> runner.py -> reconcile.py -> children.py
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from finetune_api import errors
from finetune_api.progress import ProgressReport, merge_reports
from finetune_operator import builders
from finetune_operator.caches import Caches
from finetune_operator.children import Children
from finetune_operator.k8s import Kube
from finetune_operator.metrics import JobSample, Metrics
from finetune_operator.progress import token_valid
from finetune_operator.reconcile import Reconciler
from finetune_operator.record import JobRecord, Key, key_of
from finetune_operator.repair import Repair
from finetune_operator.runner import Runner
from finetune_operator.settings import Settings
from finetune_operator.sharing import footprint
from finetune_operator.workqueue import WorkQueue

PROGRESS_MIN_INTERVAL = 2.0  # seconds between progress-driven status writes of one job


class Controller:
    """The records of all FineTuneJobs, the work queue, and the parts that act on them."""

    def __init__(self, settings: Settings, kube: Kube, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.records: dict[Key, JobRecord] = {}
        self.queue: WorkQueue[Key] = WorkQueue()
        self.caches = Caches()
        self.ctx = builders.BuildContext(
            trainer_image=settings.trainer_image, progress_url=settings.progress_url,
            grace_period_seconds=settings.grace_period_seconds,
            preflight=builders.PreflightContext(
                enabled=settings.preflight, cpu=settings.preflight_cpu, memory=settings.preflight_memory,
                node_selector=settings.preflight_node_selector, tolerations=settings.preflight_tolerations,
                queue_name=settings.preflight_queue or None))
        children = Children(kube, self.caches, self.ctx, settings.progress_key)
        self.reconciler = Reconciler(settings, kube, metrics, clock, self.records, self.caches, children,
                                     Repair(kube, self.caches, children), self.queue)
        self.runner = Runner(self.queue, self.reconcile, lambda: list(self.records), metrics, settings.workers,
                             settings.resync_seconds)
        metrics.bind_jobs(self.samples)

    async def reconcile(self, key: Key) -> None:
        await self.reconciler.reconcile(key)

    def start(self) -> None:
        self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()

    # ------------------------------------------------------------------------------------------ watch intake

    def bind_indices(self, **indices: Any) -> None:
        """The watch caches by name (kinds.Watch.cache: jobs, pods, configmaps, services, workloads)."""
        self.caches.bind(**indices)

    def observe_ftj(self, event_type: str | None, body: dict[str, Any]) -> None:
        key = key_of(body)
        record = self.records.get(key)
        if record is not None and record.footprint.live and (event_type == "DELETED" or not footprint(body).live):
            self._wake_held_back(key)  # it ended or went: the jobs it kept from its storage may start now
        if event_type == "DELETED":
            self.forget(key)
            return
        if record is not None and record.uid != (body.get("metadata") or {}).get("uid"):
            self.forget(key)  # same name, new object: nothing of the old one applies
            record = None
        if record is None:  # first sight: counters count growth from here on, not the history
            status = body.get("status") or {}
            self.metrics.add_delta(self.metrics.restarts, *key, status.get("restarts"))
            self.metrics.add_delta(self.metrics.checkpoints, *key, (status.get("checkpoints") or {}).get("count"))
            self.records[key] = JobRecord.first_seen(body)
        else:
            record.see(body)
        self.queue.add(key)

    def _wake_held_back(self, key: Key) -> None:
        for other, record in self.records.items():
            if other != key and record.footprint.held:
                self.queue.add(other)

    def observe_child(self, key: Key | None) -> None:
        if key is not None and key in self.records:
            self.queue.add(key)

    def forget(self, key: Key) -> None:
        self.records.pop(key, None)
        self.queue.forget(key)
        self.metrics.forget(*key)

    # -------------------------------------------------------------------------------------- progress intake

    def accept_report(self, namespace: str, name: str, token: str, payload: Any) -> tuple[int, str]:
        """Authenticate and record one progress push; returns (HTTP status, message). Status follows within 2 s."""
        key = (namespace, name)
        record = self.records.get(key)
        uid = record.uid if record is not None else None
        if not uid or not token or not token_valid(self.settings.progress_key, namespace, name, uid, token):
            self.metrics.progress_reports.labels(result="unauthorized").inc()
            return 401, "invalid token for this job"
        assert record is not None
        try:
            report = ProgressReport.model_validate(payload)
        except ValidationError as exc:
            self.metrics.progress_reports.labels(result="invalid").inc()
            return 400, errors.describe(exc, limit=5)
        record.report = merge_reports(record.report, report)
        self.metrics.progress_reports.labels(result="accepted").inc()
        wait = record.last_status_write + PROGRESS_MIN_INTERVAL - self.clock()
        self.queue.add(key, max(0.0, wait))
        return 202, "accepted"

    def samples(self) -> Iterable[JobSample]:
        """Per-job series for the scrape: the status as stored, overlaid with a newer trainer report."""
        for (namespace, name), record in list(self.records.items()):
            status = record.body.get("status") or {}
            progress, report = status.get("progress") or {}, record.report
            yield JobSample(namespace=namespace, name=name, phase=status.get("phase"),
                            step=_latest(report, "step", progress, "step"),
                            loss=_latest(report, "loss", progress, "loss"),
                            samples_per_second=_latest(report, "samples_per_second", progress, "samplesPerSecond"),
                            eta_seconds=_latest(report, "eta_seconds", progress, "etaSeconds"))


def _latest(report: ProgressReport | None, attr: str, progress: dict[str, Any], stored: str) -> Any:
    value = getattr(report, attr) if report is not None else None
    return value if value is not None else progress.get(stored)
