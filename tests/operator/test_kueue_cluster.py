"""FineTuneJobs under the real Kueue controller (tests/controlplane/kueue.py) on the control plane's kwok GPU nodes.

Kueue admits, preempts, evicts and requeues the operator's Jobs itself; nothing is imitated by hand. Each test makes its
own ResourceFlavor, ClusterQueues and LocalQueues (cluster-scoped names carry the test's namespace) in a namespace
Kueue's webhooks see. The checkpoint a preempted trainer writes, and the resume from it, are proven with real pods in
tests/node/test_kueue_node.py.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.kueue import Kueue, kueue_namespace_labels
from tests.operator.cluster_support import (
    OperatorProcess,
    condition,
    create_ftj,
    ftj_events,
    get_ftj,
    get_or_none,
    operator_errors,
    patch_ftj,
    pods_of,
    wait_phase,
    wait_running_pods,
)
from tests.operator.helpers import manifest
from tests.operator.test_preflight import FOUND

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"  # the kwok nodes' nvidia.com/gpu.product label
POOL_TAINT = "finetune.dev/gpu-pool"  # a toleration the flavor adds to admitted pods (the kwok nodes have no taint)
ADMIT = 45.0  # seconds from a FineTuneJob's creation (or freed quota) to Kueue's admission and running pods


@pytest.fixture(scope="module")
def kueue_operator(control_plane: ControlPlane, finetune_crd: None, kueue_process: Kueue,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """An operator started once Kueue's CRDs are served (FINETUNE_KUEUE auto: it watches Workloads)."""
    with OperatorProcess(control_plane, tmp_path_factory.mktemp("operator-kueue")) as op:
        yield op


@pytest.fixture
def op(kueue_operator: OperatorProcess, kueue: Kueue) -> OperatorProcess:
    if not kueue_operator.alive:
        kueue_operator.start()
    return kueue_operator


class Queues:
    """The Kueue objects of one test: a flavor for the kwok GPU nodes, ClusterQueues, LocalQueues, priorities."""

    def __init__(self, kueue: Kueue, namespace: str) -> None:
        self.kueue, self.ns, self.suffix = kueue, namespace, uuid.uuid4().hex[:6]
        self.made: list[tuple[str, str, str | None]] = []
        self.flavor = self._make({"kind": "ResourceFlavor", "metadata": {"name": self.name("h100")}, "spec": {
            "nodeLabels": {"nvidia.com/gpu.product": GPU_PRODUCT},
            "tolerations": [{"key": POOL_TAINT, "operator": "Exists", "effect": "NoSchedule"}]}})

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def _make(self, obj: dict[str, Any]) -> str:
        self.kueue.create(obj)
        self.made.append((obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")))
        return str(obj["metadata"]["name"])

    def cluster_queue(self, base: str, gpus: int, cohort: str | None = None, borrowing: int | None = None,
                      preemption: dict[str, Any] | None = None) -> str:
        quota: dict[str, Any] = {"name": "nvidia.com/gpu", "nominalQuota": gpus}
        if borrowing is not None:
            quota["borrowingLimit"] = borrowing
        spec: dict[str, Any] = {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": ["nvidia.com/gpu"], "flavors": [{"name": self.flavor, "resources": [quota]}]}]}
        if cohort:
            spec["cohortName"] = self.name(cohort)
        if preemption:
            spec["preemption"] = preemption
        return self._make({"kind": "ClusterQueue", "metadata": {"name": self.name(base)}, "spec": spec})

    def cpu_cluster_queue(self, base: str, cpu: str, memory: str) -> str:
        """A CPU-only ClusterQueue (a flavor of its own, no node labels): where pre-flights are admitted."""
        flavor = self._make({"kind": "ResourceFlavor", "metadata": {"name": self.name(f"{base}-cpu")}, "spec": {}})
        return self._make({"kind": "ClusterQueue", "metadata": {"name": self.name(base)}, "spec": {
            "namespaceSelector": {}, "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{
                "name": flavor, "resources": [{"name": "cpu", "nominalQuota": cpu},
                                              {"name": "memory", "nominalQuota": memory}]}]}]}})

    def local_queue(self, name: str, cluster_queue: str) -> str:
        return self._make({"kind": "LocalQueue", "metadata": {"name": name, "namespace": self.ns},
                           "spec": {"clusterQueue": cluster_queue}})

    def priority(self, base: str, value: int) -> str:
        return self._make({"kind": "WorkloadPriorityClass", "metadata": {"name": self.name(base)}, "value": value,
                           "description": f"{base} priority FineTuneJobs"})

    def delete(self) -> None:
        for kind, name, namespace in reversed(self.made):
            self.kueue.delete(kind, name, namespace)


