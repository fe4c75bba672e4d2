"""The work queue: dedupe, delays, one worker per key, backoff."""

from __future__ import annotations

import asyncio

from finetune_operator.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_dedupe_and_order() -> None:
    async def body() -> None:
        q: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "a", "a"):
            q.add(key)
        assert len(q) == 2
        assert await q.get() == "a"
        assert await q.get() == "b"
        assert len(q) == 0
    run(body())


def test_delay_keeps_the_earliest_due_time() -> None:
    async def body() -> None:
        clock = Clock()
        q: WorkQueue[str] = WorkQueue(clock=clock)
        q.add("a", 10)
        q.add("a", 5)
        q.add("a", 20)
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        clock.now += 5
        q.add("b", 100)  # wakes the getter, which now finds "a" due
        assert await asyncio.wait_for(waiter, 1) == "a"
    run(body())


def test_a_key_in_progress_is_not_handed_out_twice_but_runs_again_after() -> None:
    async def body() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        assert await q.get() == "a"
        q.add("a")  # event while processing
        second = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        assert not second.done(), "no second worker on the same key"
        q.done("a")
        assert await asyncio.wait_for(second, 1) == "a"
    run(body())


def test_retry_backs_off_exponentially_and_success_resets() -> None:
    async def body() -> None:
        q: WorkQueue[str] = WorkQueue(base_delay=1.0, max_delay=8.0)
        delays = []
        for _ in range(6):
            q.add("a")
            assert await q.get() == "a"
            delays.append(q.retry("a"))
            q.forget("a")  # drops the scheduled retry (and the history, so restore it below)
            q._failures["a"] = len(delays)
        for i, d in enumerate(delays[:3]):
            assert 0.8 * 2**i <= d <= 1.2 * 2**i
        assert max(delays) <= 8.0 * 1.2
        q.succeeded("a")
        assert q.failures("a") == 0
        assert q.retry("a", delay=3.0) == 3.0
    run(body())


def test_forget_and_shutdown() -> None:
    async def body() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.forget("a")
        assert len(q) == 0
        q.shutdown()
        assert await q.get() is None
    run(body())
