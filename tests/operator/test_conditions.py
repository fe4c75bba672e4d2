"""Condition setters: pure, stable order, lastTransitionTime kept unless the status flips."""

from __future__ import annotations

from finetune_operator.conditions import MAX_MESSAGE, find, set_condition


def test_new_condition_is_added_with_now() -> None:
    conds, changed = set_condition(None, "Running", "False", "PodsPending", "waiting", 3, "T0")
    assert changed
    assert [c.model_dump(by_alias=True) for c in conds] == [{
        "type": "Running", "status": "False", "reason": "PodsPending", "message": "waiting",
        "observedGeneration": 3, "lastTransitionTime": "T0"}]


def test_same_values_change_nothing() -> None:
    conds, _ = set_condition(None, "Running", "True", "PodsRunning", "up", 1, "T0")
    again, changed = set_condition(conds, "Running", "True", "PodsRunning", "up", 1, "T9")
    assert not changed and again == conds


def test_reason_change_keeps_transition_time_flip_moves_it() -> None:
    conds, _ = set_condition(None, "Running", "False", "PodsPending", "waiting", 1, "T0")
    conds, changed = set_condition(conds, "Running", "False", "Unschedulable", "no GPUs", 1, "T1")
    running = find(conds, "Running")
    assert changed and running is not None and running.last_transition_time == "T0"
    conds, _ = set_condition(conds, "Running", "True", "PodsRunning", "up", 1, "T2")
    running = find(conds, "Running")
    assert running is not None and running.last_transition_time == "T2"


def test_generation_change_is_a_change_and_input_is_not_mutated() -> None:
    conds, _ = set_condition(None, "Created", "True", "JobCreated", "ok", 1, "T0")
    snapshot = [c.model_copy() for c in conds]
    new, changed = set_condition(conds, "Created", "True", "JobCreated", "ok", 2, "T1")
    assert changed and conds == snapshot
    created = find(new, "Created")
    assert created is not None and created.observed_generation == 2 and created.last_transition_time == "T0"


def test_order_is_stable_and_messages_are_truncated() -> None:
    conds, _ = set_condition(None, "Failed", "True", "DataError", "x" * (MAX_MESSAGE + 10), 1, "T0")
    conds, _ = set_condition(conds, "Created", "True", "JobCreated", "ok", 1, "T0")
    conds, _ = set_condition(conds, "Running", "False", "DataError", "x", 1, "T0")
    assert [c.type for c in conds] == ["Created", "Running", "Failed"]
    failed = find(conds, "Failed")
    assert failed is not None and len(failed.message) == MAX_MESSAGE and failed.message.endswith("...")
