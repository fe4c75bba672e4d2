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
# Kubernetes' recommended labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/)
APP_NAME = "app.kubernetes.io/name"
APP_INSTANCE = "app.kubernetes.io/instance"
APP_COMPONENT = "app.kubernetes.io/component"
APP_PART_OF = "app.kubernetes.io/part-of"
APP = "finetune-job"  # what every child is part of running: one FineTuneJob (the instance)
TRAINER, CONFIG, PROGRESS_TOKEN, RENDEZVOUS = "trainer", "config", "progress-token", "rendezvous"  # components
PREFLIGHT = "preflight"  # component of the pre-flight Job and its pod
JOB_NAME = f"{names.GROUP}/job-name"  # the FineTuneJob a child belongs to: the key of every watch cache
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # on the Job: Kueue admits it (and holds its `suspend`)
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"  # on the Job: its WorkloadPriorityClass
KUEUE_REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"  # on the pod template: TAS, all in one domain
KUEUE_PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"  # on the pod template: TAS, as few as possible
# Annotation on a Job the operator suspended (value: why, see suspend_owner.py), written in the same patch as
# `spec.suspend`, and on a Workload the operator deactivated: a suspension without it is someone else's (Kueue's).
SUSPENDED_BY = f"{names.GROUP}/suspended-by"
SPEC_HASH = f"{names.GROUP}/spec-hash"  # annotation on the pre-flight Job: the spec it checked
JOB_CONTROLLER_UID = "batch.kubernetes.io/controller-uid"  # set by the Job controller on the Job's pods
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # annotation (and label) on Indexed Job pods

# What the operator's watches match: key -> required value, None meaning "present with any value".
SELECTOR_MATCH: dict[str, str | None] = {MANAGED_BY: MANAGER, JOB_NAME: None}
# The same, as a server-side label selector (`?labelSelector=`).
SELECTOR = ",".join(key if value is None else f"{key}={value}" for key, value in SELECTOR_MATCH.items())


def selector(job_name: str) -> dict[str, str]:
    """The labels that identify one FineTuneJob's pods: the Service's selector."""
    return {MANAGED_BY: MANAGER, JOB_NAME: job_name}


def child_labels(job_name: str, component: str) -> dict[str, str]:
    """Labels of every child object and of the trainer pods: `selector` plus the recommended app.kubernetes.io set
    (name, instance = the FineTuneJob, component = what the child is for, part-of, managed-by)."""
    return {**selector(job_name), APP_NAME: APP, APP_INSTANCE: job_name, APP_COMPONENT: component,
            APP_PART_OF: MANAGER}
