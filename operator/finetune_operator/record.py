"""What the operator remembers about each FineTuneJob between passes: one record per job, dropped as a whole.

The watch caches (kopf indices) say what exists; a record holds what only this process knows: the FineTuneJob as it
last saw it, the pod ledger, the latest trainer report, and the small timers of the pass. A deleted FineTuneJob, or
a new one under the same name, drops its record in one statement, so nothing of an old job leaks into a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api.progress import ProgressReport
from finetune_operator.ledger import Ledger

Key = tuple[str, str]  # (namespace, FineTuneJob name)


def key_of(body: dict[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _rv(body: dict[str, Any]) -> int | None:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def _without_managed_fields(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


@dataclass
class JobRecord:
    """Everything this process knows about one FineTuneJob (one uid)."""

    body: dict[str, Any]  # the FineTuneJob as last seen (watch event or our own status write), no managedFields
    ledger: Ledger | None = None  # the pods its Job has run: restarts, GPU-seconds, broken groups
    report: ProgressReport | None = None  # the trainer's pushes merged, until a terminal status holds them
    created_at: float | None = None  # when this process created the children (the settle time runs from here)
    last_status_write: float = 0.0  # progress pushes are written no sooner than 2 s after the previous write
    create_failure_checked: float = 0.0  # last look at the Job's FailedCreate events ...
    create_failure: str | None = None  # ... and the message found then
    secret_retries: int = 0  # passes left to re-create the progress Secret of a re-created ConfigMap
    cleaned: bool = False  # the TTL clean-up is done

    @classmethod
    def first_seen(cls, body: dict[str, Any]) -> JobRecord:
        return cls(body=_without_managed_fields(body))

    @property
    def uid(self) -> str | None:
        return (self.body.get("metadata") or {}).get("uid")

    def see(self, body: dict[str, Any]) -> None:
        """Keep `body` unless what is held is newer (watch events and our own writes may arrive out of order)."""
        new_rv, old_rv = _rv(body), _rv(self.body)
        if new_rv is None or old_rv is None or new_rv >= old_rv:
            self.body = _without_managed_fields(body)
