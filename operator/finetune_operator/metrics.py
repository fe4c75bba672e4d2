"""Prometheus metrics of the operator, in a registry of its own.

Per-job gauges (phase counts, step, loss, throughput, ETA) are produced at scrape time from the operator's cache by a
custom collector, so a job's series disappear the moment it ends or is deleted: nothing to forget, nothing piles up.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from finetune_api.status import PHASES


@dataclass(frozen=True)
class JobSample:
    """One FineTuneJob as the scrape sees it."""

    namespace: str
    name: str
    phase: str | None
    step: int | None = None
    loss: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None


class _JobCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[JobSample]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        samples = list(self._source())
        by_phase = GaugeMetricFamily("finetune_job_phase", "Number of FineTuneJobs by namespace and phase.",
                                     labels=["namespace", "phase"])
        tally = Tally((s.namespace, s.phase or "Unknown") for s in samples)
        for ns in sorted({s.namespace for s in samples}):
            for phase in (*PHASES, "Unknown"):
                if phase != "Unknown" or tally[(ns, phase)]:
                    by_phase.add_metric([ns, phase], tally[(ns, phase)])
        yield by_phase
        running = [s for s in samples if s.phase == "Running"]
        for metric, doc, attr in (
            ("finetune_job_step", "Optimizer steps done by a running job.", "step"),
            ("finetune_job_loss", "Latest training loss of a running job.", "loss"),
            ("finetune_job_samples_per_second", "Training throughput of a running job.", "samples_per_second"),
            ("finetune_job_eta_seconds", "Estimated seconds until a running job finishes.", "eta_seconds"),
        ):
            family = GaugeMetricFamily(metric, doc, labels=["namespace", "name"])
            for s in running:
                value = getattr(s, attr)
                if value is not None:
                    family.add_metric([s.namespace, s.name], float(value))
            yield family


class Metrics:
    """All operator metrics; `render()` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.reconciles = Counter("finetune_operator_reconcile", "Reconcile passes, by result (ok, retry, error).",
                                  ["result"], registry=r)
        self.reconcile_errors = Counter("finetune_operator_reconcile_errors", "Failed reconcile passes, by cause.",
                                        ["cause"], registry=r)
        self.reconcile_seconds = Histogram(
            "finetune_operator_reconcile_duration_seconds", "Wall time of one reconcile pass.", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.api_requests = Counter("finetune_operator_api_requests", "Kubernetes API requests made by the reconciler, "
                                    "by verb, resource and HTTP code.", ["verb", "resource", "code"], registry=r)
        self.status_writes = Counter("finetune_operator_status_writes", "FineTuneJob status patches, by namespace.",
                                     ["namespace"], registry=r)
        self.restarts = Counter("finetune_job_restarts", "Trainer restarts from a checkpoint, by namespace.",
                                ["namespace"], registry=r)
        self.checkpoints = Counter("finetune_job_checkpoints_recorded", "Complete checkpoints recorded in status, "
                                   "by namespace.", ["namespace"], registry=r)
        self.gpu_seconds = Counter("finetune_job_gpu_seconds", "GPU-seconds consumed by trainer pods, by "
                                   "namespace.", ["namespace"], registry=r)
        self.progress_reports = Counter("finetune_operator_progress_reports", "Progress pushes received, by result.",
                                        ["result"], registry=r)
        self.queue_depth = Gauge("finetune_operator_queue_depth", "FineTuneJobs waiting for a reconcile pass.",
                                 registry=r)
        self.leader = Gauge("finetune_operator_leader", "1 while this replica holds the leader lease.", registry=r)
        self._last: dict[tuple[str, str, str], float] = {}

    def bind_jobs(self, source: Callable[[], Iterable[JobSample]]) -> None:
        self.registry.register(_JobCollector(source))

    def add_delta(self, counter: Counter, namespace: str, name: str, value: float | None) -> None:
        """Count the growth of a per-job total; the first value seen after start is the baseline (no jump)."""
        value = value or 0.0
        key = (counter._name, namespace, name)
        last = self._last.get(key)
        self._last[key] = max(value, last or 0.0)
        if last is not None and value > last:
            counter.labels(namespace=namespace).inc(value - last)

    def forget(self, namespace: str, name: str) -> None:
        for key in [k for k in self._last if k[1:] == (namespace, name)]:
            del self._last[key]

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type, negotiated by prometheus_client from the scraper's Accept header
        (Prometheus text format by default, OpenMetrics when asked for)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
