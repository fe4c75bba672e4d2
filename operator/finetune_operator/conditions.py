"""Pure condition setters in the Kubernetes convention (metav1.Condition), modelled on Kueue's workload helpers.

The clock is an argument, so tests are exact and a pass that changes nothing produces an identical list (which is
what lets the operator skip the status write). lastTransitionTime moves only when `status` flips.
"""

from __future__ import annotations

from finetune_api.status import Condition

MAX_MESSAGE = 32768
# Order in which condition types are listed, so the list is stable whatever order the setters ran in.
ORDER = ("Ready", "Created", "Queued", "Running", "Suspended", "Succeeded", "Failed", "Reconciling", "Stalled")


def truncate(message: str, limit: int = MAX_MESSAGE) -> str:
    if len(message) <= limit:
        return message
    return message[: limit - 3] + "..."


def find(conditions: list[Condition] | None, type_: str) -> Condition | None:
    for c in conditions or []:
        if c.type == type_:
            return c
    return None


def set_condition(
    conditions: list[Condition] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> tuple[list[Condition], bool]:
    """Return (new list, changed). Keeps lastTransitionTime unless the status flips; never mutates the input."""
    current = list(conditions or [])
    message = truncate(message)
    old = find(current, type_)
    if old is not None and (old.status, old.reason, old.message, old.observed_generation) == (
        status, reason, message, generation,
    ):
        return current, False
    transition = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(type=type_, status=status, reason=reason, message=message, observed_generation=generation,
                    last_transition_time=transition)
    result = [c for c in current if c.type != type_] + [new]
    result.sort(key=lambda c: (ORDER.index(c.type) if c.type in ORDER else len(ORDER), c.type))
    return result, True


def is_true(conditions: list[Condition] | None, type_: str) -> bool:
    c = find(conditions, type_)
    return c is not None and c.status == "True"
