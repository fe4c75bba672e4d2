"""The reconcile pass against an in-memory API: which calls it makes, and which it does not.

The real control plane proves the behaviour end to end (test_operator_cluster.py); here the API can fail on cue
(500 bursts, 409 on status, foreign owners), and every write is counted.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
from typing import Any

import pytest

from finetune_api.spec import FineTuneJobSpec
from finetune_operator import builders
from finetune_operator.controller import Controller
from finetune_operator.k8s import ApiError
from finetune_operator.metrics import Metrics
from finetune_operator.observe import (
    PodView,
    summarize_configmap,
    summarize_job,
    summarize_service,
    summarize_workload,
)
from finetune_operator.progress import job_token
from finetune_operator.settings import Settings
from tests.operator.helpers import manifest, merge_patch

KEY = b"test-progress-key-0123456789"
NS, NAME = "team-a", "job1"


class FakeKube:
    """Just enough of k8s.Kube: objects by (kind, namespace, name), a call log, injectable failures."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.fail: list[tuple[str, str, int]] = []  # (verb, kind, status) consumed in order when matching
        self.fail_message: str | None = None  # the injected error's message (default: "injected <status>")
        self.events: list[tuple[str, str, str]] = []
        self.failed_create_events: list[dict[str, Any]] = []
        self.evicted: list[str] = []
        self._uid = itertools.count(1)
        self._rv = itertools.count(100)

    def _maybe_fail(self, verb: str, kind: str) -> None:
        for i, (v, k, status) in enumerate(self.fail):
            if v == verb and k == kind:
                del self.fail[i]
                raise ApiError(verb, kind, status, {"reason": "Injected",
                                                    "message": self.fail_message or f"injected {status}"})

    def writes(self) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[0] != "GET"]

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("uid", f"uid-{next(self._uid)}")
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta.setdefault("generation", 1)
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return copy.deepcopy(obj)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        self.calls.append(("POST", kind, meta["name"]))
        self._maybe_fail("POST", kind)
        if (kind, meta["namespace"], meta["name"]) in self.objects:
            raise ApiError("POST", kind, 409, {"reason": "AlreadyExists", "message": "exists"})
        return self.add(obj)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("GET", kind, name))
        self._maybe_fail("GET", kind)
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    async def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        self.calls.append(("PATCH", kind, name))
        self._maybe_fail("PATCH", kind)
        obj = self.objects[(kind, namespace, name)] = merge_patch(self.objects[(kind, namespace, name)], patch)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str,
                     propagation: str | None = None) -> bool:
        self.calls.append(("DELETE", kind, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    async def patch_ftj_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("PATCH", "FineTuneJob/status", name))
        self._maybe_fail("PATCH", "FineTuneJob/status")
        obj = self.objects[("FineTuneJob", namespace, name)]
        obj["status"] = merge_patch(obj.get("status") or {}, status_patch)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    async def job_events(self, namespace: str, job_uid: str, reason: str) -> list[dict[str, Any]]:
        self.calls.append(("GET", "Event", job_uid))
        return list(self.failed_create_events)

    async def evict(self, namespace: str, pod: str, uid: str) -> bool:
        self.calls.append(("POST", "Pod/eviction", pod))
        self.evicted.append(pod)
        return True

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.calls.append(("POST", "Event", reason))
        self.events.append((type_, reason, message))


def condition_of(ftj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in ftj["status"]["conditions"] if c["type"] == type_)


class Clock:
    def __init__(self) -> None:
        self.now = 1767225600.0  # 2026-01-01T00:00:00Z

    def __call__(self) -> float:
        return self.now


class World:
    """Controller + fake API + hand-fed caches (what kopf's indices would hold)."""

    def __init__(self, **settings: Any) -> None:
        self.kube = FakeKube()
        self.clock = Clock()
        # The pre-flight is off here: these tests are about the trainer Job; test_preflight.py turns it on.
        env = {"FINETUNE_PROGRESS_KEY": KEY.decode(), "FINETUNE_TRAINER_IMAGE": "registry.example.com/t:1",
               "FINETUNE_STATUS_SETTLE_SECONDS": "5", "FINETUNE_PREFLIGHT": "false", **settings}
        self.ctl = Controller(Settings.from_env(env), self.kube, Metrics(), clock=self.clock)  # type: ignore[arg-type]
        self.jobs: dict[tuple[str, str], list[Any]] = {}
        self.pods: dict[tuple[str, str], list[PodView]] = {}
        self.configmaps: dict[tuple[str, str], list[Any]] = {}
        self.services: dict[tuple[str, str], list[Any]] = {}
        self.workloads: dict[tuple[str, str], list[Any]] = {}
        self.ctl.bind_indices(jobs=self.jobs, pods=self.pods, configmaps=self.configmaps, services=self.services,
                              workloads=self.workloads)

    def apply(self, **overrides: Any) -> dict[str, Any]:
        body = self.kube.add(manifest(NAME, NS, **overrides))
        self.ctl.observe_ftj("ADDED", body)
        return body

    def ftj(self) -> dict[str, Any]:
        return self.kube.objects[("FineTuneJob", NS, NAME)]

    def sync_caches(self) -> None:
        """What the watches would deliver: the FineTuneJob and our Jobs, ConfigMaps and Services."""
        self.ctl.observe_ftj("MODIFIED", copy.deepcopy(self.ftj()))
        objs = [o for (_, ns, _), o in self.kube.objects.items() if ns == NS]
        self.jobs[(NS, NAME)] = [summarize_job(o) for o in objs if o["kind"] == "Job"]
        self.configmaps[(NS, NAME)] = [summarize_configmap(o) for o in objs if o["kind"] == "ConfigMap"]
        self.services[(NS, NAME)] = [summarize_service(o) for o in objs if o["kind"] == "Service"]
        self.workloads[(NS, NAME)] = [summarize_workload(o) for o in objs if o["kind"] == "Workload"]

    def run_pods(self, n: int = 1, phase: str = "Running") -> None:
        job = self.kube.objects[("Job", NS, NAME)]
        self.pods[(NS, NAME)] = [PodView(name=f"{NAME}-{i}-x", uid=f"pod-{i}", job_uid=job["metadata"]["uid"],
                                         index=i, phase=phase, gpus=1, started_at="2026-01-01T00:00:00Z")
                                 for i in range(n)]

    async def reconcile(self) -> None:
        await self.ctl.reconcile((NS, NAME))

    async def running(self, workers: int = 1, queue: str | None = None) -> None:
        """Create the job (with a Kueue `queue`: and let Kueue admit it) and bring all its workers up: Running."""
        self.apply(merge_resources={"workers": workers}, **({"run_policy": {"queueName": queue}} if queue else {}))
        await self.reconcile()
        if queue:
            self.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] = False  # Kueue admitted it
        self.sync_caches()
        self.run_pods(workers)
        self.clock.now += 1
        await self.reconcile()
        assert self.ftj()["status"]["phase"] == "Running"


