"""The one error type of the CLI: a sentence for the user and the exit code to leave with."""

from __future__ import annotations


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message, self.code = message, code
