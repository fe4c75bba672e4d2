"""Small helpers of the fault suite: reading the operator's Prometheus text, filtering proxied requests, events."""

from __future__ import annotations

import re

from tests.faults.apiproxy import Seen
from tests.operator.cluster_support import OperatorProcess, ftj_events  # noqa: F401 (re-exported)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")


def metric(op: OperatorProcess, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0.0 when there is none yet)."""
    total = 0.0
    for line in op.metrics().splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def passes(op: OperatorProcess) -> float:
    """Reconcile passes so far, whatever their result."""
    return metric(op, "finetune_operator_reconcile_total")


def reconciler_requests(seen: list[Seen]) -> list[Seen]:
    """What the reconciler itself asked for: no watch streams, no leader-election lease traffic, no discovery."""
    return [s for s in seen if not s.watch and "/leases" not in s.target and s.target not in ("/api", "/apis")
            and not re.fullmatch(r"/apis?(/[^/?]+){0,2}", s.target.split("?")[0])]
