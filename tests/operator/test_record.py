"""JobRecord keeps the newest FineTuneJob it has seen without ever comparing resourceVersions as numbers (issue 15):
they are opaque strings, equal or not. Whole-object comparisons."""

from __future__ import annotations

from typing import Any

from finetune_operator.record import JobRecord


def body(rv: str, generation: int = 1, phase: str | None = None, label: str = "a") -> dict[str, Any]:
    return {"metadata": {"name": "j", "namespace": "ns", "uid": "u", "resourceVersion": rv, "generation": generation,
                         "labels": {"x": label}, "managedFields": [{"manager": "m"}]},
            "spec": {"generation": generation}, **({"status": {"phase": phase}} if phase else {})}


def held(r: JobRecord) -> tuple[Any, ...]:
    m = r.body["metadata"]
    return m["resourceVersion"], m["generation"], m["labels"]["x"], (r.body.get("status") or {}).get("phase")


def test_watch_events_replace_the_body_and_managed_fields_are_dropped() -> None:
    r = JobRecord.first_seen(body("b7"))
    assert "managedFields" not in r.body["metadata"]
    r.see(body("a3", label="b"))  # "a3" < "b7" as text and as nothing else: the watch's order is what counts
    assert held(r) == ("a3", 1, "b", None)


def test_an_event_older_than_our_write_does_not_undo_the_written_status() -> None:
    r = JobRecord.first_seen(body("100"))
    r.wrote(body("102", phase="Running"))
    r.see(body("101", label="b"))  # in flight before our write: its metadata, our status
    assert held(r) == ("101", 1, "b", "Running") and r.written == "102"
    r.see(body("102", phase="Running", label="b"))  # the watch reached our write
    assert held(r) == ("102", 1, "b", "Running") and r.written is None
    r.see(body("103", phase="Running", label="c"))
    assert held(r) == ("103", 1, "c", "Running")


def test_generation_decides_what_a_version_cannot() -> None:
    r = JobRecord.first_seen(body("9", generation=2))
    r.wrote(body("11", generation=2, phase="Suspended"))
    r.see(body("8", generation=1))  # an older spec: stale, ignored
    assert held(r) == ("11", 2, "a", "Suspended")
    r.see(body("12", generation=3, phase="Suspended"))  # a newer spec includes our write
    assert held(r) == ("12", 3, "a", "Suspended") and r.written is None


def test_a_larger_number_that_is_not_ours_never_wins_over_the_write() -> None:
    """An event that is not our write and not a newer generation keeps the written status, whatever its version
    string looks like (compared as integers, "1000" would have replaced the written status with its own)."""
    r = JobRecord.first_seen(body("998"))
    r.wrote(body("999", phase="Failed"))
    r.see(body("1000"))
    assert held(r) == ("1000", 1, "a", "Failed")
