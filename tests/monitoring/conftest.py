"""The monitoring tests scrape the real operator, run as the operator tests run it (the same fixtures)."""

from tests.operator.conftest import operator, operator_process

__all__ = ["operator", "operator_process"]
