"""FineTuneJobs as real pods on the real node: examples/sentiment-cpu.yaml as it is, and examples/sentiment.yaml
adjusted per scenario, applied with ``kubectl apply``, the chart's operator running in its built image, the trainer
image built from trainer_image/Dockerfile, storage on local PersistentVolumes of the node (staged as ``make cluster``
stages them). Nothing is played: the kubelet runs the Job the operator wrote (mounts, ``/dev/termination-log``,
``terminationGracePeriodSeconds``, ``$(JOB_COMPLETION_INDEX)``, the rendezvous name over CoreDNS), the trainer
pushes progress to the operator's Service, and the kubelet and the kernel report the failures (a missing Secret or
image, an OOM kill).

The failure scenarios shorten examples/sentiment.yaml for time (see ``jobs.sentiment_job``): a few hundred examples
instead of 4,000, and checkpoints every few steps instead of every 50. The release fails pods that cannot start
after START_TIMEOUT seconds (``trainer.startTimeoutSeconds``; the default is 300).
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.spec import FineTuneJobSpec
from finetune_api.times import parse_time
from finetune_operator.builders import PVC_ROOT, RUN_AS_USER, BuildContext, Owner, pod_spec
from finetune_trainer.history import read_lines
from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import NODE_NAME, RealNode, node_scheduling
from tests.controlplane.storage import NodeStorage

from .conftest import released
from .jobs import (
    BAD_DATA,
    BAD_ROW,
    BROKEN_TOKENIZER,
    CHAT_MODEL,
    PodRecorder,
    apply,
    checkpoint_steps,
    condition,
    dpo_job,
    events_of,
    get_ftj,
    get_ftj_row,
    job_of,
    live_pods,
    node_storage,
    phase_is,
    pods_of,
    sentiment_job,
    status,
    trainer_log,
    wait_first_step,
    wait_ftj,
)
from .support import REPO, Release

pytestmark = [pytest.mark.node, pytest.mark.e2e]

START_TIMEOUT = 30
CPU_EXAMPLE = REPO / "examples" / "sentiment-cpu.yaml"
# Accuracy on the validation file that only a model that learned reaches: the pretrained encoder with its new,
# untrained head is at chance (0.5); the CPU example's run measured 0.95.
ACCURACY_FLOOR = 0.85
BATCH = 32  # the example's batchSize
TRAIN = 600.0  # seconds a shortened run may take on a loaded 2-core machine, pod start and final evaluation included
SURFACED = 15.0  # seconds from the kubelet's report on the pod to the FineTuneJob's condition
LATE = 20.0  # seconds after START_TIMEOUT by which a job whose pod cannot start has failed
KUBELET_RETRY = 20.0  # the kubelet tries a pod that cannot start again after 10 s, then 20 s, ...
PREFLIGHT_MEMORY = "1536Mi"  # each pre-flight pod's (the trainer's libraries and the example's data take about 1 GB)
NO_PREFLIGHT = {"preflight": {"enabled": False}}  # scenarios about the trainer pods alone skip it (CI's time)


def is_preflight(pod: dict[str, Any]) -> bool:
    return pod["metadata"]["labels"].get("app.kubernetes.io/component") == "preflight"


def trainer_pods(recorder: PodRecorder, name: str) -> list[dict[str, Any]]:
    return [p for p in recorder.of_job(name) if not is_preflight(p)]


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, real_node: RealNode, node_images: ProductImages, finetune_crd: None,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    placement = node_scheduling()
    values = {"trainer": {"startTimeoutSeconds": START_TIMEOUT},
              # the pre-flight pods go to the real node (the FineTuneJobs' GPU pods would go to kwok's GPU nodes)
              "preflight": {"cpu": "100m", "memory": PREFLIGHT_MEMORY, "nodeSelector": placement["nodeSelector"],
                            "tolerations": placement["tolerations"]}}
    with released(control_plane, node_images, tmp_path_factory.mktemp("release"), values) as release:
        yield release


@pytest.fixture(scope="module")
def storage(control_plane: ControlPlane, release: Release,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStorage]:
    with node_storage(control_plane, release.watched[0], tmp_path_factory.mktemp("pvc")) as made:
        yield made


@pytest.fixture
def recorder(control_plane: ControlPlane, release: Release) -> Iterator[PodRecorder]:
    with PodRecorder(control_plane, release.watched[0]) as rec:
        yield rec


def _classify(model_dir: Path, validation: Path, labels: list[str], max_length: int) -> tuple[int, int]:
    """(correct, total) of the written model on the validation file, with transformers in this process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    rows = [json.loads(line) for line in validation.read_text().splitlines() if line.strip()]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            enc = tok([r["text"] for r in chunk], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1).tolist()
            correct += sum(labels[p] == r["label"] for p, r in zip(predicted, chunk, strict=True))
    return correct, len(rows)


