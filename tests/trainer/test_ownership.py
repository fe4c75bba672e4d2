"""A job resumes only its own checkpoints and never overwrites another job's model.

The fingerprint follows what changes the arithmetic and nothing else; `ownership.problem` reads the records where a
job would write and refuses anyone else's, and the real trainer, run as `finetune run` runs it, stops with exit 78
before it writes anything. `model.initFrom` is the explicit way to start from another run's weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import exitcodes
from finetune_api.manifest import FineTuneJob
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import ownership
from finetune_trainer.errors import ConfigError
from finetune_trainer.locations import Storage
from finetune_trainer.ownership import RECORD, Fingerprint, Identity, Record
from tests.trainer import support

SPEC: dict[str, Any] = {
    "task": {"type": "causal-lm"},
    "model": {"source": "pvc://models/gpt2"},
    "dataset": {"train": "pvc://data/train.jsonl"},
    "hyperparameters": {"maxSteps": 20, "batchSize": 4, "learningRate": 1e-4, "maxSeqLength": 32},
    "checkpointing": {"everySteps": 10},
    "output": {"storage": "pvc://runs/shared"},
}


def job(name: str = "job-a", spec: dict[str, Any] | None = None, namespace: str | None = "ml",
        uid: str | None = "uid-a") -> FineTuneJob:
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {}),
                            **({"uid": uid} if uid else {})}
    return FineTuneJob.model_validate({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": meta, "spec": spec or SPEC})


def changed(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return spec


@pytest.fixture
def pvc(tmp_path: Path) -> Path:
    root = tmp_path / "pvc"
    support.write_jsonl(root / "data" / "train.jsonl", support.qa_rows(16))
    return root


def fingerprint(pvc: Path, spec: dict[str, Any] | None = None) -> Fingerprint:
    return ownership.for_job(job(spec=spec), pvc)[1]


# ----------------------------------------------------------------------------------------------- the fingerprint
@pytest.mark.parametrize(("path", "value"), [
    ("checkpointing.everySteps", 5), ("checkpointing.keepLast", 7), ("checkpointing.storage", "pvc://ckpt/a"),
    ("output.storage", "pvc://runs/elsewhere"), ("tracking.tensorboard", False), ("resources.workers", 4),
    ("resources.gpusPerWorker", 0), ("resources.sharding", "none"), ("runPolicy.backoffLimit", 9),
    ("hyperparameters.evalEverySteps", 5), ("hyperparameters.activationCheckpointing", True),
    ("hyperparameters.learningRate", 1e-4), ("model.trustRemoteCode", False), ("method", {"type": "full"}),
])
def test_what_does_not_change_the_arithmetic_keeps_the_fingerprint(pvc: Path, path: str, value: Any) -> None:
    assert fingerprint(pvc, changed(path, value)) == fingerprint(pvc)


@pytest.mark.parametrize(("path", "value", "said"), [
    ("hyperparameters.learningRate", 2e-4, "hyperparameters.learningRate: 0.0001 -> 0.0002"),
    ("hyperparameters.maxSteps", 30, "hyperparameters.maxSteps: 20 -> 30"),
    ("hyperparameters.seed", 1, "hyperparameters.seed: the default (42) -> 1"),
    ("hyperparameters.precision", "bf16", "hyperparameters.precision: the default (\"auto\") -> \"bf16\""),
    ("model.source", "pvc://models/other", "model.source"),
    ("model.revision", "v2", "model.revision"),
    ("model.initFrom", "pvc://runs/a/checkpoints", "model.initFrom"),
    ("dataset.maxSamples", 8, "dataset.maxSamples"),
    ("method", {"type": "lora"}, "method.type"),
    ("task", {"type": "seq2seq"}, "task.type"),
])
def test_what_changes_the_arithmetic_changes_the_fingerprint(pvc: Path, path: str, value: Any, said: str) -> None:
    other = fingerprint(pvc, changed(path, value))
    assert other != fingerprint(pvc)
    assert any(said in d for d in ownership.differences(fingerprint(pvc).trajectory, other.trajectory))


def test_the_fingerprint_follows_the_data_content_not_its_timestamps(pvc: Path) -> None:
    before = fingerprint(pvc)
    train = pvc / "data" / "train.jsonl"
    text = train.read_text()
    train.write_text(text)  # rewritten, same bytes
    assert fingerprint(pvc) == before
    train.write_text(text.replace("red", "blue", 1))  # same size, other content
    after = fingerprint(pvc)
    assert after != before
    assert ownership.differences(before.trajectory, after.trajectory) == ["the content of dataset.train changed"]


def test_a_manifest_with_every_default_written_out_has_the_same_fingerprint(pvc: Path) -> None:
    """The operator's ConfigMap carries the spec with every default filled in; `finetune run` reads the manifest as
    written. Both are the same training."""
    full = FineTuneJobSpec.model_validate(SPEC).model_dump(by_alias=True, mode="json", exclude_none=True)
    assert fingerprint(pvc, full) == fingerprint(pvc)
    assert fingerprint(pvc, changed("method", {"type": "lora", "lora": {"r": 8}})) == \
        fingerprint(pvc, changed("method", {"type": "lora"}))


# ----------------------------------------------------------------------------------------------------- verdicts
def claimed(folder: Path, owner: Identity, fp: Fingerprint) -> Storage:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).write_text(Record(owner, fp, "2026-01-01T00:00:00Z").text())
    return Storage(f"pvc://runs/{folder.name}", folder)


def test_nothing_there_or_this_jobs_own_record_is_no_problem(pvc: Path, tmp_path: Path) -> None:
    me, fp = ownership.for_job(job(), pvc)
    assert ownership.problem(Storage("pvc://runs/new", tmp_path / "new"), me, fp) is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert ownership.problem(Storage("pvc://runs/empty", tmp_path / "empty"), me, fp) is None
    mine = claimed(tmp_path / "mine", me, fp)
    (tmp_path / "mine" / "model.safetensors").write_bytes(b"x")
    assert ownership.problem(mine, me, fp) is None
    # Deleted and applied again (a GitOps re-sync): a new uid, the same namespace/name and fingerprint continues.
    assert ownership.problem(mine, Identity("ml", "job-a", "uid-new"), fp) is None


def test_another_jobs_storage_is_refused_naming_the_path_the_writer_and_what_to_do(pvc: Path, tmp_path: Path) -> None:
    a, fp_a = ownership.for_job(job(), pvc)
    b, fp_b = ownership.for_job(job("job-b", changed("hyperparameters.learningRate", 5e-5), uid="uid-b"), pvc)
    storage = claimed(tmp_path / "shared", a, fp_a)
    message = ownership.problem(storage, b, fp_b, "output.storage")
    assert message is not None
    for said in (f"output.storage pvc://runs/shared ({tmp_path / 'shared'})", "FineTuneJob ml/job-a (uid uid-a)",
                 "written 2026-01-01T00:00:00Z", "this job is FineTuneJob ml/job-b (uid uid-b)",
                 "another spec.output.storage", "spec.model.initFrom"):
        assert said in message, (said, message)
    # The same name in another namespace is another job, even with the same training.
    assert ownership.problem(storage, Identity("other", "job-a", "uid-a"), fp_a) is not None


def test_the_same_name_with_another_training_is_refused_naming_what_differs(pvc: Path, tmp_path: Path) -> None:
    a, fp_a = ownership.for_job(job(), pvc)
    _, fp_changed = ownership.for_job(job(spec=changed("hyperparameters.learningRate", 5e-5), uid="uid-2"), pvc)
    message = ownership.problem(claimed(tmp_path / "shared", a, fp_a), Identity("ml", "job-a", "uid-2"), fp_changed)
    assert message is not None and "hyperparameters.learningRate: 0.0001 -> the default (5e-05)" in message


def test_what_no_record_claims_is_refused(pvc: Path, tmp_path: Path) -> None:
    me, fp = ownership.for_job(job(), pvc)
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (legacy / "checkpoints" / "checkpoint-20" / "COMPLETE").write_text("{}")
    message = ownership.problem(Storage("pvc://runs/legacy", legacy), me, fp)
    assert message is not None and "the folder checkpoints/ without a finetune-owner.json" in message
    message = ownership.problem(Storage("pvc://runs/legacy/checkpoints", legacy / "checkpoints"), me, fp,
                                "checkpointing.storage")
    assert message is not None and "checkpoint-20" in message and "a complete checkpoint" in message
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text("{}")
    message = ownership.problem(Storage("pvc://runs/files", tmp_path / "files"), me, fp)
    assert message is not None and "the file config.json" in message


def test_every_record_inside_is_judged_too(pvc: Path, tmp_path: Path) -> None:
    """A checkpoint of another job copied into this job's storage, another job's output nested in this one, an
    unreadable record: refused, naming the folder."""
    me, fp = ownership.for_job(job(), pvc)
    other, fp_other = ownership.for_job(job("job-b", uid="uid-b"), pvc)
    mine = claimed(tmp_path / "mine", me, fp)
    claimed(tmp_path / "mine" / "checkpoint-10", other, fp_other)
    message = ownership.problem(mine, me, fp, "checkpointing.storage")
    assert message is not None and "pvc://runs/mine/checkpoint-10" in message and "ml/job-b" in message
    claimed(tmp_path / "parent", me, fp)
    claimed(tmp_path / "parent" / "nested", other, fp_other)
    message = ownership.problem(Storage("pvc://runs/parent", tmp_path / "parent"), me, fp)
    assert message is not None and "pvc://runs/parent/nested" in message
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / RECORD).write_text("{not json")
    message = ownership.problem(Storage("pvc://runs/broken", tmp_path / "broken"), me, fp)
    assert message is not None and "cannot be read" in message


def test_remote_storage_is_judged_by_its_remote_records(pvc: Path, tmp_path: Path) -> None:
    """For s3:// the bucket is the truth (file:// stands in for it): a record there refuses a job whose local
    staging is empty."""
    a, fp_a = ownership.for_job(job(), pvc)
    b, fp_b = ownership.for_job(job("job-b", uid="uid-b"), pvc)
    bucket = tmp_path / "bucket"
    claimed(bucket / "out", a, fp_a)
    remote = Storage("s3://bucket/out", tmp_path / "staging-b", f"file://{bucket / 'out'}")
    message = ownership.problem(remote, b, fp_b)
    assert message is not None and "ml/job-a" in message
    assert ownership.problem(Storage("s3://bucket/new", tmp_path / "staging", f"file://{bucket / 'new'}"), b,
                             fp_b) is None


def test_of_two_jobs_claiming_at_once_only_one_wins(pvc: Path, tmp_path: Path) -> None:
    """Both found the storage empty; the second claim finds the first's record and is refused."""
    a, fp_a = ownership.for_job(job(), pvc)
    b, fp_b = ownership.for_job(job("job-b", uid="uid-b"), pvc)
    storage = Storage("pvc://runs/race", tmp_path / "race")
    assert ownership.problem(storage, a, fp_a) is None and ownership.problem(storage, b, fp_b) is None
    ownership.claim(storage, Record.of(a, fp_a), a, fp_a)
    with pytest.raises(ConfigError, match="ml/job-a"):
        ownership.claim(storage, Record.of(b, fp_b), b, fp_b)
    assert Record.parse((tmp_path / "race" / RECORD).read_bytes()).owner == a
    # The same job claiming again (a restarted pod) changes nothing; re-applied, the record takes the new uid.
    ownership.claim(storage, Record.of(a, fp_a), a, fp_a)
    again = Identity("ml", "job-a", "uid-new")
    ownership.claim(storage, Record.of(again, fp_a), again, fp_a)
    assert Record.parse((tmp_path / "race" / RECORD).read_bytes()).owner == again