def test_creation_makes_three_creates_and_defers_the_pending_status() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        # One pod: no rendezvous Service (multi-pod jobs get one, below).
        assert w.kube.writes() == [("POST", "ConfigMap", "job1-config"), ("POST", "Secret", "job1-progress"),
                                   ("POST", "Job", "job1")]
        secret = w.kube.objects[("Secret", NS, "job1-progress")]
        cm_uid = w.kube.objects[("ConfigMap", NS, "job1-config")]["metadata"]["uid"]
        assert secret["metadata"]["ownerReferences"][0]["uid"] == cm_uid
        job = w.kube.objects[("Job", NS, NAME)]
        owner = builders.Owner(NAME, NS, w.ftj()["metadata"]["uid"])
        expected = builders.build_job(owner, FineTuneJobSpec.model_validate(w.ftj()["spec"]), w.ctl.ctx)
        assert job["spec"] == expected["spec"]
        assert "status" not in w.ftj(), "no Pending write while pods are starting"
        # Pods run within the settle time: the first status write is already Running.
        w.sync_caches()
        w.run_pods()
        w.clock.now += 1
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Running"
        assert w.kube.writes()[3:] == [("PATCH", "FineTuneJob/status", NAME), ("POST", "Event", "PodsRunning")]
        # Steady state: another pass (a resync) writes nothing.
        w.sync_caches()
        before = len(w.kube.calls)
        await w.reconcile()
        assert w.kube.calls[before:] == []
    asyncio.run(body())


def test_multi_pod_job_also_gets_its_rendezvous_service() -> None:
    async def body() -> None:
        w = World()
        w.apply(merge_resources={"workers": 2})
        await w.reconcile()
        assert w.kube.writes() == [("POST", "ConfigMap", "job1-config"), ("POST", "Service", "job1"),
                                   ("POST", "Secret", "job1-progress"), ("POST", "Job", "job1")]
        owner = builders.Owner(NAME, NS, w.ftj()["metadata"]["uid"])
        assert w.kube.objects[("Service", NS, NAME)]["spec"] == builders.build_service(owner)["spec"]
        w.sync_caches()
        w.run_pods(2)
        w.clock.now += 1
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Running"
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [], "a steady multi-pod job costs no request either"
    asyncio.run(body())


def test_pending_is_written_once_the_settle_time_passed() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        w.sync_caches()
        w.clock.now += 6
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Pending"
        assert condition_of(w.ftj(), "Running")["reason"] == "PodsPending"
    asyncio.run(body())


def test_restart_after_job_created_makes_no_duplicate_and_no_create() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        # A new operator process: empty memory, caches from the watches.
        w.ctl = Controller(w.ctl.settings, w.kube, Metrics(), clock=w.clock)  # type: ignore[arg-type]
        w.ctl.bind_indices(jobs=w.jobs, pods=w.pods)
        w.sync_caches()
        w.run_pods()
        w.kube.calls.clear()
        await w.reconcile()
        assert [c for c in w.kube.writes() if c[0] == "POST" and c[1] != "Event"] == []
        assert w.ftj()["status"]["phase"] == "Running"
        assert sum(1 for k in w.kube.objects if k[0] == "Job") == 1
    asyncio.run(body())


def test_restart_with_children_present_but_not_yet_watched_treats_409_as_ours() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        w.ctl = Controller(w.ctl.settings, w.kube, Metrics(), clock=w.clock)  # type: ignore[arg-type]
        w.ctl.bind_indices(jobs={}, pods={})  # the Job watch has not delivered yet
        w.ctl.observe_ftj("MODIFIED", copy.deepcopy(w.ftj()))
        w.kube.calls.clear()
        await w.reconcile()
        posts = [c for c in w.kube.calls if c[0] == "POST"]
        assert posts == [("POST", "ConfigMap", "job1-config"), ("POST", "Secret", "job1-progress"),
                         ("POST", "Job", "job1")]  # all answered 409
        assert sum(1 for k in w.kube.objects if k[0] == "Job") == 1
        assert "NameConflict" not in str(w.ftj().get("status"))
    asyncio.run(body())