@pytest.mark.timeout(900)
def test_the_cpu_example_trains_in_a_real_pod_learns_and_keeps_its_best_evaluation(
    control_plane: ControlPlane, release: Release, storage: NodeStorage, node_images: ProductImages,
    recorder: PodRecorder,
) -> None:
    """Scenario 1: examples/sentiment-cpu.yaml applied as it is (only its namespace set), as ``make cluster``'s user
    applies it. The pre-flight passes (its findings in status, the tokenised data in the cache), then a restricted
    trainer pod reads that cache instead of tokenising, under the example's memory limit, which the plan accepts (and
    the kernel does not kill it), pushes progress through the operator's Service to ``kubectl get ftj``, Succeeded;
    the model LEARNED (the model on the volume classifies the validation file above ACCURACY_FLOOR, where the
    untrained head is at chance, and as status.metrics says); two evaluations or more, and the model is the
    checkpoint of the best one by f1Macro (selectBest); the ledger matches the disk."""
    cp, ns = control_plane, release.watched[0]
    manifest = yaml.safe_load(CPU_EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = ns
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    samples = spec["dataset"]["maxSamples"]
    steps = samples // spec["hyperparameters"]["batchSize"]
    ftj = apply(cp, manifest)

    # The pre-flight first: no trainer Job until it passed; its findings in status and in `kubectl get ftj`.
    checked = wait_ftj(cp, ns, name, lambda f: f if status(f).get("preflight") else None, timeout=TRAIN,
                       desc="the pre-flight's findings")
    found = status(checked)["preflight"]
    assert found["train"] == {"examples": samples, "checked": samples, "tokens": found["train"]["tokens"],
                              "longest": found["train"]["longest"]} and 0 < found["train"]["longest"] <= 128, found
    assert found["totalSteps"] == steps and found["tokenCache"].startswith(f"{PVC_ROOT}/runs/{name}/")
    plan = found["memoryPlan"]
    assert plan["deviceMemoryFrom"] == "spec.resources.memory" and plan["fits"] is True, plan
    assert condition(checked, "Validated")["reason"] == "PreflightPassed"
    assert get_ftj_row(cp, ns, name)["EXAMPLES"] == str(samples)
    [pre] = [p for p in recorder.of_job(name) if is_preflight(p)]
    assert pre["spec"]["nodeName"] == NODE_NAME and recorder.wait_terminated(pre["metadata"]["uid"], 30)[
        "exitCode"] == 0

    # The pod the Job controller made from the operator's template, on the real node, in the trainer image.
    pod = cp.wait_for(lambda: next(iter(p for p in pods_of(cp, ns, name) if not is_preflight(p)), None),
                      timeout=120, desc="the trainer pod")
    container = pod["spec"]["containers"][0]
    assert container["image"] == node_images.trainer
    built = pod_spec(Owner(name, ns, ftj["metadata"]["uid"]), FineTuneJobSpec.model_validate(spec),
                     BuildContext(node_images.trainer, "http://unused"))
    assert pod["spec"]["securityContext"] == built["securityContext"]
    assert container["securityContext"] == built["containers"][0]["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    url = next(e["value"] for e in container["env"] if e["name"] == "FINETUNE_PROGRESS_URL")
    assert url == f"http://{release.fullname}.{release.namespace}.svc:8081/v1/progress/{ns}/{name}"

    # Progress, loss and ETA move in `kubectl get ftj` while it trains.
    rows: list[dict[str, str]] = []

    def watched(ftj: dict[str, Any]) -> dict[str, Any] | None:
        row = get_ftj_row(cp, ns, name)
        if row["PHASE"] == "Running" and row["PROGRESS"] not in ("", "<none>", "0") and (
                not rows or row["PROGRESS"] != rows[-1]["PROGRESS"]):
            rows.append(row)
        return ftj if status(ftj).get("phase") == "Succeeded" else None

    done = wait_ftj(cp, ns, name, watched, timeout=TRAIN, desc="Succeeded", interval=1.0)
    progress = [float(r["PROGRESS"]) for r in rows]
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] > progress[0], rows
    assert all(float(r["LOSS"]) > 0 and re.fullmatch(r"(\d+[hms])+", r["ETA"]) for r in rows), rows
    assert len({r["LOSS"] for r in rows}) >= 2, rows
    st = status(done)
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == steps
    plan = st["memoryPlan"]  # the trainer's memory plan, reported before the first step, kept by the CRD's schema
    assert plan["sharding"] == "none" and plan["reason"].startswith("auto: ") and plan["perDeviceBytes"] > 0

    # One pod, on the real node, exited 0 (never OOM-killed under the limit the plan accepted); it read the
    # pre-flight's tokens; it ran as the operator's uid: the files it wrote on the volume are its.
    [pod] = trainer_pods(recorder, name)
    said = trainer_log(cp, ns, pod["metadata"]["name"]).text
    assert "using tokenised train from cache" in said, said[-3000:]
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert recorder.wait_terminated(pod["metadata"]["uid"], timeout=30)["exitCode"] == 0
    out = storage.host_path(st["output"]["path"])
    assert st["output"]["path"] == spec["output"]["storage"]
    assert (out / "model.safetensors").stat().st_uid == RUN_AS_USER

    # It learned: the model on the volume classifies the validation file well above chance, as reported.
    labels = spec["task"]["labels"]
    correct, total = _classify(out, storage.host_path(spec["dataset"]["validation"]), labels,
                               spec["hyperparameters"]["maxSeqLength"])
    assert correct >= ACCURACY_FLOOR * total, f"{correct} of {total} right: the model did not learn"
    reported = st["output"]["metrics"]["accuracy"]
    assert abs(correct - reported * total) <= 1, (correct, total, reported)

    # Best-checkpoint selection over two evaluations or more: the model is the best evaluation's checkpoint.
    evaluations = {r["step"]: r for r in read_lines(out / "metrics.jsonl") if r["type"] == "eval"}
    every = spec["hyperparameters"]["evalEverySteps"]
    assert sorted(evaluations) == sorted({*range(every, steps + 1, every), steps}), evaluations
    best = max(evaluations.values(), key=lambda r: r["f1Macro"])
    written = json.loads((out / "metrics.json").read_text())["output"]
    assert (st["output"]["model"], st["output"]["step"], st["output"]["reason"]) == (
        "best", best["step"], written["reason"]), (st["output"], best)
    assert st["output"]["metrics"]["f1Macro"] == pytest.approx(best["f1Macro"]), (st["output"], best)
    assert f"uid `{done['metadata']['uid']}`" in (out / "README.md").read_text()

    # The ledger lists what is on disk, the best checkpoint kept beside the last keepLast.
    ledger = st["checkpoints"]
    folder = storage.host_path(ledger["latest"]["path"]).parent
    on_disk = checkpoint_steps(folder)
    saved = spec["checkpointing"]["everySteps"]
    written_steps = sorted({*range(saved, steps + 1, saved), steps})
    assert ledger["latest"]["step"] == written_steps[-1] and ledger["latest"]["step"] in on_disk
    assert ledger["count"] == len(written_steps)
    keep = spec["checkpointing"]["keepLast"]
    assert {*written_steps[-keep:], best["step"]} <= set(on_disk) <= set(written_steps), on_disk
    assert condition(done, "Succeeded")["status"] == "True"


@pytest.mark.timeout(900)
def test_a_dpo_job_on_a_real_instruct_model_succeeds_with_its_reward_metrics_in_status(
    control_plane: ControlPlane, release: Release, storage: NodeStorage, recorder: PodRecorder,
) -> None:
    """examples/assistant-dpo.yaml, shortened: preference tuning of SmolLM2-135M-Instruct with LoRA (the reference is
    the model with its adapters disabled) in a real pod, to Succeeded, with the reward metrics in status (the last
    evaluation's, and the output's as selectBest chose it), metrics.json and the model card on the volume."""
    cp, ns, name, steps = control_plane, release.watched[0], "assistant-dpo", 4
    apply(cp, dpo_job(name, ns, steps=steps))
    done = wait_ftj(cp, ns, name, lambda f: f if status(f).get("phase") in ("Succeeded", "Failed") else None,
                    timeout=TRAIN, desc="finished", interval=1.0)
    st = status(done)
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == steps
    rewards = ("evalLoss", "rewardAccuracy", "rewardMargin", "rewardChosen", "rewardRejected")
    assert set(rewards) <= set(st["metrics"]) and set(rewards) <= set(st["output"]["metrics"])
    assert 0 <= st["output"]["metrics"]["rewardAccuracy"] <= 1
    assert st["memoryPlan"]["sharding"] == "none" and "reference" not in st["memoryPlan"]["breakdown"]  # LoRA
    # The pre-flight checked the pairs first (on CPU, before the trainer Job), then one trainer pod trained.
    assert condition(done, "Validated")["reason"] == "PreflightPassed"
    assert st["preflight"]["train"]["examples"] > 0 and st["preflight"]["totalSteps"] == steps, st["preflight"]
    pods = recorder.of_job(name)
    checked = [p for p in pods if p["metadata"]["name"].startswith(f"{name}-preflight-")]
    trained = [p for p in pods if p not in checked]
    assert len(checked) == len(trained) == 1, [p["metadata"]["name"] for p in pods]
    for pod in (*checked, *trained):
        assert recorder.wait_terminated(pod["metadata"]["uid"], timeout=30)["exitCode"] == 0
    out = storage.host_path(st["output"]["path"])
    written = json.loads((out / "metrics.json").read_text())
    assert written["task"] == "dpo" and written["metrics"] == pytest.approx(st["output"]["metrics"])
    assert (st["output"]["model"], st["output"]["step"]) == (written["output"]["model"], written["output"]["step"])
    assert (out / "adapter_config.json").exists()
    assert "Direct preference optimisation" in (out / "README.md").read_text()


def _first_checkpoint(cp: ControlPlane, storage: NodeStorage, ns: str, name: str) -> int:
    """The step of the first complete checkpoint on the volume, as soon as it is there (the status hears of it
    seconds later, and a run on an idle machine takes one step a second), while the job still trains."""
    folder = storage.host_path(f"pvc://runs/{name}/checkpoints")

    def check(ftj: dict[str, Any]) -> int | None:
        steps = checkpoint_steps(folder) if folder.is_dir() else {}
        if status(ftj).get("phase") == "Succeeded":
            raise AssertionError(f"{ns}/{name} finished before it could be interrupted: lengthen its run")
        return min(steps) if steps else None

    return wait_ftj(cp, ns, name, check, timeout=TRAIN, desc="a complete checkpoint on the volume", interval=0.2)


def _stopped_at(state: dict[str, Any]) -> int:
    """The step of the checkpoint a trainer stopped by SIGTERM says it completed, in its termination message."""
    said = state.get("message", "")
    found = re.fullmatch(r"stopped by signal; checkpoint at step (\d+) of \d+ is complete, a restart resumes from "
                         r"it \[exit 75: interrupted after saving a checkpoint \(retried\)\]\n", said)
    assert found, state
    return int(found[1])


def _trains_on_past(cp: ControlPlane, ns: str, name: str, saved: int) -> dict[str, Any]:
    """The status once the resumed run has written a checkpoint beyond ``saved``."""
    return wait_ftj(cp, ns, name, lambda f: (lambda t: t if t.get("phase") in ("Running", "Succeeded") and (
        t.get("checkpoints") or {}).get("latest", {}).get("step", 0) > saved else None)(status(f)),
                    timeout=TRAIN, desc=f"a checkpoint after step {saved}")


def _replacement(cp: ControlPlane, ns: str, name: str, old: set[str], count: int = 1) -> list[dict[str, Any]]:
    return cp.wait_for(lambda: (lambda p: p if len(p) >= count else None)(
        [p for p in live_pods(cp, ns, name) if p["metadata"]["uid"] not in old]),
        timeout=240, desc=f"{count} new pod(s) of {ns}/{name}")


@pytest.mark.timeout(900)
def test_a_deleted_trainer_pod_checkpoints_exits_75_and_its_replacement_resumes_from_it(
    control_plane: ControlPlane, release: Release, storage: NodeStorage, recorder: PodRecorder,
) -> None:
    """Scenario 2 (preemption): ``kubectl delete pod`` mid-run. SIGTERM: a complete checkpoint within the grace
    period and exit 75; the Job's replacement pod resumes from it; one restart, and the Job's backoffLimit is not
    used up (a deletion that is not a disruption counts one failure; exit 75 is not in the FailJob rule)."""
    cp, ns, name, every = control_plane, release.watched[0], "preempted", 3
    apply(cp, sentiment_job(name, ns, samples=21 * BATCH, checkpoint_every=every, **NO_PREFLIGHT))
    _first_checkpoint(cp, storage, ns, name)
    [first] = live_pods(cp, ns, name)
    cp.kubectl("-n", ns, "delete", "pod", first["metadata"]["name"], "--wait=false")

    ended = recorder.wait_terminated(first["metadata"]["uid"], timeout=180)
    assert ended["exitCode"] == 75, ended
    saved = _stopped_at(ended)
    folder = storage.host_path(f"pvc://runs/{name}/checkpoints")
    assert saved in checkpoint_steps(folder), f"checkpoint-{saved} is not complete on the volume"

    [second] = _replacement(cp, ns, name, {first["metadata"]["uid"]})
    log = wait_first_step(cp, ns, second["metadata"]["name"], timeout=TRAIN)
    assert log.resumed_from == saved and log.steps[0] == saved + 1, log.text[-3000:]
    st = wait_ftj(cp, ns, name, lambda f: status(f) if status(f).get("restarts") == 1 else None, timeout=60,
                  desc="one restart counted")
    assert st["checkpoints"]["latest"]["step"] >= saved
    # The Job counted the deleted pod once (a deletion is no disruption; 75 is in no FailJob rule), within its limit.
    job = cp.wait_for(lambda: (lambda j: j if j and j["status"].get("failed") else None)(job_of(cp, ns, name)),
                      timeout=60, desc="the Job's count of failed pods")
    assert job["status"]["failed"] == 1 < job["spec"]["backoffLimit"], job["status"]
    assert not [c for c in job["status"].get("conditions") or [] if c["type"] in ("Failed", "FailureTarget")]
    _trains_on_past(cp, ns, name, saved)
    cp.kubectl("-n", ns, "delete", "ftj", name, "--wait=false")  # the rest of the run proves nothing new


@pytest.mark.timeout(900)
def test_suspend_stops_the_pod_after_a_checkpoint_and_resume_continues_from_it(
    control_plane: ControlPlane, release: Release, storage: NodeStorage, recorder: PodRecorder,
) -> None:
    """Scenario 3: ``runPolicy.suspend: true`` mid-run stops the pod (SIGTERM, checkpoint, exit 75), counted neither
    as a failure nor as a restart; ``false`` starts a pod that resumes from that checkpoint."""
    cp, ns, name, every = control_plane, release.watched[0], "suspended", 3
    apply(cp, sentiment_job(name, ns, samples=21 * BATCH, checkpoint_every=every, **NO_PREFLIGHT))
    _first_checkpoint(cp, storage, ns, name)
    [first] = live_pods(cp, ns, name)

    def suspend(value: bool) -> None:
        cp.kubectl("-n", ns, "patch", "ftj", name, "--type=merge",
                   "-p", json.dumps({"spec": {"runPolicy": {"suspend": value}}}))

    suspend(True)
    ended = recorder.wait_terminated(first["metadata"]["uid"], timeout=180)
    assert ended["exitCode"] == 75, ended
    saved = _stopped_at(ended)
    assert saved in checkpoint_steps(storage.host_path(f"pvc://runs/{name}/checkpoints"))
    wait_ftj(cp, ns, name, phase_is("Suspended"), timeout=60, desc="Suspended")
    cp.wait_for(lambda: not live_pods(cp, ns, name), timeout=60, desc="no pod left")
    assert condition(get_ftj(cp, ns, name), "Suspended")["status"] == "True"

    suspend(False)
    [second] = _replacement(cp, ns, name, {first["metadata"]["uid"]})
    log = wait_first_step(cp, ns, second["metadata"]["name"], timeout=TRAIN)
    assert log.resumed_from == saved and log.steps[0] == saved + 1, log.text[-3000:]
    # It trains on from there, and neither a restart nor a Job failure is counted.
    st = _trains_on_past(cp, ns, name, saved)
    assert not st.get("restarts"), "a suspension is not a restart"
    assert condition(get_ftj(cp, ns, name), "Suspended")["reason"] == "Resumed"
    job = job_of(cp, ns, name)
    assert job is not None and not job["status"].get("failed"), job["status"]
    cp.kubectl("-n", ns, "delete", "ftj", name, "--wait=false")  # the rest of the run proves nothing new


# What each FineTuneJob of the pre-flight scenario changes in the example, and what its Failed condition must say.
# Each asks for a GPU (so its trainer pods would go to kwok's GPU nodes) except the CPU job whose memory the plan
# refuses; the pre-flight pods run on the real node.
GPU = {"gpusPerWorker": 1, "nodeSelector": None, "tolerations": None, "memory": None}
CHAT = {"task": {"type": "causal-lm", "labels": None}, "model": {"source": f"pvc://models/{CHAT_MODEL}"},
        "checkpointing": {"selectBest": None}, "hyperparameters": {"maxSeqLength": 32, "evalEverySteps": None}}
PREFLIGHT_FAILURES: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "missing-column": ({"dataset": {"train": "pvc://datasets/no-text-column/train.jsonl"}}, "DataError",
                       (f"{PVC_ROOT}/datasets/no-text-column/train.jsonl", "column 'text' (dataset.columns.text) is "
                        "missing; columns found: sentence, label")),
    "bad-label": ({"dataset": {"train": f"pvc://datasets/{BAD_DATA}/train.jsonl"}}, "DataError",
                  (f"{PVC_ROOT}/datasets/{BAD_DATA}/train.jsonl, row {BAD_ROW}: field 'label' has label 'neutral', "
                   "outside the label set",)),
    "too-long": ({**CHAT, "dataset": {"train": "pvc://datasets/too-long/train.jsonl", "validation": None,
                                      "columns": {"text": None, "label": None}}}, "DataError",
                 (f"{PVC_ROOT}/datasets/too-long/train.jsonl, row 2: prompt + response is", "longer than "
                  "hyperparameters.maxSeqLength 32")),
    "bad-chat": ({**CHAT, "dataset": {"train": "pvc://datasets/no-assistant/train.jsonl", "validation": None,
                                      "columns": {"text": None, "label": None, "messages": "messages"}}},
                 "DataError", (f"{PVC_ROOT}/datasets/no-assistant/train.jsonl, row 2: field 'messages' has no "
                               "assistant message",)),
    "empty": ({"dataset": {"train": "pvc://datasets/empty/train.jsonl"}}, "DataError",
              ("dataset.train pvc://datasets/empty/train.jsonl is empty",)),
    "no-tokenizer": ({"model": {"source": f"pvc://models/{BROKEN_TOKENIZER}"}}, "ConfigError",
                     (f"model.source '{PVC_ROOT}/models/{BROKEN_TOKENIZER}': cannot load the tokenizer",)),
    "too-big-gpu": ({"preflight": {"gpuMemory": "100Mi"}}, "ConfigError",
                    ("the training state would not fit", "with spec.resources.sharding none",
                     "GB usable of 0.10 GB")),
    "too-big-cpu": ({"resources": {"memory": "600Mi"}}, "ConfigError",
                    ("the training process would not fit", "is the process itself",
                     "set spec.resources.memory to at least")),
}


