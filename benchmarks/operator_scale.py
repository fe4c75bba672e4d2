"""Operator scale: N FineTuneJobs applied at once, across namespaces, on the real test control plane, against a
baseline without the operator measured in the same run.

Absolute times depend on the machine (the API server, not the operator, is the bottleneck, and its speed varies by a
factor of two between machines of the same kind), so the operator is reported as a ratio to the baseline: the same N
trainer Jobs (as the builders make them) created directly by the benchmark, with nothing else, on a fresh control
plane of the same shape. Each part gets a fresh control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok as the kubelet of enough fake GPU nodes for one 1-GPU pod per job) with the CRD; the operator part runs the real
operator as a subprocess (`python -m finetune_operator`, started by tests/operator/cluster_support.OperatorProcess):

  1. POST N FineTuneJobs (8 client threads) spread over the namespaces (baseline: POST N Jobs);
  2. wait until every Job exists, then until every FineTuneJob is Running (its pod runs on a kwok node);
  3. finish every pod with exit code 0 (the fake kubelet's annotation, as ControlPlane.finish_pod does, in bulk);
  4. wait until every FineTuneJob is Succeeded (baseline: every Job Complete).

The operator's /metrics is scraped throughout (its gauges say when every job is Running): every scrape's latency is
recorded, a scrape that gets no answer within SCRAPE_TIMEOUT is retried, and the run fails only if the operator stays
silent for SCRAPE_DEADLINE. The table reports the slowest scrape, so a busy event loop shows as a number, not a crash.

Measured: the time to each milestone from the first POST; the operator's writes per job, counted by the API server
itself (apiserver_request_total by verb and resource, diffed; Events by listing those whose source is the operator,
since the API server's counter cannot tell who posted an Event), cross-checked with the operator's own request
counter; the operator's peak RSS and CPU time (psutil, sampled every 100 ms); reconcile latency p50/p99 from its
Prometheus histogram; the ERROR lines in its log. Writes per job "to Running" cover steps 1-2, "total" also 3-4.

    python benchmarks/operator_scale.py                # 1,000 jobs in 10 namespaces
    python benchmarks/operator_scale.py --jobs 100
    python benchmarks/operator_scale.py --sweep        # 100 and 1,000, one table

The last line is machine-readable (of the largest run):

  RESULT jobs=<n> all_jobs_created_s=<s> all_succeeded_s=<s> jobs_ratio=<r> running_ratio=<r> succeeded_ratio=<r>
         writes_per_job=<w> operator_peak_rss_mib=<m> slowest_scrape_s=<s> errors=<e>

where writes_per_job counts from creation to Running (the target: at most 6) and each ratio is the operator's time to
that milestone over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests.*` importable
    sys.path.insert(0, str(REPO))

from finetune_api.spec import FineTuneJobSpec  # noqa: E402
from finetune_operator import builders  # noqa: E402
from finetune_operator.settings import Settings  # noqa: E402
from tests.controlplane.cluster import (  # noqa: E402
    EXIT_CODE_ANNOTATION,
    FINISH_ANNOTATION,
    ControlPlane,
    start_control_plane,
)
from tests.operator.cluster_support import FTJ, OperatorProcess, create_ftj, operator_errors  # noqa: E402
from tests.operator.helpers import manifest  # noqa: E402

GPUS_PER_NODE = 64  # fewer, bigger fake nodes: less kwok heartbeat traffic for the same GPU count
CLIENT_THREADS = 8
POLL = 0.5
SCRAPE_TIMEOUT = 30.0  # seconds one /metrics request may take before it is retried
SCRAPE_DEADLINE = 180.0  # seconds of no answer at all after which the operator counts as hung
BASELINE_LABEL = "finetune.dev/benchmark"  # on the baseline's Jobs and pods (they carry no operator label)
MANAGED = "app.kubernetes.io/managed-by%3Dfinetune-operator"
# Writes that only the operator makes here: (verb, API group, resource, subresource) as the API server counts them.
OPERATOR_WRITES = {
    ("POST", "", "configmaps", ""): "ConfigMap create",
    ("POST", "", "secrets", ""): "Secret create",
    ("POST", "", "services", ""): "Service create",
    ("POST", "batch", "jobs", ""): "Job create",
    ("PATCH", "batch", "jobs", ""): "Job patch",
    ("PATCH", "finetune.dev", "finetunejobs", "status"): "status patch",
    ("PATCH", "", "configmaps", ""): "ConfigMap patch",
    ("DELETE", "batch", "jobs", ""): "Job delete",
}
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


# ------------------------------------------------------------------------------------------------------ measuring


def apiserver_requests(cp: ControlPlane) -> Counter[tuple[str, str, str, str]]:
    """apiserver_request_total summed over codes, by (verb, group, resource, subresource)."""
    text = cp.request("GET", "/metrics", timeout=60)
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for line in str(text).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        key = (labels.get("verb", ""), labels.get("group", ""), labels.get("resource", ""),
               labels.get("subresource", ""))
        counts[key] += int(float(line.rsplit(" ", 1)[1]))
    return counts


@dataclass
class Scrapes:
    """Every /metrics scrape of the operator: latencies, and those that got no answer in time (then retried)."""

    latencies: list[float] = field(default_factory=list)
    unanswered: int = 0

    def get(self, op: OperatorProcess) -> str:
        deadline = time.monotonic() + SCRAPE_DEADLINE
        while True:
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics",
                                            timeout=SCRAPE_TIMEOUT) as resp:
                    text = resp.read().decode()
                self.latencies.append(time.monotonic() - t0)
                return text
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                self.unanswered += 1
                log(f"  /metrics gave no answer in {time.monotonic() - t0:.1f}s ({exc}); retrying")
                if not op.alive:
                    raise RuntimeError(f"the operator exited:\n{op.log_text()[-3000:]}") from exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the operator's /metrics gave no answer for {SCRAPE_DEADLINE:.0f}s") from exc

    @property
    def slowest(self) -> float:
        return max(self.latencies, default=math.nan)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


SCRAPES = Scrapes()


def operator_metrics(op: OperatorProcess) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in SCRAPES.get(op).splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)$", line)
        if m:
            out.append((m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), float(m.group(3))))
    return out


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def histogram_quantile(samples: list[tuple[str, dict[str, str], float]], name: str, q: float) -> float:
    """Prometheus' histogram_quantile over cumulative buckets (linear inside the bucket)."""
    buckets = sorted((math.inf if lab["le"] == "+Inf" else float(lab["le"]), v)
                     for n, lab, v in samples if n == f"{name}_bucket")
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le


