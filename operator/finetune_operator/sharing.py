"""Live FineTuneJobs that would write to the same storage: a pure function over the operator's records.

Two jobs whose output or checkpoint storage is the same folder, or one inside the other, would resume each other's
checkpoints and overwrite each other's model. The trainer refuses storage that another job wrote (its ownership
records), but only once one of them has written there, and then as a failure. So the operator holds the newer of two
live jobs (the later creationTimestamp; namespace/name break a tie) before it creates any pod: Pending with
`Created=False/StorageConflict` naming the other job, and a Warning Event. It starts once the other job has finished
or is deleted (and its trainer then refuses what that job left there, unless it is its own).

Only shared places count: `pvc://` (a claim of the job's own namespace) and remote URLs (per object-store endpoint).
A plain path is each pod's own file system.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=8192)
def _place(field: str, uri: str, namespace: str, endpoint: str) -> Place | None:
    """A location as path parts; None for a plain path (the pod's own file system). Cached: every pass that may
    create a job's children compares it with every other live job."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":
        return None
    where = ("pvc", namespace) if scheme == "pvc" else ("url", endpoint, scheme)
    return Place(field, uri, (*where, *(p for p in rest.split("/") if p not in ("", "."))))


def places(body: Body) -> list[Place]:
    """Where a FineTuneJob writes: output.storage and the checkpoint storage (by default inside the output)."""
    spec = body.get("spec") or {}
    namespace = str((body.get("metadata") or {}).get("namespace", ""))
    endpoint = str((((spec.get("credentials") or {}).get("s3")) or {}).get("endpointUrl") or "")
    found = []
    for field, uri in (("output.storage", (spec.get("output") or {}).get("storage")),
                       ("checkpointing.storage", (spec.get("checkpointing") or {}).get("storage"))):
        if uri and (place := _place(field, str(uri), namespace, endpoint)) is not None:
            found.append(place)
    return found


def _relation(mine: Place, theirs: Place) -> str | None:
    """How two places overlap: the same folder, or one inside the other; None when they are apart."""
    if mine.parts == theirs.parts:
        return "is also"
    if mine.parts[: len(theirs.parts)] == theirs.parts:
        return "lies inside"
    if theirs.parts[: len(mine.parts)] == mine.parts:
        return "contains"
    return None


def _live(body: Body) -> bool:
    """Running, pending, queued or suspended: not finished, not cancelled, not being deleted."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    return (((body.get("status") or {}).get("phase") not in TERMINAL_PHASES) and not meta.get("deletionTimestamp")
            and not (spec.get("runPolicy") or {}).get("cancel"))


def gone(body: Body) -> bool:
    """No longer live (finished, cancelled or being deleted): the jobs it held back may start."""
    return not _live(body)


def held_back(body: Body) -> bool:
    """Whether this job is waiting for another one's storage (its last written status says so)."""
    return any(c.get("type") == "Created" and c.get("status") == "False" and c.get("reason") == STORAGE_CONFLICT
               for c in (body.get("status") or {}).get("conditions") or [])


def _age_key(body: Body) -> tuple[str, str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("namespace") or ""), str(meta.get("name") or "")


def conflict(job: Body, others: Iterable[Body]) -> str | None:
    """Why `job` must not start yet: an older live FineTuneJob writes where it would (the oldest such, named with
    the place they share). None when nothing does."""
    mine = places(job)
    if not mine:
        return None
    me = _age_key(job)
    found: tuple[tuple[str, str, str], Body, Place, Place, str] | None = None
    for other in others:
        age = _age_key(other)
        if age >= me or (found is not None and age >= found[0]) or not _live(other):
            continue
        for place in mine:
            for theirs in places(other):
                if (relation := _relation(place, theirs)) is not None:
                    found = (age, other, place, theirs, relation)
    if found is None:
        return None
    _, other, place, theirs, relation = found
    meta = other.get("metadata") or {}
    phase = (other.get("status") or {}).get("phase") or "Pending"
    return (f"spec.{place.field} {place.uri} {relation} where FineTuneJob {meta.get('namespace')}/{meta.get('name')} "
            f"(created {meta.get('creationTimestamp')}, {phase}) writes its {theirs.field} ({theirs.uri}): two jobs "
            "there would resume each other's checkpoints and overwrite each other's model. This job does not start "
            "while that one is live; give it its own storage (checkpointing.storage can be edited; output.storage "
            "cannot: re-create the job), or delete the other job")
