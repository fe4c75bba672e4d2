"""Cross-field rules written once and enforced twice: as CEL in the CRD and in Python by the client-side validator.

A rule is a CEL expression plus a Python predicate over the same pydantic model. The CRD generator copies the CEL into
`x-kubernetes-validations`; `SpecModel` runs the predicate after field validation, so `finetune validate` reports the
same message the API server would. A test evaluates both sides on the same objects.

`Immutable` marks a field that cannot change after creation; the CRD generator writes its transition rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """One cross-field constraint: `cel` for the API server, `check` for Python, `message` for both."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # reported by the API server as the offending field, relative to the object


@dataclass(frozen=True)
class Immutable:
    """Field marker (`Annotated[T, Immutable()]`): the API server refuses changes to the field after creation.

    Only the API server can check it (it sees the old object); the message reads "<field> is immutable", "are" with
    `plural`, followed by `why` when given.
    """

    plural: bool = False
    why: str = ""

    def rule(self, field_name: str) -> dict[str, str]:
        """The CEL transition rule for the field's schema node."""
        message = f"{field_name} {'are' if self.plural else 'is'} immutable" + (f": {self.why}" if self.why else "")
        return {"message": message, "rule": "self == oldSelf"}


class SpecModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected, cross-field rules enforced."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False)

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> SpecModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self


def exactly_one(*values: object) -> bool:
    return sum(v is not None for v in values) == 1


def at_most_one(*values: object) -> bool:
    return sum(v is not None for v in values) <= 1