def count_objects(cp: ControlPlane, path: str) -> int:
    """Objects in a cluster-wide list without transferring them: limit=1 plus remainingItemCount."""
    page = cp.request("GET", f"{path}?limit=1", timeout=60)
    return len(page["items"]) + int(page["metadata"].get("remainingItemCount") or 0)


def operator_events(cp: ControlPlane) -> int:
    items = cp.request("GET", "/api/v1/events?fieldSelector=source%3Dfinetune-operator", timeout=60)["items"]
    return sum(int(e.get("count") or 1) for e in items)


@dataclass
class ProcessSampler:
    """Peak RSS and CPU time of one process, sampled in a thread (psutil)."""

    pid: int
    interval: float = 0.1
    peak_rss: int = 0
    cpu_seconds: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcessSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
                t = proc.cpu_times()
                self.cpu_seconds = t.user + t.system
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def component_cpu() -> dict[str, float]:
    """CPU seconds so far of every process this benchmark started (control-plane components, the operator)."""
    out: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
            t = child.cpu_times()
        except psutil.Error:
            continue
        name = "operator" if "finetune_operator" in cmd else Path(cmd[0]).name.split("-v")[0] if cmd else "?"
        out[name] = out.get(name, 0.0) + t.user + t.system
    return out


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """'kube-apiserver 61%, etcd 20%, ...' of one core over an interval, biggest first."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    diff["benchmark client"] = _own_cpu() - before.get("benchmark client", 0.0)
    parts = sorted(diff.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {100 * v / seconds:.0f}%" for k, v in parts if v > 0.01 * seconds)


def _own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` until true; return the monotonic time it first held. Raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


# ------------------------------------------------------------------------------------------------------ one run


@dataclass
class Result:
    jobs: int
    namespaces: int
    applied_s: float = math.nan
    all_jobs_created_s: float = math.nan
    all_running_s: float = math.nan
    all_succeeded_s: float = math.nan
    writes_to_running: float = math.nan
    writes_total: float = math.nan
    operator_writes_self: float = math.nan
    operator_requests: float = math.nan
    apiserver_requests_all: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    peak_rss_mib: float = math.nan
    cpu_s: float = math.nan
    errors: int = 0
    warnings: int = 0
    breakdown: dict[str, float] = field(default_factory=dict)
    failed_requests: dict[str, int] = field(default_factory=dict)
    requests_by_kind: dict[str, float] = field(default_factory=dict)
    settings: str = ""
    load_before: float = math.nan
    load_after: float = math.nan
    cpu_to_jobs: str = ""
    cpu_to_running: str = ""
    baseline_jobs_created_s: float = math.nan
    baseline_running_s: float = math.nan
    baseline_succeeded_s: float = math.nan
    scrapes: int = 0
    scrape_p50_s: float = math.nan
    slowest_scrape_s: float = math.nan
    unanswered_scrapes: int = 0

    def ratio(self, attr: str) -> float:
        return getattr(self, attr) / getattr(self, f"baseline_{attr.removeprefix('all_').removesuffix('_s')}_s")


def install_crd(cp: ControlPlane) -> None:
    """The FineTuneJob CRD, Established (polled: `kubectl wait` fails outright before the API server wrote any
    condition)."""
    from finetune_api.crd import CRD_PATH

    cp.apply(CRD_PATH.read_text())
    crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.finetune.dev"
    wait_until(lambda: any(c.get("type") == "Established" and c.get("status") == "True"
                           for c in (cp.request("GET", crd).get("status") or {}).get("conditions") or []),
               60, "the CRD Established")


def _lists(cp: ControlPlane, path: str) -> bool:
    try:
        cp.request("GET", f"{path}?limit=1", timeout=10)
    except Exception:  # 429 "storage is (re)initializing", or not served yet
        return False
    return True


def operator_writes(before: Counter[tuple[str, str, str, str]], after: Counter[tuple[str, str, str, str]],
                    events: int) -> tuple[int, dict[str, int]]:
    by_kind = {label: after[key] - before[key] for key, label in OPERATOR_WRITES.items() if after[key] - before[key]}
    by_kind["Event create"] = events
    return sum(by_kind.values()), by_kind


def run(n: int, namespaces: int, workdir: Path, operator_env: dict[str, str], timeout: float) -> Result:
    result = Result(jobs=n, namespaces=namespaces)
    run_baseline(result, workdir, timeout)
    SCRAPES.latencies.clear()
    SCRAPES.unanswered = 0
    nodes = math.ceil(n / GPUS_PER_NODE) + 1
    result.load_before = os.getloadavg()[0]
    log(f"[{n} jobs] starting a control plane with {nodes} kwok nodes x {GPUS_PER_NODE} GPUs")
    cp = start_control_plane(workdir=workdir / "controlplane", stream=sys.stderr, node_count=nodes,
                             gpus_per_node=GPUS_PER_NODE)
    op: OperatorProcess | None = None
    sampler: ProcessSampler | None = None
    try:
        install_crd(cp)
        # Established is not "served": until the CRD's storage is initialised a LIST answers 429, which kopf logs as
        # a WARNING and retries. Wait for a LIST to work so the operator starts as it would in a settled cluster.
        wait_until(lambda: _lists(cp, "/apis/finetune.dev/v1alpha1/finetunejobs"), 60, "FineTuneJobs served")
        ns_names = [f"bench-{i}" for i in range(namespaces)]
        for ns in ns_names:
            cp.create_namespace(ns)
        # The operator's production defaults (OperatorProcess itself sets short test timings).
        d = Settings()
        env = {"FINETUNE_RESYNC_SECONDS": str(d.resync_seconds),
               "FINETUNE_STATUS_SETTLE_SECONDS": str(d.settle_seconds),
               "FINETUNE_LEASE_DURATION_SECONDS": str(d.lease_seconds), "FINETUNE_WORKERS": str(d.workers),
               "FINETUNE_LOG_LEVEL": "INFO", **operator_env}
        result.settings = ", ".join(f"{k.removeprefix('FINETUNE_')}={v}" for k, v in env.items()
                                    if k != "FINETUNE_LOG_LEVEL")
        op = OperatorProcess(cp, workdir, **env).start(timeout=120)
        assert op.proc is not None
        sampler = ProcessSampler(op.proc.pid).start()
        # Wait for the CRD watch to be up and kwok to have settled the nodes; then take the baseline.
        time.sleep(1.0)
        base = apiserver_requests(cp)
        base_events = operator_events(cp)

        bodies = [manifest(f"job-{i:05d}", ns_names[i % namespaces]) for i in range(n)]
        log(f"[{n} jobs] applying {n} FineTuneJobs across {namespaces} namespaces")
        cpu0 = {**component_cpu(), "benchmark client": _own_cpu()}
        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(lambda b: create_ftj(cp, b), bodies))
        result.applied_s = time.monotonic() - t0

        def jobs_created() -> bool:
            created = metric_sum(operator_metrics(op), "finetune_operator_api_requests_total", verb="POST",
                                 resource="Job", code="201")
            return created >= n and count_objects(cp, "/apis/batch/v1/jobs") >= n

        result.all_jobs_created_s = wait_until(jobs_created, timeout, "every Job created") - t0
        result.cpu_to_jobs = cpu_share(cpu0, component_cpu(), result.all_jobs_created_s)
        log(f"[{n} jobs] all Jobs exist after {result.all_jobs_created_s:.1f}s; CPU (of one core) meanwhile: "
            f"{result.cpu_to_jobs}")

        def phase_count(phase: str) -> Callable[[], bool]:
            def check() -> bool:
                return metric_sum(operator_metrics(op), "finetune_job_phase", phase=phase) >= n
            return check

        result.all_running_s = wait_until(phase_count("Running"), timeout, "every FineTuneJob Running") - t0
        running = listed_phases(cp)
        if running.get("Running", 0) != n:
            raise RuntimeError(f"the operator's gauge says all Running, the API says {running}")
        result.cpu_to_running = cpu_share(cpu0, component_cpu(), result.all_running_s)
        log(f"[{n} jobs] all Running after {result.all_running_s:.1f}s; CPU (of one core) meanwhile: "
            f"{result.cpu_to_running}")
        at_running = apiserver_requests(cp)
        writes, _ = operator_writes(base, at_running, operator_events(cp) - base_events)
        result.writes_to_running = writes / n

        finish_all(cp, cp.request("GET", f"/api/v1/pods?labelSelector={MANAGED}", timeout=120)["items"])
        result.all_succeeded_s = wait_until(phase_count("Succeeded"), timeout, "every FineTuneJob Succeeded") - t0
        done = listed_phases(cp)
        if done.get("Succeeded", 0) != n:
            raise RuntimeError(f"the operator's gauge says all Succeeded, the API says {done}")
        log(f"[{n} jobs] all Succeeded after {result.all_succeeded_s:.1f}s")

        final = apiserver_requests(cp)
        writes, by_kind = operator_writes(base, final, operator_events(cp) - base_events)
        result.writes_total = writes / n
        result.breakdown = {k: v / n for k, v in by_kind.items()}
        samples = operator_metrics(op)
        self_writes = sum(v for name, lab, v in samples if name == "finetune_operator_api_requests_total"
                          and lab.get("verb") in WRITE_VERBS and lab.get("resource") != "Lease")
        result.operator_writes_self = self_writes / n
        result.operator_requests = sum(v for name, lab, v in samples if name == "finetune_operator_api_requests_total"
                                       and lab.get("resource") != "Lease") / n
        result.apiserver_requests_all = sum((final - base).values()) / n
        by_kind: Counter[str] = Counter()
        for name, lab, v in samples:
            if name == "finetune_operator_api_requests_total" and lab.get("resource") != "Lease":
                by_kind[f"{lab['verb']} {lab['resource']}"] += v
        result.requests_by_kind = {k: v / n for k, v in sorted(by_kind.items())}
        result.failed_requests = {f"{lab['verb']} {lab['resource']} {lab['code']}": int(v) for name, lab, v in samples
                                  if name == "finetune_operator_api_requests_total"
                                  and not lab.get("code", "").startswith("2")}
        result.p50_ms = 1000 * histogram_quantile(samples, "finetune_operator_reconcile_duration_seconds", 0.5)
        result.p99_ms = 1000 * histogram_quantile(samples, "finetune_operator_reconcile_duration_seconds", 0.99)
    finally:
        if sampler is not None:
            sampler.stop()
            result.peak_rss_mib = sampler.peak_rss / 2**20
            result.cpu_s = sampler.cpu_seconds
        result.scrapes, result.unanswered_scrapes = len(SCRAPES.latencies), SCRAPES.unanswered
        result.scrape_p50_s, result.slowest_scrape_s = SCRAPES.quantile(0.5), SCRAPES.slowest
        if op is not None:
            lines = op.log_text().splitlines()
            result.errors = len(operator_errors(op))
            result.warnings = sum(1 for line in lines if " WARNING " in line)
            for line in operator_errors(op)[:5]:
                log(f"  operator error: {line[:300]}")
            for line in [line for line in lines if " WARNING " in line][:5]:
                log(f"  operator warning: {line[:300]}")
            op.stop()
        cp.stop()
        result.load_after = os.getloadavg()[0]
    return result


def baseline_jobs(n: int, ns_names: list[str]) -> list[dict[str, Any]]:
    """The Jobs the operator would create for the same N FineTuneJobs, as the builders make them, without an owner
    (garbage collection would delete Jobs whose owner does not exist) and with a label of their own."""
    ctx = builders.BuildContext(trainer_image="registry.example.com/finetune-trainer:bench",
                                progress_url="http://127.0.0.1:9/progress")
    jobs = []
    for i in range(n):
        body = manifest(f"job-{i:05d}", ns_names[i % len(ns_names)])
        owner = builders.Owner(body["metadata"]["name"], body["metadata"]["namespace"], str(uuid.uuid4()))
        job = builders.build_job(owner, FineTuneJobSpec.model_validate(body["spec"]), ctx)
        job["metadata"].pop("ownerReferences")
        job["metadata"]["labels"][BASELINE_LABEL] = "true"
        job["spec"]["template"]["metadata"]["labels"][BASELINE_LABEL] = "true"
        jobs.append(job)
    return jobs


class Tally:
    """Counts objects by a predicate from one watch stream (a list of a selected or filtered collection carries no
    remainingItemCount, and listing 1,000 pods every second would load the API server it measures)."""

    def __init__(self, cp: ControlPlane, kind: str, selector: str, state: Callable[[Any], str]) -> None:
        from kubernetes import client, watch

        self._api = client.CoreV1Api(cp.api_client()) if kind == "pods" else client.BatchV1Api(cp.api_client())
        self._list = (self._api.list_pod_for_all_namespaces if kind == "pods"
                      else self._api.list_job_for_all_namespaces)
        self._watch, self._selector, self._state = watch.Watch(), selector, state
        self.states: dict[str, str] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            try:
                for event in self._watch.stream(self._list, label_selector=self._selector, timeout_seconds=3600):
                    obj = event["object"]
                    self.states[obj.metadata.uid] = self._state(obj)
            except Exception as exc:  # a dropped stream: watch again
                if not self._stopped:
                    log(f"  watch: {exc}")
                    time.sleep(1)

    def count(self, state: str) -> int:
        return sum(1 for s in list(self.states.values()) if s == state)

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def run_baseline(result: Result, workdir: Path, timeout: float) -> None:
    """The same N trainer Jobs created by the benchmark itself on a fresh control plane: the pace of the API server,
    the Job controller, the scheduler and kwok on this machine, now, without the operator."""
    n, nodes = result.jobs, math.ceil(result.jobs / GPUS_PER_NODE) + 1
    log(f"[{n} jobs, baseline] starting a control plane with {nodes} kwok nodes x {GPUS_PER_NODE} GPUs")
    cp = start_control_plane(workdir=workdir / "controlplane-baseline", stream=sys.stderr, node_count=nodes,
                             gpus_per_node=GPUS_PER_NODE)
    tallies: list[Tally] = []
    try:
        ns_names = [f"bench-{i}" for i in range(result.namespaces)]
        for ns in ns_names:
            cp.create_namespace(ns)
        jobs = baseline_jobs(n, ns_names)
        pods = Tally(cp, "pods", f"{BASELINE_LABEL}=true", lambda p: p.status.phase or "Pending")
        done = Tally(cp, "jobs", f"{BASELINE_LABEL}=true", lambda j: "Complete" if j.status.succeeded else "")
        tallies += [pods, done]
        time.sleep(1.0)
        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(lambda j: cp.request("POST", f"/apis/batch/v1/namespaces/{j['metadata']['namespace']}/jobs",
                                               j), jobs))
        result.baseline_jobs_created_s = time.monotonic() - t0  # every POST answered 201: every Job exists
        result.baseline_running_s = wait_until(lambda: pods.count("Running") >= n, timeout, "every pod Running") - t0
        log(f"[{n} jobs, baseline] all Jobs after {result.baseline_jobs_created_s:.1f}s, all pods Running after "
            f"{result.baseline_running_s:.1f}s")
        finish_all(cp, cp.request("GET", f"/api/v1/pods?labelSelector={urllib.parse.quote(BASELINE_LABEL)}%3Dtrue",
                                  timeout=120)["items"])
        result.baseline_succeeded_s = wait_until(lambda: done.count("Complete") >= n, timeout,
                                                 "every Job Complete") - t0
        log(f"[{n} jobs, baseline] all Jobs succeeded after {result.baseline_succeeded_s:.1f}s")
    finally:
        for tally in tallies:
            tally.stop()
        cp.stop()


def finish_all(cp: ControlPlane, pods: list[dict[str, Any]]) -> None:
    """The fake kubelet ends every pod's container with exit code 0 (ControlPlane.finish_pod, in bulk)."""
    finish = {"metadata": {"annotations": {FINISH_ANNOTATION: "Succeeded", EXIT_CODE_ANNOTATION: "0"}}}

    def finish_pod(pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        cp.request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{urllib.parse.quote(meta['name'])}",
                   finish, content_type="application/merge-patch+json")

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(finish_pod, pods))


