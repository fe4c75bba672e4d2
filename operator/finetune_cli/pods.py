"""Which trainer pods `finetune logs` reads: one per worker (the current attempt), and why one has no logs yet.

Pure functions over pods as the API serves them (dicts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def worker_index(pod: Mapping[str, Any]) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (meta.get("labels") or {}).get(INDEX_LABEL)
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def _live(pod: Mapping[str, Any]) -> bool:
    return not (pod.get("metadata") or {}).get("deletionTimestamp") and \
        (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def current_workers(pods: Iterable[Mapping[str, Any]], worker: int | None = None,
                    previous: bool = False) -> list[dict[str, Any]]:
    """The pod of each worker index to read: a live one if there is one, else the newest; sorted by index.

    With `previous`, the newest pod of each worker that has ended: trainer pods never restart in place
    (restartPolicy Never), so an earlier attempt is an earlier pod, not an earlier container."""
    best: dict[int, Mapping[str, Any]] = {}
    for pod in pods:
        index = worker_index(pod)
        if (worker is not None and index != worker) or (previous and _live(pod)):
            continue
        key = (_live(pod), (pod.get("metadata") or {}).get("creationTimestamp") or "")
        other = best.get(index)
        if other is None or key > (_live(other), (other.get("metadata") or {}).get("creationTimestamp") or ""):
            best[index] = pod
    return [dict(best[i]) for i in sorted(best)]


def no_logs_reason(pod: Mapping[str, Any]) -> str | None:
    """Why the kubelet has no log for this pod yet (not scheduled, image not pulled, ...); None when it has one."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if not spec.get("nodeName"):
        unscheduled = next((c for c in status.get("conditions") or []
                            if c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
        why = f": {unscheduled.get('reason')}: {unscheduled.get('message')}" if unscheduled else ""
        return f"not scheduled to a node yet{why}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and not cs.get("lastState", {}).get("terminated"):
            reason = waiting.get("reason") or "waiting"
            return f"container {cs.get('name')} has not started: {reason}" + \
                (f": {waiting['message']}" if waiting.get("message") else "")
    if not status.get("containerStatuses") and status.get("phase") == "Pending":
        return "container has not started yet"
    return None
