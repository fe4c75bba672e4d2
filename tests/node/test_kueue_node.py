"""Preemption by the real Kueue keeps the work: the real trainer in a real pod checkpoints on SIGTERM, the FineTuneJob
goes back to Queued (no backoffLimit retry used, GPU-seconds kept), and after re-admission a new pod resumes from that
checkpoint. The chart's operator runs with `kueue.enabled` (Workloads watched, RBAC for them) in its built image.

Kueue holds the tenant namespace's Jobs (its label), one ClusterQueue has room for one job (memory quota of the real
node's flavor), and a job of a higher WorkloadPriorityClass preempts the running one. Cancelling the preemptor frees
the quota, Kueue admits the preempted job again, and it trains on from its checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.kueue import Kueue, kueue_namespace_labels
from tests.controlplane.node import NODE_LABEL, RealNode
from tests.controlplane.storage import NodeStorage

from .conftest import released
from .jobs import (
    PodRecorder,
    apply,
    checkpoint_steps,
    condition,
    get_ftj,
    job_of,
    live_pods,
    node_storage,
    sentiment_job,
    status,
    wait_first_step,
    wait_ftj,
)
from .support import Release, unique
from .test_finetunejobs import (
    BATCH,
    NO_PREFLIGHT,
    TRAIN,
    _first_checkpoint,
    _replacement,
    _stopped_at,
    _trains_on_past,
)

pytestmark = [pytest.mark.node, pytest.mark.e2e]

MEMORY = "4Gi"  # the example's memory request: the ClusterQueue has room for exactly one such job


@pytest.fixture(scope="module")
def kueue_release(control_plane: ControlPlane, real_node: RealNode, node_images: ProductImages, finetune_crd: None,
                  kueue_process: Kueue, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart with `kueue.enabled`, installed once Kueue's CRDs are served, watching one tenant namespace that
    Kueue manages."""
    with released(control_plane, node_images, tmp_path_factory.mktemp("release"),
                  {"kueue": {"enabled": True}, "trainer": {"startTimeoutSeconds": 120}},
                  tenant_labels=kueue_namespace_labels()) as release:
        yield release


@pytest.fixture(scope="module")
def storage(control_plane: ControlPlane, kueue_release: Release,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStorage]:
    with node_storage(control_plane, kueue_release.watched[0], tmp_path_factory.mktemp("pvc")) as made:
        yield made


@pytest.fixture
def one_slot(kueue: Kueue, kueue_release: Release) -> Iterator[dict[str, str]]:
    """A flavor for the real node, a ClusterQueue with room for one job (preemption by priority), its LocalQueue in
    the tenant namespace, and two WorkloadPriorityClasses."""
    suffix, ns = unique("x").removeprefix("x-"), kueue_release.watched[0]
    names = {"flavor": f"real-node-{suffix}", "cq": f"one-job-{suffix}", "lq": "team", "low": f"low-{suffix}",
             "high": f"high-{suffix}"}
    objects = [
        {"kind": "ResourceFlavor", "metadata": {"name": names["flavor"]}, "spec": {"nodeLabels": {NODE_LABEL: "true"}}},
        {"kind": "ClusterQueue", "metadata": {"name": names["cq"]}, "spec": {
            "namespaceSelector": {}, "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["memory"], "flavors": [
                {"name": names["flavor"], "resources": [{"name": "memory", "nominalQuota": MEMORY}]}]}]}},
        {"kind": "LocalQueue", "metadata": {"name": names["lq"], "namespace": ns},
         "spec": {"clusterQueue": names["cq"]}},
        {"kind": "WorkloadPriorityClass", "metadata": {"name": names["low"]}, "value": 100},
        {"kind": "WorkloadPriorityClass", "metadata": {"name": names["high"]}, "value": 1000},
    ]
    for obj in objects:
        kueue.create(obj)
    yield names
    for obj in reversed(objects):
        kueue.delete(obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace"))


@pytest.mark.timeout(1200)
def test_a_preempted_job_checkpoints_waits_in_its_queue_and_resumes_from_the_checkpoint(
    control_plane: ControlPlane, kueue_release: Release, storage: NodeStorage, one_slot: dict[str, str],
) -> None:
    cp, ns, every = control_plane, kueue_release.watched[0], 3
    with PodRecorder(cp, ns) as recorder:
        apply(cp, sentiment_job("low", ns, samples=21 * BATCH, checkpoint_every=every, **NO_PREFLIGHT,
                                runPolicy={"queueName": one_slot["lq"], "priorityClass": one_slot["low"]}))
        _first_checkpoint(cp, storage, ns, "low")
        running = wait_ftj(cp, ns, "low", lambda f: status(f) if status(f).get("phase") == "Running" else None,
                           timeout=60, desc="low Running")
        assert running["queue"]["clusterQueue"] == one_slot["cq"] and running["queue"]["flavor"] == one_slot["flavor"]
        [first] = live_pods(cp, ns, "low")

        # The preemptor: Kueue evicts "low" (suspends its Job), its trainer checkpoints on SIGTERM and exits 75.
        apply(cp, sentiment_job("high", ns, samples=21 * BATCH, checkpoint_every=every, **NO_PREFLIGHT,
                                runPolicy={"queueName": one_slot["lq"], "priorityClass": one_slot["high"]}))
        ended = recorder.wait_terminated(first["metadata"]["uid"], timeout=180)
        assert ended["exitCode"] == 75, ended
        saved = _stopped_at(ended)
        assert saved in checkpoint_steps(storage.host_path("pvc://runs/low/checkpoints"))
        queued = wait_ftj(cp, ns, "low", lambda f: f if status(f).get("phase") == "Queued" and condition(
            f, "Queued")["reason"] == "Preempted" else None, timeout=60, desc="low Queued: Preempted")
        st = status(queued)
        assert st["queue"]["requeues"] == 1 and not st.get("restarts"), st
        assert st["checkpoints"]["latest"]["step"] >= saved - every
        assert "evicted by Kueue (InClusterQueue)" in condition(queued, "Queued")["message"]
        printed = cp.kubectl("get", "ftj", "low", "-n", ns, "-o", "wide").stdout
        assert "Preempted" in printed and one_slot["lq"] in printed, printed

        # The preemptor is cancelled: the quota is free, Kueue admits "low" again, a new pod resumes.
        cp.kubectl("-n", ns, "patch", "ftj", "high", "--type=merge",
                   "-p", json.dumps({"spec": {"runPolicy": {"cancel": True}}}))
        [second] = _replacement(cp, ns, "low", {first["metadata"]["uid"]})
        log = wait_first_step(cp, ns, second["metadata"]["name"], timeout=TRAIN)
        assert log.resumed_from == saved and log.steps[0] == saved + 1, log.text[-3000:]
        st = _trains_on_past(cp, ns, "low", saved)
        assert not st.get("restarts"), "a preemption is not a restart"
        ftj = get_ftj(cp, ns, "low")
        assert condition(ftj, "Queued")["reason"] == "Admitted"
        assert "after 1 requeue" in condition(ftj, "Queued")["message"]
        job: dict[str, Any] | None = job_of(cp, ns, "low")
        assert job is not None and not job["status"].get("failed"), "the preemption used no backoffLimit retry"
    for name in ("low", "high"):
        cp.kubectl("-n", ns, "delete", "ftj", name, "--wait=false")  # the rest of the run proves nothing new