def listed_phases(cp: ControlPlane) -> Counter[str]:
    items = cp.request("GET", f"{FTJ}/finetunejobs", timeout=120)["items"]
    return Counter((i.get("status") or {}).get("phase") or "None" for i in items)


# ------------------------------------------------------------------------------------------------------ output


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


COLUMNS = [
    ("jobs", "jobs", "{:d}"), ("ns", "namespaces", "{:d}"), ("applied s", "applied_s", "{:.1f}"),
    ("all Jobs s", "all_jobs_created_s", "{:.1f}"), ("all Running s", "all_running_s", "{:.1f}"),
    ("all Succeeded s", "all_succeeded_s", "{:.1f}"), ("writes/job to Running", "writes_to_running", "{:.2f}"),
    ("writes/job total", "writes_total", "{:.2f}"), ("operator req/job", "operator_requests", "{:.2f}"),
    ("apiserver req/job (all)", "apiserver_requests_all", "{:.1f}"), ("reconcile p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"), ("peak RSS MiB", "peak_rss_mib", "{:.0f}"), ("CPU s", "cpu_s", "{:.1f}"),
    ("errors", "errors", "{:d}"), ("warnings", "warnings", "{:d}"),
]
RATIO_COLUMNS = [
    ("jobs", "jobs", "{:d}"), ("baseline all Jobs s", "baseline_jobs_created_s", "{:.1f}"),
    ("baseline all Running s", "baseline_running_s", "{:.1f}"),
    ("baseline all Succeeded s", "baseline_succeeded_s", "{:.1f}"),
    ("all Jobs ratio", "jobs_ratio", "{:.2f}"), ("all Running ratio", "running_ratio", "{:.2f}"),
    ("all Succeeded ratio", "succeeded_ratio", "{:.2f}"), ("scrapes", "scrapes", "{:d}"),
    ("scrape p50 s", "scrape_p50_s", "{:.2f}"), ("slowest scrape s", "slowest_scrape_s", "{:.2f}"),
    ("unanswered", "unanswered_scrapes", "{:d}"),
]