def test_foreign_owner_is_never_adopted() -> None:
    async def body() -> None:
        w = World()
        w.kube.add({"apiVersion": "v1", "kind": "Service", "metadata": {"name": NAME, "namespace": NS},
                    "spec": {"selector": {"app": "someone-else"}}})
        w.apply(merge_resources={"workers": 2})
        await w.reconcile()
        status = w.ftj()["status"]
        assert status["phase"] == "Pending"
        created = condition_of(w.ftj(), "Created")
        assert (created["type"], created["status"], created["reason"]) == ("Created", "False", "NameConflict")
        assert "Service job1 already exists" in created["message"]
        assert ("Job", NS, NAME) not in w.kube.objects
        assert w.kube.objects[("Service", NS, NAME)]["spec"] == {"selector": {"app": "someone-else"}}
        assert "ownerReferences" not in w.kube.objects[("Service", NS, NAME)]["metadata"]
        assert w.kube.events[-1][:2] == ("Warning", "NameConflict")
    asyncio.run(body())


def test_invalid_image_fails_permanently_and_creates_nothing() -> None:
    async def body() -> None:
        w = World(FINETUNE_ALLOWED_REGISTRIES="registry.example.com")
        w.apply(merge_resources={"image": "evil.example.org/miner:latest"})
        await w.reconcile()
        assert [c for c in w.kube.writes() if c[1] in ("Job", "ConfigMap", "Secret", "Service")] == []
        status = w.ftj()["status"]
        assert status["phase"] == "Failed"
        assert condition_of(w.ftj(), "Failed")["reason"] == "InvalidSpec"
        assert "evil.example.org/miner:latest" in condition_of(w.ftj(), "Failed")["message"]
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.writes() == [], "a permanent failure is not retried"
    asyncio.run(body())


