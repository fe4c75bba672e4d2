"""kopf wiring, and nothing else: watch streams and indices in, work-queue keys out.

Only watching handlers (`on.event`, `index`) are used on purpose. kopf's change-detection handlers (`on.create`,
`on.update`) persist progress and a diff-base on every object (an extra write per job), and daemons and timers
always add a finalizer (deletion would hang while the operator is down). The controller does the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
# Every kind of child the operator watches: (resource, index id, event handler id, summary kept in the index).
_CHILDREN: tuple[tuple[tuple[str, ...], str, str, Callable[[dict[str, Any]], Any]], ...] = (
    (("batch", "v1", "jobs"), "jobs_by_owner", "job_event", summarize_job),
    (("v1", "pods"), "pods_by_owner", "pod_event", summarize_pod),
    (("v1", "configmaps"), "configmaps_by_owner", "configmap_event", summarize_configmap),
    (("v1", "services"), "services_by_owner", "service_event", summarize_service),
)


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: server-side selectors for the children, no scanning (no CRD/namespace RBAC), no kopf Events."""
    for resource, *_ in _CHILDREN:
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


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=REGISTRY)
async def finetunejob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_ftj(event.get("type"), event["object"])


async def _by_owner(body: kopf.Body, param: Callable[[dict[str, Any]], Any], **_: Any) -> dict[Any, Any] | None:
    """Index entry of a child: its summary under its FineTuneJob's key."""
    key = owner_key(dict(body))
    return {key: param(dict(body))} if key else None


async def _child_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_child(owner_key(event["object"]))


for _resource, _index_id, _event_id, _summary in _CHILDREN:
    kopf.index(*_resource, id=_index_id, param=_summary, labels=_CHILD_LABELS, registry=REGISTRY)(_by_owner)
    kopf.on.event(*_resource, id=_event_id, labels=_CHILD_LABELS, registry=REGISTRY)(_child_event)
