"""Lease election against an in-memory Lease store with optimistic concurrency (resourceVersion)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from finetune_operator.k8s import ApiError
from finetune_operator.leader import LeaderElector


class LeaseStore:
    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lease)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.lease is not None:
            raise ApiError("POST", "lease", 409, {"reason": "AlreadyExists"})
        self.rv += 1
        self.lease = {**copy.deepcopy(obj), "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        return copy.deepcopy(self.lease)

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.lease is not None
        if obj["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError("PUT", "lease", 409, {"reason": "Conflict"})
        self.rv += 1
        self.lease = {**copy.deepcopy(obj), "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        return copy.deepcopy(self.lease)


def test_one_leader_standby_takes_over_after_release() -> None:
    async def body() -> None:
        store = LeaseStore()
        a = LeaderElector(store, "ops", "op", lease_seconds=0.5, identity="a")  # type: ignore[arg-type]
        b = LeaderElector(store, "ops", "op", lease_seconds=0.5, identity="b")  # type: ignore[arg-type]
        stop = asyncio.Event()
        assert await a.acquire(stop)
        waiting = asyncio.create_task(b.acquire(stop))
        rv = store.rv
        async with asyncio.timeout(3):
            while store.rv < rv + 3:  # a renews three times: b sees a live lease and keeps waiting
                await asyncio.sleep(0.01)
        assert not waiting.done()
        assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "a"
        await a.release()
        assert await asyncio.wait_for(waiting, 2)
        assert store.lease["spec"]["holderIdentity"] == "b" and store.lease["spec"]["leaseTransitions"] == 1
        await b.release()
    asyncio.run(body())


def test_an_expired_lease_is_taken_over_and_the_old_holder_steps_down() -> None:
    async def body() -> None:
        store = LeaseStore()
        a = LeaderElector(store, "ops", "op", lease_seconds=0.5, identity="a")  # type: ignore[arg-type]
        assert await a.acquire(asyncio.Event())
        assert a._renewer is not None
        a._renewer.cancel()  # a hangs (no renewals) without releasing
        b = LeaderElector(store, "ops", "op", lease_seconds=0.5, identity="b")  # type: ignore[arg-type]
        assert await asyncio.wait_for(b.acquire(asyncio.Event()), 3)
        assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "b"
        # a wakes up: its next renewal finds b holding the lease and it steps down.
        a._renewer = asyncio.create_task(a._renew_loop())
        await asyncio.wait_for(a.lost.wait(), 3)
        await b.release()
    asyncio.run(body())
