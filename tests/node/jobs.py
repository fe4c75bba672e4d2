"""FineTuneJobs as real pods on the real node: the example with names and storage adjusted, and what the tests read
back (pods as the kubelet reported them, ``kubectl get ftj``, trainer logs). The storage the example expects is
tests/controlplane/storage.py's, as ``make cluster`` stages it, plus one bad data file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.node import node_scheduling
from tests.controlplane.storage import STAGE_DEMO, NodeStorage, provide_storage, remove_storage, stage_demo_claims
from tests.operator.helpers import merge_patch

from .support import EXAMPLE, REPO, logs, unique

T = TypeVar("T")
FTJ = "/apis/finetune.dev/v1alpha1"
BAD_DATA = "sentiment-bad"  # datasets/<BAD_DATA>/train.jsonl: the example's data with one label outside the set
BAD_ROW = 3
CHAT_MODEL = "tiny-llama"  # models/<CHAT_MODEL>: a tiny Llama with a word-level tokenizer and a chat template
BROKEN_TOKENIZER = "tiny-llama-broken"  # the same with a tokenizer.json that is not one
# datasets/<name>/train.jsonl: one file per kind of bad data the pre-flight meets (and the row that is bad)
BAD_FILES = ("no-text-column", "too-long", "no-assistant", "empty")
DPO_EXAMPLE = REPO / "examples" / "assistant-dpo.yaml"
SHORT_VALIDATION = "assistant-short"  # datasets/<this>/preference-validation.jsonl: the example's first pairs
SHORT_ROWS = 8


def stage_storage(root: Path) -> None:
    """The demo's claims (``make cluster`` stages the same), one bad data file beside the example's, and what the
    pre-flight scenarios read."""
    stage_demo_claims(root)
    rows = (root / "datasets" / "sentiment" / "train.jsonl").read_text().splitlines(keepends=True)
    bad = json.loads(rows[BAD_ROW - 1])
    bad["label"] = "neutral"
    rows[BAD_ROW - 1] = json.dumps(bad) + "\n"
    (root / "datasets" / BAD_DATA).mkdir(parents=True)
    (root / "datasets" / BAD_DATA / "train.jsonl").write_text("".join(rows))
    _stage_bad_inputs(root, rows)
    _stage_assistant(root)


@contextlib.contextmanager
def node_storage(cp: ControlPlane, namespace: str, root: Path) -> Iterator[NodeStorage]:
    """``stage_storage`` in ``root``, offered to ``namespace`` as the example's claims on local PersistentVolumes of
    the real node; removed afterwards."""
    stage_storage(root)
    made = provide_storage(cp, namespace, root, unique("finetune-node-local"))
    try:
        yield made
    finally:
        remove_storage(cp, made)


def _stage_assistant(root: Path) -> None:
    """examples/assistant-dpo.yaml's inputs as examples/stage_demo.py stages them (SmolLM2-135M-Instruct, converted
    once from its wheel's GGUF, and the assistant data, copied), and a short validation file."""
    subprocess.run([sys.executable, str(STAGE_DEMO), "--pvc-root", str(root), "--copy", "--examples", "assistant"],
                   check=True, capture_output=True, text=True, timeout=900)
    validation = (root / "datasets" / "assistant" / "preference-validation.jsonl").read_text().splitlines(True)
    (root / "datasets" / SHORT_VALIDATION).mkdir(parents=True)
    (root / "datasets" / SHORT_VALIDATION / "preference-validation.jsonl").write_text("".join(
        validation[:SHORT_ROWS]))


def _stage_bad_inputs(root: Path, rows: list[str]) -> None:
    """What the pre-flight scenarios read: a tiny chat model (and a copy whose tokenizer cannot load), and one data
    file per kind of bad data: a missing column (row 1), an over-long example (row 2), a conversation without an
    assistant message (row 2), an empty file."""
    from tests.trainer.support import tiny_llama

    chat = tiny_llama(root / "models" / CHAT_MODEL)
    shutil.copytree(chat, root / "models" / BROKEN_TOKENIZER)
    (root / "models" / BROKEN_TOKENIZER / "tokenizer.json").write_text("{not json")
    good = [json.loads(r) for r in rows[:3]]
    files = {
        "no-text-column": [{"sentence": r["text"], "label": r["label"]} for r in good],
        "too-long": [{"prompt": "the cat", "response": "yes"}, {"prompt": "the cat is red " * 20, "response": "no"}],
        "no-assistant": [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]},
                         {"messages": [{"role": "user", "content": "hello"}]}],
        "empty": [],
    }
    for name, content in files.items():
        (root / "datasets" / name).mkdir(parents=True)
        (root / "datasets" / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in content))


