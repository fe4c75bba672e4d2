"""The watch caches: one kopf index per watched kind of kinds.py (Jobs, Pods, ConfigMaps, Services, and Kueue's
Workloads where that integration is on), each holding small views by FineTuneJob key.

A pass reads only these (and the FineTuneJob's record), never the API, so a steady job costs no request. kopf fills
them from watches; tests hand in plain dicts of the same shape.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.observe import ConfigMapView, JobView, PodView, ServiceView, WorkloadView
from finetune_operator.record import Key


def _read(index: Any, key: Key) -> list[Any]:
    """A snapshot of one key's entries; empty when unbound, or when the index changed while it was copied (the
    watch event that changed it queues another pass)."""
    if index is None:
        return []
    try:
        return list(index.get(key, ()))
    except RuntimeError:
        return []


class Caches:
    """Read-only views of the indices, bound at startup by cache name (`kinds.Watch.cache`)."""

    def __init__(self) -> None:
        self.indices: dict[str, Any] = {}  # cache name -> kopf.Index[Key, <view>]

    def bind(self, **indices: Any) -> None:
        self.indices = {name: index for name, index in indices.items() if index is not None}

    def bound(self, cache: str) -> bool:
        return cache in self.indices

    @property
    def drift_repair(self) -> bool:
        """Whether ConfigMaps and Services are watched, so that a drifted or missing one can be seen."""
        return self.bound("configmaps") and self.bound("services")

    def jobs_of(self, key: Key, owner_uid: str) -> list[JobView]:
        return [j for j in _read(self.indices.get("jobs"), key) if j.owner_uid == owner_uid]

    def job(self, key: Key, owner_uid: str, name: str) -> JobView | None:
        return next((j for j in self.jobs_of(key, owner_uid) if j.name == name), None)

    def pods_of(self, key: Key, job_uid: str) -> list[PodView]:
        """The pods of one Job. Not tolerant like the others: a pass on a partial pod list could report a running
        job as Pending, so a concurrent change fails the pass, and it is retried."""
        pods = self.indices.get("pods")
        if pods is None:
            return []
        return [p for p in list(pods.get(key, ())) if p.job_uid == job_uid]

    def configmap(self, key: Key, owner_uid: str, name: str) -> ConfigMapView | None:
        return next((c for c in _read(self.indices.get("configmaps"), key)
                     if c.owner_uid == owner_uid and c.name == name), None)

    def service(self, key: Key, owner_uid: str, name: str) -> ServiceView | None:
        return next((s for s in _read(self.indices.get("services"), key)
                     if s.owner_uid == owner_uid and s.name == name), None)

    def services_of(self, key: Key, owner_uid: str) -> list[ServiceView]:
        return [s for s in _read(self.indices.get("services"), key) if s.owner_uid == owner_uid]

    def workload_of(self, key: Key, job_uid: str) -> WorkloadView | None:
        """Kueue's Workload of one Job (Kueue keeps one; while a replaced one is being deleted, the live one)."""
        found = [w for w in _read(self.indices.get("workloads"), key) if w.job_uid == job_uid]
        found.sort(key=lambda w: w.deleting)
        return found[0] if found else None