@pytest.mark.timeout(600)
def test_a_job_that_cannot_train_fails_in_the_preflight_and_never_gets_a_gpu_job(
    control_plane: ControlPlane, release: Release, storage: NodeStorage, recorder: PodRecorder,
) -> None:
    """Scenario 4: each failure class a user meets (a missing column, a label outside the set, an over-long example,
    a conversation without an assistant reply, an empty split, a tokenizer that cannot load, a memory plan that
    cannot fit the GPU or the pod's memory limit) fails in its pre-flight pod on the real node with the trainer's
    own exit code and message (file, row, field) through the real /dev/termination-log; the FineTuneJob is Failed
    with that message at once and one Warning Event; no trainer Job is ever created (kwok's GPU nodes stay unused)
    and nothing is counted as a restart."""
    cp, ns = control_plane, release.watched[0]
    for case, (change, _, _) in PREFLIGHT_FAILURES.items():
        spec = {**change, "resources": {**(GPU if case != "too-big-cpu" else {}), **change.get("resources", {})}}
        apply(cp, sentiment_job(case, ns, samples=8 * BATCH, checkpoint_every=4, **spec))
    for case, (_, reason, said) in PREFLIGHT_FAILURES.items():
        failed = wait_ftj(cp, ns, case, phase_is("Failed"), timeout=TRAIN, desc="Failed", failed_ok=True)
        why = condition(failed, "Failed")
        assert why["reason"] == reason and why["message"].startswith("pre-flight: trainer exited with code "), why
        assert all(part in why["message"] for part in said), (case, why)
        assert condition(failed, "Validated")["status"] == "False" and not status(failed).get("restarts")
        [pod] = recorder.of_job(case)
        assert is_preflight(pod) and pod["spec"]["nodeName"] == NODE_NAME, pod["spec"].get("nodeName")
        ended = recorder.wait_terminated(pod["metadata"]["uid"], timeout=30)
        code = {"DataError": 65, "ConfigError": 78}[reason]
        assert ended["exitCode"] == code and ended["message"].count("\n") == 1, ended
        assert ended["message"].strip() in why["message"], (ended, why)
        assert job_of(cp, ns, case) is None, "never a trainer Job"
        warnings = [e for e in events_of(cp, ns, case) if e["type"] == "Warning"]
        assert [e["reason"] for e in warnings] == [reason], warnings


