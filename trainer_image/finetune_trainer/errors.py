"""Exceptions that carry the trainer's exit code, so the operator can tell "do not retry" from "resume".

Every permanent failure is raised as one of these with a one-paragraph message naming the file, row and field at
fault; `__main__` turns it into the termination message and the exit code. Anything else is a crash (retried).
"""

from __future__ import annotations

from finetune_api import exitcodes


class TrainerError(Exception):
    """A failure with a known exit code and a message fit for `kubectl describe` (never a secret value)."""

    exit_code: int = exitcodes.CRASH

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(TrainerError):
    """The job configuration is invalid or the model cannot be loaded: permanent."""

    exit_code = exitcodes.CONFIG_ERROR


class DataError(TrainerError):
    """The dataset is unusable (missing column, empty split, bad label, over-long example): permanent."""

    exit_code = exitcodes.DATA_ERROR


class StorageError(TrainerError):
    """Checkpoint or output storage is full or not writable: permanent."""

    exit_code = exitcodes.STORAGE_ERROR


class Interrupted(TrainerError):
    """SIGTERM arrived; a checkpoint was saved (or none was possible): retried by the operator."""

    exit_code = exitcodes.INTERRUPTED