# ------------------------------------------------------------------------------------------------ the manifest


def sentiment_job(name: str, namespace: str, *, samples: int, checkpoint_every: int,
                  **spec: Any) -> dict[str, Any]:
    """examples/sentiment.yaml with names and storage adjusted, placed on the real node, and shortened.

    - ``metadata``: ``name`` in ``namespace``; ``output.storage``: ``pvc://runs/<name>`` (the example's claims are
      kept: ``models``, ``datasets``, ``runs``);
    - ``resources``: the real node's label and taint (the example leaves placement to the cluster, and only pods
      that ask for this node land there); ``cpu`` dropped: the example asks for 2, all the cores of this node, which
      already runs the operator and CoreDNS; the trainer takes what the node has free;
    - shortened: ``dataset.maxSamples`` (the example trains one epoch over 4,000 examples, 125 steps of 32, about
      7 minutes on 2 cores) and ``checkpointing.everySteps`` (the example checkpoints every 50), so that a run takes
      ``samples / 32`` steps and checkpoints come early;
    - ``spec``: each scenario's own change (a bad data file, a Secret, an image, a memory limit, two workers), merged
      into the spec (a None value removes the key).
    """
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    body = manifest["spec"]
    body["output"]["storage"] = f"pvc://runs/{name}"
    body["resources"].pop("cpu")
    body["resources"].update(node_scheduling())
    body["dataset"]["maxSamples"] = samples
    body["checkpointing"]["everySteps"] = checkpoint_every
    manifest["spec"] = merge_patch(body, copy.deepcopy(spec))
    return manifest


def dpo_job(name: str, namespace: str, *, steps: int, **spec: Any) -> dict[str, Any]:
    """examples/assistant-dpo.yaml (SmolLM2-135M-Instruct, LoRA, the hosted APIs' preference rows) on the real node,
    shortened: ``steps`` optimizer steps of 2 pairs, an evaluation and a checkpoint every 2, SHORT_ROWS validation
    pairs; ``cpu`` dropped and ``memory`` lowered to what the node has to spare."""
    manifest = yaml.safe_load(DPO_EXAMPLE.read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    body = manifest["spec"]
    body["output"]["storage"] = f"pvc://runs/{name}"
    body["resources"].pop("cpu")
    body["resources"].update(node_scheduling(), memory="3Gi")
    body["dataset"]["validation"] = f"pvc://datasets/{SHORT_VALIDATION}/preference-validation.jsonl"
    body["hyperparameters"].update(maxSteps=steps, batchSize=2, evalEverySteps=2)
    body["checkpointing"]["everySteps"] = 2
    manifest["spec"] = merge_patch(body, copy.deepcopy(spec))
    return manifest


def apply(cp: ControlPlane, manifest: dict[str, Any]) -> dict[str, Any]:
    """``kubectl apply -f`` of the manifest, as the README's first step does; returns the stored FineTuneJob."""
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest, sort_keys=False))
    return get_ftj(cp, manifest["metadata"]["namespace"], manifest["metadata"]["name"])


