"""Lease election against an in-memory Lease store with optimistic concurrency (resourceVersion)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

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


def test_holds_fences_a_leader_that_stopped_renewing() -> None:
    """A paused leader (here: its renewals stop) stops holding within renew_deadline of its last renewal's start,
    before any other replica can take the lease over (a full lease duration after it saw that renewal)."""
    async def body() -> None:
        store = LeaseStore()
        a = LeaderElector(store, "ops", "op", lease_seconds=0.6, identity="a")  # type: ignore[arg-type]
        assert not a.holds(), "not before it acquired the lease"
        assert await a.acquire(asyncio.Event())
        assert a.holds()
        assert a._renewer is not None
        a._renewer.cancel()
        b = LeaderElector(store, "ops", "op", lease_seconds=0.6, identity="b")  # type: ignore[arg-type]
        taking_over = asyncio.create_task(b.acquire(asyncio.Event()))
        async with asyncio.timeout(3):
            while a.holds():
                assert not taking_over.done(), "b took over while a still believed it held the lease"
                await asyncio.sleep(0.005)
        assert await asyncio.wait_for(taking_over, 3)
        assert not a.holds()
        await b.release()
    asyncio.run(body())


def test_writes_are_withheld_without_the_lease_but_lease_traffic_is_not() -> None:
    async def body() -> None:
        from finetune_operator.k8s import Kube
        from finetune_operator.metrics import Metrics

        def no_login() -> None:
            raise AssertionError("a withheld write never reaches the network")

        kube = Kube(Metrics(), login_fn=no_login)  # type: ignore[arg-type]
        kube.write_guard = lambda: False
        for verb, resource in (("POST", "Job"), ("PATCH", "FineTuneJob/status"), ("DELETE", "ConfigMap"),
                               ("POST", "Event"), ("POST", "Pod/eviction")):
            try:
                await kube.request(verb, "/x", {}, resource=resource)
            except ApiError as exc:
                assert exc.status == 0 and "withheld" in exc.message
            else:
                raise AssertionError(f"{verb} {resource} went out without the lease")
        for verb, resource in (("GET", "Job"), ("PUT", "Lease")):  # not fenced: they reach login (forbidden here)
            with pytest.raises(AssertionError, match="never reaches the network"):
                await kube.request(verb, "/x", resource=resource)
    asyncio.run(body())