@pytest.mark.timeout(600)
def test_a_pod_that_cannot_start_is_named_at_once_and_fails_the_job_after_the_start_timeout(
    control_plane: ControlPlane, release: Release, storage: NodeStorage, recorder: PodRecorder,
    node_images: ProductImages,
) -> None:
    """Scenarios 5 and 6: the kubelet's CreateContainerConfigError (a Secret, or a key of an existing Secret, that
    the pod reads is missing) and ErrImagePull/ImagePullBackOff (an image the node lacks; pulls go to a closed port
    on loopback and fail at once). Each is named in a condition (the Secret, key and field; the image) with a Warning
    Event within SURFACED seconds of the kubelet's report, and the job fails START_TIMEOUT seconds after the
    kubelet took the pod on: the decision (operator/README.md, "Failures a kubelet reports") is to wait that long
    for a Secret that GitOps or an external-secrets controller may still deliver, then fail and free the node."""
    cp, ns = control_plane, release.watched[0]
    cp.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub"}, "stringData": {"other": "x"}})
    missing_image = node_images.trainer.rsplit(":", 1)[0] + ":no-such-tag"
    # name: (the change to the example, the reason, what the first report names, what the kubelet's next try names)
    cases = {
        "no-secret": ({"credentials": {"hubToken": {"name": "hub-missing", "key": "token"}}},
                      "CreateContainerConfigError", ('Secret "hub-missing"', 'key "token"'),
                      'Secret "hub-missing" does not exist (spec.credentials.hubToken needs its key "token")'),
        "no-key": ({"credentials": {"hubToken": {"name": "hub", "key": "token"}}}, "CreateContainerConfigError",
                   ('Secret "hub"', 'key "token"'), 'Secret "hub" has no key "token" (spec.credentials.hubToken)'),
        "no-image": ({"resources": {"image": missing_image}}, "ImagePullBackOff",
                     (f'cannot pull image "{missing_image}": ', "127.0.0.1:9"),
                     f'cannot pull image "{missing_image}": '),
    }
    for name, (spec, *_) in cases.items():
        apply(cp, sentiment_job(name, ns, samples=8 * BATCH, checkpoint_every=4, **spec, **NO_PREFLIGHT))

    # The three start together, and each fails START_TIMEOUT seconds after its pod was accepted: one polling pass
    # over all three records what each condition said first, and when it first named what is missing (a kubelet may
    # try before the Node authorizer lets it read the Secret at all: "failed to sync secret cache" names no Secret,
    # and the first report lists every Secret and key the pod reads; its next try, seconds later, names the missing
    # one), so that no job's early states are missed while the test looks at another.
    first: dict[str, dict[str, Any]] = {}  # job -> its Running condition when it first had the job's reason
    named_at: dict[str, dict[str, Any]] = {}  # job -> its Running condition when it first named the missing piece

    def watched_all() -> bool:
        for name, (_, reason, _, named) in cases.items():
            running = next((c for c in status(get_ftj(cp, ns, name)).get("conditions") or []
                            if c["type"] == "Running"), None)
            if running is not None and running.get("reason") == reason:
                first.setdefault(name, running)
                if named in running["message"]:
                    named_at.setdefault(name, running)
        return len(named_at) == len(cases)

    cp.wait_for(watched_all, timeout=120 + KUBELET_RETRY, interval=1.0,
                desc=f"each job's Running=False condition naming what is missing (first: {sorted(first)}, "
                     f"named: {sorted(named_at)})")

    for name, (_, reason, first_named, named) in cases.items():
        [pod] = recorder.of_job(name)
        kubelet = {"CreateContainerConfigError": ("CreateContainerConfigError",),
                   "ImagePullBackOff": ("ErrImagePull", "ImagePullBackOff")}[reason]
        reported = min(t for (uid, r), t in recorder.first_seen.items()
                       if uid == pod["metadata"]["uid"] and r in kubelet)
        running = first[name]
        assert parse_time(running["lastTransitionTime"]) <= reported + SURFACED, (running, reported)
        assert running["message"].startswith(f"pod {pod['metadata']['name']} "), running
        assert all(part in running["message"] for part in first_named), running
        assert f"the job fails if a pod cannot start for {START_TIMEOUT}s" in running["message"], running
        warnings = [e for e in events_of(cp, ns, name) if e["reason"] == reason and e["message"].startswith("Pending")]
        assert 1 <= len(warnings) <= 2 and all(e["type"] == "Warning" for e in warnings), warnings
        assert all(part in warnings[0]["message"] for part in first_named), warnings
        # One Warning Event names what is missing: the first, if the kubelet's first report named it already, else
        # one more once the condition has learned it (a vague first report: "failed to sync secret cache").
        said = cp.wait_for(lambda n=name, r=reason, m=named: [  # type: ignore[misc]
            e for e in events_of(cp, ns, n) if e["reason"] == r and e["message"].startswith("Pending")
            and m in e["message"]] or None, timeout=SURFACED, desc=f"a {reason} Event saying: {named}")
        assert len(said) == 1 and said[0]["type"] == "Warning", said

    for name, (_, reason, _, named) in cases.items():
        pod = recorder.of_job(name)[0]
        accepted = parse_time(pod["status"]["startTime"])
        failed = wait_ftj(cp, ns, name, phase_is("Failed"), timeout=START_TIMEOUT + LATE + 60, desc="Failed",
                          failed_ok=True)
        why = condition(failed, "Failed")
        assert why["reason"] == reason and named in why["message"], why
        assert accepted + START_TIMEOUT - 1 <= parse_time(why["lastTransitionTime"]) <= \
            accepted + START_TIMEOUT + LATE, (why, pod["status"]["startTime"])
        cp.wait_for(lambda n=name: job_of(cp, ns, n) is None and not pods_of(cp, ns, n), timeout=60,  # type: ignore[misc]
                    desc=f"the Job of {name} and its pod deleted")
        assert [e["type"] for e in events_of(cp, ns, name) if e["message"].startswith("Failed:")] == ["Warning"]


