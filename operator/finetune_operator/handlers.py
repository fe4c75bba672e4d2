"""kopf wiring, and nothing else: watch streams and indices in, work-queue keys out.

Only watching handlers (`on.event`, `index`) are used on purpose. kopf's change-detection handlers (`on.create`,
`on.update`) persist progress and a diff-base on every object (an extra write per job), and daemons and timers
always add a finalizer (deletion would hang while the operator is down). The controller does the rest.

`registry(integrations)` registers one index and one event handler per watched kind of kinds.py, so the watched
kinds are those of that declaration and no other list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf

from finetune_api import names
from finetune_operator import k8s, kinds, labels, observe

log = logging.getLogger(__name__)

# kopf's client-side filter, from the same definition as the server-side selector below.
_CHILD_LABELS = {key: kopf.PRESENT if value is None else value for key, value in labels.SELECTOR_MATCH.items()}


def index_id(kind: kinds.Kind) -> str:
    assert kind.watch is not None
    return f"{kind.watch.cache}_by_owner"


def _resource(kind: kinds.Kind) -> tuple[str, ...]:
    return (kind.group, kind.version, kind.plural) if kind.group else (kind.version, kind.plural)


def configure(settings: kopf.OperatorSettings, watched: tuple[kinds.Kind, ...]) -> None:
    """kopf settings: server-side selectors for the children, no scanning (no CRD/namespace RBAC), no kopf Events."""
    for kind in watched:
        if kind.watch is not None and kind.watch.selected:
            settings.watching.label_selectors[_resource(kind)] = labels.SELECTOR
    settings.scanning.disabled = True
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return k8s.login(**kwargs)


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.stop()


async def finetunejob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.observe_ftj(event.get("type"), event["object"])


Reader = Callable[[dict[str, Any]], Any]


async def _by_owner(body: kopf.Body, param: tuple[Reader, Reader], **_: Any) -> dict[Any, Any] | None:
    """Index entry of a watched object: its summary under its FineTuneJob's key (param: key and summary functions)."""
    key_of, summary = param
    key = key_of(dict(body))
    return {key: summary(dict(body))} if key else None


async def _watched_event(event: kopf.RawEvent, memo: kopf.Memo, param: Reader, **_: Any) -> None:
    memo.controller.observe_child(param(event["object"]))


def registry(integrations: frozenset[str] = frozenset()) -> kopf.OperatorRegistry:
    """The operator's handlers: the FineTuneJob watch, and an index plus an event handler per watched kind."""
    reg = kopf.OperatorRegistry()
    watched = kinds.watched(integrations)
    kopf.on.login(registry=reg)(login)
    kopf.on.cleanup(registry=reg)(cleanup)
    kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=reg)(finetunejob_event)

    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **indices: Any) -> None:
        configure(settings, watched)
        memo.controller.bind_indices(**{k.watch.cache: indices[index_id(k)] for k in watched if k.watch})
        memo.controller.start()

    kopf.on.startup(registry=reg)(startup)
    for kind in watched:
        assert kind.watch is not None
        key_of, summary = getattr(observe, kind.watch.key), getattr(observe, kind.watch.summary)
        selected = {"labels": _CHILD_LABELS} if kind.watch.selected else {}
        kopf.index(*_resource(kind), id=index_id(kind), param=(key_of, summary), registry=reg, **selected)(_by_owner)
        kopf.on.event(*_resource(kind), id=f"{kind.watch.cache}_event", param=key_of, registry=reg,
                      **selected)(_watched_event)
    return reg
