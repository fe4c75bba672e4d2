"""Kueue admitting N FineTuneJobs from four tenants, against Kueue admitting the same N plain Jobs, in the same run.

Four tenants (namespaces team-a .. team-d), each with a LocalQueue on its own ClusterQueue of NOMINAL GPUs, the four
in one cohort (unused quota is lent), one ResourceFlavor for the kwok GPU nodes, 4 x NOMINAL GPUs in all. Demand is
uneven (DEMAND: 40%, 30%, 20% and 10% of the jobs), so the tenants that still queue borrow what the others leave.
Each job is one 1-GPU pod that "trains" for RUN seconds: the benchmark finishes every pod RUN seconds after it starts
running (kwok plays the kubelet; ControlPlane.finish_pod's annotation).

Two parts, each on a fresh control plane with the real Kueue (tests/controlplane/kueue.py):

  - plain: N batch/v1 Jobs with the queue label, created by the benchmark: Kueue alone;
  - operator: N FineTuneJobs with `runPolicy.queueName`, the real operator creating their Jobs (FINETUNE_KUEUE auto:
    it watches the Workloads).

Measured per part: the time from the first POST until the last job is admitted and until the last one succeeded,
jobs admitted per second (N over the time to the last admission), each tenant's share of the GPU-seconds used while
every tenant still had jobs queued (against its nominal share, 25%) and over the whole run; for the operator part
also its API writes per job (its own request counter: Kueue writes the same Jobs, so the API server's counters cannot
tell the two apart), its errors and Kueue's. The operator's overhead is the ratio of the two parts' times.

    python benchmarks/kueue_scale.py               # 1,000 jobs
    python benchmarks/kueue_scale.py --jobs 200

The last line is machine-readable:

  RESULT jobs=<n> plain_admitted_per_s=<r> operator_admitted_per_s=<r> makespan_ratio=<r> admission_ratio=<r>
         writes_per_job=<w> min_tenant_share=<s> errors=<e>

where min_tenant_share is the smallest tenant's share of GPU-seconds while all four had queued jobs (nominal: 0.25).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from operator_scale import (  # noqa: E402
    CLIENT_THREADS,
    FINISH_ANNOTATION,
    WRITE_VERBS,
    install_crd,
    log,
    operator_metrics,
    wait_until,
)

from tests.controlplane.cluster import EXIT_CODE_ANNOTATION, ControlPlane, build_binaries, start_control_plane  # noqa: E402
from tests.controlplane.kueue import KUEUE_API, Kueue, kueue_namespace_labels  # noqa: E402
from tests.operator.cluster_support import OperatorProcess, create_ftj, operator_errors  # noqa: E402
from tests.operator.helpers import manifest  # noqa: E402

TENANTS = ("team-a", "team-b", "team-c", "team-d")
DEMAND = (0.4, 0.3, 0.2, 0.1)  # each tenant's share of the jobs
NOMINAL = 16  # GPUs per tenant's ClusterQueue
GPUS_PER_NODE = 64
RUN = 5.0  # seconds each pod "trains"
POLL = 1.0
LABEL = "finetune.dev/benchmark"  # on the plain part's Jobs and pods


@dataclass
class Part:
    name: str
    jobs: int
    admitted_s: float = math.nan  # first POST to the last admission
    succeeded_s: float = math.nan  # first POST to the last job's success
    gpu_seconds: dict[str, float] = field(default_factory=dict)  # whole run, per tenant
    contended: dict[str, float] = field(default_factory=dict)  # while every tenant had jobs queued
    writes_per_job: float = math.nan
    writes_by_kind: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    kueue_errors: int = 0
    window: tuple[float, float] | None = None  # every tenant had jobs waiting (seconds from the first POST)

    @property
    def admitted_per_s(self) -> float:
        return self.jobs / self.admitted_s

    def share(self, tenant: str, contended: bool = True) -> float:
        seconds = self.contended if contended else self.gpu_seconds
        total = sum(seconds.values())
        return seconds.get(tenant, 0.0) / total if total else math.nan


class Finisher:
    """Finishes every Running pod RUN seconds after it started, and keeps the books: GPU-seconds per tenant, and the
    same while every tenant still had jobs waiting (`contended`, which the caller switches off)."""

    def __init__(self, cp: ControlPlane, selector: str) -> None:
        self.cp, self.selector = cp, selector
        self.done: set[str] = set()
        self.gpu_seconds: Counter[str] = Counter()
        self.contended: Counter[str] = Counter()
        self.contention = False  # every tenant has jobs waiting (switched by the caller)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Finisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        finish = {"metadata": {"annotations": {FINISH_ANNOTATION: "Succeeded", EXIT_CODE_ANNOTATION: "0"}}}
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            while not self._stop.wait(POLL):
                try:
                    pods = self.cp.request("GET", f"/api/v1/pods?{self.selector}&fieldSelector=status.phase%3DRunning",
                                           timeout=60)["items"]
                except Exception as exc:  # a slow API server: look again
                    log(f"  finisher: {exc}")
                    continue
                now = time.time()
                due = []
                for pod in pods:
                    uid = pod["metadata"]["uid"]
                    started = _epoch(pod["status"].get("startTime"))
                    if uid in self.done or started is None or now - started < RUN:
                        continue
                    self.done.add(uid)
                    tenant = pod["metadata"]["namespace"]
                    self.gpu_seconds[tenant] += now - started
                    if self.contention:
                        self.contended[tenant] += now - started
                    due.append(pod)
                list(pool.map(self._finish, due, [finish] * len(due)))

    def _finish(self, pod: dict[str, Any], body: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.cp.request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{urllib.parse.quote(meta['name'])}",
                            body, content_type="application/merge-patch+json")
        except Exception as exc:
            log(f"  finisher: {exc}")
            self.done.discard(meta["uid"])


def _epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    from finetune_api.times import parse_time

    return parse_time(stamp)


def queues(kueue: Kueue) -> None:
    kueue.create({"kind": "ResourceFlavor", "metadata": {"name": "h100"},
                  "spec": {"nodeLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}})
    for tenant in TENANTS:
        kueue.cp.create_namespace(tenant, labels=kueue_namespace_labels())
        kueue.create({"kind": "ClusterQueue", "metadata": {"name": tenant}, "spec": {
            "namespaceSelector": {}, "cohortName": "research",
            "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                {"name": "h100", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": NOMINAL}]}]}]}})
        kueue.create({"kind": "LocalQueue", "metadata": {"name": "gpu", "namespace": tenant},
                      "spec": {"clusterQueue": tenant}})


def demand(n: int) -> list[str]:
    """The tenant of each job, interleaved (a tenant's jobs are not all submitted first)."""
    counts = [round(n * d) for d in DEMAND]
    counts[0] += n - sum(counts)
    order = []
    left = dict(zip(TENANTS, counts, strict=True))
    while any(left.values()):
        for tenant in TENANTS:
            if left[tenant]:
                order.append(tenant)
                left[tenant] -= 1
    return order


def plain_job(i: int, tenant: str) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"job-{i:05d}", "namespace": tenant,
                         "labels": {"kueue.x-k8s.io/queue-name": "gpu", LABEL: "true"}},
            "spec": {"completions": 1, "parallelism": 1, "completionMode": "Indexed", "backoffLimit": 3,
                     "template": {"metadata": {"labels": {LABEL: "true"}}, "spec": {
                         "restartPolicy": "Never", "containers": [{
                             "name": "trainer", "image": "registry.example.com/finetune-trainer:bench",
                             "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}}]}}}}


def admitted(cp: ControlPlane, finisher: Finisher) -> int:
    """Jobs admitted so far: those finished, plus those the ClusterQueues admit now."""
    now = sum(int((cp.request("GET", f"{KUEUE_API}/clusterqueues/{t}").get("status") or {}).get("admittedWorkloads")
                  or 0) for t in TENANTS)
    return len(finisher.done) + now


def pending(cp: ControlPlane) -> dict[str, int]:
    return {t: int((cp.request("GET", f"{KUEUE_API}/clusterqueues/{t}").get("status") or {}).get("pendingWorkloads")
                   or 0) for t in TENANTS}


def run_part(name: str, n: int, workdir: Path, timeout: float) -> Part:
    part = Part(name, n)
    binaries = build_binaries(stream=sys.stderr, with_kueue=True)
    assert binaries.kueue is not None
    nodes = math.ceil(len(TENANTS) * NOMINAL / GPUS_PER_NODE) + 1
    log(f"[{name}] control plane, {nodes} kwok nodes x {GPUS_PER_NODE} GPUs, Kueue")
    cp = start_control_plane(workdir=workdir / f"controlplane-{name}", stream=sys.stderr, node_count=nodes,
                             gpus_per_node=GPUS_PER_NODE)
    kueue = Kueue(cp, binaries.kueue, workdir / f"kueue-{name}")
    op: OperatorProcess | None = None
    finisher: Finisher | None = None
    try:
        kueue.start()
        queues(kueue)
        order = demand(n)
        if name == "operator":
            install_crd(cp)
            op = OperatorProcess(cp, workdir, FINETUNE_RESYNC_SECONDS="60", FINETUNE_STATUS_SETTLE_SECONDS="10",
                                 FINETUNE_LEASE_DURATION_SECONDS="15").start(timeout=120)
            selector = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfinetune-operator"
            submit = [lambda i=i, t=t: create_ftj(cp, manifest(f"job-{i:05d}", t, run_policy={"queueName": "gpu"}))
                      for i, t in enumerate(order)]
        else:
            selector = f"labelSelector={urllib.parse.quote(LABEL)}%3Dtrue"
            submit = [lambda i=i, t=t: cp.request("POST", f"/apis/batch/v1/namespaces/{t}/jobs", plain_job(i, t))
                      for i, t in enumerate(order)]
        time.sleep(1.0)
        finisher = Finisher(cp, selector).start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(lambda f: f(), submit))
        log(f"[{name}] {n} submitted in {time.monotonic() - t0:.1f}s")

        window: list[float] = []  # when every tenant first had jobs waiting, and when one's queue ran empty

        def all_admitted() -> bool:
            assert finisher is not None
            waiting = pending(cp)
            if not window and min(waiting.values()) > 0:
                window.append(time.monotonic() - t0)
                finisher.contention = True
            elif len(window) == 1 and min(waiting.values()) == 0:
                window.append(time.monotonic() - t0)
                finisher.contention = False
                log(f"[{name}] every tenant had jobs waiting from {window[0]:.0f}s to {window[1]:.0f}s: {waiting}")
            return admitted(cp, finisher) >= n

        part.admitted_s = wait_until(all_admitted, timeout, "every job admitted") - t0
        log(f"[{name}] all admitted after {part.admitted_s:.1f}s")
        part.succeeded_s = wait_until(lambda: len(finisher.done) >= n, timeout, "every pod finished") - t0  # type: ignore[union-attr]
        part.gpu_seconds, part.contended = dict(finisher.gpu_seconds), dict(finisher.contended)
        part.window = (window[0], window[1]) if len(window) == 2 else None
        if op is not None:
            wait_until(lambda: _succeeded_ftjs(cp) >= n, timeout, "every FineTuneJob Succeeded")
            part.succeeded_s = time.monotonic() - t0
            # Kueue writes the same Jobs (suspend, the flavor's nodeSelector), so the API server's counters cannot
            # tell the operator's writes from Kueue's here: the operator's own request counter says what it wrote.
            writes: Counter[str] = Counter()
            for metric, lab, v in operator_metrics(op):
                if metric == "finetune_operator_api_requests_total" and lab.get("verb") in WRITE_VERBS \
                        and lab.get("resource") != "Lease":
                    writes[f"{lab['verb']} {lab['resource']}"] += v / n
            part.writes_per_job, part.writes_by_kind = sum(writes.values()), dict(writes)
        log(f"[{name}] all succeeded after {part.succeeded_s:.1f}s")
    finally:
        if finisher is not None:
            finisher.stop()
        if op is not None:
            part.errors = len(operator_errors(op))
            for line in operator_errors(op)[:5]:
                log(f"  operator error: {line[:300]}")
            op.stop()
        # Kueue logs an optimistic-concurrency conflict (it retries the update) at ERROR: those are not failures.
        kueue_errors = [line for line in kueue.log_text().splitlines() if "\tERROR\t" in line
                        and "Provisioning Requests not supported" not in line
                        and "Operation cannot be fulfilled" not in line]
        part.kueue_errors = len(kueue_errors)
        for line in kueue_errors[:3]:
            log(f"  Kueue error: {line[:300]}")
        kueue.stop()
        cp.stop()
    return part


def _succeeded_ftjs(cp: ControlPlane) -> int:
    items = cp.request("GET", "/apis/finetune.dev/v1alpha1/finetunejobs", timeout=120)["items"]
    return sum(1 for i in items if (i.get("status") or {}).get("phase") == "Succeeded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in each part (default 1000)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each milestone")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kueue-scale-") as tmp:
        plain = run_part("plain", args.jobs, Path(tmp), args.timeout)
        ftj = run_part("operator", args.jobs, Path(tmp), args.timeout)
    print(f"{args.jobs} jobs, {len(TENANTS)} tenants x {NOMINAL} GPUs nominal in one cohort, demand "
          f"{', '.join(f'{t} {d:.0%}' for t, d in zip(TENANTS, DEMAND, strict=True))}, {RUN:.0f} s per job")
    print("| part | last admitted s | admitted/s | last succeeded s | writes/job | errors | Kueue errors | "
          + " | ".join(f"{t} share (all queued / whole run)" for t in TENANTS) + " |")
    print("|" + "---|" * (7 + len(TENANTS)))
    for p in (plain, ftj):
        shares = " | ".join(f"{p.share(t):.2f} / {p.share(t, contended=False):.2f}" for t in TENANTS)
        print(f"| {p.name} | {p.admitted_s:.1f} | {p.admitted_per_s:.1f} | {p.succeeded_s:.1f} | "
              f"{p.writes_per_job:.2f} | {p.errors} | {p.kueue_errors} | {shares} |")
    makespan_ratio = ftj.succeeded_s / plain.succeeded_s
    admission_ratio = plain.admitted_per_s / ftj.admitted_per_s
    print(f"operator / plain: time to the last success x{makespan_ratio:.2f}, admission rate x{1 / admission_ratio:.2f}"
          f"; nominal share of every tenant 0.25; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (2 cores)")
    print("operator writes per job (its own request counter): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ftj.writes_by_kind.items())))
    for p in (plain, ftj):
        if p.window:
            print(f"{p.name}: every tenant had jobs waiting from {p.window[0]:.0f} s to {p.window[1]:.0f} s")
    min_share = min(ftj.share(t) for t in TENANTS)
    print(f"RESULT jobs={args.jobs} plain_admitted_per_s={plain.admitted_per_s:.2f} "
          f"operator_admitted_per_s={ftj.admitted_per_s:.2f} makespan_ratio={makespan_ratio:.2f} "
          f"admission_ratio={admission_ratio:.2f} writes_per_job={ftj.writes_per_job:.2f} "
          f"min_tenant_share={min_share:.2f} errors={ftj.errors + ftj.kueue_errors + plain.kueue_errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
