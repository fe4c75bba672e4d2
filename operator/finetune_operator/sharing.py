"""Live FineTuneJobs that would write to the same storage: a pure function over the operator's records.

Two jobs whose output or checkpoint storage is the same folder, or one inside the other, would resume each other's
checkpoints and overwrite each other's model. The trainer refuses storage that another job wrote (its ownership
records), but only once one of them has written there, and then as a failure. So the operator holds the newer of two
live jobs (the later creationTimestamp; namespace/name break a tie) before it creates any pod: Pending with
`Created=False/StorageConflict` naming the other job, and a Warning Event. It starts once the other job has finished
or is deleted (and its trainer then refuses what that job left there, unless it is its own).

Only shared places count: `pvc://` (a claim of the job's own namespace) and remote URLs (per object-store endpoint).
A plain path is each pod's own file system.

Each record keeps its job's `Footprint` (made once per version of the object), so that the pass before a job's
children are created compares it with every other job cheaply: under a millisecond against 1,000 jobs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from finetune_api.status import TERMINAL_PHASES
from finetune_operator.state import STORAGE_CONFLICT

Body = dict[str, Any]


@dataclass(frozen=True)
class Place:
    """One storage a job writes to: the spec field, the location as written, and where it is, as path parts."""

    field: str
    uri: str
    parts: tuple[str, ...]  # ("pvc", namespace, claim, *path) or ("url", endpoint, scheme, *path)


@dataclass(frozen=True)
class Footprint:
    """What the check needs of one version of a FineTuneJob."""

    namespace: str
    name: str
    created: str  # creationTimestamp: RFC 3339 in UTC, so its text sorts as its time
    phase: str | None
    live: bool  # running, pending, queued or suspended: not finished, cancelled or being deleted
    held: bool  # its written status says it waits for another job's storage (StorageConflict)
    places: tuple[Place, ...]

    @property
    def age(self) -> tuple[str, str, str]:
        """Older first: creationTimestamp, then namespace and name (one second holds many creations)."""
        return self.created, self.namespace, self.name


def _place(field: str, uri: str, namespace: str, endpoint: str) -> Place | None:
    """A location as path parts; None for a plain path (the pod's own file system)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":
        return None
    where = ("pvc", namespace) if scheme == "pvc" else ("url", endpoint, scheme)
    return Place(field, uri, (*where, *(p for p in rest.split("/") if p not in ("", "."))))


def footprint(body: Body) -> Footprint:
    """Where a FineTuneJob writes (output.storage and the checkpoint storage, by default inside the output), how old
    it is and whether it is live."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    namespace, phase = str(meta.get("namespace") or ""), (body.get("status") or {}).get("phase")
    endpoint = str((((spec.get("credentials") or {}).get("s3")) or {}).get("endpointUrl") or "")
    places = []
    for field, uri in (("output.storage", (spec.get("output") or {}).get("storage")),
                       ("checkpointing.storage", (spec.get("checkpointing") or {}).get("storage"))):
        if uri and (place := _place(field, str(uri), namespace, endpoint)) is not None:
            places.append(place)
    live = phase not in TERMINAL_PHASES and not meta.get("deletionTimestamp") and not (
        spec.get("runPolicy") or {}).get("cancel")
    held = any(c.get("type") == "Created" and c.get("status") == "False" and c.get("reason") == STORAGE_CONFLICT
               for c in (body.get("status") or {}).get("conditions") or [])
    return Footprint(namespace, str(meta.get("name") or ""), str(meta.get("creationTimestamp") or ""), phase, live,
                     held, tuple(places))


def _relation(mine: Place, theirs: Place) -> str | None:
    """How two places overlap: the same folder, or one inside the other; None when they are apart."""
    a, b = mine.parts, theirs.parts
    if len(a) == len(b):
        return "is also" if a == b else None
    if len(a) > len(b):
        return "lies inside" if a[: len(b)] == b else None
    return "contains" if b[: len(a)] == a else None


def conflict(job: Footprint, others: Iterable[Footprint]) -> str | None:
    """Why `job` must not start yet: an older live FineTuneJob writes where it would (the oldest such, named with
    the place they share). None when nothing does."""
    if not job.places:
        return None
    me = job.age
    found: tuple[Footprint, Place, Place, str] | None = None
    for other in others:
        if not other.live or other.age >= me or (found is not None and other.age >= found[0].age):
            continue
        for place in job.places:
            for theirs in other.places:
                if (relation := _relation(place, theirs)) is not None:
                    found = (other, place, theirs, relation)
    if found is None:
        return None
    other, place, theirs, relation = found
    return (f"spec.{place.field} {place.uri} {relation} where FineTuneJob {other.namespace}/{other.name} (created "
            f"{other.created}, {other.phase or 'Pending'}) writes its {theirs.field} ({theirs.uri}): two jobs there "
            "would resume each other's checkpoints and overwrite each other's model. This job does not start while "
            "that one is live; give it its own storage (checkpointing.storage can be edited; output.storage cannot: "
            "re-create the job), or delete the other job")