@pytest.fixture
def queues(control_plane: ControlPlane, kueue: Kueue, request: pytest.FixtureRequest) -> Iterator[Queues]:
    """A fresh namespace whose Jobs Kueue manages, and the test's Kueue objects (deleted afterwards)."""
    ns = f"kq-{request.node.name[5:30].replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    control_plane.create_namespace(ns, labels={"finetune.dev/test": "true", **kueue_namespace_labels()})
    made = Queues(kueue, ns)
    try:
        yield made
    finally:
        control_plane.delete_namespace(ns)
        made.delete()


def queued(name: str, ns: str, queue: str, **run_policy: Any) -> dict[str, Any]:
    return manifest(name, ns, run_policy={"queueName": queue, **run_policy})


def workload_of(kueue: Kueue, ns: str, job: str) -> dict[str, Any] | None:
    return next((w for w in kueue.workloads(ns) if any(r.get("kind") == "Job" and r.get("name") == job
                                                       for r in w["metadata"].get("ownerReferences") or [])), None)


def job_path(ns: str, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"


def finish(cp: ControlPlane, ns: str, name: str, code: int = 0) -> None:
    for pod in pods_of(cp, ns, name, live_only=True):
        cp.finish_pod(ns, pod["metadata"]["name"], exit_code=code)


# ----------------------------------------------------------------------------------------------- admission


def test_queued_then_admitted_with_the_flavor_and_kueues_own_message(control_plane: ControlPlane, queues: Queues,
                                                                     op: OperatorProcess) -> None:
    """Three 1-GPU jobs on a 2-GPU ClusterQueue: two admitted (the flavor's nodeSelector and toleration on their
    pods, flavor and ClusterQueue in status, an Admitted Event), one Queued with Kueue's own reason; it is admitted
    when a running one finishes. The operator never writes a Kueue Job's suspend."""
    cp, ns = control_plane, queues.ns
    cq = queues.cluster_queue("gpus", gpus=2)
    queues.local_queue("gpu", cq)
    for name in ("first", "second"):
        create_ftj(cp, queued(name, ns, "gpu"))
        ftj = wait_phase(cp, ns, name, "Running", timeout=ADMIT)
        assert condition(ftj, "Queued")["reason"] == "Admitted"  # type: ignore[index]
        assert ftj["status"]["queue"] == {"workload": workload_of(queues.kueue, ns, name)["metadata"]["name"],
                                          "localQueue": "gpu", "clusterQueue": cq, "flavor": queues.flavor}
    [pod] = pods_of(cp, ns, "first", live_only=True)
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": GPU_PRODUCT}
    assert {"key": POOL_TAINT, "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    admitted = [e for e in ftj_events(cp, ns, "first", after="Admitted") if e["reason"] == "Admitted"]
    assert admitted[0]["type"] == "Normal"
    assert f"ClusterQueue {cq} with flavor {queues.flavor}" in admitted[0]["message"]

    create_ftj(cp, queued("third", ns, "gpu"))
    ftj = wait_phase(cp, ns, "third", "Queued", timeout=ADMIT, reason=("Queued", "WaitingForQuota"))
    message = condition(ftj, "Queued")["message"]  # type: ignore[index]
    said = workload_of(queues.kueue, ns, "third")
    kueue_message = next(c["message"] for c in said["status"]["conditions"] if c["type"] == "QuotaReserved")
    assert f"insufficient unused quota for nvidia.com/gpu in flavor {queues.flavor}" in kueue_message
    assert kueue_message in message and "LocalQueue gpu" in message, message
    assert control_plane.request("GET", job_path(ns, "third"))["spec"]["suspend"] is True
    printed = cp.kubectl("get", "ftj", "third", "-n", ns, "-o", "wide").stdout
    assert "Queued" in printed and "gpu" in printed, printed

    finish(cp, ns, "first")
    wait_phase(cp, ns, "first", "Succeeded", timeout=ADMIT)
    ftj = wait_phase(cp, ns, "third", "Running", timeout=ADMIT)
    assert ftj["status"]["queue"]["clusterQueue"] == cq
    assert _job_patches(op) == [], "the operator wrote a Job Kueue holds"
    assert operator_errors(op) == []


def test_two_tenants_in_a_cohort_borrow_and_wait_with_the_reason(control_plane: ControlPlane, queues: Queues,
                                                                  op: OperatorProcess) -> None:
    """team-a (2 GPUs) borrows team-b's unused quota in their cohort; team-b's second job then waits with Kueue's
    reason, and is admitted when team-a's borrowing job finishes."""
    cp, ns = control_plane, queues.ns
    queues.local_queue("team-a", queues.cluster_queue("team-a", gpus=2, cohort="research"))
    queues.local_queue("team-b", queues.cluster_queue("team-b", gpus=2, cohort="research"))
    for i in range(3):
        create_ftj(cp, queued(f"a{i}", ns, "team-a"))
    for i in range(3):
        wait_phase(cp, ns, f"a{i}", "Running", timeout=ADMIT)
    create_ftj(cp, queued("b0", ns, "team-b"))
    wait_phase(cp, ns, "b0", "Running", timeout=ADMIT)
    create_ftj(cp, queued("b1", ns, "team-b"))
    ftj = wait_phase(cp, ns, "b1", "Queued", timeout=ADMIT, reason=("Queued", "WaitingForQuota"))
    assert "LocalQueue team-b" in condition(ftj, "Queued")["message"]  # type: ignore[index]
    finish(cp, ns, "a2")
    ftj = wait_phase(cp, ns, "b1", "Running", timeout=ADMIT)
    assert ftj["status"]["queue"]["clusterQueue"] == queues.name("team-b")


def test_a_local_queue_that_does_not_exist_is_named_within_30_seconds(control_plane: ControlPlane, queues: Queues,
                                                                     op: OperatorProcess) -> None:
    cp, ns = control_plane, queues.ns
    create_ftj(cp, queued("lost", ns, "no-such-queue"))
    ftj = wait_phase(cp, ns, "lost", "Queued", timeout=30, reason=("Queued", "Inadmissible"))
    message = condition(ftj, "Queued")["message"]  # type: ignore[index]
    assert "no-such-queue" in message and "doesn't exist" in message, message
    events = ftj_events(cp, ns, "lost", after="Inadmissible")
    assert [e["type"] for e in events if e["reason"] == "Inadmissible"] == ["Warning"]


# ----------------------------------------------------------------------------------------------- pre-flight


@pytest.fixture
def checking(kueue_operator: OperatorProcess, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """An operator with the pre-flight on (its default) in place of the module's: ``checking(**env)`` starts it."""
    started: list[OperatorProcess] = []

    def start(**env: str) -> OperatorProcess:
        kueue_operator.stop()
        started.append(OperatorProcess(kueue_operator.cp, tmp_path, FINETUNE_PREFLIGHT="true",
                                       FINETUNE_PREFLIGHT_CPU="100m", FINETUNE_PREFLIGHT_MEMORY="1Gi", **env))
        started[-1].start()
        return started[-1]

    try:
        yield start
    finally:
        for op in started:
            op.stop()


def _preflight_pod(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = cp.wait_for(lambda: next((p for p in pods_of(cp, ns, name, live_only=True)
                                                    if p["status"].get("phase") == "Running"), None),
                                      timeout=ADMIT, desc=f"{name}'s pre-flight pod running")
    assert pod["metadata"]["name"].startswith(f"{name}-preflight-"), pod["metadata"]["name"]
    return pod


def test_the_preflight_is_admitted_through_its_cpu_queue_while_the_gpu_quota_is_full(
        control_plane: ControlPlane, queues: Queues, kueue: Kueue,
        checking: Callable[..., OperatorProcess]) -> None:
    """With FINETUNE_PREFLIGHT_QUEUE the pre-flight Job carries a CPU LocalQueue of its own: Kueue admits it at once
    while every GPU of the job's ClusterQueue is taken, and only the trainer Job (after the pre-flight passed) waits
    for GPU quota, with Kueue's reason."""
    cp, ns = control_plane, queues.ns
    queues.local_queue("gpu", queues.cluster_queue("gpus", gpus=1))
    checks = queues.cpu_cluster_queue("checks", cpu="2", memory="4Gi")
    queues.local_queue("checks", checks)
    op = checking(FINETUNE_PREFLIGHT_QUEUE="checks")
    passed = FOUND.model_dump_json(by_alias=True, exclude_none=True)

    create_ftj(cp, queued("holder", ns, "gpu"))
    cp.finish_pod(ns, _preflight_pod(cp, ns, "holder")["metadata"]["name"], exit_code=0, message=passed)
    wait_phase(cp, ns, "holder", "Running", timeout=ADMIT)  # the ClusterQueue's only GPU is now held

    create_ftj(cp, queued("waiting", ns, "gpu"))
    pod = _preflight_pod(cp, ns, "waiting")
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0]["resources"])
    checked = cp.request("GET", job_path(ns, "waiting-preflight"))
    assert checked["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "checks"
    workload = workload_of(queues.kueue, ns, "waiting-preflight")
    assert workload is not None and workload["status"]["admission"]["clusterQueue"] == checks, workload
    assert get_or_none(cp, job_path(ns, "waiting")) is None  # no GPU Job while the pre-flight runs
    cp.finish_pod(ns, pod["metadata"]["name"], exit_code=0, message=passed)

    ftj = wait_phase(cp, ns, "waiting", "Queued", timeout=ADMIT, reason=("Queued", "WaitingForQuota"))
    assert condition(ftj, "Validated")["reason"] == "PreflightPassed"  # type: ignore[index]
    assert "insufficient unused quota for nvidia.com/gpu" in condition(ftj, "Queued")["message"]  # type: ignore[index]
    finish(cp, ns, "holder")
    wait_phase(cp, ns, "waiting", "Running", timeout=ADMIT)
    assert _job_patches(op) == [], "the operator wrote a Job Kueue holds"
    assert operator_errors(op) == []


def test_a_preflight_kueue_holds_without_a_queue_is_reported_and_no_gpu_job_is_made(
        control_plane: ControlPlane, queues: Queues, kueue: Kueue,
        checking: Callable[..., OperatorProcess]) -> None:
    """A Kueue that manages Jobs without a queue name suspends a pre-flight that has no CPU queue of its own: the
    operator leaves that suspend alone, makes no GPU Job, and says what to configure (one Warning Event)."""
    cp, ns = control_plane, queues.ns
    kueue.restart(manageJobsWithoutQueueName=True)
    queues.local_queue("gpu", queues.cluster_queue("gpus", gpus=1))
    op = checking()
    create_ftj(cp, queued("held", ns, "gpu"))
    ftj = wait_phase(cp, ns, "held", "Pending", timeout=ADMIT, reason=("Running", "PreflightSuspended"))
    message = condition(ftj, "Running")["message"]  # type: ignore[index]
    assert "FINETUNE_PREFLIGHT_QUEUE" in message and "spec.preflight.enabled" in message, message
    assert cp.request("GET", job_path(ns, "held-preflight"))["spec"]["suspend"] is True
    assert get_or_none(cp, job_path(ns, "held")) is None
    warnings = [e for e in ftj_events(cp, ns, "held", after="PreflightSuspended") if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["PreflightSuspended"]
    assert _job_patches(op) == [], "the operator wrote the pre-flight Job Kueue holds"


# --------------------------------------------------------------------------------------------- preemption


def test_a_higher_priority_job_preempts_and_the_preempted_one_is_requeued_and_readmitted(
        control_plane: ControlPlane, queues: Queues, op: OperatorProcess) -> None:
    """Preemption as the status tells it: Queued with Kueue's reason, a Warning Event, the requeue counted, no
    backoffLimit retry used, GPU-seconds kept; admitted again when the preemptor finishes. (The checkpoint and the
    resume from it: tests/node/test_kueue_node.py.)"""
    cp, ns = control_plane, queues.ns
    cq = queues.cluster_queue("one-gpu", gpus=1, preemption={"withinClusterQueue": "LowerPriority"})
    queues.local_queue("gpu", cq)
    low, high = queues.priority("low", 100), queues.priority("high", 1000)
    create_ftj(cp, queued("low", ns, "gpu", priorityClass=low, backoffLimit=0))
    wait_phase(cp, ns, "low", "Running", timeout=ADMIT)
    before = cp.wait_for(lambda: (lambda s: s if s.get("gpuSeconds", 0) > 0 else None)(
        get_ftj(cp, ns, "low")["status"]), timeout=30, desc="GPU-seconds counted")["gpuSeconds"]

    create_ftj(cp, queued("high", ns, "gpu", priorityClass=high))
    ftj = wait_phase(cp, ns, "low", "Queued", timeout=ADMIT, reason=("Queued", "Preempted"))
    message = condition(ftj, "Queued")["message"]  # type: ignore[index]
    assert "evicted by Kueue (InClusterQueue)" in message and "resumes from the latest checkpoint" in message, message
    assert ftj["status"]["queue"]["requeues"] == 1 and ftj["status"]["queue"]["priorityClass"] == low
    assert ftj["status"]["gpuSeconds"] >= before and ftj["status"].get("restarts", 0) == 0
    warned = [e for e in ftj_events(cp, ns, "low", after="Preempted") if e["reason"] == "Preempted"]
    assert warned[0]["type"] == "Warning"
    wait_phase(cp, ns, "high", "Running", timeout=ADMIT)
    job = cp.request("GET", job_path(ns, "low"))
    assert job["spec"]["suspend"] is True and not job["status"].get("failed"), "a preemption is no retry"

    finish(cp, ns, "high")
    ftj = wait_phase(cp, ns, "low", "Running", timeout=ADMIT)
    assert condition(ftj, "Queued")["reason"] == "Admitted"  # type: ignore[index]
    assert "after 1 requeue" in condition(ftj, "Queued")["message"]  # type: ignore[index]
    assert not cp.request("GET", job_path(ns, "low"))["status"].get("failed")
    assert ftj["status"].get("restarts", 0) == 0


def test_a_failed_worker_restarts_the_group_by_eviction_under_kueue(control_plane: ControlPlane, queues: Queues,
                                                                    op: OperatorProcess) -> None:
    """Kueue holds the admitted Job's suspend: one crashed worker restarts the whole group by the eviction of its
    survivor, one restart, without touching the Job's suspend (Kueue would see a suspension as its own)."""
    cp, ns = control_plane, queues.ns
    queues.local_queue("gpu", queues.cluster_queue("gpus", gpus=4))
    body = queued("gang", ns, "gpu", backoffLimit=1)
    body["spec"]["resources"] = {"workers": 2, "gpusPerWorker": 1}
    create_ftj(cp, body)
    first = wait_running_pods(cp, ns, "gang", 2, timeout=ADMIT)
    wait_phase(cp, ns, "gang", "Running")
    by_index = {int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]): p for p in first}
    cp.finish_pod(ns, by_index[1]["metadata"]["name"], exit_code=1)
    survivor = f"/api/v1/namespaces/{ns}/pods/{by_index[0]['metadata']['name']}"
    cp.wait_for(lambda: get_or_none(cp, survivor) is None, timeout=30, desc="the surviving worker evicted")
    old = {p["metadata"]["uid"] for p in first}
    cp.wait_for(lambda: len([p for p in pods_of(cp, ns, "gang", live_only=True) if p["metadata"]["uid"] not in old
                             and p["status"].get("phase") == "Running"]) == 2, timeout=30, desc="a new group")
    ftj = cp.wait_for(lambda: (lambda f: f if f["status"].get("phase") == "Running" and f["status"].get("restarts")
                               == 1 else None)(get_ftj(cp, ns, "gang")), timeout=30, desc="Running, 1 restart")
    assert ftj["status"]["restarts"] == 1
    job = cp.request("GET", job_path(ns, "gang"))
    assert job["spec"]["suspend"] is False and job["status"].get("failed", 0) == 1


# --------------------------------------------------------------------------------------- suspend and cancel


def test_user_suspend_frees_the_quota_resume_requeues_and_cancel_frees_it_for_good(
        control_plane: ControlPlane, queues: Queues, op: OperatorProcess) -> None:
    """Under Kueue a user suspend deactivates the Workload: Kueue stops the pods and frees the quota (a waiting job
    is admitted); resume activates it and the job waits for quota like any other; cancel deletes the Job and frees
    the quota for good."""
    cp, ns = control_plane, queues.ns
    queues.local_queue("gpu", queues.cluster_queue("one-gpu", gpus=1))
    create_ftj(cp, queued("paused", ns, "gpu"))
    wait_phase(cp, ns, "paused", "Running", timeout=ADMIT)
    create_ftj(cp, queued("waiting", ns, "gpu"))
    wait_phase(cp, ns, "waiting", "Queued", timeout=ADMIT, reason=("Queued", "WaitingForQuota"))

    patch_ftj(cp, ns, "paused", {"spec": {"runPolicy": {"suspend": True}}})
    ftj = wait_phase(cp, ns, "paused", "Suspended", timeout=ADMIT, reason=("Suspended", "Suspended"))
    assert "Workload is deactivated" in condition(ftj, "Suspended")["message"]  # type: ignore[index]
    workload = workload_of(queues.kueue, ns, "paused")
    assert workload["spec"]["active"] is False
    assert workload["metadata"]["annotations"]["finetune.dev/suspended-by"] == "user"
    cp.wait_for(lambda: not pods_of(cp, ns, "paused", live_only=True), timeout=30, desc="pods stopped")
    wait_phase(cp, ns, "waiting", "Running", timeout=ADMIT)  # the quota was freed

    patch_ftj(cp, ns, "paused", {"spec": {"runPolicy": {"suspend": False}}})
    wait_phase(cp, ns, "paused", "Queued", timeout=ADMIT, reason=("Queued", "WaitingForQuota"))
    assert workload_of(queues.kueue, ns, "paused")["spec"]["active"] is True
    finish(cp, ns, "waiting")
    ftj = wait_phase(cp, ns, "paused", "Running", timeout=ADMIT)
    assert condition(ftj, "Suspended")["reason"] == "Resumed"  # type: ignore[index]

    create_ftj(cp, queued("next", ns, "gpu"))
    wait_phase(cp, ns, "next", "Queued", timeout=ADMIT, reason=("Queued", "WaitingForQuota"))
    patch_ftj(cp, ns, "paused", {"spec": {"runPolicy": {"cancel": True}}})
    wait_phase(cp, ns, "paused", "Failed", timeout=ADMIT, reason=("Failed", "Cancelled"))
    cp.wait_for(lambda: get_or_none(cp, job_path(ns, "paused")) is None, timeout=30, desc="the Job deleted")
    wait_phase(cp, ns, "next", "Running", timeout=ADMIT)
    assert operator_errors(op) == []


# ------------------------------------------------------------------------------------- Kueue's configuration


def test_manage_jobs_without_queue_name_takes_the_job_and_nothing_fights_over_it(
        control_plane: ControlPlane, queues: Queues, op: OperatorProcess, kueue: Kueue) -> None:
    """With Kueue's manageJobsWithoutQueueName, its webhook suspends the unlabelled Job at creation and Kueue makes a
    Workload for it: the operator sees that the suspension is not its own and leaves the Job alone (no suspend fight:
    the Job is written by Kueue only, a handful of times), reporting why it waits."""
    cp, ns = control_plane, queues.ns
    kueue.restart(manageJobsWithoutQueueName=True)
    create_ftj(cp, manifest("unqueued", ns))
    cp.wait_for(lambda: get_or_none(cp, job_path(ns, "unqueued")), timeout=ADMIT, desc="the Job created")
    job = cp.request("GET", job_path(ns, "unqueued"))
    assert job["spec"]["suspend"] is True and "kueue.x-k8s.io/queue-name" not in job["metadata"].get("labels", {})
    cp.wait_for(lambda: workload_of(queues.kueue, ns, "unqueued"), timeout=30, desc="Kueue's Workload")
    ftj = wait_phase(cp, ns, "unqueued", "Queued", timeout=30, reason=("Queued", "Inadmissible"))
    message = condition(ftj, "Queued")["message"]  # type: ignore[index]
    assert "manageJobsWithoutQueueName" in message and "names no LocalQueue" in message, message
    start = json.dumps(cp.request("GET", job_path(ns, "unqueued"))["metadata"]["generation"])
    passes = _passes(op)
    cp.wait_for(lambda: _passes(op) >= passes + 10, timeout=60, desc="ten more reconcile passes")
    job = cp.request("GET", job_path(ns, "unqueued"))
    assert json.dumps(job["metadata"]["generation"]) == start and job["metadata"]["generation"] <= 2, job["metadata"]
    assert job["spec"]["suspend"] is True
    assert _job_patches(op) == [], "the operator wrote the Job Kueue holds"
    assert len([e for e in ftj_events(cp, ns, "unqueued") if e["reason"] == "Inadmissible"]) == 1


def _job_patches(op: OperatorProcess) -> list[str]:
    """The operator's PATCH requests on Jobs (its metrics count every request by verb, resource and code)."""
    return [line for line in op.metrics().splitlines() if line.startswith("finetune_operator_api_requests_total{")
            and 'resource="Job"' in line and 'verb="PATCH"' in line and not line.endswith(" 0.0")]


def _passes(op: OperatorProcess) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in op.metrics().splitlines()
               if line.startswith("finetune_operator_reconcile_total{"))


def test_wait_for_pods_ready_evicts_requeues_reports_and_gives_up_after_its_limit(
        control_plane: ControlPlane, queues: Queues, op: OperatorProcess, kueue: Kueue) -> None:
    """WaitForPodsReady (off by default before Kueue v0.19, on since) with a 5 s timeout and one requeue: a pod that
    cannot start (its image cannot be pulled) is evicted with PodsReadyTimeout, requeued and reported, evicted again,
    and then Kueue deactivates the Workload: the job fails RequeuingLimitExceeded and its Job is deleted."""
    cp, ns = control_plane, queues.ns
    kueue.restart(waitForPodsReady={"timeout": "5s", "requeuingStrategy": {
        "backoffLimitCount": 1, "backoffBaseSeconds": 1, "backoffMaxSeconds": 2}})
    queues.local_queue("gpu", queues.cluster_queue("gpus", gpus=2))
    body = queued("stuck", ns, "gpu")
    body["spec"]["resources"]["image"] = "registry.example.com/kwok-missing/trainer:1"
    create_ftj(cp, body)
    ftj = wait_phase(cp, ns, "stuck", "Queued", timeout=ADMIT, reason=("Queued", "PodsReadyTimeout"))
    assert ftj["status"]["queue"]["requeues"] >= 1
    assert "evicted by Kueue" in condition(ftj, "Queued")["message"]  # type: ignore[index]
    ftj = wait_phase(cp, ns, "stuck", "Failed", timeout=90, reason=("Failed", "RequeuingLimitExceeded"))
    message = condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert re.search(r"PodsReadyTimeout x\d", message) and "re-queuing retries" in message, message
    cp.wait_for(lambda: get_or_none(cp, job_path(ns, "stuck")) is None, timeout=30, desc="the Job deleted")
    reasons = [e["reason"] for e in ftj_events(cp, ns, "stuck", after="RequeuingLimitExceeded")]
    assert "PodsReadyTimeout" in reasons


def test_kueue_down_refuses_the_job_which_is_reported_and_created_once_kueue_is_back(
        control_plane: ControlPlane, queues: Queues, op: OperatorProcess, kueue: Kueue) -> None:
    """Kueue's Job webhook has failurePolicy Fail: while Kueue is down no Job can be created in its namespaces. The
    FineTuneJob says so (Created=False, a Warning Event), the create is retried with backoff, no Job exists (none
    escapes the queue), and the job is queued and admitted once Kueue is back."""
    cp, ns = control_plane, queues.ns
    queues.local_queue("gpu", queues.cluster_queue("gpus", gpus=1))
    kueue.stop()
    create_ftj(cp, queued("outage", ns, "gpu"))
    ftj = wait_phase(cp, ns, "outage", "Pending", timeout=30, reason=("Created", "AdmissionWebhookUnavailable"))
    message = condition(ftj, "Created")["message"]  # type: ignore[index]
    assert "mjob.kb.io" in message and "retrying with backoff" in message, message
    assert get_or_none(cp, job_path(ns, "outage")) is None
    assert [e["type"] for e in ftj_events(cp, ns, "outage", after="AdmissionWebhookUnavailable")
            if e["reason"] == "AdmissionWebhookUnavailable"] == ["Warning"]
    kueue.start()
    ftj = wait_phase(cp, ns, "outage", "Running", timeout=90)
    assert condition(ftj, "Created")["reason"] == "JobCreated"  # type: ignore[index]
    assert len([j for j in cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]]) == 1