def get_ftj(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    ftj: dict[str, Any] = cp.request("GET", f"{FTJ}/namespaces/{namespace}/finetunejobs/{name}")
    return ftj


def status(ftj: dict[str, Any]) -> dict[str, Any]:
    st: dict[str, Any] = ftj.get("status") or {}
    return st


def condition(ftj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in status(ftj).get("conditions") or []:
        if c["type"] == type_:
            return c  # type: ignore[no-any-return]
    raise AssertionError(f"no {type_} condition in {json.dumps(status(ftj), indent=1)}")


def pods_of(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cp.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=finetune.dev%2Fjob-name%3D{name}")["items"]
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def live_pods(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in pods_of(cp, namespace, name) if not p["metadata"].get("deletionTimestamp")
            and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]


def job_of(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    job: dict[str, Any] | None = cp.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    return job


def events_of(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = cp.request(
        "GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.kind=FineTuneJob,"
               f"involvedObject.name={name}")["items"]
    return events


class JobFailed(AssertionError):
    """The FineTuneJob ended Failed while a test waited for something else."""


def describe(cp: ControlPlane, namespace: str, name: str) -> str:
    """The job's status and its pods' states and log tails, for a failure message."""
    parts = [f"status: {json.dumps(status(get_ftj(cp, namespace, name)), indent=1)}"]
    for pod in pods_of(cp, namespace, name):
        pname = pod["metadata"]["name"]
        parts.append(f"pod {pname}: {json.dumps(pod.get('status', {}).get('containerStatuses'), indent=1)}")
        try:
            parts.append(logs(cp, namespace, pname)[-3000:])
        except Exception as exc:
            parts.append(f"(no logs: {exc})")
    return "\n".join(parts)


def wait_ftj(cp: ControlPlane, namespace: str, name: str, check: Callable[[dict[str, Any]], T | None],
             timeout: float, desc: str, interval: float = 1.0, failed_ok: bool = False) -> T:
    """Polls the FineTuneJob until ``check`` returns something; fails at once (with the pods' logs) when the job
    fails and ``failed_ok`` is not set."""

    def poll() -> T | None:
        ftj = get_ftj(cp, namespace, name)
        if not failed_ok and status(ftj).get("phase") == "Failed":
            raise JobFailed(f"{namespace}/{name} failed while waiting for {desc}:\n{describe(cp, namespace, name)}")
        return check(ftj)

    try:
        return cp.wait_for(poll, timeout=timeout, interval=interval, desc=f"{namespace}/{name}: {desc}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cp, namespace, name)}") from None


def phase_is(phase: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    return lambda ftj: ftj if status(ftj).get("phase") == phase else None


# ------------------------------------------------------------------------------------------- what pods did


@dataclass
class PodRecorder:
    """Every state the API server held for the pods of a namespace, from a watch: a pod that is deleted once its
    container ended (a deleted pod, a suspended Job's pods) is gone within moments, and polling could miss the
    container's last state; the watch delivers each update.

    The watch resumes where it stopped after a transient failure (a dropped connection, a 5xx or 429 answer), so no
    update is lost and a recovered watch carries no error. One that cannot go on (another 4xx, or ``RETRIES``
    transient failures in a row) is dead: every read of the recorder then fails at once, naming the cause, instead
    of a wait running into its deadline."""

    cp: ControlPlane
    namespace: str
    kubeconfig: Path | None = None  # the control plane's own by default
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> the last state seen
    first_seen: dict[tuple[str, str], float] = field(default_factory=dict)  # (uid, waiting reason) -> when
    transient: BaseException | None = None  # the failure the watch is recovering from, None once it is back
    dead: BaseException | None = None  # the failure that ended the watch
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    RETRIES = 5

    def __enter__(self) -> PodRecorder:
        self._thread = threading.Thread(target=self._run, name=f"pods-{self.namespace}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=70)

    def _run(self) -> None:
        from kubernetes import client, config, watch

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig or self.cp.kubeconfig)))
        version = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = api.list_namespaced_pod(self.namespace, _preload_content=False)
                    body = json.loads(listed.data)
                    for pod in body["items"]:
                        self._record(pod)
                    version = body["metadata"]["resourceVersion"]
                    failures, self.transient = 0, None
                for event in watch.Watch().stream(api.list_namespaced_pod, self.namespace, resource_version=version,
                                                  timeout_seconds=5, allow_watch_bookmarks=True):
                    failures, self.transient = 0, None
                    raw = event["raw_object"]  # (an ERROR event is raised by the client as an ApiException)
                    version = raw["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._record(raw)
                    if self._stop.is_set():
                        return
                failures, self.transient = 0, None  # the stream ended at its own timeout: healthy
            except client.ApiException as exc:
                if exc.status == 410:  # too old: list again
                    version = None
                    continue
                if exc.status is None or not (exc.status >= 500 or exc.status == 429):
                    self.dead = exc
                    return
                failures = self._retry(exc, failures)
            except Exception as exc:  # a dropped connection, a truncated stream
                if self._stop.is_set():
                    return
                failures = self._retry(exc, failures)
            if failures > self.RETRIES:
                return

    def _retry(self, exc: BaseException, failures: int) -> int:
        """Counts a transient failure; past RETRIES in a row the watch is dead, else it waits before going on."""
        failures += 1
        if failures > self.RETRIES:
            self.dead = exc
        else:
            self.transient = exc
            self._stop.wait(min(0.25 * 2 ** failures, 4.0))
        return failures

    def _alive(self) -> None:
        if self.dead is not None:
            raise AssertionError(f"the pod watch of namespace {self.namespace} is dead: {self.dead!r}")

    def _record(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        now = time.time()
        with self._lock:
            self.pods[uid] = pod
            for cs in pod.get("status", {}).get("containerStatuses") or []:
                reason = (cs.get("state", {}).get("waiting") or {}).get("reason")
                if reason:
                    self.first_seen.setdefault((uid, reason), now)

    def of_job(self, name: str) -> list[dict[str, Any]]:
        """The job's pods as last seen, oldest first (deleted ones included)."""
        self._alive()
        with self._lock:
            pods = [p for p in self.pods.values() if p["metadata"].get("labels", {}).get("finetune.dev/job-name")
                    == name]
        return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])

    def terminated(self, uid: str) -> dict[str, Any] | None:
        """The trainer container's ``state.terminated`` as last seen (exitCode, reason, message), or None."""
        self._alive()
        with self._lock:
            pod = self.pods.get(uid) or {}
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            if cs["name"] == "trainer" and cs.get("state", {}).get("terminated"):
                state: dict[str, Any] = cs["state"]["terminated"]
                return state
        return None

    def wait_terminated(self, uid: str, timeout: float) -> dict[str, Any]:
        return self.cp.wait_for(lambda: self.terminated(uid), timeout=timeout, interval=0.5,
                                desc=f"the trainer container of pod {uid} to end")


# --------------------------------------------------------------------------------------------- trainer logs

_RESUMED = re.compile(r"resuming from \S+ \(step (\d+) of (\d+)")
_STEP = re.compile(r"finetune_trainer\.progress: step (\d+)/(\d+)")


@dataclass(frozen=True)
class TrainerLog:
    """What a trainer pod's log (``kubectl logs``) says about where it started."""

    text: str

    @property
    def resumed_from(self) -> int | None:
        m = _RESUMED.search(self.text)
        return int(m[1]) if m else None

    @property
    def steps(self) -> list[int]:
        return [int(m[1]) for m in _STEP.finditer(self.text)]


def trainer_log(cp: ControlPlane, namespace: str, pod: str) -> TrainerLog:
    return TrainerLog(logs(cp, namespace, pod))


def wait_first_step(cp: ControlPlane, namespace: str, pod: str, timeout: float) -> TrainerLog:
    """The pod's log once it shows its first training step (the trainer logs the first step it takes at once)."""
    return cp.wait_for(lambda: (lambda t: t if t.steps else None)(trainer_log(cp, namespace, pod)),
                       timeout=timeout, interval=2, desc=f"pod {namespace}/{pod} to log a training step",
                       ignore=(Exception,))


# ------------------------------------------------------------------------------------------ kubectl get ftj


def get_ftj_row(cp: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    """``kubectl get ftj NAME``: the columns a user sees, by header."""
    lines = cp.kubectl("-n", namespace, "get", "ftj", name).stdout.splitlines()
    header, row = lines[0], lines[1]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(names, cells, strict=True))


def checkpoint_steps(folder: Path) -> dict[int, dict[str, Any]]:
    """The complete checkpoints in a checkpoint folder on the host: step -> its COMPLETE marker."""
    out = {}
    for marker in folder.glob("checkpoint-*/COMPLETE"):
        done = json.loads(marker.read_text())
        out[int(done["step"])] = done
    return out
