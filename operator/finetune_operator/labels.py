"""Every label and annotation key the operator writes or reads, and the one selector for its children.

The builders stamp `child_labels` on every child and on the pod template; the Service selects pods by `selector`;
the watches (kopf's filter and the server-side selector) match `SELECTOR_MATCH`. All three come from here, so a
label added to the children (say the standard `app.kubernetes.io/*` set) is one edit in `child_labels`, and the
selector, which must not change under running jobs, stays as it is.
"""

from __future__ import annotations

from finetune_api import names

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "finetune-operator"
JOB_NAME = f"{names.GROUP}/job-name"  # the FineTuneJob a child belongs to: the key of every watch cache
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # on the Job: Kueue admits it (and owns its `suspend`)
JOB_CONTROLLER_UID = "batch.kubernetes.io/controller-uid"  # set by the Job controller on the Job's pods
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # annotation (and label) on Indexed Job pods

# What the operator's watches match: key -> required value, None meaning "present with any value".
SELECTOR_MATCH: dict[str, str | None] = {MANAGED_BY: MANAGER, JOB_NAME: None}
# The same, as a server-side label selector (`?labelSelector=`).
SELECTOR = ",".join(key if value is None else f"{key}={value}" for key, value in SELECTOR_MATCH.items())


def selector(job_name: str) -> dict[str, str]:
    """The labels that identify one FineTuneJob's pods: the Service's selector."""
    return {MANAGED_BY: MANAGER, JOB_NAME: job_name}


def child_labels(job_name: str) -> dict[str, str]:
    """Labels of every child object and of the trainer pods (a superset of `selector`)."""
    return selector(job_name)