@pytest.mark.parametrize("refused", ["Job", "Secret", "ConfigMap", "Service"])
def test_a_child_the_api_server_refuses_fails_the_job_and_leaves_nothing(refused: str) -> None:
    """A 422 is permanent: Failed/InvalidSpec with the server's words, one Warning Event, no retry, and the children
    made before it are deleted (the Secret goes with its ConfigMap, by garbage collection)."""
    async def body() -> None:
        w = World()
        w.apply(merge_resources={"workers": 2})
        w.kube.fail = [("POST", refused, 422)]
        await w.reconcile()
        status = w.ftj()["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert (status["phase"], failed["status"], failed["reason"]) == ("Failed", "True", "InvalidSpec")
        assert failed["message"] == f"the API server refused the {refused} built from this spec: injected 422"
        assert w.kube.events == [("Warning", "InvalidSpec", f"Failed: {failed['message']}")]
        left = {k[0] for k in w.kube.objects if k[0] != "FineTuneJob"}
        secret = w.kube.objects.get(("Secret", NS, "job1-progress"))
        assert left <= {"Secret"}, "nothing but the Secret, which garbage collection removes with its ConfigMap"
        if secret is not None:
            assert secret["metadata"]["ownerReferences"][0]["kind"] == "ConfigMap"
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [], "nothing is retried"
    asyncio.run(body())


@pytest.mark.parametrize("cause", ["missing secret", "second OOM kill"])
def test_a_job_the_operator_fails_has_its_job_deleted_after_the_status_write(cause: str) -> None:
    """Pods that cannot start, or that keep being OOM-killed, would hold their nodes (and GPUs) for ever: the
    status says why first, then the Job (and with it the pods) is deleted, once."""
    async def body() -> None:
        w = World(FINETUNE_START_TIMEOUT_SECONDS="300")
        await w.running()
        job_uid = w.kube.objects[("Job", NS, NAME)]["metadata"]["uid"]
        if cause == "missing secret":
            w.pods[(NS, NAME)] = [PodView(name="job1-0-x", uid="p1", job_uid=job_uid,
                                          accepted_at="2026-01-01T00:00:00Z",
                                          waiting_reason="CreateContainerConfigError",
                                          waiting_message='secret "hf" not found')]
        else:
            w.pods[(NS, NAME)] = [PodView(name=f"job1-0-{i}", uid=f"p{i}", job_uid=job_uid, phase="Failed",
                                          exit_code=137, terminated_reason="OOMKilled",
                                          finished_at=f"2026-01-01T00:00:0{i}Z") for i in (1, 2)]
        w.clock.now += 301
        w.kube.calls.clear()
        await w.reconcile()
        reason = "CreateContainerConfigError" if cause == "missing secret" else "OOMKilled"
        assert w.kube.writes() == [("PATCH", "FineTuneJob/status", NAME), ("POST", "Event", reason),
                                   ("DELETE", "Job", NAME)]
        assert w.ftj()["status"]["phase"] == "Failed"
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [], "deleted once; a failed job costs nothing more"
    asyncio.run(body())


def test_api_errors_are_retried_with_backoff_and_no_condition_is_lost() -> None:
    async def body() -> None:
        w = World()
        w.ctl.queue.base_delay = 0.02
        w.apply()
        w.kube.fail = [("POST", "Job", 500), ("POST", "Job", 500), ("POST", "Job", 503)]
        w.ctl.start()
        try:
            for _ in range(200):
                if ("Job", NS, NAME) in w.kube.objects:
                    break
                await asyncio.sleep(0.01)
            assert ("Job", NS, NAME) in w.kube.objects
            job_posts = [c for c in w.kube.calls if c == ("POST", "Job", NAME)]
            assert len(job_posts) == 4, "three failures, one success: bounded, no hot loop"
            # A 409 on the status write (as if another writer won): retried, the condition still lands.
            w.sync_caches()
            w.run_pods()
            w.kube.fail = [("PATCH", "FineTuneJob/status", 409)]
            w.clock.now += 10
            w.ctl.queue.add((NS, NAME))
            for _ in range(200):
                if (w.ftj().get("status") or {}).get("phase") == "Running":
                    break
                await asyncio.sleep(0.01)
            status = w.ftj()["status"]
            assert status["phase"] == "Running"
            assert [c["type"] for c in status["conditions"]] == ["Ready", "Created", "Running"]
            assert w.ctl.metrics.reconciles.labels(result="retry")._value.get() >= 4
        finally:
            await w.ctl.stop()
    asyncio.run(body())


def test_progress_push_authenticates_and_lands_in_one_write() -> None:
    async def body() -> None:
        w = World()
        await w.running()
        uid = w.ftj()["metadata"]["uid"]
        token = job_token(KEY, NS, NAME, uid)
        assert w.ctl.accept_report(NS, NAME, "wrong", {"step": 1})[0] == 401
        assert w.ctl.accept_report(NS, "other", token, {"step": 1})[0] == 401
        assert w.ctl.accept_report(NS, NAME, token, {"step": -5})[0] == 400
        report = {"state": "running", "step": 40, "totalSteps": 100, "loss": 0.5, "samplesPerSecond": 12.5,
                  "etaSeconds": 120, "checkpoint": {"step": 40, "path": "s3://bucket/out/checkpoints/checkpoint-40"}}
        assert w.ctl.accept_report(NS, NAME, token, report) == (202, "accepted")
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.writes() == [("PATCH", "FineTuneJob/status", NAME)]
        status = w.ftj()["status"]
        assert status["progress"]["step"] == 40 and status["progress"]["eta"] == "2m00s"
        assert status["checkpoints"] == {"latest": {"step": 40, "path": "s3://bucket/out/checkpoints/checkpoint-40"},
                                         "count": 1}
        samples = {(s.namespace, s.name): s for s in w.ctl.samples()}
        assert samples[(NS, NAME)].step == 40
    asyncio.run(body())


def test_quota_exhaustion_is_read_from_failed_create_events() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        w.sync_caches()
        # Until the Job controller has synced the Job (startTime), no FailedCreate Event can exist: none is listed.
        w.clock.now += 10
        await w.reconcile()
        assert ("GET", "Event", w.kube.objects[("Job", NS, NAME)]["metadata"]["uid"]) not in w.kube.calls
        # Its first sync sets startTime even though every pod create fails (quota): now the Events are read.
        w.kube.objects[("Job", NS, NAME)]["status"] = {"startTime": "2026-01-01T00:00:01Z", "active": 0}
        w.sync_caches()
        w.kube.failed_create_events = [{"lastTimestamp": "2026-01-01T00:00:03Z", "message":
                                        'Error creating: pods "job1-0-x" is forbidden: exceeded quota: gpu, '
                                        'requested: nvidia.com/gpu=1, used: nvidia.com/gpu=0, limited: '
                                        'nvidia.com/gpu=0'}]
        w.clock.now += 10
        await w.reconcile()
        running = condition_of(w.ftj(), "Running")
        assert (running["reason"], running["status"]) == ("QuotaExceeded", "False")
        assert "exceeded quota" in running["message"]
    asyncio.run(body())


def test_no_event_list_while_a_succeeded_job_awaits_its_complete_condition() -> None:
    """Between the last pod's success and the Job's Complete condition the Job has no live pods and no active count:
    that is not a pod-creation problem, and listing Events then cost one request per job at scale."""
    async def body() -> None:
        w = World()
        w.apply(merge_resources={"workers": 2})
        await w.reconcile()
        job = w.kube.objects[("Job", NS, NAME)]
        job["status"] = {"startTime": "2026-01-01T00:00:01Z", "active": 0, "succeeded": 2}
        w.sync_caches()
        w.run_pods(2, phase="Succeeded")
        w.clock.now += 10
        w.kube.calls.clear()
        await w.reconcile()
        assert [c for c in w.kube.calls if c[1] == "Event" and c[0] == "GET"] == []
        # One index succeeded, the other could not be re-created: that is worth a look.
        job["status"] = {"startTime": "2026-01-01T00:00:01Z", "active": 0, "succeeded": 1, "failed": 1}
        w.sync_caches()
        w.clock.now += 10
        await w.reconcile()
        assert ("GET", "Event", job["metadata"]["uid"]) in w.kube.calls
    asyncio.run(body())


@pytest.mark.parametrize(("workers", "deleted"), [
    (1, [("DELETE", "Job", NAME), ("DELETE", "ConfigMap", "job1-config")]),
    (2, [("DELETE", "Job", NAME), ("DELETE", "Service", NAME), ("DELETE", "ConfigMap", "job1-config")]),
])
def test_terminal_job_is_cleaned_up_after_ttl_and_status_stays(workers: int, deleted: list[tuple[str, ...]]) -> None:
    async def body() -> None:
        w = World()
        w.apply(run_policy={"ttlSecondsAfterFinished": 30}, merge_resources={"workers": workers})
        await w.reconcile()
        job = w.kube.objects[("Job", NS, NAME)]
        job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}],
                         "completionTime": "2026-01-01T00:00:05Z"}
        w.sync_caches()
        w.clock.now += 5
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Succeeded"
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.writes() == [], "TTL not reached yet"
        w.clock.now += 31
        await w.reconcile()
        assert [c for c in w.kube.calls if c[0] == "DELETE"] == deleted
        assert ("GET", "Service", NAME) not in w.kube.calls, "the watch cache says whether there is a Service"
        # (the Secret is owned by the ConfigMap: garbage collection removes it; the operator cannot delete Secrets)
        assert w.ftj()["status"]["phase"] == "Succeeded"
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == []
    asyncio.run(body())


