"""The real operator process against the real control plane (API server, Job controller, scheduler, GC, kwok nodes).

kwok plays the kubelet: pods run until a test finishes them with an exit code (control_plane.finish_pod) or evicts
them. Every wait polls with a deadline; no test sleeps to synchronise.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import pytest

from finetune_api import exitcodes
from finetune_api.spec import FineTuneJobSpec
from finetune_operator import builders
from finetune_operator.progress import job_token
from tests.controlplane.cluster import ApiError, ControlPlane
from tests.operator.cluster_support import (
    OPERATOR_RULES,
    PROGRESS_KEY,
    TRAINER_IMAGE,
    OperatorProcess,
    condition,
    create_ftj,
    ftj_events,
    get_ftj,
    get_or_none,
    grant,
    jobs_of,
    operator_errors,
    patch_ftj,
    pods_of,
    revoke,
    subset_mismatches,
    wait_phase,
    wait_running_pods,
)
from tests.operator.helpers import manifest, output_of

pytestmark = pytest.mark.cluster


def _ctx(op: OperatorProcess) -> builders.BuildContext:
    return builders.BuildContext(trainer_image=TRAINER_IMAGE, progress_url=op.env["FINETUNE_PROGRESS_URL"],
                                 grace_period_seconds=120)


def _owner(ftj: dict[str, Any]) -> builders.Owner:
    meta = ftj["metadata"]
    return builders.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _passes(op: OperatorProcess) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in op.metrics().splitlines()
               if line.startswith("finetune_operator_reconcile_total{"))


def test_create_run_succeed(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    cp = control_plane
    body = manifest("classify", namespace, resources={"workers": 2, "gpusPerWorker": 2},
                    credentials={"hubToken": {"name": "hf", "key": "token"}},
                    run_policy={"backoffLimit": 2})
    created = create_ftj(cp, body)
    owner, spec = _owner(created), FineTuneJobSpec.model_validate(created["spec"])

    # Children exactly as the builders say (the API server only adds defaults).
    job = cp.wait_for(lambda: get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/classify"),
                      timeout=20, desc="Job created")
    configmap = get_or_none(cp, f"/api/v1/namespaces/{namespace}/configmaps/classify-config")
    assert configmap is not None
    token = job_token(PROGRESS_KEY.encode(), namespace, "classify", owner.uid)
    expected = {
        "Job": (builders.build_job(owner, spec, _ctx(operator)), job),
        "Service": (builders.build_service(owner),
                    get_or_none(cp, f"/api/v1/namespaces/{namespace}/services/classify")),
        "ConfigMap": (builders.build_configmap(owner, spec), configmap),
        "Secret": (builders.build_secret(owner, token, configmap["metadata"]["uid"]),
                   get_or_none(cp, f"/api/v1/namespaces/{namespace}/secrets/classify-progress")),
    }
    for kind, (want, live) in expected.items():
        assert live is not None, f"{kind} missing"
        assert subset_mismatches(want, live) == [], kind
    assert len(jobs_of(cp, namespace)) == 1

    pods = wait_running_pods(cp, namespace, "classify", 2)
    assert {p["spec"]["nodeName"] for p in pods} <= set(cp.node_names)
    standard = "app.kubernetes.io/name=finetune-job,app.kubernetes.io/instance=classify,app.kubernetes.io/part-of=" \
               "finetune-operator,app.kubernetes.io/managed-by=finetune-operator"
    for kind, component, count in (("pods", "trainer", 2), ("jobs", "trainer", 1), ("configmaps", "config", 1),
                                   ("secrets", "progress-token", 1), ("services", "rendezvous", 1)):
        found = cp.kubectl("get", kind, "-n", namespace, "-o", "name", "-l",
                           f"{standard},app.kubernetes.io/component={component}").stdout.split()
        assert len(found) == count, (kind, found)
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2" for p in pods)
    ftj = wait_phase(cp, namespace, "classify", "Running", reason=("Running", "PodsRunning"))
    assert ftj["status"]["startTime"] and ftj["status"]["jobName"] == "classify"
    # kstatus' Ready (Flux, kubectl wait): healthy once every worker runs, as kstatus judges a started Job.
    cp.kubectl("wait", "--for=condition=Ready", "ftj/classify", "-n", namespace, "--timeout=20s")
    assert ftj["status"]["observedGeneration"] == ftj["metadata"]["generation"]

    for p in pods:
        cp.finish_pod(namespace, p["metadata"]["name"], exit_code=0)
    ftj = wait_phase(cp, namespace, "classify", "Succeeded", reason=("Succeeded", "Completed"))
    st = ftj["status"]
    assert st["output"] == {"path": output_of("classify", namespace)}
    assert st["completionTime"] >= st["startTime"]
    assert st["restarts"] == 0 and st["gpuSeconds"] >= 0
    assert condition(ftj, "Running")["status"] == "False"  # type: ignore[index]
    events = ftj_events(cp, namespace, "classify", after="Completed")
    assert {"PodsRunning", "Completed"} <= {e["reason"] for e in events}
    printed = cp.kubectl("get", "ftj", "classify", "-n", namespace).stdout
    assert "Succeeded" in printed
    managers = {m["manager"] for m in ftj["metadata"].get("managedFields", [])}
    assert not any("kopf" in m for m in managers), f"kopf itself wrote to the FineTuneJob: {managers}"
    assert "finetune-operator" in managers
    assert not ftj["metadata"].get("finalizers") and not any(
        "kopf" in a for a in ftj["metadata"].get("annotations") or {}), "no kopf annotations or finalizers"
    assert operator_errors(operator) == []


def test_gpu_request_larger_than_any_node_is_unschedulable(control_plane: ControlPlane, namespace: str,
                                                          operator: OperatorProcess) -> None:
    create_ftj(control_plane, manifest("huge", namespace, resources={"workers": 1, "gpusPerWorker": 16}))
    ftj = wait_phase(control_plane, namespace, "huge", "Pending", reason=("Running", "Unschedulable"))
    assert "nvidia.com/gpu" in condition(ftj, "Running")["message"]  # type: ignore[index]


def test_progress_push_reaches_status_and_bad_tokens_are_refused(control_plane: ControlPlane, namespace: str,
                                                                 operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("progress", namespace))
    wait_phase(cp, namespace, "progress", "Running")
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/services/progress") is None, \
        "a one-pod job needs no rendezvous Service"
    secret = cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets/progress-progress")
    token = base64.b64decode(secret["data"]["token"]).decode()

    assert operator.post_progress(namespace, "progress", None, {"step": 1}) == 401
    assert operator.post_progress(namespace, "progress", "not-the-token", {"step": 1}) == 401
    assert operator.post_progress(namespace, "other-job", token, {"step": 1}) == 401
    assert operator.post_progress(namespace, "progress", token, {"step": "many"}) == 400

    sent = time.monotonic()
    report = {"state": "running", "step": 120, "totalSteps": 400, "epoch": 0.3, "loss": 0.6931, "learningRate": 4e-5,
              "samplesPerSecond": 55.5, "tokensPerSecond": 7000, "etaSeconds": 310,
              "updatedAt": "2026-01-01T00:00:00Z", "metrics": {"evalAccuracy": 0.75},
              "checkpoint": {"step": 100, "path": "s3://bucket/out/checkpoints/checkpoint-100",
                             "time": "2026-01-01T00:00:00Z", "count": 1}}
    assert operator.post_progress(namespace, "progress", token, report) == 202

    def arrived() -> dict[str, Any] | None:
        st = get_ftj(cp, namespace, "progress").get("status") or {}
        return st if (st.get("progress") or {}).get("step") == 120 else None

    st = cp.wait_for(arrived, timeout=10, interval=0.1, desc="progress in status within 10 s")
    assert time.monotonic() - sent < 10
    assert st["progress"] == {"step": 120, "totalSteps": 400, "epoch": 0.3, "percent": 30.0, "loss": 0.6931,
                              "learningRate": 4e-5, "samplesPerSecond": 55.5, "tokensPerSecond": 7000.0,
                              "etaSeconds": 310, "eta": "5m10s", "updatedAt": "2026-01-01T00:00:00Z"}
    assert st["metrics"] == {"evalAccuracy": 0.75}
    assert st["checkpoints"] == {"latest": {"step": 100, "path": "s3://bucket/out/checkpoints/checkpoint-100",
                                            "time": "2026-01-01T00:00:00Z"}, "count": 1}
    printed = cp.kubectl("get", "ftj", "progress", "-n", namespace, "-o", "wide").stdout
    assert "0.6931" in printed and "5m10s" in printed and "120" in printed

    text = operator.metrics()
    assert f'finetune_job_step{{name="progress",namespace="{namespace}"}} 120.0' in text
    assert f'finetune_job_loss{{name="progress",namespace="{namespace}"}} 0.6931' in text
    assert f'finetune_job_phase{{namespace="{namespace}",phase="Running"}} 1.0' in text
    assert 'finetune_operator_progress_reports_total{result="unauthorized"}' in text
    assert "finetune_operator_reconcile_duration_seconds_bucket" in text

    pod = pods_of(cp, namespace, "progress", live_only=True)[0]
    cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=0)
    wait_phase(cp, namespace, "progress", "Succeeded")
    text = operator.metrics()
    assert f'name="progress",namespace="{namespace}"' not in text, "per-job series end with the job"


def test_evicted_pod_is_retried_and_counted(control_plane: ControlPlane, namespace: str,
                                           operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("evict", namespace, run_policy={"backoffLimit": 0}))
    wait_phase(cp, namespace, "evict", "Running")
    token = job_token(PROGRESS_KEY.encode(), namespace, "evict", get_ftj(cp, namespace, "evict")["metadata"]["uid"])
    ckpt = {"step": 50, "path": "s3://bucket/out/checkpoints/checkpoint-50"}
    assert operator.post_progress(namespace, "evict", token, {"step": 55, "checkpoint": ckpt}) == 202
    first = pods_of(cp, namespace, "evict", live_only=True)[0]["metadata"]["name"]
    cp.evict_pod(namespace, first)

    def replaced() -> dict[str, Any] | None:
        ftj = get_ftj(cp, namespace, "evict")
        st = ftj.get("status") or {}
        return ftj if st.get("phase") == "Running" and st.get("restarts") == 1 else None

    ftj = cp.wait_for(replaced, timeout=30, desc="replacement pod running and restarts 1")
    # backoffLimit 0 and still running: the disruption did not count as a failure (podFailurePolicy Ignore).
    job = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/evict")
    assert job["status"].get("failed", 0) == 0
    assert ftj["status"]["checkpoints"]["latest"]["step"] == 50, "the resume point survives the restart"
    live = [p["metadata"]["name"] for p in pods_of(cp, namespace, "evict", live_only=True)]
    assert live and first not in live


@pytest.mark.parametrize("how", ["crash", "eviction", "lost peer"])
def test_a_failed_worker_restarts_the_whole_group(control_plane: ControlPlane, namespace: str,
                                                  operator: OperatorProcess, how: str) -> None:
    """A torchrun group cannot take a replacement member: one worker failing restarts all of them, from the latest
    checkpoint, and costs one restart (the stopped survivors are not counted against backoffLimit). "lost peer": a
    worker exits 76 (it lost contact with the group, e.g. a network partition), which the pod failure policy ignores:
    with backoffLimit 0 the Job survives only if it is not counted. Under Kueue (the survivors are evicted instead):
    test_kueue_cluster.py."""
    cp = control_plane
    limit = 1 if how.startswith("crash") else 0
    create_ftj(cp, manifest("gang", namespace, resources={"workers": 2, "gpusPerWorker": 1},
                            run_policy={"backoffLimit": limit}))
    first = wait_running_pods(cp, namespace, "gang", 2)
    wait_phase(cp, namespace, "gang", "Running")
    by_index = {int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]): p for p in first}
    if how == "eviction":
        cp.evict_pod(namespace, by_index[1]["metadata"]["name"])
    else:
        cp.finish_pod(namespace, by_index[1]["metadata"]["name"],
                      exit_code=exitcodes.PEER_LOST if how == "lost peer" else 1)
    survivor = f"/api/v1/namespaces/{namespace}/pods/{by_index[0]['metadata']['name']}"
    cp.wait_for(lambda: get_or_none(cp, survivor) is None, timeout=30, desc="the surviving worker stopped")

    old = {p["metadata"]["uid"] for p in first}

    def restarted() -> list[dict[str, Any]] | None:
        pods = [p for p in pods_of(cp, namespace, "gang", live_only=True)
                if p["metadata"]["uid"] not in old and p.get("status", {}).get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    fresh = cp.wait_for(restarted, timeout=30, desc="both workers running again as new pods")
    assert {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in fresh} == {"0", "1"}
    ftj = cp.wait_for(lambda: (lambda f: f if (f.get("status") or {}).get("phase") == "Running"
                               and f["status"].get("restarts") == 1 else None)(get_ftj(cp, namespace, "gang")),
                      timeout=30, desc="Running again with restarts 1")
    job = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/gang")
    assert job["spec"]["suspend"] is False
    assert job["status"].get("failed", 0) == limit, "only the failure itself counted (a crash), nothing else"
    assert not [c for c in job["status"].get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"]
    assert ftj["status"]["restarts"] == 1
    events = ftj_events(cp, namespace, "gang", after="RestartingWorkers")
    restarting = [e for e in events if e["reason"] == "RestartingWorkers"]
    assert len(restarting) == 1 and restarting[0]["type"] == "Warning"
    assert "worker 1" in restarting[0]["message"]
    assert not [e for e in events if e["reason"] == "Suspended"]
    assert operator_errors(operator) == []


def test_bad_data_exit_fails_at_once_with_the_trainer_message(control_plane: ControlPlane, namespace: str,
                                                             operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("baddata", namespace, run_policy={"backoffLimit": 5}))
    pod = wait_running_pods(cp, namespace, "baddata", 1)[0]
    message = "dataset.train row 17: label 'maybe' is not one of [negative, positive]"
    cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=65, message=message)
    ftj = wait_phase(cp, namespace, "baddata", "Failed", reason=("Failed", "DataError"))
    failed = condition(ftj, "Failed")
    assert failed is not None and message in failed["message"] and "code 65" in failed["message"]
    cp.kubectl("wait", "--for=condition=Stalled", "ftj/baddata", "-n", namespace, "--timeout=20s")
    assert condition(ftj, "Ready")["status"] == "False"  # type: ignore[index]
    assert ftj["status"]["restarts"] == 0
    assert len(pods_of(cp, namespace, "baddata")) == 1, "not retried"


def test_backoff_limit_exceeded(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("crashy", namespace, run_policy={"backoffLimit": 1}))
    first = wait_running_pods(cp, namespace, "crashy", 1)[0]["metadata"]["name"]
    cp.finish_pod(namespace, first, exit_code=1)
    # The Job controller waits its own back-off (about 10 s) before the replacement.
    second = cp.wait_for(lambda: [p for p in pods_of(cp, namespace, "crashy", live_only=True)
                                  if p["metadata"]["name"] != first and p["status"].get("phase") == "Running"],
                         timeout=45, desc="replacement pod running")[0]
    wait_phase(cp, namespace, "crashy", "Running")
    cp.finish_pod(namespace, second["metadata"]["name"], exit_code=137, reason="OOMKilled")
    # The backoff limit ended it, and the last failure was an OOM kill: reported as such, with the advice.
    ftj = wait_phase(cp, namespace, "crashy", "Failed", reason=("Failed", "OOMKilled"))
    assert ftj["status"]["restarts"] == 1
    message = condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert "backoff limit" in message and "exited with code 137 (OOMKilled)" in message, message
    assert "spec.resources.memory" in message


def test_active_deadline(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    create_ftj(control_plane, manifest("slow", namespace, run_policy={"activeDeadlineSeconds": 3}))
    wait_phase(control_plane, namespace, "slow", "Failed", timeout=40, reason=("Failed", "DeadlineExceeded"))


def test_suspend_and_resume(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("pausable", namespace))
    wait_phase(cp, namespace, "pausable", "Running")
    patch_ftj(cp, namespace, "pausable", {"spec": {"runPolicy": {"suspend": True}}})
    ftj = wait_phase(cp, namespace, "pausable", "Suspended", reason=("Suspended", "Suspended"))
    assert cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/pausable")["spec"]["suspend"] is True
    cp.wait_for(lambda: not pods_of(cp, namespace, "pausable", live_only=True), timeout=30, desc="pods stopped")
    assert ftj["status"]["observedGeneration"] == 2
    patch_ftj(cp, namespace, "pausable", {"spec": {"runPolicy": {"suspend": False}}})
    ftj = wait_phase(cp, namespace, "pausable", "Running")
    assert condition(ftj, "Suspended")["reason"] == "Resumed"  # type: ignore[index]
    assert ftj["status"]["restarts"] == 0, "a suspension is not a restart"


def test_resource_quota_exhaustion_is_reported(control_plane: ControlPlane, namespace: str,
                                               operator: OperatorProcess) -> None:
    cp = control_plane
    cp.request("POST", f"/api/v1/namespaces/{namespace}/resourcequotas", {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-gpus"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    create_ftj(cp, manifest("quota", namespace))
    ftj = wait_phase(cp, namespace, "quota", "Pending", timeout=40, reason=("Running", "QuotaExceeded"))
    assert "exceeded quota: no-gpus" in condition(ftj, "Running")["message"]  # type: ignore[index]


def test_invalid_image_is_refused_and_nothing_created(control_plane: ControlPlane, namespace: str,
                                                      operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("evil", namespace, merge_resources={"image": "evil.example.org/miner:latest"}))
    ftj = wait_phase(cp, namespace, "evil", "Failed", reason=("Failed", "InvalidSpec"))
    assert "not in an allowed registry" in condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert jobs_of(cp, namespace) == []
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/configmaps/evil-config") is None


def test_foreign_same_named_child_is_not_adopted(control_plane: ControlPlane, namespace: str,
                                                 operator: OperatorProcess) -> None:
    cp = control_plane
    cp.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-config"}, "data": {"mine": "yes"}})
    create_ftj(cp, manifest("taken", namespace))
    ftj = wait_phase(cp, namespace, "taken", "Pending", reason=("Created", "NameConflict"))
    assert "ConfigMap taken-config already exists" in condition(ftj, "Created")["message"]  # type: ignore[index]
    cm = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/taken-config")
    assert cm["data"] == {"mine": "yes"} and not cm["metadata"].get("ownerReferences")
    assert jobs_of(cp, namespace) == []


def test_the_newer_of_two_live_jobs_on_one_storage_waits_for_the_older(control_plane: ControlPlane, namespace: str,
                                                                        operator: OperatorProcess) -> None:
    """Two live FineTuneJobs name the same output: the newer is Pending with Created=False/StorageConflict naming
    the older one and a Warning Event, and gets no child, until the older one has succeeded; then it starts."""
    cp = control_plane
    shared = f"s3://bucket/{namespace}/shared"
    create_ftj(cp, manifest("first", namespace, output={"storage": shared}))
    first = wait_running_pods(cp, namespace, "first", 1)
    create_ftj(cp, manifest("second", namespace, output={"storage": shared + "/"}))  # the same place, as written
    ftj = wait_phase(cp, namespace, "second", "Pending", reason=("Created", "StorageConflict"))
    message = condition(ftj, "Created")["message"]  # type: ignore[index]
    assert f"spec.output.storage {shared}/ is also where FineTuneJob {namespace}/first" in message, message
    assert [e["type"] for e in ftj_events(cp, namespace, "second", after="StorageConflict")
            if e["reason"] == "StorageConflict"] == ["Warning"]
    assert condition(ftj, "Ready")["status"] == "False"  # type: ignore[index]
    assert [j["metadata"]["name"] for j in jobs_of(cp, namespace)] == ["first"]
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/configmaps/second-config") is None

    cp.finish_pod(namespace, first[0]["metadata"]["name"], exit_code=0)
    wait_phase(cp, namespace, "first", "Succeeded")
    wait_running_pods(cp, namespace, "second", 1)
    created = condition(wait_phase(cp, namespace, "second", "Running"), "Created")
    assert created is not None and (created["status"], created["reason"]) == ("True", "JobCreated")


def test_child_job_deleted_by_hand_is_recreated(control_plane: ControlPlane, namespace: str,
                                                operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("phoenix", namespace))
    wait_phase(cp, namespace, "phoenix", "Running")
    old_uid = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/phoenix")["metadata"]["uid"]
    cp.request("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/phoenix",
               {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})

    def recreated() -> bool:
        job = get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/phoenix")
        return job is not None and job["metadata"]["uid"] != old_uid

    cp.wait_for(recreated, timeout=15, desc="Job recreated within a resync")
    wait_phase(cp, namespace, "phoenix", "Running")
    assert len(jobs_of(cp, namespace)) == 1


def test_steady_state_resync_writes_nothing(control_plane: ControlPlane, namespace: str,
                                            operator: OperatorProcess) -> None:
    cp = control_plane
    # Two pods, so that the rendezvous Service is among the children that must stay untouched.
    create_ftj(cp, manifest("steady", namespace, resources={"workers": 2, "gpusPerWorker": 1}))
    wait_phase(cp, namespace, "steady", "Running")
    paths = [f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/steady",
             f"/apis/batch/v1/namespaces/{namespace}/jobs/steady", f"/api/v1/namespaces/{namespace}/services/steady",
             f"/api/v1/namespaces/{namespace}/configmaps/steady-config"]

    def versions() -> list[str]:
        # The Job controller goes on updating the Job's status while its pods settle (ready counts, more so on a busy
        # machine); the operator writes only the Job's spec, and that moves its generation.
        objs = [cp.request("GET", p) for p in paths]
        return [o["metadata"]["generation" if o["kind"] == "Job" else "resourceVersion"] for o in objs]

    def events() -> int:
        return len(cp.request("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector="
                                     "involvedObject.kind=FineTuneJob")["items"])

    before, events_before = versions(), events()
    start = _passes(operator)
    cp.wait_for(lambda: _passes(operator) >= start + 2, timeout=15, desc="two more reconcile passes (resync: 3 s)")
    assert versions() == before, "a resync wrote to the job or its children"
    assert events() == events_before


def test_ttl_removes_children_and_keeps_status(control_plane: ControlPlane, namespace: str,
                                               operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("brief", namespace, run_policy={"ttlSecondsAfterFinished": 2},
                            resources={"workers": 2, "gpusPerWorker": 1}))
    for pod in wait_running_pods(cp, namespace, "brief", 2):
        cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=0)
    wait_phase(cp, namespace, "brief", "Succeeded")
    assert get_or_none(cp, f"/api/v1/namespaces/{namespace}/services/brief") is not None
    paths = [f"/apis/batch/v1/namespaces/{namespace}/jobs/brief", f"/api/v1/namespaces/{namespace}/services/brief",
             f"/api/v1/namespaces/{namespace}/configmaps/brief-config",
             f"/api/v1/namespaces/{namespace}/secrets/brief-progress"]
    cp.wait_for(lambda: all(get_or_none(cp, p) is None for p in paths), timeout=30, desc="children deleted after TTL")
    ftj = get_ftj(cp, namespace, "brief")
    assert ftj["status"]["phase"] == "Succeeded" and ftj["status"]["output"]["path"] == output_of("brief", namespace)


def test_delete_while_operator_is_down_never_hangs(control_plane: ControlPlane, namespace: str,
                                                   operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("doomed", namespace))
    wait_phase(cp, namespace, "doomed", "Running")
    assert not get_ftj(cp, namespace, "doomed")["metadata"].get("finalizers")
    operator.stop()
    try:
        cp.request("DELETE", f"{'/apis/finetune.dev/v1alpha1'}/namespaces/{namespace}/finetunejobs/doomed")
        cp.wait_for(lambda: get_or_none(cp, f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/doomed")
                    is None, timeout=10, desc="FineTuneJob gone without the operator")
        children = [f"/apis/batch/v1/namespaces/{namespace}/jobs/doomed",
                    f"/api/v1/namespaces/{namespace}/services/doomed",
                    f"/api/v1/namespaces/{namespace}/configmaps/doomed-config",
                    f"/api/v1/namespaces/{namespace}/secrets/doomed-progress"]
        # (The garbage collector learns a new CRD from discovery, refreshed every 30 s: allow for that.)
        cp.wait_for(lambda: all(get_or_none(cp, p) is None for p in children), timeout=60,
                    desc="children garbage-collected")
        cp.wait_for(lambda: not pods_of(cp, namespace, "doomed"), timeout=60, desc="pods garbage-collected")
    finally:
        if not operator.alive:
            operator.start()


def test_killed_between_job_creation_and_status_then_restarted(control_plane: ControlPlane, namespace: str,
                                                               operator: OperatorProcess,
                                                               tmp_path: Any) -> None:
    cp = control_plane
    operator.stop()
    # An operator that may create children but not write status is "killed between the Job and the status" for as
    # long as we like: no race to win. Same lease, so exactly one of the two processes runs at a time.
    name = f"no-status-{uuid.uuid4().hex[:6]}"
    rules = [r for r in OPERATOR_RULES if r["resources"] != ["finetunejobs/status"]]
    kubeconfig = grant(cp, namespace, name, rules, operator.lease, "default", tmp_path / "kubeconfig")
    crippled = OperatorProcess(cp, tmp_path, lease=operator.lease, KUBECONFIG=str(kubeconfig))
    try:
        crippled.start()
        create_ftj(cp, manifest("phoenix2", namespace))
        job = cp.wait_for(lambda: get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/phoenix2"),
                          timeout=20, desc="Job created")
        cp.wait_for(lambda: "finetunejobs/phoenix2/status" in crippled.log_text(), timeout=20,
                    desc="the status write was attempted (and refused)")
        assert not get_ftj(cp, namespace, "phoenix2").get("status"), "no status was written"
        crippled.kill()
    finally:
        crippled.kill()
        revoke(cp, name, "default")
    operator.start()
    ftj = wait_phase(cp, namespace, "phoenix2", "Running", timeout=40)
    assert [j["metadata"]["uid"] for j in jobs_of(cp, namespace)] == [job["metadata"]["uid"]], "exactly one Job"
    assert ftj["status"]["jobName"] == "phoenix2"
    assert operator_errors(operator) == []


def test_second_replica_waits_for_the_lease(control_plane: ControlPlane, namespace: str, operator: OperatorProcess,
                                            tmp_path: Any) -> None:
    cp = control_plane
    standby = OperatorProcess(cp, tmp_path, lease=operator.lease).start(wait_ready=False)
    try:
        cp.wait_for(standby.healthy, timeout=20, desc="standby healthy")
        create_ftj(cp, manifest("single", namespace))
        wait_phase(cp, namespace, "single", "Running")
        assert not standby.ready(), "the standby does not reconcile"
        assert "finetune_operator_reconcile_total{" not in standby.metrics()
        assert "finetune_operator_leader 0.0" in standby.metrics()
        operator.stop()  # hands the lease over
        cp.wait_for(standby.ready, timeout=20, desc="standby takes over")
        patch_ftj(cp, namespace, "single", {"spec": {"runPolicy": {"suspend": True}}})
        wait_phase(cp, namespace, "single", "Suspended")
    finally:
        standby.stop()
        if not operator.alive:
            operator.start()


def test_api_rejects_immutable_edits_and_operator_applies_allowed_ones(control_plane: ControlPlane, namespace: str,
                                                                       operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("editable", namespace))
    wait_phase(cp, namespace, "editable", "Running")
    with pytest.raises(ApiError) as err:
        patch_ftj(cp, namespace, "editable", {"spec": {"model": {"source": "org/other"}}})
    assert err.value.status == 422 and "immutable" in str(err.value)
    patch_ftj(cp, namespace, "editable", {"spec": {"runPolicy": {"backoffLimit": 7},
                                                   "checkpointing": {"keepLast": 5}}})
    cp.wait_for(lambda: cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/editable")["spec"][
        "backoffLimit"] == 7, timeout=15, desc="backoffLimit carried to the Job")
    cp.wait_for(lambda: "keepLast: 5" in cp.request(
        "GET", f"/api/v1/namespaces/{namespace}/configmaps/editable-config")["data"]["job.yaml"], timeout=15,
        desc="trainer configuration refreshed")
    cp.wait_for(lambda: get_ftj(cp, namespace, "editable")["status"].get("observedGeneration") == 2, timeout=15,
                desc="observedGeneration 2")


def test_namespaced_operator_ignores_other_namespaces(control_plane: ControlPlane, namespace: str,
                                                      operator: OperatorProcess, tmp_path: Any) -> None:
    cp = control_plane
    other = f"{namespace[:50]}-other"
    cp.create_namespace(other)
    operator.stop()
    scoped = OperatorProcess(cp, tmp_path, FINETUNE_NAMESPACES=namespace)
    try:
        scoped.start()
        create_ftj(cp, manifest("mine", namespace))
        create_ftj(cp, manifest("theirs", other))
        wait_phase(cp, namespace, "mine", "Running")
        start = _passes(scoped)
        cp.wait_for(lambda: _passes(scoped) >= start + 2, timeout=15, desc="two more reconcile passes")
        assert not get_ftj(cp, other, "theirs").get("status")
        assert jobs_of(cp, other) == []
    finally:
        scoped.stop()
        cp.delete_namespace(other)
        if not operator.alive:
            operator.start()
