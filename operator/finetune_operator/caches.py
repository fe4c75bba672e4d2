"""The watch caches: kopf indices of the operator's Jobs, Pods, ConfigMaps and Services, by FineTuneJob key.

A pass reads only these (and the FineTuneJob's record), never the API, so a steady job costs no request. kopf fills
them from watches with a server-side label selector; tests hand in plain dicts of the same shape.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.observe import ConfigMapView, JobView, PodView, ServiceView
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
    """Read-only views of the four indices, bound at startup."""

    def __init__(self) -> None:
        self.jobs: Any = None  # kopf.Index[Key, JobView]
        self.pods: Any = None  # kopf.Index[Key, PodView]
        self.configmaps: Any = None  # kopf.Index[Key, ConfigMapView]; None: no drift repair
        self.services: Any = None  # kopf.Index[Key, ServiceView]

    def bind(self, jobs: Any, pods: Any, configmaps: Any = None, services: Any = None) -> None:
        self.jobs, self.pods, self.configmaps, self.services = jobs, pods, configmaps, services

    @property
    def drift_repair(self) -> bool:
        """Whether ConfigMaps and Services are watched, so that a drifted or missing one can be seen."""
        return self.configmaps is not None and self.services is not None

    def jobs_of(self, key: Key, owner_uid: str) -> list[JobView]:
        return [j for j in _read(self.jobs, key) if j.owner_uid == owner_uid]

    def job(self, key: Key, owner_uid: str, name: str) -> JobView | None:
        return next((j for j in self.jobs_of(key, owner_uid) if j.name == name), None)

    def pods_of(self, key: Key, job_uid: str) -> list[PodView]:
        """The pods of one Job. Not tolerant like the others: a pass on a partial pod list could report a running
        job as Pending, so a concurrent change fails the pass, and it is retried."""
        if self.pods is None:
            return []
        return [p for p in list(self.pods.get(key, ())) if p.job_uid == job_uid]

    def configmap(self, key: Key, owner_uid: str, name: str) -> ConfigMapView | None:
        return next((c for c in _read(self.configmaps, key) if c.owner_uid == owner_uid and c.name == name), None)

    def service(self, key: Key, owner_uid: str, name: str) -> ServiceView | None:
        return next((s for s in _read(self.services, key) if s.owner_uid == owner_uid and s.name == name), None)

    def services_of(self, key: Key, owner_uid: str) -> list[ServiceView]:
        return [s for s in _read(self.services, key) if s.owner_uid == owner_uid]