def test_spec_edits_reach_the_job_but_kueue_owns_suspend() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        w.sync_caches()
        ftj = w.ftj()
        ftj["spec"]["runPolicy"] = {"suspend": True, "backoffLimit": 9}
        ftj["metadata"]["generation"] = 2
        ftj["status"] = {"observedGeneration": 1}
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("PATCH", "Job", NAME) in w.kube.calls
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] is True
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["backoffLimit"] == 9
        assert ("PATCH", "ConfigMap", "job1-config") in w.kube.calls  # the trainer's copy is refreshed too
        assert ("GET", "ConfigMap", "job1-config") not in w.kube.calls  # compared against the watch cache
        assert "backoffLimit: 9" in w.kube.objects[("ConfigMap", NS, "job1-config")]["data"]["job.yaml"]
    asyncio.run(body())


def _fail_worker(w: World, index: int, exit_code: int = 1) -> None:
    """Worker `index` of the running pods ends Failed; the others keep running."""
    w.pods[(NS, NAME)] = [
        dataclasses.replace(p, phase="Failed", exit_code=exit_code, finished_at="2026-01-01T00:00:30Z")
        if p.index == index else p for p in w.pods[(NS, NAME)]]


def test_a_failed_worker_restarts_the_whole_group_once() -> None:
    async def body() -> None:
        w = World()
        await w.running(2)

        # Worker 1 crashes: the Job is suspended, so the Job controller stops worker 0 too (not counted as failures).
        _fail_worker(w, 1)
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("PATCH", "Job", NAME) in w.kube.calls
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] is True
        status = w.ftj()["status"]
        running = next(c for c in status["conditions"] if c["type"] == "Running")
        assert (status["phase"], running["reason"]) == ("Pending", "RestartingWorkers")
        assert running["message"] == ("worker 1 (pod job1-1-x) exited with code 1: stopping the other workers, "
                                      "then restarting all 2 from the latest checkpoint")
        assert w.kube.events[-1][:2] == ("Warning", "RestartingWorkers")

        # While worker 0 is still stopping: held, and nothing is written again.
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.writes() == []

        # Worker 0 is gone: the Job is resumed and every index starts afresh.
        w.pods[(NS, NAME)] = [p for p in w.pods[(NS, NAME)] if p.index == 1]
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] is False
        assert w.ftj()["status"]["phase"] == "Pending"
        assert [e for e in w.kube.events if e[1] == "Suspended"] == [], "a group restart is not a user's suspension"

        job_uid = w.kube.objects[("Job", NS, NAME)]["metadata"]["uid"]
        w.pods[(NS, NAME)] += [PodView(name=f"{NAME}-{i}-y", uid=f"new-{i}", job_uid=job_uid, index=i,
                                       phase="Running", gpus=1, started_at="2026-01-01T00:01:00Z",
                                       created="2026-01-01T00:00:50Z") for i in range(2)]
        w.sync_caches()
        await w.reconcile()
        status = w.ftj()["status"]
        assert (status["phase"], status["restarts"]) == ("Running", 1)
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] is False
    asyncio.run(body())


def _group_stopped_by_itself(w: World) -> None:
    """Worker 1 is killed (137) and worker 0 exits 76 (peer lost) within the same second: no member is left."""
    w.pods[(NS, NAME)] = [
        dataclasses.replace(p, phase="Failed", exit_code=137 if p.index == 1 else 76,
                            finished_at="2026-01-01T00:00:30Z") for p in w.pods[(NS, NAME)]]


def _new_group(w: World, created: str) -> None:
    job_uid = w.kube.objects[("Job", NS, NAME)]["metadata"]["uid"]
    w.pods[(NS, NAME)] += [PodView(name=f"{NAME}-{i}-y", uid=f"new-{i}", job_uid=job_uid, index=i, phase="Running",
                                   gpus=1, started_at="2026-01-01T00:01:00Z", created=created) for i in range(2)]


