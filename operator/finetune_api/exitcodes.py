"""Trainer exit codes: the contract by which the operator tells "do not retry" from "resume from a checkpoint".

Codes follow sysexits.h. The operator's Job carries a podFailurePolicy that fails the Job at once on the permanent
codes; every other non-zero exit (crash, OOM kill 137, SIGTERM after a checkpoint) is retried up to backoffLimit.
"""

OK = 0
CRASH = 1  # unexpected exception: retried
DATA_ERROR = 65  # EX_DATAERR: the dataset is unusable (missing column, label outside the set, empty split): permanent
STORAGE_ERROR = 74  # EX_IOERR: checkpoint/output storage full or not writable: permanent
INTERRUPTED = 75  # EX_TEMPFAIL: SIGTERM (preemption, eviction, suspend) after saving a checkpoint: retried
PEER_LOST = 76  # EX_PROTOCOL: another worker of the torchrun group died or became unreachable: this one is healthy,
#                 the group restarts (the operator) and the failure is not counted against backoffLimit
CONFIG_ERROR = 78  # EX_CONFIG: the job configuration is invalid, or the model cannot be loaded: permanent

PERMANENT = (DATA_ERROR, STORAGE_ERROR, CONFIG_ERROR)
DESCRIPTIONS = {
    OK: "success",
    CRASH: "crashed (retried from the latest checkpoint)",
    DATA_ERROR: "bad data (not retried)",
    STORAGE_ERROR: "storage full or not writable (not retried)",
    INTERRUPTED: "interrupted after saving a checkpoint (retried)",
    PEER_LOST: "lost contact with another worker of its group (the group restarts; not counted)",
    CONFIG_ERROR: "bad configuration or unloadable model (not retried)",
}
