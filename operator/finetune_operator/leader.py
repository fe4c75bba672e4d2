"""Leader election on a coordination.k8s.io Lease, the way client-go does it.

Two replicas (a rolling update, a mistaken `replicas: 2`) must not both create children and write status. kopf's
peering pauses operators of equal priority instead of choosing one, so the operator holds a Lease: the holder runs
kopf and the reconciler, a standby only serves health probes. Expiry is judged by when *this* process last saw the
record change (not by comparing clocks), and a leader that cannot renew in time exits, so it never acts unsure.

`holds()` fences writes: it is true only within `renew_deadline` of the *start* of the last successful renewal, which
is before any other replica can see the lease expire (they wait a full lease duration from when they saw that
renewal). A leader that was paused (SIGSTOP, a stalled VM, a long GC) and wakes up after another replica took over
therefore withholds its writes, even those a reconcile pass had already decided on, until it notices and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from finetune_operator.k8s import ApiError, Kube

log = logging.getLogger(__name__)


def _micro_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, lease_seconds: float = 15.0,
                 identity: str | None = None) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.identity = identity or f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        # client-go's proportions: renew within 2/3 of the lease, try every 1/5 of it.
        self.lease_seconds = lease_seconds
        self.renew_deadline = lease_seconds * 2 / 3
        self.retry_period = lease_seconds / 5
        self.lost = asyncio.Event()
        self._observed: tuple[Any, float] | None = None  # (holder, renewTime) record and when it was first seen
        self._lease: dict[str, Any] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._renewed_at: float | None = None  # monotonic start of the last successful acquire or renew

    def holds(self) -> bool:
        """Whether this replica may still act as the leader (see the module docstring)."""
        return (not self.lost.is_set() and self._renewed_at is not None
                and time.monotonic() - self._renewed_at < self.renew_deadline)

    async def _attempt(self) -> bool:
        started = time.monotonic()
        if await self._try():
            self._renewed_at = started
            return True
        return False

    def _record(self, now: float, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_seconds)),
            "acquireTime": _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    async def _try(self) -> bool:
        """One acquire-or-renew attempt; True when this process holds the lease afterwards."""
        now = time.time()
        lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._record(now, 0)}
            return await self._store(self.kube.create(body))
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        record = (holder, spec.get("renewTime"))
        mono = time.monotonic()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, mono)
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        expired = mono - self._observed[1] > duration
        if holder and holder != self.identity and not expired:
            return False
        new_spec = self._record(now, int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1))
        if holder == self.identity and spec.get("acquireTime"):
            new_spec["acquireTime"] = spec["acquireTime"]
        lease["spec"] = new_spec
        return await self._store(self.kube.replace(lease))

    async def _store(self, write: Awaitable[dict[str, Any]]) -> bool:
        """Create or replace the Lease; a 409 means another candidate wrote it first."""
        try:
            self._lease = await write
        except ApiError as exc:
            if exc.conflict:
                return False
            raise
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Block until leader (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if await self._attempt():
                    log.info("became leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
                    self._renewer = asyncio.create_task(self._renew_loop(), name="lease-renewer")
                    return True
            except ApiError as exc:
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("waiting for the lease %s/%s (held by another replica)", self.namespace, self.name)
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.retry_period * random.uniform(0.8, 1.2))
        return False

    async def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                if await self._attempt():
                    last_ok = time.monotonic()
                    continue
                log.error("lost the lease %s/%s to another replica", self.namespace, self.name)
                break
            except ApiError as exc:
                log.warning("lease renewal failed: %s", exc)
            if time.monotonic() - last_ok > self.renew_deadline:
                log.error("could not renew the lease for %.0fs; stepping down", self.renew_deadline)
                break
        self.lost.set()

    async def release(self) -> None:
        """Hand the lease over at once on a clean shutdown (the next replica need not wait for expiry)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._lease is None or self.lost.is_set():
            return
        lease = dict(self._lease)
        lease["spec"] = {**lease.get("spec", {}), "holderIdentity": None, "leaseDurationSeconds": 1}
        with contextlib.suppress(ApiError):
            await self.kube.replace(lease)
