"""How a rejected document is told to people: one `field.path[0]: message` per problem, whoever validated it.

`finetune validate`, the trainer reading its manifest and the operator reading a spec or a progress report all
word pydantic's errors this way, so a message names the same field wherever it is seen.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def field_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    """`spec.dataset.columns`, `tolerations[2].key`: dotted names, list indexes in brackets."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, message) for every error; a problem of the whole document is at `(document)`."""
    return [(field_path(err["loc"], prefix) or "(document)", err["msg"].removeprefix("Value error, "))
            for err in exc.errors()]


def describe(exc: ValidationError, prefix: str = "", limit: int = 10) -> str:
    """The first `limit` problems on one line, separated by semicolons."""
    return "; ".join(f"{path}: {message}" for path, message in problems(exc, prefix)[:limit])
