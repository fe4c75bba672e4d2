"""What the operator remembers about each FineTuneJob between passes: one record per job, dropped as a whole.

The watch caches (kopf indices) say what exists; a record holds what only this process knows: the FineTuneJob as it
last saw it, the pod ledger, the latest trainer report, and the small timers of the pass. A deleted FineTuneJob, or
a new one under the same name, drops its record in one statement, so nothing of an old job leaks into a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_api.progress import ProgressReport
from finetune_operator import sharing
from finetune_operator.ledger import Ledger

Key = tuple[str, str]  # (namespace, FineTuneJob name)


def key_of(body: dict[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _meta(body: dict[str, Any]) -> dict[str, Any]:
    return body.get("metadata") or {}


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
    written: str | None = None  # resourceVersion of our last status write, until the watch delivers that version
    footprint: sharing.Footprint = field(init=False)  # where it writes, its age, whether live: made with `body`

    def __post_init__(self) -> None:
        self.keep(self.body)

    @classmethod
    def first_seen(cls, body: dict[str, Any]) -> JobRecord:
        return cls(body=_without_managed_fields(body))

    def keep(self, body: dict[str, Any]) -> None:
        """The FineTuneJob as it is now, and what the storage check needs of it."""
        self.body = body
        self.footprint = sharing.footprint(body)

    @property
    def uid(self) -> str | None:
        return (self.body.get("metadata") or {}).get("uid")

    def see(self, body: dict[str, Any]) -> None:
        """A watch event. The watch delivers versions in order, but the answer to our own status write can overtake
        events still on their way, so until the watch brings the written version back, an event's spec and metadata
        are taken and the written status is kept (only this operator writes status). resourceVersion is opaque:
        compared for equality only, never as a number; `generation` is an integer by contract, so an event of a
        newer generation is newer than the write, and one of an older generation is stale."""
        if self.written is not None and _meta(body).get("resourceVersion") != self.written:
            generation, held = _meta(body).get("generation") or 0, _meta(self.body).get("generation") or 0
            if generation < held:
                return
            if generation == held:
                self.keep({**_without_managed_fields(body), "status": self.body.get("status")})
                return
        self.written = None
        self.keep(_without_managed_fields(body))

    def wrote(self, body: dict[str, Any]) -> None:
        """The answer to our status write: the newest version there is, until the watch delivers it."""
        self.keep(_without_managed_fields(body))
        self.written = _meta(body).get("resourceVersion")
