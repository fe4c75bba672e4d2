"""A deduplicating, delaying work queue with per-key exclusivity: controller-runtime's workqueue in asyncio.

Many watch events for one FineTuneJob (its Job, its pods, its own status) collapse into one pending reconcile;
a key being processed is never handed to a second worker, and a key added meanwhile runs again afterwards. Failed
keys come back with capped exponential backoff and jitter, so an API outage cannot become a hot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic, base_delay: float = 0.5,
                 max_delay: float = 60.0) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._processing: set[K] = set()
        self._dirty: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._closed = False
        self.base_delay = base_delay
        self.max_delay = max_delay

    def __len__(self) -> int:
        return len(self._due) + len(self._dirty)

    def add(self, key: K, delay: float = 0.0) -> None:
        """Schedule `key` in `delay` seconds, unless it is already due sooner."""
        if self._closed:
            return
        due = self._clock() + max(0.0, delay)
        if key in self._processing:
            self._dirty[key] = min(due, self._dirty.get(key, due))
            return
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._wakeup.set()

    def forget(self, key: K) -> None:
        """Drop a pending key (its object is gone) and its failure history."""
        self._due.pop(key, None)
        self._dirty.pop(key, None)
        self._failures.pop(key, None)

    async def get(self) -> K | None:
        """Wait for the next due key (None once shut down); the caller must call done(key)."""
        while not self._closed:
            now = self._clock()
            while self._heap:
                due, _, key = self._heap[0]
                if self._due.get(key) != due:
                    heapq.heappop(self._heap)  # superseded or forgotten entry
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                del self._due[key]
                self._processing.add(key)
                return key
            timeout = self._heap[0][0] - now if self._heap else None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
        return None

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            due = self._dirty.pop(key)
            self.add(key, max(0.0, due - self._clock()))

    def retry(self, key: K, delay: float | None = None) -> float:
        """Re-add after a failure with exponential backoff (or an explicit delay); returns the delay used."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        if delay is None:
            delay = min(self.max_delay, self.base_delay * (2**n))
            delay *= random.uniform(0.8, 1.2)
        self._processing.discard(key)
        self._dirty.pop(key, None)
        self.add(key, delay)
        return delay

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def shutdown(self) -> None:
        self._closed = True
        self._wakeup.set()