@pytest.mark.parametrize("seen", ["at once", "late"])
def test_a_group_that_stopped_by_itself_is_said_once_and_the_new_group_is_left_alone(seen: str) -> None:
    """On gloo the survivors exit 76 within moments of a crash, so the operator may first see a group with no member
    left (the Job controller starts them all again), or even the new group already running. Either way the user is
    told once why the workers restarted, it counts one restart, and the new group is never stopped."""
    async def body() -> None:
        w = World()
        await w.running(2)
        _group_stopped_by_itself(w)
        if seen == "late":
            _new_group(w, created="2026-01-01T00:00:32Z")
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("PATCH", "Job", NAME) not in w.kube.calls and w.kube.evicted == [], "nothing left to stop"
        status = w.ftj()["status"]
        running = next(c for c in status["conditions"] if c["type"] == "Running")
        assert (status["phase"], running["reason"]) == ("Pending", "RestartingWorkers")
        assert running["message"] == ("worker 1 (pod job1-1-x) exited with code 137: the other workers stopped with "
                                      "it; all 2 start again from the latest checkpoint")
        assert w.kube.events[-1][:2] == ("Warning", "RestartingWorkers")

        if seen == "at once":
            _new_group(w, created="2026-01-01T00:00:32Z")
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        status = w.ftj()["status"]
        assert (status["phase"], status["restarts"]) == ("Running", 1)
        assert ("PATCH", "Job", NAME) not in w.kube.calls and w.kube.evicted == []
        assert [e[1] for e in w.kube.events].count("RestartingWorkers") == 1
    asyncio.run(body())


def test_a_kueue_job_restarts_its_group_by_evicting_the_survivors() -> None:
    """Kueue owns the Job's suspend: the surviving workers are evicted instead (a disruption: not counted)."""
    async def body() -> None:
        w = World()
        await w.running(3, queue="gpu-queue")
        _fail_worker(w, 2)
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert sorted(w.kube.evicted) == ["job1-0-x", "job1-1-x"]
        assert ("PATCH", "Job", NAME) not in w.kube.calls, "Kueue's suspend is never touched"
        running = next(c for c in w.ftj()["status"]["conditions"] if c["type"] == "Running")
        assert running["reason"] == "RestartingWorkers"
        # Being deleted: not evicted again; once gone, the group is whole again.
        w.pods[(NS, NAME)] = [dataclasses.replace(p, deleting=True) if p.phase == "Running" else p
                              for p in w.pods[(NS, NAME)]]
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert [c for c in w.kube.calls if c[1] == "Pod/eviction"] == []
        w.pods[(NS, NAME)] = [p for p in w.pods[(NS, NAME)] if p.phase == "Failed"]
        w.sync_caches()
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Pending"
        assert "RestartingWorkers" not in str(condition_of(w.ftj(), "Running"))
    asyncio.run(body())


def test_kueue_preemption_is_not_a_broken_group() -> None:
    """Kueue suspends an admitted Job to preempt it: its pods end one by one, which is not a worker failure."""
    async def body() -> None:
        w = World()
        await w.running(2, queue="gpu-queue")
        w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] = True  # preempted
        _fail_worker(w, 1, exit_code=143)
        w.pods[(NS, NAME)] = [dataclasses.replace(p, deleting=True) for p in w.pods[(NS, NAME)]]
        w.sync_caches()
        await w.reconcile()
        assert w.kube.evicted == []
        assert w.ftj()["status"]["phase"] == "Queued"
    asyncio.run(body())


@pytest.mark.parametrize("case", ["one pod", "bad data"])
def test_no_group_restart_for_one_pod_or_permanent_failures(case: str) -> None:
    async def body() -> None:
        w = World()
        await w.running(1 if case == "one pod" else 2)
        _fail_worker(w, 0, exit_code=65 if case == "bad data" else 1)
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("PATCH", "Job", NAME) not in w.kube.calls and w.kube.evicted == []
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] is False
        assert "RestartingWorkers" not in str(w.ftj()["status"]["conditions"])
    asyncio.run(body())


def test_kueue_job_is_created_suspended_and_never_unsuspended() -> None:
    async def body() -> None:
        w = World()
        w.apply(run_policy={"queueName": "gpu-queue"})
        await w.reconcile()
        job = w.kube.objects[("Job", NS, NAME)]
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        w.sync_caches()
        w.clock.now += 10
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Queued"
        job["spec"]["suspend"] = False  # Kueue admits
        w.sync_caches()
        w.run_pods()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("PATCH", "Job", NAME) not in w.kube.calls
        assert w.ftj()["status"]["phase"] == "Running"
    asyncio.run(body())


def _workload(w: World, active: bool = True) -> dict[str, Any]:
    """What Kueue makes for the job's Job: a Workload it owns."""
    job = w.kube.objects[("Job", NS, NAME)]
    return w.kube.add({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                       "metadata": {"name": f"job-{NAME}-abcde", "namespace": NS, "ownerReferences": [
                           {"apiVersion": "batch/v1", "kind": "Job", "name": NAME,
                            "uid": job["metadata"]["uid"], "controller": True}]},
                       "spec": {"queueName": "gpu-queue", "active": active}})


