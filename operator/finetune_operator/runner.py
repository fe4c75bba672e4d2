"""The workers that drain the work queue into reconcile passes, and the periodic resync that refills it.

Errors choose the next step: `kopf.TemporaryError(delay)` retries after that delay, an `ApiError` or any other
exception retries with the queue's capped exponential backoff, and a namespace being deleted needs nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import kopf

from finetune_operator.k8s import ApiError
from finetune_operator.metrics import Metrics
from finetune_operator.record import Key
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)


@dataclass
class Runner:
    """`workers` reconcile tasks and one resync task around a queue with per-key exclusivity."""

    queue: WorkQueue[Key]
    reconcile: Callable[[Key], Awaitable[None]]
    keys: Callable[[], list[Key]]  # every known job, for the resync
    metrics: Metrics
    workers: int
    resync_seconds: float
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    def start(self) -> None:
        for i in range(self.workers):
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
            await asyncio.sleep(self.resync_seconds)
            keys = self.keys()
            spread = self.resync_seconds / 2
            for i, key in enumerate(keys):
                self.queue.add(key, spread * i / max(len(keys), 1))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            if key is None:
                return
            started = time.perf_counter()
            try:
                result = await self._run(key)
            finally:
                self.queue.done(key)
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.metrics.queue_depth.set(len(self.queue))
            self.metrics.reconciles.labels(result=result).inc()

    async def _run(self, key: Key) -> str:
        """One pass; returns its result label (ok, retry, error) after scheduling what comes next."""
        try:
            await self.reconcile(key)
        except kopf.TemporaryError as exc:
            delay = self.queue.retry(key, exc.delay)
            log.info("%s/%s: %s; retrying in %.1fs", *key, exc, delay)
            return "retry"
        except ApiError as exc:
            if exc.namespace_terminating:
                log.debug("%s/%s: namespace is being deleted; nothing to do", *key)
                return "ok"
            delay = self.queue.retry(key)
            self.metrics.reconcile_errors.labels(cause=f"api_{exc.status}").inc()
            level = logging.INFO if exc.retryable and self.queue.failures(key) < 5 else logging.WARNING
            log.log(level, "%s/%s: API error (%s); retrying in %.1fs", *key, exc, delay)
            return "retry" if exc.retryable else "error"
        except Exception:
            delay = self.queue.retry(key)
            self.metrics.reconcile_errors.labels(cause="exception").inc()
            log.exception("%s/%s: reconcile failed; retrying in %.1fs", *key, delay)
            return "error"
        self.queue.succeeded(key)
        return "ok"
