"""The pre-flight before the GPU Job: its Job as a whole object, and the reconcile pass against the in-memory API
(test_controller.World with the pre-flight on): no GPU Job until it passed for the spec as it is now, its findings in
status, a failure at once with the trainer's message and one Warning Event, a spec edited before the start checked
again, the opt-outs, and a pre-flight that someone else holds suspended."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import PreflightStatus
from finetune_operator import builders, preflight
from finetune_operator.observe import PodView
from finetune_operator.settings import Settings
from tests.operator.helpers import spec
from tests.operator.test_controller import NAME, NS, World, condition_of

FOUND = PreflightStatus.model_validate({
    "train": {"examples": 4000, "tokens": 86774, "longest": 55, "checked": 4000},
    "validation": {"examples": 800, "tokens": 17983, "longest": 54, "checked": 800},
    "stepsPerEpoch": 125, "totalSteps": 125,
    "memoryPlan": {"sharding": "none", "reason": "auto: a full copy fits on each device", "perDeviceBytes": 1870000000,
                   "deviceBytes": 85899345920, "deviceMemoryFrom": "spec.preflight.gpuMemory", "fits": True},
    "estimate": {"tokensPerSecond": 1800.0, "basis": "spec.preflight.tokensPerSecond", "wallSeconds": 62,
                 "wall": "1m02s", "gpuSeconds": 62},
    "tokenCache": "/mnt/pvc/runs/sentiment/checkpoints/.cache/tokens",
})
PREFLIGHT_JOB = f"{NAME}-preflight"


def world(**settings: Any) -> World:
    return World(FINETUNE_PREFLIGHT="true", **settings)


def finish_preflight(w: World, code: int, message: str, reason: str | None = None) -> None:
    """The pre-flight's pod ended with `code` and its termination message; the Job controller's condition follows."""
    job = w.kube.objects[("Job", NS, PREFLIGHT_JOB)]
    ok = code == 0
    job["status"] = {"conditions": [
        {"type": "Complete", "status": "True"} if ok else
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "Container trainer failed"}]}
    w.sync_caches()
    w.pods[(NS, NAME)] = [PodView(name=f"{PREFLIGHT_JOB}-abcde", uid="pf-pod", job_uid=job["metadata"]["uid"],
                                  phase="Succeeded" if ok else "Failed", exit_code=code, terminated_message=message,
                                  terminated_reason=reason or ("Completed" if ok else "Error"),
                                  finished_at="2026-01-01T00:00:30Z")]


def test_the_preflight_job_is_the_trainer_pod_without_gpus_with_its_own_requests_and_placement() -> None:
    owner = builders.Owner("job1", "team-a", "uid-1")
    job_spec = spec(credentials={"hubToken": {"name": "hf", "key": "token"}},
                    merge_resources={"nodeSelector": {"gpu": "a100"}, "memory": "64Gi", "cpu": "8"})
    ctx = builders.BuildContext("registry.example.com/t:1", "http://op:8081", preflight=builders.PreflightContext(
        cpu="500m", memory="3Gi", node_selector=(("pool", "cpu"),),
        tolerations='[{"key": "cpu-only", "operator": "Exists"}]', queue_name="preflight"))
    trainer = builders.pod_spec(owner, job_spec, ctx)
    volumes, mounts = builders.volumes(owner, job_spec)
    assert preflight.build_job(owner, job_spec, ctx) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "job1-preflight",
            "namespace": "team-a",
            "labels": {**builders.labels(owner, "preflight"), "kueue.x-k8s.io/queue-name": "preflight"},
            "ownerReferences": [builders.owner_reference(owner)],
            "annotations": {"finetune.dev/spec-hash": preflight.spec_hash(job_spec)},
        },
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": 3600,
            "podFailurePolicy": builders.pod_failure_policy(),
            "template": {"metadata": {"labels": builders.labels(owner, "preflight")}, "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": trainer["securityContext"],
                "containers": [{
                    "name": "trainer",
                    "image": "registry.example.com/t:1",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-m", "finetune_trainer", "--preflight", "/etc/finetune/job.yaml"],
                    "env": trainer["containers"][0]["env"],  # the same Secrets, by reference only
                    "resources": {"requests": {"cpu": "500m", "memory": "3Gi"}, "limits": {"memory": "3Gi"}},
                    "volumeMounts": mounts,
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "securityContext": trainer["containers"][0]["securityContext"],
                }],
                "volumes": volumes,
                "nodeSelector": {"pool": "cpu"},
                "tolerations": [{"key": "cpu-only", "operator": "Exists"}],
            }},
        },
    }
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in \
        trainer["containers"][0]["env"]


def test_the_spec_hash_ignores_run_policy_and_follows_everything_else() -> None:
    base = spec()
    assert preflight.spec_hash(base) == preflight.spec_hash(spec(run_policy={"suspend": True, "backoffLimit": 7}))
    assert preflight.spec_hash(base) != preflight.spec_hash(spec(checkpointing={"keepLast": 5}))


def test_no_gpu_job_until_the_preflight_passes_then_its_findings_reach_status() -> None:
    async def body() -> None:
        w = world()
        w.apply()
        await w.reconcile()
        assert w.kube.writes() == [("POST", "ConfigMap", "job1-config"), ("POST", "Secret", "job1-progress"),
                                   ("POST", "Job", PREFLIGHT_JOB), ("PATCH", "FineTuneJob/status", NAME)]
        assert ("Job", NS, NAME) not in w.kube.objects
        running = condition_of(w.ftj(), "Running")
        assert (w.ftj()["status"]["phase"], running["reason"]) == ("Pending", "Validating")
        assert "no GPU is requested until it passes" in running["message"]
        assert w.kube.events == [], "the pre-flight running is the normal course of events"

        finish_preflight(w, 0, FOUND.model_dump_json(by_alias=True, exclude_none=True))
        w.kube.calls.clear()
        w.clock.now += 20
        await w.reconcile()
        assert [c for c in w.kube.writes() if c[1] != "FineTuneJob/status"] == [("POST", "Job", NAME)], \
            "only the trainer Job: its ConfigMap and Secret exist"
        st = w.ftj()["status"]
        assert PreflightStatus.model_validate(st["preflight"]) == FOUND
        validated = condition_of(w.ftj(), "Validated")
        assert (validated["status"], validated["reason"]) == ("True", "PreflightPassed")
        assert validated["message"] == ("4000 training examples (86774 tokens, longest 55), 125 steps; memory plan "
                                        "1.87 GB per device: fits; estimated 1m02s")
        expected = builders.build_job(builders.Owner(NAME, NS, w.ftj()["metadata"]["uid"]),
                                      FineTuneJobSpec.model_validate(w.ftj()["spec"]), w.ctl.ctx)
        assert w.kube.objects[("Job", NS, NAME)]["spec"] == expected["spec"]

        # The trainer's pods run: Running, and the findings stay.
        w.sync_caches()
        w.run_pods()
        w.clock.now += 1
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Running"
        assert w.ftj()["status"]["preflight"]["train"]["examples"] == 4000

    asyncio.run(body())


def test_a_failed_preflight_fails_the_job_at_once_with_the_trainers_message_and_no_gpu_job() -> None:
    async def body() -> None:
        w = world()
        w.apply()
        await w.reconcile()
        said = ("/mnt/pvc/datasets/sentiment-bad/train.jsonl, row 3: field 'label' has label 'neutral', outside the "
                "label set (expected one of ['negative', 'positive'] or an index 0..1) [exit 65: bad data (not "
                "retried)]")
        finish_preflight(w, 65, said)
        w.clock.now += 5
        await w.reconcile()
        st = w.ftj()["status"]
        failed = condition_of(w.ftj(), "Failed")
        assert (st["phase"], failed["reason"]) == ("Failed", "DataError")
        assert failed["message"] == f"pre-flight: trainer exited with code 65 (bad data (not retried)): {said}"
        assert condition_of(w.ftj(), "Validated")["status"] == "False"
        assert [(kind, reason) for kind, reason, _ in w.kube.events] == [("Warning", "DataError")]
        assert ("Job", NS, NAME) not in w.kube.objects and not st.get("restarts")
        w.kube.calls.clear()
        await w.reconcile()
        assert not [c for c in w.kube.writes() if c[0] == "POST" and c[1] == "Job"], "never a GPU Job"

    asyncio.run(body())


def test_an_oom_killed_preflight_names_the_operators_preflight_memory() -> None:
    async def body() -> None:
        w = world(FINETUNE_PREFLIGHT_MEMORY="1Gi")
        w.apply()
        await w.reconcile()
        job = w.kube.objects[("Job", NS, PREFLIGHT_JOB)]
        finish_preflight(w, 137, "", reason="OOMKilled")
        job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]}
        w.sync_caches()
        await w.reconcile()
        failed = condition_of(w.ftj(), "Failed")
        assert failed["reason"] == "OOMKilled" and "(1Gi, FINETUNE_PREFLIGHT_MEMORY)" in failed["message"], failed

    asyncio.run(body())


def test_a_spec_edited_before_the_start_is_checked_again() -> None:
    async def body() -> None:
        w = world()
        w.apply()
        await w.reconcile()
        old_hash = w.kube.objects[("Job", NS, PREFLIGHT_JOB)]["metadata"]["annotations"]["finetune.dev/spec-hash"]
        ftj = w.ftj()
        ftj["spec"]["checkpointing"] = {"keepLast": 5}
        ftj["metadata"]["generation"] = 2
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("DELETE", "Job", PREFLIGHT_JOB) in w.kube.writes()
        assert condition_of(w.ftj(), "Running")["message"].startswith("the spec changed before the job started")
        w.sync_caches()  # the old one is gone: a new one for the spec as it is now, after the ConfigMap
        w.kube.calls.clear()
        await w.reconcile()
        writes = w.kube.writes()
        assert writes.index(("PATCH", "ConfigMap", "job1-config")) < writes.index(("POST", "Job", PREFLIGHT_JOB))
        new_hash = w.kube.objects[("Job", NS, PREFLIGHT_JOB)]["metadata"]["annotations"]["finetune.dev/spec-hash"]
        assert new_hash != old_hash
        assert new_hash == preflight.spec_hash(FineTuneJobSpec.model_validate(w.ftj()["spec"]))
        # Suspending does not re-run it (runPolicy is not what it checked).
        w.ftj()["spec"]["runPolicy"] = {"suspend": True}
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert not [c for c in w.kube.writes() if c[1] == "Job"]

    asyncio.run(body())


def test_opting_out_per_job_or_per_operator_creates_the_gpu_job_at_once() -> None:
    async def body() -> None:
        for w, overrides in ((world(), {"preflight": {"enabled": False}}), (World(FINETUNE_PREFLIGHT="false"), {})):
            w.apply(**overrides)
            await w.reconcile()
            assert [c for c in w.kube.writes() if c[1] == "Job"] == [("POST", "Job", NAME)]
            assert "preflight" not in (w.ftj().get("status") or {})

    asyncio.run(body())


def test_a_preflight_held_suspended_by_someone_else_is_named() -> None:
    async def body() -> None:
        w = world()
        w.apply()
        await w.reconcile()
        w.kube.objects[("Job", NS, PREFLIGHT_JOB)]["spec"]["suspend"] = True  # Kueue without a queue for it
        w.sync_caches()
        w.clock.now += 1
        await w.reconcile()
        running = condition_of(w.ftj(), "Running")
        assert running["reason"] == "PreflightSuspended" and "FINETUNE_PREFLIGHT_QUEUE" in running["message"]
        assert ("Job", NS, NAME) not in w.kube.objects
        assert not [c for c in w.kube.writes() if c[0] == "PATCH" and c[1] == "Job"], "never unsuspended by us"

    asyncio.run(body())


def test_a_preflight_pod_that_cannot_start_names_the_secret() -> None:
    async def body() -> None:
        w = world(FINETUNE_START_TIMEOUT_SECONDS="300")
        w.apply(credentials={"hubToken": {"name": "hf", "key": "token"}})
        await w.reconcile()
        w.sync_caches()
        job = w.kube.objects[("Job", NS, PREFLIGHT_JOB)]
        w.pods[(NS, NAME)] = [PodView(name=f"{PREFLIGHT_JOB}-x", uid="p", job_uid=job["metadata"]["uid"],
                                      waiting_reason="CreateContainerConfigError",
                                      waiting_message='secret "hf" not found', accepted_at="2026-01-01T00:00:00Z")]
        await w.reconcile()
        running = condition_of(w.ftj(), "Running")
        assert running["reason"] == "CreateContainerConfigError"
        assert running["message"].startswith(f'pre-flight pod {PREFLIGHT_JOB}-x cannot start: Secret "hf" does not '
                                             'exist (spec.credentials.hubToken needs its key "token")'), running
        w.clock.now += 301
        await w.reconcile()
        assert condition_of(w.ftj(), "Failed")["reason"] == "CreateContainerConfigError"
        assert ("Job", NS, PREFLIGHT_JOB) not in w.kube.objects, "its Job deleted after the status write"

    asyncio.run(body())


def test_settings_parse_the_preflight_knobs() -> None:
    s = Settings.from_env({"FINETUNE_PREFLIGHT": "false", "FINETUNE_PREFLIGHT_CPU": "1", "FINETUNE_PREFLIGHT_MEMORY":
                           "4Gi", "FINETUNE_PREFLIGHT_NODE_SELECTOR": "pool=cpu, zone=a",
                           "FINETUNE_PREFLIGHT_TOLERATIONS": '[{"key": "k", "operator": "Exists"}]',
                           "FINETUNE_PREFLIGHT_QUEUE": "cpu-queue"})
    assert (s.preflight, s.preflight_cpu, s.preflight_memory, s.preflight_node_selector, s.preflight_queue) == (
        False, "1", "4Gi", (("pool", "cpu"), ("zone", "a")), "cpu-queue")
    assert copy.copy(Settings.from_env({})).preflight is True


def test_a_preflight_in_its_own_kueue_queue_waits_for_admission_quietly() -> None:
    async def body() -> None:
        w = world(FINETUNE_PREFLIGHT_QUEUE="cpu-only")
        w.apply()
        await w.reconcile()
        job = w.kube.objects[("Job", NS, PREFLIGHT_JOB)]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "cpu-only"
        job["spec"]["suspend"] = True  # Kueue's webhook suspends it at creation
        w.sync_caches()
        w.clock.now += 1
        await w.reconcile()
        running = condition_of(w.ftj(), "Running")
        assert running["reason"] == "PreflightQueued" and "LocalQueue cpu-only" in running["message"]
        assert [kind for kind, _, _ in w.kube.events] == ["Normal"]
        job["spec"]["suspend"] = False  # admitted: it runs
        w.sync_caches()
        w.clock.now += 1
        await w.reconcile()
        assert condition_of(w.ftj(), "Running")["reason"] == "Validating"
        assert not [c for c in w.kube.writes() if c[0] == "PATCH" and c[1] == "Job"], "suspend is Kueue's"

    asyncio.run(body())