def test_a_user_suspend_under_kueue_deactivates_the_workload_and_never_writes_the_job() -> None:
    async def body() -> None:
        w = World()
        await w.running(queue="gpu-queue")
        _workload(w)
        ftj = w.ftj()
        ftj["spec"]["runPolicy"]["suspend"] = True
        ftj["metadata"]["generation"] = 2
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert ("PATCH", "Workload", f"job-{NAME}-abcde") in w.kube.calls
        assert ("PATCH", "Job", NAME) not in w.kube.calls
        wl = w.kube.objects[("Workload", NS, f"job-{NAME}-abcde")]
        assert wl["spec"]["active"] is False and wl["metadata"]["annotations"] == {"finetune.dev/suspended-by": "user"}
        # Kueue evicts the Workload and suspends the Job: Suspended, and nothing more is written.
        w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] = True
        w.pods[(NS, NAME)] = []
        w.sync_caches()
        await w.reconcile()
        assert w.ftj()["status"]["phase"] == "Suspended"
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.writes() == []
        # Resume: the Workload is activated again (the mark removed); Kueue readmits it in its own time.
        w.ftj()["spec"]["runPolicy"]["suspend"] = False
        w.sync_caches()
        await w.reconcile()
        wl = w.kube.objects[("Workload", NS, f"job-{NAME}-abcde")]
        assert wl["spec"]["active"] is True and "finetune.dev/suspended-by" not in wl["metadata"]["annotations"]
        assert w.ftj()["status"]["phase"] == "Queued"
        assert ("PATCH", "Job", NAME) not in w.kube.calls
    asyncio.run(body())


def test_a_job_suspended_by_someone_else_is_left_suspended() -> None:
    """Kueue's manageJobsWithoutQueueName: its webhook suspends the unlabelled Job at creation. The operator does not
    unsuspend it, however many passes run."""
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] = True  # what the create answered: suspended
        w.sync_caches()
        w.clock.now += 10
        for _ in range(3):
            w.kube.calls.clear()
            await w.reconcile()
            w.sync_caches()
            assert ("PATCH", "Job", NAME) not in w.kube.calls
        status = w.ftj()["status"]
        assert status["phase"] == "Queued"
        assert "suspended by another controller" in condition_of(w.ftj(), "Queued")["message"]
        _workload(w)
        w.sync_caches()
        await w.reconcile()
        assert w.ftj()["status"]["queue"]["workload"] == f"job-{NAME}-abcde"
    asyncio.run(body())


def test_a_refused_job_create_is_reported_and_retried_and_nothing_more_is_made() -> None:
    """Kueue down: its webhook (failurePolicy Fail) cannot be called, the API server answers 500 to the Job create."""
    async def body() -> None:
        w = World()
        w.apply(run_policy={"queueName": "gpu-queue"})
        message = 'Internal error occurred: failed calling webhook "mjob.kb.io": connection refused'
        w.kube.fail.append(("POST", "Job", 500))
        w.kube.fail_message = message
        with pytest.raises(ApiError) as raised:
            await w.reconcile()
        assert raised.value.retryable
        assert ("Job", NS, NAME) not in w.kube.objects
        created = condition_of(w.ftj(), "Created")
        assert (w.ftj()["status"]["phase"], created["status"], created["reason"]) == \
            ("Pending", "False", "AdmissionWebhookUnavailable")
        assert "mjob.kb.io" in created["message"] and "retrying with backoff" in created["message"]
        assert w.kube.events[-1][:2] == ("Warning", "AdmissionWebhookUnavailable")
        await w.reconcile()  # Kueue is back: the ConfigMap and Secret are reused (409), the Job is created
        assert w.kube.objects[("Job", NS, NAME)]["spec"]["suspend"] is True
        assert sum(1 for k in w.kube.objects if k[0] == "ConfigMap") == 1
    asyncio.run(body())


def test_kueue_is_watched_only_where_the_api_serves_its_workloads() -> None:
    from finetune_operator.__main__ import integrations

    class Discovery:
        def __init__(self, served: bool) -> None:
            self.served = served

        async def serves(self, kind: Any) -> bool:
            return self.served and kind.plural == "workloads"

    on = Settings.from_env({"FINETUNE_PROGRESS_KEY": KEY.decode()})
    off = Settings.from_env({"FINETUNE_PROGRESS_KEY": KEY.decode(), "FINETUNE_KUEUE": "false"})
    assert asyncio.run(integrations(on, Discovery(True))) == {"kueue"}  # type: ignore[arg-type]
    assert asyncio.run(integrations(on, Discovery(False))) == frozenset()  # type: ignore[arg-type]
    assert asyncio.run(integrations(off, Discovery(True))) == frozenset()  # type: ignore[arg-type]