def _value(r: Result, attr: str) -> Any:
    if attr.endswith("_ratio"):
        return r.ratio({"jobs": "all_jobs_created_s", "running": "all_running_s",
                        "succeeded": "all_succeeded_s"}[attr.removesuffix("_ratio")])
    return getattr(r, attr)


def table(results: list[Result], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    rule = "|" + "|".join("-" * (len(c[0]) + 2) for c in columns) + "|"
    rows = ["| " + " | ".join(fmt.format(_value(r, attr)) for _, attr, fmt in columns) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="FineTuneJobs to apply at once (default 1000)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces to spread them over (default 10)")
    parser.add_argument("--sweep", action="store_true", help="run 100 and 1,000 jobs and print one table")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for each milestone")
    parser.add_argument("--operator-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra operator setting, e.g. FINETUNE_WORKERS=16 (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    operator_env = dict(item.split("=", 1) for item in args.operator_env)
    sizes = [100, 1000] if args.sweep else [args.jobs]
    results = []
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        for n in sizes:
            workdir = Path(tmp) / f"run-{n}"
            workdir.mkdir()
            results.append(run(n, args.namespaces, workdir, operator_env, args.timeout))
            log(table(results[-1:]))
    print(table(results))
    print("\nthe operator against the baseline (the same Jobs created by the benchmark, no operator) in this run:")
    print(table(results, RATIO_COLUMNS))
    last = results[-1]
    print("\noperator writes per job, by kind (largest run, creation to Succeeded, from the API server's counters):")
    for kind, value in sorted(last.breakdown.items()):
        print(f"  {kind:<18} {value:.2f}")
    print(f"  (the operator's own count of its writes: {last.operator_writes_self:.2f} per job)")
    print(f"  (of the operator's requests, answered with an error: {last.failed_requests or 'none'})")
    print("operator requests per job, by verb and kind (its own counter; Lease traffic left out): "
          + ", ".join(f"{k} {v:.2f}" for k, v in last.requests_by_kind.items()))
    for r in results:
        print(f"{r.jobs} jobs: operator settings {r.settings}; 1-min load average {r.load_before:.1f} before, "
              f"{r.load_after:.1f} after (2 cores; anything above 2 means other work competed)")
        print(f"CPU use, {r.jobs} jobs, first POST to all Jobs created ({r.all_jobs_created_s:.0f} s): {r.cpu_to_jobs}")
        print(f"CPU use, {r.jobs} jobs, first POST to all Running ({r.all_running_s:.0f} s): {r.cpu_to_running}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    print(f"RESULT jobs={last.jobs} all_jobs_created_s={last.all_jobs_created_s:.1f} "
          f"all_succeeded_s={last.all_succeeded_s:.1f} jobs_ratio={last.ratio('all_jobs_created_s'):.2f} "
          f"running_ratio={last.ratio('all_running_s'):.2f} succeeded_ratio={last.ratio('all_succeeded_s'):.2f} "
          f"writes_per_job={last.writes_to_running:.2f} operator_peak_rss_mib={last.peak_rss_mib:.0f} "
          f"slowest_scrape_s={last.slowest_scrape_s:.2f} errors={last.errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
