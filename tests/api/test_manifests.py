"""The FineTuneJob models: examples validate, and malformed manifests are rejected with the field and the rule."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api.manifest import validate_document, validate_files
from finetune_api.spec import FineTuneJobSpec, checkpoint_storage, metric_mode, output_model, resolved_columns

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

BASE = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bad-input"},
    "spec": {
        "task": {"type": "sequence-classification", "labels": ["neg", "pos"]},
        "model": {"source": "pvc://models/minilm"},
        "dataset": {"train": "pvc://data/train.jsonl"},
        "hyperparameters": {"epochs": 1},
        "output": {"storage": "pvc://runs/out"},
    },
}


def _with(doc: dict, path: str, value: object) -> dict:
    """Set one more dotted path on an already mutated copy."""
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


def mutate(path: str, value: object, *, delete: bool = False) -> dict:
    """Copy BASE and set (or delete) the value at a dotted path."""
    doc = copy.deepcopy(BASE)
    if not delete:
        return _with(doc, path, value)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node.pop(last)
    return doc


def evaluated(**sections: object) -> dict:
    """BASE with validation data and an evaluation cadence (what checkpointing.selectBest needs), and `sections`
    replacing top-level spec sections."""
    doc = copy.deepcopy(BASE)
    doc["spec"]["dataset"]["validation"] = "pvc://data/validation.jsonl"
    doc["spec"]["hyperparameters"]["evalEverySteps"] = 50
    for key, value in sections.items():
        if key == "hyperparameters":  # merged; None removes a key
            hp = {**doc["spec"]["hyperparameters"], **value}  # type: ignore[dict-item]
            doc["spec"]["hyperparameters"] = {k: v for k, v in hp.items() if v is not None}
        else:
            doc["spec"][key] = value
    return doc


# Valid uses of the selection and tracking fields and of model.initFrom (both validators accept them; see also the
# server test).
SELECTION_OK = [
    ("best by accuracy, early stopping, best output", evaluated(
        checkpointing={"selectBest": {"metric": "accuracy"}}, earlyStopping={"patience": 2, "minDelta": 0.001},
        output={"storage": "pvc://runs/out", "model": "best"})),
    ("regression by mse, last output", evaluated(
        task={"type": "sequence-classification", "numLabels": 1},
        checkpointing={"selectBest": {"metric": "mse", "mode": "min"}}, output={"storage": "o", "model": "last"})),
    ("causal-lm by perplexity on a validation split", {**BASE, "spec": {
        **BASE["spec"], "task": {"type": "causal-lm"}, "dataset": {"train": "t.jsonl", "validationSplit": 0.1},
        "hyperparameters": {"maxSteps": 100, "evalEverySteps": 10},
        "checkpointing": {"selectBest": {"metric": "perplexity"}}}}),
    ("dpo by reward accuracy, over-long pairs dropped", {**BASE, "spec": {
        **BASE["spec"], "task": {"type": "dpo", "dpo": {"beta": 0.2, "lossType": "ipo", "maxPromptLength": 64}},
        "dataset": {"train": "t.jsonl", "validationSplit": 0.1, "overLong": "drop",
                    "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        "method": {"type": "lora"}, "hyperparameters": {"maxSteps": 100, "evalEverySteps": 10},
        "checkpointing": {"selectBest": {"metric": "rewardAccuracy"}}}}),
    ("initFrom another run's checkpoint (a sibling of the output, not inside it)", mutate(
        "spec.model.initFrom", "pvc://runs/out-2/checkpoints/checkpoint-20")),
    ("mlflow with login, tensorboard off", mutate("spec.tracking", {"tensorboard": False, "mlflow": {
        "trackingUri": {"name": "mlflow", "key": "uri"}, "username": {"name": "mlflow", "key": "user"},
        "password": {"name": "mlflow", "key": "password"}, "experiment": "sentiment"}})),
]


# (description, document, expected field path, expected words in the message)
MALFORMED = [
    ("missing model", mutate("spec.model", None, delete=True), "spec.model", "Field required"),
    ("negative learning rate", mutate("spec.hyperparameters.learningRate", -0.1), "spec.hyperparameters.learningRate",
     "greater than 0"),
    ("unknown task", mutate("spec.task.type", "image-generation"), "spec.task.type", "sequence-classification"),
    ("both epochs and maxSteps", mutate("spec.hyperparameters.maxSteps", 100), "spec.hyperparameters",
     "exactly one of hyperparameters.epochs or hyperparameters.maxSteps"),
    ("neither epochs nor maxSteps", mutate("spec.hyperparameters.epochs", None, delete=True), "spec.hyperparameters",
     "exactly one of"),
    ("validationSplit 1.5", mutate("spec.dataset.validationSplit", 1.5), "spec.dataset.validationSplit",
     "less than 1"),
    ("secret given inline", mutate("spec.credentials", {"hubToken": "hf_abcdef"}), "spec.credentials.hubToken",
     "SecretKeyRef"),
    ("secret in another namespace", mutate("spec.credentials", {"hubToken": {"name": "t", "key": "k",
                                                                            "namespace": "other"}}),
     "spec.credentials.hubToken.namespace", "Extra inputs are not permitted"),
    ("unknown field", mutate("spec.hyperparameters.learning_rate_typo", 0.1), "spec.hyperparameters."
     "learning_rate_typo", "Extra inputs are not permitted"),
    ("classification without labels", mutate("spec.task.labels", None, delete=True), "spec.task",
     "exactly one of task.labels or task.numLabels"),
    ("labels and numLabels", mutate("spec.task.numLabels", 2), "spec.task", "exactly one of task.labels"),
    ("causal-lm column on a classifier", mutate("spec.dataset.columns", {"prompt": "question"}), "spec",
     "dataset.columns names a column that the task does not use"),
    ("validation and validationSplit", mutate("spec.dataset", {"train": "a.jsonl", "validation": "b.jsonl",
                                                               "validationSplit": 0.1}), "spec.dataset",
     "mutually exclusive"),
    ("duplicate labels", mutate("spec.task.labels", ["a", "a"]), "spec.task.labels", "unique"),
    ("lora settings with full method", mutate("spec.method", {"type": "full", "lora": {"r": 8}}), "spec.method",
     "method.lora applies only to method.type lora"),
    ("malformed pvc uri", mutate("spec.model.source", "pvc://Bad_Claim/x"), "spec.model", "pvc://<claim-name>"),
    ("zero workers", mutate("spec.resources.workers", 0), "spec.resources.workers", "greater than or equal to 1"),
    ("gpus per worker over 16", mutate("spec.resources.gpusPerWorker", 64), "spec.resources.gpusPerWorker",
     "less than or equal to 16"),
    ("bad precision", mutate("spec.hyperparameters.precision", "fp8"), "spec.hyperparameters.precision", "bf16"),
    ("name too long for children", mutate("metadata.name", "x" * 60), "metadata.name", "at most 52"),
    ("name not a DNS label", mutate("metadata.name", "My_Job"), "metadata.name", "DNS-1035"),
    ("oversized model source", mutate("spec.model.source", "m" * 5000), "spec.model.source", "at most 1024"),
    ("wrong type for batchSize", mutate("spec.hyperparameters.batchSize", "many"), "spec.hyperparameters.batchSize",
     "valid integer"),
    ("bad memory quantity", mutate("spec.resources.memory", "lots"), "spec.resources.memory", "quantity"),
    ("control character in a path", mutate("spec.dataset.train", "a\nb"), "spec.dataset.train",
     "string should match pattern"),
    ("checkpointing that never checkpoints", mutate("spec.checkpointing", {"everyEpoch": False}),
     "spec.checkpointing", "nothing could be resumed"),
    ("unknown sharding", mutate("spec.resources", {"sharding": "zero3"}), "spec.resources.sharding", "fsdp"),
    ("fsdp on one process", mutate("spec.resources", {"sharding": "fsdp", "workers": 1, "gpusPerWorker": 1}),
     "spec.resources", "sharding fsdp needs more than one process"),
    ("unknown quantization", mutate("spec.method", {"type": "lora", "lora": {"quantization": "2bit"}}),
     "spec.method.lora.quantization", "4bit"),
    ("quantization with full fine-tuning", mutate("spec.method", {"type": "full", "lora": {"quantization": "4bit"}}),
     "spec.method", "method.lora applies only to method.type lora"),
    ("QLoRA without GPUs", _with(mutate("spec.method", {"type": "lora", "lora": {"quantization": "4bit"}}),
                                 "spec.resources", {"gpusPerWorker": 0}),
     "spec", "quantization (QLoRA) needs a CUDA GPU"),
    ("QLoRA sharded", _with(mutate("spec.method", {"type": "lora", "lora": {"quantization": "4bit"}}),
                            "spec.resources", {"sharding": "fsdp", "workers": 2}),
     "spec", "quantization cannot be combined with resources.sharding fsdp"),
    ("seq2seq sharded", _with(mutate("spec.task", {"type": "seq2seq"}), "spec.resources",
                              {"sharding": "fsdp", "workers": 2}),
     "spec", "fsdp is not available for task seq2seq"),
    ("activationCheckpointing not a bool", mutate("spec.hyperparameters.activationCheckpointing", "sometimes"),
     "spec.hyperparameters.activationCheckpointing", "boolean"),
    ("wrong kind", mutate("kind", "TrainJob"), "kind", "must be FineTuneJob"),
    ("selectBest by a metric the task does not report", evaluated(checkpointing={"selectBest": {"metric": "chrf"}}),
     "spec", "checkpointing.selectBest.metric must be one the task reports"),
    ("selectBest by accuracy for a regression", evaluated(task={"type": "sequence-classification", "numLabels": 1},
                                                          checkpointing={"selectBest": {"metric": "accuracy"}}),
     "spec", "numLabels 1: evalLoss, mse"),
    ("selectBest by an unknown metric", evaluated(checkpointing={"selectBest": {"metric": "bleu"}}),
     "spec.checkpointing.selectBest.metric", "evalLoss"),
    ("selectBest mode neither min nor max", evaluated(checkpointing={"selectBest": {"metric": "accuracy",
                                                                                  "mode": "up"}}),
     "spec.checkpointing.selectBest.mode", "'min' or 'max'"),
    ("selectBest without validation data", mutate("spec.checkpointing", {"selectBest": {"metric": "accuracy"}}),
     "spec", "selectBest needs evaluations to compare"),
    ("selectBest without an evaluation cadence", evaluated(hyperparameters={"evalEverySteps": None},
                                                           checkpointing={"selectBest": {"metric": "accuracy"}}),
     "spec", "hyperparameters.evalEverySteps"),
    ("earlyStopping without selectBest", evaluated(earlyStopping={"patience": 2}), "spec",
     "earlyStopping needs checkpointing.selectBest"),
    ("earlyStopping patience 0", evaluated(earlyStopping={"patience": 0},
                                           checkpointing={"selectBest": {"metric": "accuracy"}}),
     "spec.earlyStopping.patience", "greater than or equal to 1"),
    ("earlyStopping negative minDelta", evaluated(earlyStopping={"minDelta": -0.1},
                                                  checkpointing={"selectBest": {"metric": "accuracy"}}),
     "spec.earlyStopping.minDelta", "greater than or equal to 0"),
    ("output.model best without selectBest", mutate("spec.output.model", "best"), "spec",
     "output.model best needs checkpointing.selectBest"),
    ("output.model neither best nor last", mutate("spec.output.model", "final"), "spec.output.model",
     "'best' or 'last'"),
    ("mlflow tracking URI given inline", mutate("spec.tracking", {"mlflow": {"trackingUri": "https://u:p@mlflow"}}),
     "spec.tracking.mlflow.trackingUri", "SecretKeyRef"),
    ("mlflow username without password", mutate("spec.tracking", {"mlflow": {
        "trackingUri": {"name": "mlflow", "key": "uri"}, "username": {"name": "mlflow", "key": "user"}}}),
     "spec.tracking.mlflow", "username and tracking.mlflow.password go together"),
    ("tensorboard not a boolean", mutate("spec.tracking", {"tensorboard": "sometimes"}), "spec.tracking.tensorboard",
     "valid boolean"),
    # Issue 12: everything the Job's own validation refuses is refused at admission, named by its field.
    ("cpu quantity Kubernetes refuses", mutate("spec.resources", {"cpu": "1e2.5"}), "spec.resources",
     "resources.cpu must be a positive Kubernetes quantity"),
    ("negative memory", mutate("spec.resources", {"memory": "-1Gi"}), "spec.resources",
     "resources.memory must be a positive Kubernetes quantity"),
    ("zero cpu", mutate("spec.resources", {"cpu": 0}), "spec.resources", "resources.cpu must be a positive"),
    ("zero memory as a string", mutate("spec.resources", {"memory": "0Mi"}), "spec.resources",
     "resources.memory must be a positive"),
    ("fractional cpu number", mutate("spec.resources", {"cpu": 0.5}), "spec.resources.cpu",
     "must be an integer or a string"),
    ("nodeSelector key that is not a label key", mutate("spec.resources", {"nodeSelector": {"gpu type": "a100"}}),
     "spec.resources", "resources.nodeSelector keys must be label keys"),
    ("nodeSelector key prefix over 253", mutate("spec.resources", {"nodeSelector": {"a" * 254 + "/gpu": "x"}}),
     "spec.resources", "resources.nodeSelector keys must be label keys"),
    ("nodeSelector value that is not a label value", mutate("spec.resources", {"nodeSelector": {"pool": "a100 x"}}),
     "spec.resources.nodeSelector.pool", "should match pattern"),
    ("toleration without key and not Exists", mutate("spec.resources", {"tolerations": [{"operator": "Equal"}]}),
     "spec.resources.tolerations[0]", "a toleration without a key must use operator Exists"),
    ("toleration Exists with a value", mutate("spec.resources", {"tolerations": [
        {"key": "gpu", "operator": "Exists", "value": "yes"}]}), "spec.resources.tolerations[0]",
     "value must be empty with operator Exists"),
    ("tolerationSeconds without NoExecute", mutate("spec.resources", {"tolerations": [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]}),
     "spec.resources.tolerations[0]", "tolerationSeconds applies only to effect NoExecute"),
    ("toleration key that is not a label key", mutate("spec.resources", {"tolerations": [
        {"key": "nvidia gpu", "operator": "Exists"}]}), "spec.resources.tolerations[0].key", "should match pattern"),
    ("toleration value that is not a label value", mutate("spec.resources", {"tolerations": [
        {"key": "gpu", "value": "a/b"}]}), "spec.resources.tolerations[0].value", "should match pattern"),
    ("'..' in a pvc path", mutate("spec.dataset.train", "pvc://data/../other/train.jsonl"), "spec.dataset",
     "no '..' in the path"),
    ("'..' at the end of a pvc path", mutate("spec.output.storage", "pvc://runs/out/.."), "spec.output",
     "no '..' in the path"),
    ("'..' in model.initFrom", mutate("spec.model.initFrom", "pvc://runs/a/../b/checkpoints"), "spec.model",
     "model.initFrom must look like pvc://"),
    ("model.initFrom in the job's own output", mutate("spec.model.initFrom", "pvc://runs/out/checkpoints"), "spec",
     "model.initFrom names this job's own output.storage or checkpointing.storage"),
    ("model.initFrom is the job's own checkpoint storage", _with(mutate(
        "spec.checkpointing", {"storage": "s3://ckpt/a/"}), "spec.model.initFrom", "s3://ckpt/a/checkpoint-4"),
     "spec", "model.initFrom names this job's own"),
    ("empty lora targetModules", mutate("spec.method", {"type": "lora", "lora": {"targetModules": []}}),
     "spec.method.lora.targetModules", "at least 1"),
    ("secret key '..'", mutate("spec.credentials", {"hubToken": {"name": "hf", "key": "..token"}}),
     "spec.credentials.hubToken", "may not be '.' or start with '..'"),
    ("dpo settings on a classifier", mutate("spec.task.dpo", {"beta": 0.1}), "spec.task",
     "task.dpo applies only to type dpo"),
    ("dpo label smoothing with ipo", mutate("spec.task", {"type": "dpo", "dpo": {"lossType": "ipo",
                                                                                 "labelSmoothing": 0.1}}),
     "spec.task.dpo", "labelSmoothing applies only to lossType sigmoid"),
    ("dpo beta 0", mutate("spec.task", {"type": "dpo", "dpo": {"beta": 0}}), "spec.task.dpo.beta", "greater than 0"),
    ("dpo label smoothing 0.5", mutate("spec.task", {"type": "dpo", "dpo": {"labelSmoothing": 0.5}}), "spec.task.dpo",
     "labelSmoothing must be below 0.5"),
    ("dpo unknown loss", mutate("spec.task", {"type": "dpo", "dpo": {"lossType": "kto"}}),
     "spec.task.dpo.lossType", "sigmoid"),
    ("dpo prompt limit not below the total", _with(mutate("spec.task", {"type": "dpo", "dpo": {
        "maxPromptLength": 256}}), "spec.hyperparameters.maxSeqLength", 256), "spec",
     "task.dpo.maxPromptLength must be below hyperparameters.maxSeqLength"),
    ("dpo column on a classifier", mutate("spec.dataset.columns", {"chosen": "good"}), "spec",
     "dataset.columns names a column that the task does not use"),
    ("overLong on a classifier", mutate("spec.dataset.overLong", "drop"), "spec",
     "dataset.overLong applies only to the tasks that never truncate"),
    ("overLong neither fail nor drop", _with(mutate("spec.task", {"type": "causal-lm"}), "spec.dataset.overLong",
                                             "truncate"), "spec.dataset.overLong", "'fail' or 'drop'"),
    ("selectBest by reward accuracy for a classifier", evaluated(checkpointing={"selectBest": {
        "metric": "rewardAccuracy"}}), "spec", "dpo: evalLoss, rewardAccuracy"),
]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    assert validate_files([str(path)]) == []


def test_there_are_realistic_examples_of_every_task() -> None:
    tasks = {yaml.safe_load(p.read_text())["spec"]["task"]["type"] for p in EXAMPLES}
    assert tasks == {"sequence-classification", "causal-lm", "seq2seq", "dpo"}
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize(("doc", "field", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_manifest_is_rejected_with_field_and_rule(doc: dict, field: str, words: str) -> None:
    job, problems = validate_document(doc, "bad.yaml")
    assert job is None
    assert problems, "a malformed manifest was accepted"
    matching = [p for p in problems if p.path == field]
    assert matching, f"no problem reported at {field}: {[str(p) for p in problems]}"
    assert any(words.lower() in p.message.lower() for p in matching), [str(p) for p in matching]


@pytest.mark.parametrize("doc", [d for _, d in SELECTION_OK], ids=[n for n, _ in SELECTION_OK])
def test_selection_and_tracking_fields_validate(doc: dict) -> None:
    job, problems = validate_document(copy.deepcopy(doc))
    assert problems == [] and job is not None


def test_selection_defaults() -> None:
    """selectBest's mode follows its metric; output.model follows selectBest; TensorBoard is on by default."""
    spec = FineTuneJobSpec.model_validate(evaluated(checkpointing={"selectBest": {"metric": "f1Macro"}})["spec"])
    assert spec.checkpointing.select_best is not None and metric_mode(spec.checkpointing.select_best) == "max"
    assert output_model(spec) == "best"
    assert spec.tracking.tensorboard and spec.tracking.mlflow is None and spec.early_stopping is None
    loss = FineTuneJobSpec.model_validate(evaluated(checkpointing={"selectBest": {"metric": "evalLoss"}})["spec"])
    assert loss.checkpointing.select_best is not None and metric_mode(loss.checkpointing.select_best) == "min"
    plain = FineTuneJobSpec.model_validate(BASE["spec"])
    assert output_model(plain) == "last"