def test_failed_job_reports_the_trainer_message() -> None:
    async def body() -> None:
        w = World()
        w.apply()
        await w.reconcile()
        job = w.kube.objects[("Job", NS, NAME)]
        job["status"] = {"failed": 1, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", "message": "rule 0"}]}
        w.sync_caches()
        w.pods[(NS, NAME)] = [PodView(name="job1-0-x", uid="p", job_uid=job["metadata"]["uid"], phase="Failed",
                                      exit_code=65, terminated_message="label 'maybe' is not one of [negative, "
                                      "positive] (line 17)")]
        await w.reconcile()
        failed = next(c for c in w.ftj()["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "DataError"
        assert "label 'maybe' is not one of" in failed["message"]
        assert w.kube.events[-1][:2] == ("Warning", "DataError")
    asyncio.run(body())


def test_deleted_or_edited_configmap_and_service_are_repaired_from_the_caches() -> None:
    async def body() -> None:
        w = World()
        await w.running(2)
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [], "a steady job costs no request"
        desired = copy.deepcopy(w.kube.objects[("ConfigMap", NS, "job1-config")]["data"])

        # Edited by hand: the data is patched back, without a GET.
        w.kube.objects[("ConfigMap", NS, "job1-config")]["data"] = {"job.yaml": "tampered: true\n"}
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [("PATCH", "ConfigMap", "job1-config")]
        assert w.kube.objects[("ConfigMap", NS, "job1-config")]["data"] == desired

        # Deleted by hand (garbage collection takes its Secret): both are created again, the Secret owned by the new
        # ConfigMap; the Service too.
        del w.kube.objects[("ConfigMap", NS, "job1-config")]
        del w.kube.objects[("Secret", NS, "job1-progress")]
        del w.kube.objects[("Service", NS, NAME)]
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [("POST", "ConfigMap", "job1-config"), ("POST", "Secret", "job1-progress"),
                                ("POST", "Service", NAME)]
        cm = w.kube.objects[("ConfigMap", NS, "job1-config")]
        assert cm["data"] == desired
        assert w.kube.objects[("Secret", NS, "job1-progress")]["metadata"]["ownerReferences"][0]["uid"] == \
            cm["metadata"]["uid"]

        # A Service whose selector was edited is recreated as the builders say.
        w.kube.objects[("Service", NS, NAME)]["spec"]["selector"] = {"app": "other"}
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == [("DELETE", "Service", NAME), ("POST", "Service", NAME)]
        owner = builders.Owner(NAME, NS, w.ftj()["metadata"]["uid"])
        assert w.kube.objects[("Service", NS, NAME)]["spec"] == builders.build_service(owner)["spec"]
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.calls == []
    asyncio.run(body())


def test_a_foreign_configmap_in_place_of_ours_is_never_adopted_or_changed() -> None:
    async def body() -> None:
        w = World()
        await w.running()
        foreign = {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "job1-config", "namespace": NS}, "data": {"mine": "yes"}}
        w.kube.objects[("ConfigMap", NS, "job1-config")] = foreign  # no labels: not in the cache
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        assert w.kube.writes() == [("POST", "ConfigMap", "job1-config")]  # answered 409, then left alone
        assert w.kube.objects[("ConfigMap", NS, "job1-config")] == foreign
        assert w.ftj()["status"]["phase"] == "Running"
    asyncio.run(body())


@pytest.mark.parametrize("decided", ["FailureTarget", "SuccessCriteriaMet"])
def test_a_job_whose_outcome_is_decided_gets_no_edits_or_repairs(decided: str) -> None:
    """The Job controller sets FailureTarget or SuccessCriteriaMet before Failed or Complete: from then on the Job is
    finished, and the pass that reports it neither carries a spec edit to it nor repairs its children."""
    async def body() -> None:
        w = World()
        await w.running(2)
        w.kube.objects[("Job", NS, NAME)].setdefault("status", {})["conditions"] = [
            {"type": decided, "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}]
        ftj = w.ftj()
        ftj["spec"]["runPolicy"] = {"suspend": True}
        ftj["metadata"]["generation"] = 2
        del w.kube.objects[("ConfigMap", NS, "job1-config")]
        w.sync_caches()
        w.kube.calls.clear()
        await w.reconcile()
        phase = "Failed" if decided == "FailureTarget" else "Succeeded"
        assert w.ftj()["status"]["phase"] == phase
        assert [c[:2] for c in w.kube.writes()] == [("PATCH", "FineTuneJob/status"), ("POST", "Event")]
    asyncio.run(body())



async def _due(w: World) -> set[tuple[str, str]]:
    """The keys the queue hands out now (each marked done again)."""
    keys = set()
    while True:
        try:
            key = await asyncio.wait_for(w.ctl.queue.get(), 0.05)
        except TimeoutError:
            return keys
        assert key is not None
        keys.add(key)
        w.ctl.queue.done(key)


def test_a_job_held_for_its_storage_creates_nothing_until_the_older_one_finishes() -> None:
    """Two live jobs with one output: the newer is Pending/StorageConflict (one Warning Event, no child); the older
    one's end wakes it, and it starts."""
    async def body() -> None:
        w = World()
        older = manifest("older", NS, output={"storage": "s3://bucket/shared"})
        older["metadata"]["creationTimestamp"] = "2025-12-31T23:59:00Z"
        w.ctl.observe_ftj("ADDED", w.kube.add(older))
        w.apply(output={"storage": "s3://bucket/shared/"})
        await w.reconcile()
        assert w.kube.writes() == [("PATCH", "FineTuneJob/status", NAME), ("POST", "Event", "StorageConflict")]
        created = condition_of(w.ftj(), "Created")
        assert w.ftj()["status"]["phase"] == "Pending" and created["reason"] == "StorageConflict"
        assert f"FineTuneJob {NS}/older" in created["message"] and w.kube.events[0][0] == "Warning"
        w.sync_caches()
        await _due(w)
        await w.reconcile()
        assert w.kube.writes()[2:] == [], "still held: nothing new to write"

        finished = w.kube.objects[("FineTuneJob", NS, "older")]
        finished["status"] = {"phase": "Succeeded"}
        w.ctl.observe_ftj("MODIFIED", copy.deepcopy(finished))
        assert (NS, NAME) in await _due(w), "the older job's end wakes the job it held"
        await w.reconcile()
        assert ("POST", "Job", NAME) in w.kube.writes()
    asyncio.run(body())
