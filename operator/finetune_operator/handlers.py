"""kopf wiring, and nothing else: watch streams and indices in, work-queue keys out.

Only watching handlers (`on.event`, `index`) are used on purpose. kopf's change-detection handlers (`on.create`,
`on.update`) persist progress and a diff-base on every object (an extra write per job), and daemons and timers
always add a finalizer (deletion would hang while the operator is down). The controller does the rest.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from finetune_api import names
from finetune_operator import k8s, labels
from finetune_operator.observe import (
    owner_key,
    summarize_configmap,
    summarize_job,
    summarize_pod,
    summarize_service,
)

log = logging.getLogger(__name__)

REGISTRY = kopf.OperatorRegistry()
# kopf's client-side filter, from the same definition as the server-side selector below.
_CHILD_LABELS = {key: kopf.PRESENT if value is None else value for key, value in labels.SELECTOR_MATCH.items()}


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: server-side selectors for the children, no scanning (no CRD/namespace RBAC), no kopf Events."""
    for resource in (("batch", "v1", "jobs"), ("v1", "pods"), ("v1", "configmaps"), ("v1", "services")):
        settings.watching.label_selectors[resource] = labels.SELECTOR
    settings.scanning.disabled = True
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return k8s.login(**kwargs)


@kopf.on.startup(registry=REGISTRY)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, jobs_by_owner: kopf.Index,
                  pods_by_owner: kopf.Index, configmaps_by_owner: kopf.Index, services_by_owner: kopf.Index,
                  **_: Any) -> None:
    configure(settings)
    memo.controller.bind_indices(jobs_by_owner, pods_by_owner, configmaps_by_owner, services_by_owner)
    memo.controller.start()


@kopf.on.cleanup(registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.stop()


@kopf.index("batch", "v1", "jobs", labels=_CHILD_LABELS, registry=REGISTRY)
async def jobs_by_owner(body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    key = owner_key(dict(body))
    return {key: summarize_job(dict(body))} if key else None


@kopf.index("v1", "pods", labels=_CHILD_LABELS, registry=REGISTRY)
async def pods_by_owner(body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    key = owner_key(dict(body))
    return {key: summarize_pod(dict(body))} if key else None


@kopf.index("v1", "configmaps", labels=_CHILD_LABELS, registry=REGISTRY)
async def configmaps_by_owner(body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    key = owner_key(dict(body))
    return {key: summarize_configmap(dict(body))} if key else None


@kopf.index("v1", "services", labels=_CHILD_LABELS, registry=REGISTRY)
async def services_by_owner(body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    key = owner_key(dict(body))
    return {key: summarize_service(dict(body))} if key else None


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=REGISTRY)
async def finetunejob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_ftj(event.get("type"), event["object"])


@kopf.on.event("batch", "v1", "jobs", labels=_CHILD_LABELS, registry=REGISTRY)
async def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_child(owner_key(event["object"]))


@kopf.on.event("v1", "pods", labels=_CHILD_LABELS, registry=REGISTRY)
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_child(owner_key(event["object"]))


@kopf.on.event("v1", "configmaps", labels=_CHILD_LABELS, registry=REGISTRY)
async def configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_child(owner_key(event["object"]))


@kopf.on.event("v1", "services", labels=_CHILD_LABELS, registry=REGISTRY)
async def service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_child(owner_key(event["object"]))