def test_the_example_queues_are_what_kueue_accepts_and_admit_the_example_job(
        control_plane: ControlPlane, kueue: Kueue, op: OperatorProcess) -> None:
    """examples/kueue/queues.yaml as the README applies it (Kueue's webhooks and CRD schemas check it), and the
    multi-node example's priority class and topology request reaching Kueue's Workload."""
    import yaml

    from finetune_api.manifest import load_job

    cp = control_plane
    for ns in ("team-a", "team-b"):
        cp.create_namespace(ns, labels=kueue_namespace_labels())
    docs = list(yaml.safe_load_all((REPO / "examples" / "kueue" / "queues.yaml").read_text()))
    try:
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        example = yaml.safe_load((REPO / "examples" / "multinode-kueue.yaml").read_text())
        load_job(REPO / "examples" / "multinode-kueue.yaml")  # the client-side rules agree
        example["metadata"]["namespace"] = "team-a"
        example["spec"]["resources"].update({"cpu": 4, "memory": "8Gi", "gpusPerWorker": 2})
        example["spec"].pop("credentials")
        create_ftj(cp, example)
        name = example["metadata"]["name"]
        workload = cp.wait_for(lambda: workload_of(kueue, "team-a", name), timeout=30, desc="the example's Workload")
        assert workload["spec"]["priorityClassRef"]["name"] == "research-high"
        assert workload["spec"]["podSets"][0]["count"] == 4, "all four workers are one pod set: admitted together"
        assert workload["spec"]["podSets"][0]["topologyRequest"]["preferred"] == \
            "topology.k8s.aws/network-node-layer-3"
        # Whatever Kueue makes of a topology request on a flavor without a Topology, the status says it in its words.
        ftj = cp.wait_for(lambda: (lambda f: f if (f.get("status") or {}).get("queue", {}).get("workload") else None)(
            get_ftj(cp, "team-a", name)), timeout=ADMIT, desc="the example's status.queue")
        queued = condition(ftj, "Queued")
        assert queued is not None and (queued["status"] == "False" or "Kueue" in queued["message"]), queued
    finally:
        for ns in ("team-a", "team-b"):
            cp.delete_namespace(ns)
        for doc in reversed(docs):
            if doc["kind"] in ("ResourceFlavor", "ClusterQueue", "WorkloadPriorityClass"):
                kueue.delete(doc["kind"], doc["metadata"]["name"])
