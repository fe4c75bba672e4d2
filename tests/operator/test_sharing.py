"""Two live FineTuneJobs that would write to the same storage: the newer is held, with the older one named."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import sharing, state

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


def body(name: str, output: str, namespace: str = "ml", created: str = T0, checkpoints: str | None = None,
         phase: str | None = None, endpoint: str | None = None, **meta: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"output": {"storage": output}}
    if checkpoints:
        spec["checkpointing"] = {"storage": checkpoints}
    if endpoint:
        spec["credentials"] = {"s3": {"endpointUrl": endpoint}}
    return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": created, **meta},
            "spec": spec, "status": {"phase": phase} if phase else {}}


@pytest.mark.parametrize(("older", "newer", "relation"), [
    (body("a", "pvc://runs/shared"), body("b", "pvc://runs/shared", created=T1), "is also"),
    (body("a", "pvc://runs/shared/"), body("b", "pvc://runs//shared", created=T1), "is also"),
    (body("a", "s3://bucket/x"), body("b", "s3://bucket/x", namespace="other", created=T1), "is also"),
    (body("a", "pvc://runs/a"), body("b", "pvc://runs/b", checkpoints="pvc://runs/a/checkpoints", created=T1),
     "lies inside"),
    (body("a", "pvc://runs/a", checkpoints="pvc://scratch/a"), body("b", "pvc://scratch", created=T1), "contains"),
])
def test_the_newer_of_two_live_jobs_on_one_storage_is_held(older: dict[str, Any], newer: dict[str, Any],
                                                          relation: str) -> None:
    message = sharing.conflict(sharing.footprint(newer), [sharing.footprint(older)])
    assert message is not None and relation in message
    assert f"FineTuneJob ml/a (created {T0}, Pending)" in message
    assert sharing.conflict(sharing.footprint(older), [sharing.footprint(newer)]) is None, "the older one runs"


SHARED = "pvc://runs/shared"


@pytest.mark.parametrize(("mine", "other"), [
    (SHARED, body("a", SHARED, namespace="other")),  # a claim of another namespace is another volume
    (SHARED, body("a", "pvc://runs/shared-2")),  # a sibling, not a parent
    (SHARED, body("a", "pvc://other/shared")),
    ("s3://bucket/x", body("a", "s3://bucket/x", endpoint="https://minio.example.com")),  # another object store
    ("/tmp/out", body("a", "/tmp/out")),  # a plain path: the pod's own file system
    (SHARED, body("a", SHARED, phase="Succeeded")),  # finished: its trainer's records speak for it
    (SHARED, body("a", SHARED, phase="Failed")),
    (SHARED, body("a", SHARED, deletionTimestamp=T1)),
    (SHARED, {**body("a", SHARED), "spec": {"output": {"storage": SHARED}, "runPolicy": {"cancel": True}}}),
    (SHARED, body("a", SHARED, created=T2)),  # newer than the job asking
])
def test_no_conflict(mine: str, other: dict[str, Any]) -> None:
    assert sharing.conflict(sharing.footprint(body("b", mine, created=T1)), [sharing.footprint(other)]) is None


def test_the_oldest_is_named_and_a_tie_is_broken_by_namespace_and_name() -> None:
    jobs = [sharing.footprint(b) for b in (body("c", "pvc://runs/x", created=T1), body("a", "pvc://runs/x", created=T1),
                                           body("z", "pvc://runs/x", created=T2))]
    assert "FineTuneJob ml/a " in (sharing.conflict(jobs[2], jobs) or "")
    assert "FineTuneJob ml/a " in (sharing.conflict(jobs[0], jobs) or ""), "same second: a before c"
    assert sharing.conflict(jobs[1], jobs) is None


def test_held_and_live_are_read_from_the_written_status() -> None:
    held = body("b", "pvc://runs/x", created=T1)
    held["status"] = {"phase": "Pending", "conditions": [
        {"type": "Created", "status": "False", "reason": state.STORAGE_CONFLICT, "message": "m"}]}
    assert sharing.footprint(held).held and sharing.footprint(held).live
    assert not sharing.footprint(body("a", "pvc://runs/x")).held
    assert not sharing.footprint(body("a", "pvc://runs/x", phase="Succeeded")).live
    assert not sharing.footprint(body("a", "pvc://runs/x", deletionTimestamp=T1)).live