def _exec_python(cp: ControlPlane, ns: str, pod: str, code: str) -> Any:
    out = cp.kubectl("-n", ns, "exec", pod, "-c", "trainer", "--", "python", "-c", code).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.timeout(1200)
def test_two_cpu_workers_rendezvous_over_cluster_dns_and_a_killed_worker_restarts_the_group_once(
    control_plane: ControlPlane, real_node: RealNode, release: Release, storage: NodeStorage,
    recorder: PodRecorder,
) -> None:
    """Scenario 8: ``workers: 2`` puts two pods on the node (900m each: both fit beside the operator and CoreDNS,
    and each trainer runs one thread, the whole CPUs of its limit); torchrun's rendezvous goes to ``<job>-0.<job>``
    (the headless Service) resolved by CoreDNS; both ranks train one group and rank 0 writes each checkpoint once.
    Then worker 1 is killed mid-run (its container's process, SIGKILL from the node, as a crash or the OOM killer
    would): the operator stops the survivor and restarts the whole group once, both new workers resume from the
    latest checkpoint, and the job ends Succeeded."""
    cp, ns, name, every, steps = control_plane, release.watched[0], "pair", 3, 40
    apply(cp, sentiment_job(name, ns, samples=2 * steps * BATCH, checkpoint_every=every,
                            resources={"workers": 2, "cpu": "900m"}, **NO_PREFLIGHT))
    _first_checkpoint(cp, storage, ns, name)
    pods = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
            for p in live_pods(cp, ns, name)}
    assert sorted(pods) == ["0", "1"] and {p["spec"]["nodeName"] for p in pods.values()} == {NODE_NAME}
    folder = storage.host_path(f"pvc://runs/{name}/checkpoints")

    # Kill worker 1 from the node, as a crash would, at once: the group is mid-run (its rendezvous and the checks of
    # it are asserted on the restarted group below).
    victim = pods["1"]
    container = victim["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    latest = max(checkpoint_steps(folder))
    subprocess.run([*real_node.ctr(), "-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", container],
                   check=True, capture_output=True, timeout=30)
    killed = recorder.wait_terminated(victim["metadata"]["uid"], timeout=60)
    assert killed["exitCode"] == 137, killed
    # The operator says why in a Warning Event. (Its Running=False/RestartingWorkers condition may last a single
    # pass: on gloo the survivor exits 76 moments after the crash, so the group may have stopped by itself before
    # the operator looks, and the Job controller starts both workers again.)
    restarting = cp.wait_for(lambda: next((e for e in events_of(cp, ns, name) if e["reason"] == "RestartingWorkers"),
                                          None), timeout=60, desc="the RestartingWorkers Event")
    assert f"worker 1 (pod {victim['metadata']['name']}) exited with code 137" in restarting["message"], restarting
    # The survivor is stopped before the group starts again: a whole-group restart, not a new worker 1 beside it.
    survivor = pods["0"]
    stopped = recorder.wait_terminated(survivor["metadata"]["uid"], timeout=120)
    old = {p["metadata"]["uid"] for p in pods.values()}
    new = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
           for p in _replacement(cp, ns, name, old, count=2)}
    assert sorted(new) == ["0", "1"], new
    assert all(parse_time(p["metadata"]["creationTimestamp"]) >= parse_time(stopped["finishedAt"]) - 1
               for p in new.values()), (stopped, [p["metadata"]["creationTimestamp"] for p in new.values()])
    # Both ranks resume from the same checkpoint, at or after the last one before the kill: rank 0 says so and trains
    # on from the next step; rank 1 (which logs nothing else at INFO) says where it starts too.
    log = wait_first_step(cp, ns, new["0"]["metadata"]["name"], timeout=TRAIN)
    assert log.resumed_from is not None and log.resumed_from >= latest and log.steps[0] == log.resumed_from + 1, \
        log.text[-3000:]
    rank1 = cp.wait_for(lambda: (lambda t: t if t.resumed_from is not None else None)(
        trainer_log(cp, ns, new["1"]["metadata"]["name"])), timeout=60, interval=2,
        desc="rank 1 to say where it resumed", ignore=(Exception,))
    assert rank1.resumed_from == log.resumed_from, rank1.text[-3000:]
    command = new["1"]["spec"]["containers"][0]["command"]
    assert f"--master_addr={name}-0.{name}" in command and "--node_rank=$(JOB_COMPLETION_INDEX)" in command
    # Worker 1 finds worker 0 by that name through CoreDNS (ClusterFirst: the search path of its namespace).
    seen = _exec_python(cp, ns, new["1"]["metadata"]["name"], (
        f"import json, socket; print(json.dumps({{'rendezvous': socket.gethostbyname('{name}-0.{name}'), "
        "'resolv': open('/etc/resolv.conf').read()}))"))
    rank0 = next(p for p in live_pods(cp, ns, name) if p["metadata"]["uid"] == new["0"]["metadata"]["uid"])
    assert seen["rendezvous"] == rank0["status"]["podIP"], seen
    assert "nameserver 10.96.0.10" in seen["resolv"] and f"search {ns}.svc.cluster.local" in seen["resolv"], seen
    # One group of two processes: rank 0 says so, and rank 1 takes part in every step (its gradients are averaged
    # in; without it rank 0 would wait in the first all-reduce).
    assert re.search(r"job pair: .*, 2 process\(es\), device cpu, 1 thread\(s\)", log.text), log.text[-3000:]
    done = wait_ftj(cp, ns, name, phase_is("Succeeded"), timeout=TRAIN, desc="Succeeded")
    assert status(done)["restarts"] == 1, status(done)
    assert status(done)["progress"]["step"] == status(done)["progress"]["totalSteps"] == steps
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in sorted(checkpoint_steps(folder))], "one checkpoint per step, each complete"
    assert [recorder.wait_terminated(new[i]["metadata"]["uid"], timeout=30)["exitCode"] for i in "01"] == [0, 0]
    job = job_of(cp, ns, name)
    assert job is not None and (job["status"].get("failed") or 0) <= 1, job["status"]
    restarts = [e for e in events_of(cp, ns, name) if e["reason"] == "RestartingWorkers"]
    assert len(restarts) == 1 and restarts[0]["type"] == "Warning", restarts