# ------------------------------------------------------------------------------------------- the real trainer
def manifest(path: Path, name: str, spec: dict[str, Any], uid: str | None) -> Path:
    meta = {"name": name, "namespace": "ml", **({"uid": uid} if uid else {})}
    path.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": meta, "spec": spec}, sort_keys=False))
    return path


def tree(folder: Path) -> dict[str, str]:
    """Every file below `folder` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(job_file: Path, termination: Path) -> tuple[int, str]:
    from finetune_trainer.__main__ import main

    termination.unlink(missing_ok=True)
    code = main([str(job_file), "--no-progress-bar"])
    return code, termination.read_text() if termination.exists() else ""


@pytest.mark.slow
def test_two_jobs_on_one_storage_neither_resumes_nor_overwrites_the_other(models: dict[str, Path],
                                                                          isolated: Path) -> None:
    """The review's scenario through the real trainer: job-a (20 steps, lr 1e-4), then job-b (30 steps, lr 5e-5) on
    the same output.storage. job-b is refused before it writes anything; job-a's model and checkpoints are untouched.
    job-a applied again under a new uid continues; a changed job-a is refused; `model.initFrom` starts job-c from
    job-a's weights, and refuses weights that do not fit its model."""
    data = support.write_jsonl(isolated / "train.jsonl", support.qa_rows(64))
    shared = isolated / "shared"
    spec = {"task": {"type": "causal-lm"}, "model": {"source": str(models["gpt2"])}, "dataset": {"train": str(data)},
            "hyperparameters": {"maxSteps": 20, "batchSize": 4, "learningRate": 1e-4, "maxSeqLength": 32},
            "checkpointing": {"everySteps": 10}, "output": {"storage": str(shared)}}
    termination = isolated / "termination-log"
    code, said = run(manifest(isolated / "a.yaml", "job-a", spec, "uid-a"), termination)
    assert code == 0, said
    before = tree(shared)
    assert {RECORD, f"checkpoints/{RECORD}", f"checkpoints/checkpoint-20/{RECORD}"} <= set(before)
    done = json.loads((shared / "checkpoints" / "checkpoint-20" / "COMPLETE").read_text())
    assert RECORD in done["files"], "the record is part of the checkpoint, sized in its marker"

    spec_b = {**spec, "hyperparameters": {**spec["hyperparameters"], "maxSteps": 30, "learningRate": 5e-5}}
    code, said = run(manifest(isolated / "b.yaml", "job-b", spec_b, "uid-b"), termination)
    assert code == exitcodes.CONFIG_ERROR
    assert f"output.storage {shared} holds the checkpoints or model of FineTuneJob ml/job-a (uid uid-a)" in said
    assert "this job is FineTuneJob ml/job-b (uid uid-b)" in said and "spec.model.initFrom" in said
    assert tree(shared) == before, "job-b wrote into job-a's storage"

    # job-a deleted and applied again with the same spec (a new uid): it continues from its own checkpoint.
    code, said = run(manifest(isolated / "a2.yaml", "job-a", spec, "uid-a2"), termination)
    assert code == 0, said
    assert json.loads((shared / "metrics.json").read_text())["resumedFrom"] == 20
    assert Record.parse((shared / RECORD).read_bytes()).owner == Identity("ml", "job-a", "uid-a2")
    # job-a applied again with another learning rate: refused, saying what changed.
    code, said = run(manifest(isolated / "a3.yaml", "job-a", {**spec_b, "hyperparameters": {
        **spec["hyperparameters"], "learningRate": 5e-5}}, "uid-a3"), termination)
    assert code == exitcodes.CONFIG_ERROR and "hyperparameters.learningRate: 0.0001 -> the default (5e-05)" in said

    # job-c starts from job-a's weights (its checkpoint storage: the newest checkpoint), with a learning rate too
    # small to move them: its model is job-a's step 20, its optimizer and schedule its own.
    from safetensors.torch import load_file

    spec_c = {**spec, "model": {**spec["model"], "initFrom": str(shared / "checkpoints")},
              "hyperparameters": {**spec["hyperparameters"], "maxSteps": 3, "learningRate": 1e-12},
              "output": {"storage": str(isolated / "c")}}
    code, said = run(manifest(isolated / "c.yaml", "job-c", spec_c, "uid-c"), termination)
    assert code == 0, said
    doc = json.loads((isolated / "c" / "metrics.json").read_text())
    assert doc["resumedFrom"] is None and doc["step"] == 3
    start = load_file(str(shared / "checkpoints" / "checkpoint-20" / "model.safetensors"))
    fresh = load_file(str(models["gpt2"] / "model.safetensors"))
    out = load_file(str(isolated / "c" / "model.safetensors"))
    import torch

    moved = [k for k in out if k in start and not torch.equal(start[k], fresh.get(k, start[k]))]
    assert moved, "job-a's training moved no weight"
    assert all(torch.allclose(out[k], start[k], atol=1e-6) for k in moved)
    # Weights that do not fit: job-a's full checkpoint into a LoRA model.
    spec_d = {**spec_c, "method": {"type": "lora"}, "output": {"storage": str(isolated / "d")}}
    code, said = run(manifest(isolated / "d.yaml", "job-d", spec_d, "uid-d"), termination)
    assert code == exitcodes.CONFIG_ERROR
    assert f"spec.model.initFrom {shared / 'checkpoints'}" in said and "same model.source and method" in said


@pytest.mark.slow
def test_a_local_run_is_its_manifests_name_without_a_uid(models: dict[str, Path], isolated: Path) -> None:
    """`finetune run` of the same manifest again continues; the record says it was a local run."""
    data = support.write_jsonl(isolated / "train.jsonl", support.qa_rows(16))
    spec = {"task": {"type": "causal-lm"}, "model": {"source": str(models["gpt2"])}, "dataset": {"train": str(data)},
            "hyperparameters": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 32},
            "output": {"storage": str(isolated / "out")}}
    local = support.manifest(isolated / "job.yaml", spec, name="local")
    termination = isolated / "termination-log"
    assert run(local, termination)[0] == 0
    record = Record.parse((isolated / "out" / RECORD).read_bytes())
    assert record.owner == Identity(None, "local", None) and "a local run" in record.owner.describe()
    assert run(local, termination)[0] == 0
    assert json.loads((isolated / "out" / "metrics.json").read_text())["resumedFrom"] == 4