def test_base_document_is_valid() -> None:
    job, problems = validate_document(copy.deepcopy(BASE))
    assert problems == [] and job is not None
    assert job.spec.method.type == "full"
    assert job.spec.checkpointing.keep_last == 2


def test_memory_fields_default_to_the_cheapest_safe_choice() -> None:
    """sharding auto, no activation checkpointing, no quantization; QLoRA 4bit on a GPU with sharding auto is
    accepted (auto never shards a quantized base)."""
    spec = FineTuneJobSpec.model_validate(BASE["spec"])
    assert spec.resources.sharding == "auto"
    assert spec.hyperparameters.activation_checkpointing is False
    lora = FineTuneJobSpec.model_validate({**BASE["spec"], "method": {"type": "lora"}})
    assert lora.method.lora is None or lora.method.lora.quantization == "none"
    qlora = FineTuneJobSpec.model_validate({**BASE["spec"], "resources": {"workers": 2},
                                            "method": {"type": "lora", "lora": {"quantization": "4bit"}}})
    assert qlora.method.lora is not None and qlora.method.lora.quantization == "4bit"


def test_defaults_resolved_per_task() -> None:
    spec = FineTuneJobSpec.model_validate(BASE["spec"])
    assert resolved_columns(spec) == {"text": "text", "label": "label"}
    assert checkpoint_storage(spec) == "pvc://runs/out/checkpoints"
    chat = FineTuneJobSpec.model_validate({**BASE["spec"], "task": {"type": "causal-lm"},
                                          "dataset": {"train": "t.jsonl", "columns": {"messages": "conversation"}}})
    assert resolved_columns(chat) == {"messages": "conversation"}


def test_validate_cli_prints_every_problem_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    doc = mutate("spec.hyperparameters.learningRate", -1)
    doc["spec"]["dataset"]["validationSplit"] = 2
    bad.write_text(yaml.safe_dump(doc))
    good = EXAMPLES[0]
    run = subprocess.run([sys.executable, "-m", "finetune_cli", "validate", str(good), str(bad)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert f"{bad}: spec.hyperparameters.learningRate:" in run.stderr
    assert f"{bad}: spec.dataset.validationSplit:" in run.stderr
    assert "2 problem(s)" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "finetune_cli", "validate", str(good)], capture_output=True,
                        text=True, check=False)
    assert ok.returncode == 0 and "valid" in ok.stdout
