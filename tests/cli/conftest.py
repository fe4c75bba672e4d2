"""The CLI's cluster tests run the real operator, as the operator tests do (the same fixtures)."""

from tests.operator.conftest import operator, operator_process

__all__ = ["operator", "operator_process"]
