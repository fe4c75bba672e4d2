"""The FineTuneJob spec: the single source of truth for the CRD schema, the validator, the operator and the trainer.

Field descriptions become the CRD's `description`s, so `kubectl explain finetunejob.spec...` teaches the API.
Cross-field rules live in `rules` on each model (CEL for the API server, Python for `finetune validate`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, create_model, field_validator
from pydantic.alias_generators import to_camel, to_snake

from finetune_api.rules import Immutable, Rule, SpecModel, at_most_one, exactly_one
from finetune_api.tasks import TASKS, higher_is_better
from finetune_api.tasks.base import TaskDefinition

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PVC_URI = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$"
PVC_DOTDOT = r"^pvc://[^/]*/(.*/)?\.\.(/.*)?$"  # a '..' segment would lead out of the claim's mount
# Storage/model/dataset locations: a pvc:// or s3:// URI, a hub id, or a path. No control characters, no shell needed.
LOCATION = r"^[^\x00-\x1f\x7f]+$"
# Kubernetes resource.Quantity, as controller-gen emits it.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

TaskType = Literal[tuple(TASKS)]  # type: ignore[valid-type]  # one per module of finetune_api.tasks
Location = Annotated[str, Field(min_length=1, max_length=1024, pattern=LOCATION)]


def _int_or_string(value: object) -> object:
    """One clear error for anything else (the union would report one per member)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be an integer or a string such as 8, 500m or 64Gi, got {type(value).__name__}")
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_int_or_string),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
]
# Kubernetes label syntax (IsQualifiedName, IsValidLabelValue): nodeSelector keys and values, toleration keys.
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$"
LABEL_VALUE = rf"^({LABEL_NAME})?$"
MAX_LABEL_PREFIX = 253  # the DNS subdomain before '/' in a label key


def _pvc_ok(value: str | None) -> bool:
    return (value is None or not value.startswith("pvc://")
            or (re.match(PVC_URI, value) is not None and re.match(PVC_DOTDOT, value) is None))


def _pvc_cel(field: str) -> str:
    return (f"!has(self.{field}) || !self.{field}.startsWith('pvc://') || "
            f"(self.{field}.matches(r'{PVC_URI}') && !self.{field}.matches(r'{PVC_DOTDOT}'))")


PVC_MESSAGE = ("must look like pvc://<claim-name>/<path>, with a claim in the job's own namespace and no '..' in the "
               "path (it would lead out of the claim)")


def label_key_ok(key: str | None) -> bool:
    """A Kubernetes label key: [prefix/]name, the prefix a DNS subdomain of at most 253 characters."""
    return key is None or (re.match(LABEL_KEY, key) is not None and key.find("/") <= MAX_LABEL_PREFIX)


def label_key_cel(expr: str) -> str:
    return f"{expr}.matches(r'{LABEL_KEY}') && {expr}.indexOf('/') <= {MAX_LABEL_PREFIX}"


_QUANTITY_SUFFIXES = {"", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}


def quantity_sign(value: int | str) -> int | None:
    """-1, 0 or 1 for a quantity Kubernetes accepts (`isQuantity` in CEL, resource.ParseQuantity in Go, whose
    parser this follows), None for one it refuses. The CRD pattern is checked on its own."""
    if isinstance(value, int):
        return (value > 0) - (value < 0)
    digits = "0123456789"
    s, pos, end = value, 0, len(value)
    if not s:
        return None
    negative = s[0] == "-"
    pos += s[0] in "+-"
    start = pos
    while pos < end and s[pos] in digits:
        pos += 1
    number = s[start:pos]
    if pos < end and s[pos] == ".":
        pos += 1
        start = pos
        while pos < end and s[pos] in digits:
            pos += 1
        number += s[start:pos]
    suffix = s[pos:]
    if suffix not in _QUANTITY_SUFFIXES:
        exponent = suffix[1:]
        if suffix[:1] not in ("e", "E") or not re.fullmatch(r"[+-]?[0-9]+", exponent) \
                or not -(2**63) <= int(exponent) < 2**63:
            return None
    if number.strip("0") == "":
        return 0
    return -1 if negative else 1


_QUANTITY_FACTORS = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                     "E": 1e18, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50,
                     "Ei": 2.0**60}


def quantity_value(value: int | str) -> float:
    """A Kubernetes quantity as a number (bytes for memory, cores for CPU): 64Gi -> 68719476736.0, 500m -> 0.5."""
    if isinstance(value, int):
        return float(value)
    m = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([a-zA-Z]*)((?:[eE][+-]?[0-9]+)?)", value.strip())
    if m is None or (m[2] not in _QUANTITY_FACTORS and not (m[2] in ("e", "E") or m[3])):
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    if m[3]:
        return float(m[1] + m[3])
    return float(m[1]) * _QUANTITY_FACTORS[m[2]]


def _positive_quantity(value: int | str | None) -> bool:
    return value is None or quantity_sign(value) == 1


def _quantity_cel(field: str) -> str:
    return (f"!has(self.{field}) || (type(self.{field}) == int ? self.{field} > 0 : "
            f"isQuantity(self.{field}) && quantity(self.{field}).isGreaterThan(quantity('0')))")


class SecretKeyRef(SpecModel):
    """A key of a Secret in the FineTuneJob's own namespace. Values never appear in the spec, status or ConfigMaps."""

    name: str = Field(description="Name of the Secret, in the same namespace as the FineTuneJob.", max_length=253,
                      pattern=DNS_SUBDOMAIN)
    key: str = Field(description="Key inside the Secret whose value is used.", min_length=1, max_length=253,
                     pattern=r"^[-._a-zA-Z0-9]+$")

    rules = (
        Rule(cel="self.key != '.' && !self.key.startsWith('..')",
             message="a Secret key may not be '.' or start with '..'",
             check=lambda r: r.key != "." and not r.key.startswith("..")),
    )


def _only_for(definition: TaskDefinition) -> Rule:
    """The settings an objective owns are refused for every other type."""
    aliases = [f"task.{to_camel(s.name)}" for s in definition.settings]
    cel = " && ".join(f"!has(self.{to_camel(s.name)})" for s in definition.settings)
    names = [s.name for s in definition.settings]
    return Rule(cel=f"self.type == '{definition.name}' || ({cel})",
                message=f"{' and '.join(aliases)} {'apply' if len(aliases) > 1 else 'applies'} only to type "
                f"{definition.name}",
                check=lambda t: t.type == definition.name or all(getattr(t, n) is None for n in names))


def _when_type(name: str, rule: Rule, subject: str = "self") -> Rule:
    """An objective's own rule, checked only for jobs of that type."""
    type_of = "self.type" if subject == "self" else f"{subject}.type"
    getter = (lambda o: o.type) if subject == "self" else (lambda o: o.task.type)
    return Rule(cel=f"{type_of} != '{name}' || ({rule.cel})", message=rule.message,
                check=lambda o: getter(o) != name or rule.check(o), field_path=rule.field_path)


class _TaskBase(SpecModel):
    """What the model learns to do."""

    type: TaskType = Field(description=", ".join(f"{d.name} ({d.summary})" for d in TASKS.values()) + ".")

    rules = (
        *(_when_type(d.name, r) for d in TASKS.values() for r in d.task_rules),
        *(_only_for(d) for d in TASKS.values() if d.settings),
    )


# The type, then every objective's own settings (finetune_api.tasks).
TaskSpec = create_model(  # type: ignore[call-overload]
    "TaskSpec", __base__=_TaskBase, __doc__=_TaskBase.__doc__, __module__=__name__,
    **{s.name: (s.annotation, s.field) for d in TASKS.values() for s in d.settings})


class ModelSpec(SpecModel):
    """The pretrained model to start from."""

    source: Location = Field(
        description="Hub id (org/name), local path, pvc://<claim>/<path> (mounted read-only into the pods) "
        "or s3://bucket/prefix."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.",
                                 max_length=255, pattern=r"^[-._/a-zA-Z0-9]+$")
    trust_remote_code: bool = Field(default=False, description="Allow code shipped with the model to run. Off unless "
                                    "you trust the source.")
    init_from: Location | None = Field(
        default=None,
        description="Start from another run's trained weights: a complete checkpoint folder (<checkpoint "
        "storage>/checkpoint-<step>) or a checkpoint storage (its newest complete checkpoint), as pvc://, s3:// or a "
        "path. Only the trainable weights are taken (all of them for full fine-tuning, adapters and head for LoRA); "
        "the optimizer, the learning-rate schedule and the data position start afresh. The run that wrote it must "
        "have used the same model.source and method (names and shapes are checked). Without it a job starts from "
        "model.source, and it only ever resumes its own checkpoints.",
    )

    rules = (
        Rule(cel=_pvc_cel("source"), message=f"model.source {PVC_MESSAGE}", check=lambda m: _pvc_ok(m.source)),
        Rule(cel=_pvc_cel("initFrom"), message=f"model.initFrom {PVC_MESSAGE}", check=lambda m: _pvc_ok(m.init_from)),
    )


def _column_description(role: str) -> str:
    uses = []
    for d in TASKS.values():
        for c in d.columns:
            if c.role == role:
                uses.append(f"{d.name}: {c.description}" + (f" (default '{c.default}')" if c.default else ""))
    return "; ".join(uses) + "."


def _exclusive(role: str, replaces: tuple[str, ...]) -> Rule:
    """A role that replaces others (chat messages instead of prompt/response) is exclusive with them."""
    attr, others = to_snake(role), [to_snake(r) for r in replaces]
    return Rule(cel=f"!has(self.{role}) || (" + " && ".join(f"!has(self.{r})" for r in replaces) + ")",
                message=f"dataset.columns.{role} is exclusive with {' and '.join(replaces)}",
                check=lambda m: getattr(m, attr) is None or all(getattr(m, o) is None for o in others))


class _ColumnsBase(SpecModel):
    """Which dataset columns feed the task. Unset columns take the name shown as default for the task that uses them."""

    rules = tuple(_exclusive(c.role, c.replaces) for d in TASKS.values() for c in d.columns if c.replaces)


# One optional field per column role of any objective (finetune_api.tasks), described per objective.
ColumnMapping = create_model(  # type: ignore[call-overload]
    "ColumnMapping", __base__=_ColumnsBase, __doc__=_ColumnsBase.__doc__, __module__=__name__,
    **{to_snake(role): (str | None, Field(default=None, description=_column_description(role), max_length=256))
       for role in dict.fromkeys(c.role for d in TASKS.values() for c in d.columns)})


class DatasetSpec(SpecModel):
    """Labelled data to train and evaluate on."""

    train: Location = Field(description="Training data: a file or folder (local path, pvc://, s3://) or, with "
                            "format hub, a hub dataset name.")
    validation: Location | None = Field(default=None, description="Validation data, same forms as train. "
                                        "Exclusive with validationSplit.")
    validation_split: float | None = Field(default=None, description="Fraction of the training data held out for "
                                           "validation, strictly between 0 and 1.", gt=0, lt=1)
    format: Literal["auto", "jsonl", "csv", "parquet", "arrow", "hub"] = Field(
        default="auto", description="File format; auto picks from the file extension."
    )
    subset: str | None = Field(default=None, description="Hub dataset configuration name (format hub).",
                               max_length=256)
    train_split: str = Field(default="train", description="Split name used for training (format hub).",
                             max_length=128)
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Column mapping for the task.")
    max_samples: int | None = Field(default=None, description="Use at most this many training examples.",
                                    ge=1, le=1_000_000_000)
    over_long: Literal["fail", "drop"] | None = Field(
        default=None, description="An example longer than hyperparameters.maxSeqLength, for the tasks that never "
        f"truncate ({', '.join(d.name for d in TASKS.values() if d.rejects_over_long)}: the answer would be cut): "
        "fail stops the job before training, naming the file and row; drop leaves such examples out and reports "
        "how many (log, metrics.json, status.metrics droppedExamples). Default: fail.")

    rules = (
        Rule(
            cel="!(has(self.validation) && has(self.validationSplit))",
            message="dataset.validation and dataset.validationSplit are mutually exclusive",
            check=lambda d: at_most_one(d.validation, d.validation_split),
        ),
        Rule(cel=_pvc_cel("train"), message=f"dataset.train {PVC_MESSAGE}", check=lambda d: _pvc_ok(d.train)),
        Rule(cel=_pvc_cel("validation"), message=f"dataset.validation {PVC_MESSAGE}",
             check=lambda d: _pvc_ok(d.validation)),
    )


class LoraSpec(SpecModel):
    """Low-rank adapters (peft): train small matrices beside frozen weights."""

    r: int = Field(default=8, description="Rank of the adapter matrices.", ge=1, le=1024)
    alpha: int = Field(default=16, description="Scaling numerator (alpha / r).", ge=1, le=4096)
    dropout: float = Field(default=0.05, description="Dropout on the adapter input.", ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, description="Module names to adapt; unset picks the attention projections of the architecture.",
        min_length=1, max_length=64,
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none",
        description="QLoRA: load the frozen base weights quantized with bitsandbytes (4bit: NF4 with double "
        "quantization, about 0.56 bytes per parameter; 8bit: LLM.int8, about 1 byte) instead of 2 bytes in "
        "bf16/fp16, while the adapters train in the compute precision. A 7B base drops from about 14 GB to about 4 "
        "GB; each forward and backward pays for dequantizing. Needs a CUDA GPU: a job without one fails at once "
        "with exit 78. Not combined with resources.sharding fsdp (QLoRA is for fitting on one GPU; auto then keeps a "
        "copy per device).",
    )


class MethodSpec(SpecModel):
    """How weights are updated."""

    type: Literal["full", "lora"] = Field(default="full", description="full fine-tuning or lora adapters.")
    lora: LoraSpec | None = Field(default=None, description="LoRA settings; only with type lora (defaults apply "
                                  "when omitted).")

    rules = (
        Rule(
            cel="!has(self.lora) || (has(self.type) && self.type == 'lora')",
            message="method.lora applies only to method.type lora",
            check=lambda m: m.type == "lora" or m.lora is None,
        ),
    )


class LRSchedulerSpec(SpecModel):
    """Learning-rate schedule after warmup."""

    type: Literal["linear", "cosine", "constant"] = Field(default="linear", description="Decay shape after warmup.")
    warmup_ratio: float = Field(default=0.0, description="Fraction of total steps spent warming up linearly from 0.",
                                ge=0, lt=1)


class Hyperparameters(SpecModel):
    """Optimisation settings. Exactly one of epochs or maxSteps."""

    epochs: int | None = Field(default=None, description="Passes over the training data. Exclusive with maxSteps.",
                               ge=1, le=1000)
    max_steps: int | None = Field(default=None, description="Optimizer steps to run. Exclusive with epochs.",
                                  ge=1, le=1_000_000_000)
    batch_size: int = Field(default=16, description="Examples per device per forward pass.", ge=1, le=4096)
    gradient_accumulation_steps: int = Field(default=1, description="Forward passes per optimizer step.",
                                             ge=1, le=1024)
    learning_rate: float = Field(default=5e-5, description="Peak AdamW learning rate.", gt=0, le=1)
    lr_scheduler: LRSchedulerSpec = Field(default_factory=LRSchedulerSpec, description="Schedule and warmup.")
    weight_decay: float = Field(default=0.01, description="AdamW decoupled weight decay (not applied to biases and "
                                "norms).", ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, description="Gradient clipping norm; 0 disables clipping.", ge=0,
                                 le=1000)
    max_seq_length: int = Field(
        default=256, description="Longest tokenised example; longer ones are truncated ("
        f"{', '.join(d.name for d in TASKS.values() if not d.rejects_over_long)}) or rejected by the data check ("
        f"{', '.join(d.name for d in TASKS.values() if d.rejects_over_long)}; see dataset.overLong).", ge=8,
        le=131072)
    seed: int = Field(default=42, description="Seed for every random generator, so runs repeat.", ge=0,
                      le=2**31 - 1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPUs. The "
        "forward and backward passes run in it (with fsdp: the weights are gathered in it and gradients reduced in "
        "fp32); frozen weights (the LoRA base) are also stored in it, 2 bytes per parameter instead of 4. "
        "Trainable weights and optimizer state stay fp32."
    )
    eval_every_steps: int | None = Field(default=None, description="Evaluate every N optimizer steps as well as at "
                                         "the end.", ge=1, le=1_000_000_000)
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer block's activations during the backward pass instead of keeping "
        "them from the forward pass: activation memory drops from every block's intermediates to the block inputs "
        "plus one block's, for about one more forward pass of compute (roughly 30% more time per step). Use it when "
        "batchSize x maxSeqLength does not fit.",
    )

    rules = (
        Rule(
            cel="has(self.epochs) != has(self.maxSteps)",
            message="exactly one of hyperparameters.epochs or hyperparameters.maxSteps must be set",
            check=lambda h: exactly_one(h.epochs, h.max_steps),
        ),
    )


# The metrics each task's evaluation reports (camelCase, as in status.metrics and metrics.json): what
# checkpointing.selectBest may choose by. A variant (regression: a classifier with numLabels 1) reports its own set.
# All generated from finetune_api.tasks.
TASK_METRICS: dict[str, tuple[str, ...]] = {name: d.metric_names() for name, d in TASKS.items()}
HIGHER_IS_BETTER = higher_is_better()  # the others are losses or errors: lower is better
METRIC_NAMES: tuple[str, ...] = tuple(dict.fromkeys(m.name for d in TASKS.values() for m in d.all_metrics()))
MetricName = Literal[METRIC_NAMES]  # type: ignore[valid-type]


def _metrics_words(sep: str) -> str:
    """Each objective's metrics, its variants' in parentheses."""
    parts = []
    for d in TASKS.values():
        variants = "".join(f" ({v.when}: {', '.join(m.name for m in v.metrics)})" for v in d.variants)
        parts.append(f"{d.name}{sep}{', '.join(d.metric_names())}{variants}")
    return "; ".join(parts)


class SelectBestSpec(SpecModel):
    """Which evaluation counts as the best: its checkpoint is kept whatever keepLast says."""

    metric: MetricName = Field(
        description=f"Evaluation metric to compare, one the task reports: {_metrics_words(' ')}.")
    mode: Literal["min", "max"] | None = Field(
        default=None, description="min: lower is better; max: higher is better. Unset: max for "
        f"{', '.join(m for m in METRIC_NAMES if m in HIGHER_IS_BETTER)}, min for "
        f"{', '.join(m for m in METRIC_NAMES if m not in HIGHER_IS_BETTER)}.")


def metric_mode(select: SelectBestSpec) -> str:
    """selectBest's mode, defaulted from the metric when unset."""
    return select.mode or ("max" if select.metric in HIGHER_IS_BETTER else "min")


def task_metrics(task: TaskSpec) -> tuple[str, ...]:
    """The metrics the task's evaluation reports."""
    return TASKS[task.type].metrics_of(task)


class CheckpointingSpec(SpecModel):
    """Periodic, atomic checkpoints; a restarted or resumed job continues from the latest complete one."""

    storage: Location | None = Field(default=None, description="Where checkpoints go (pvc://, s3:// or a path). "
                                     "Default: <output.storage>/checkpoints.")
    every_steps: int | None = Field(default=None, description="Checkpoint every N optimizer steps.", ge=1,
                                    le=1_000_000_000)
    every_epoch: bool = Field(default=True, description="Checkpoint at the end of every epoch.")
    keep_last: int = Field(default=2, description="Complete checkpoints kept; older ones are deleted only after a "
                           "newer one is complete.", ge=1, le=100)
    select_best: SelectBestSpec | None = Field(
        default=None, description="Keep the checkpoint of the best evaluation as well as the last keepLast: an "
        "evaluation that improves the metric is checkpointed at once, and retention never deletes the best one. "
        "Needs validation data and hyperparameters.evalEverySteps. With it, output.model defaults to best.")

    rules = (
        Rule(cel="has(self.everySteps) || !has(self.everyEpoch) || self.everyEpoch",
             message="checkpointing needs everySteps or everyEpoch, otherwise nothing could be resumed",
             check=lambda c: c.every_steps is not None or c.every_epoch),
        Rule(cel=_pvc_cel("storage"), message=f"checkpointing.storage {PVC_MESSAGE}",
             check=lambda c: _pvc_ok(c.storage)),
    )


class OutputSpec(SpecModel):
    """Where the fine-tuned model and its metrics are written."""

    storage: Location = Field(description="Destination (pvc://<claim>/<path>, s3://bucket/prefix or a path): the "
                              "model (save_pretrained, tokenizer included) and metrics.json.")
    merge_adapter: bool = Field(default=False, description="For LoRA, also write the adapter merged into the base "
                                "model.")
    model: Literal["best", "last"] | None = Field(
        default=None, description="Which weights become the model: last (after the last optimizer step) or best (the "
        "checkpoint of the best evaluation, see checkpointing.selectBest). Unset: best when checkpointing.selectBest "
        "is set, else last. status.output and metrics.json say which step was written and why.")

    rules = (Rule(cel=_pvc_cel("storage"), message=f"output.storage {PVC_MESSAGE}",
                  check=lambda o: _pvc_ok(o.storage)),)


class Toleration(SpecModel):
    """A Kubernetes toleration copied onto the trainer pods."""

    key: str | None = Field(default=None, description="Taint key (a label key); empty with operator Exists "
                            "tolerates every taint.", max_length=317, pattern=f"^$|{LABEL_KEY}")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (the default).")
    value: str | None = Field(default=None, description="Taint value for Equal (a label value); empty for Exists.",
                              max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty tolerates every effect.")
    toleration_seconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated "
                                           "(only with effect NoExecute).")

    # The rules of Kubernetes' own toleration validation, so that the Job is never refused for them.
    rules = (
        Rule(cel=f"!has(self.key) || self.key == '' || self.key.indexOf('/') <= {MAX_LABEL_PREFIX}",
             message=f"resources.tolerations: the prefix of a key (before '/') is at most {MAX_LABEL_PREFIX} "
             "characters", check=lambda t: not t.key or label_key_ok(t.key)),
        Rule(cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
             message="resources.tolerations: a toleration without a key must use operator Exists (it tolerates "
             "every taint)", check=lambda t: bool(t.key) or t.operator == "Exists"),
        Rule(cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
             message="resources.tolerations: value must be empty with operator Exists",
             check=lambda t: t.operator != "Exists" or not t.value),
        Rule(cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             message="resources.tolerations: tolerationSeconds applies only to effect NoExecute",
             check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute"),
    )


class TopologySpec(SpecModel):
    """Kueue's Topology-Aware Scheduling: where the workers may be placed relative to each other."""

    required: str | None = Field(default=None, description="Every worker within one domain of this topology level "
                                 "(a node label key of the Topology the ResourceFlavor names, e.g. "
                                 "cloud.google.com/gce-topology-block), or the job is not admitted.",
                                 max_length=317, pattern=LABEL_KEY)
    preferred: str | None = Field(default=None, description="Workers within one domain of this topology level if "
                                  "possible, else spread over as few as possible.", max_length=317, pattern=LABEL_KEY)

    rules = (
        Rule(cel="has(self.required) != has(self.preferred)",
             message="resources.topology: set exactly one of required and preferred",
             check=lambda t: exactly_one(t.required, t.preferred)),
    )


class ResourcesSpec(SpecModel):
    """Compute for the trainer pods: one pod per worker, one process per GPU."""

    workers: int = Field(default=1, description="Pods (nodes) in the torchrun group.", ge=1, le=1024)
    gpus_per_worker: int = Field(default=1, description="nvidia.com/gpu per pod; 0 trains on CPU.", ge=0, le=16)
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per pod, e.g. 8 or 7500m.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per pod, e.g. 64Gi.")
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = Field(
        default=None, description="Node labels the pods must match (label keys and values).", max_length=64
    )
    tolerations: list[Toleration] | None = Field(default=None, description="Tolerations for GPU node taints.",
                                                 max_length=64)
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pods.", max_length=253,
                                            pattern=DNS_SUBDOMAIN)
    image: str | None = Field(default=None, description="Trainer image; default is the operator's configured "
                              "image. May be restricted to allowed registries by the platform.", max_length=512,
                              pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._/:@-]*$")
    topology: TopologySpec | None = Field(default=None, description="Kueue Topology-Aware Scheduling of the workers "
                                          "(the podset-required-topology or podset-preferred-topology annotation of "
                                          "the pods); Kueue admits every worker together, or none.")
    sharding: Literal["auto", "none", "fsdp"] = Field(
        default="auto",
        description="How training state is spread over the processes (workers x gpusPerWorker). none: every device "
        "keeps a full copy of the weights, gradients and optimizer state (DDP; about 16 bytes per trainable "
        "parameter with AdamW, plus the frozen weights); fsdp: FSDP2 shards them per transformer block, so each of "
        "N devices keeps about 1/N, at the cost of gathering each block's weights in the forward and backward "
        "passes (more network traffic per step). auto: fsdp when the estimated per-device memory of none would not "
        "fit the device, else none; the trainer logs the estimate and the choice before training. fsdp needs more "
        "than one process.",
    )

    rules = (
        Rule(
            cel="!has(self.sharding) || self.sharding != 'fsdp' || self.workers > 1 || self.gpusPerWorker > 1",
            message="resources.sharding fsdp needs more than one process: set resources.workers or "
            "resources.gpusPerWorker above 1, or sharding to none or auto",
            check=lambda r: r.sharding != "fsdp" or r.workers > 1 or r.gpus_per_worker > 1,
        ),
        Rule(cel=_quantity_cel("cpu"), message="resources.cpu must be a positive Kubernetes quantity, e.g. 8 or 7500m",
             check=lambda r: _positive_quantity(r.cpu)),
        Rule(cel=_quantity_cel("memory"),
             message="resources.memory must be a positive Kubernetes quantity, e.g. 64Gi or 500M",
             check=lambda r: _positive_quantity(r.memory)),
        Rule(cel=f"!has(self.nodeSelector) || self.nodeSelector.all(k, {label_key_cel('k')})",
             message="resources.nodeSelector keys must be label keys: an optional DNS-subdomain prefix of at most "
             f"{MAX_LABEL_PREFIX} characters and '/', then a name of at most 63 letters, digits, '-', '_' or '.', "
             "starting and ending with a letter or digit",
             check=lambda r: all(label_key_ok(k) for k in r.node_selector or {})),
    )

    @field_validator("cpu", "memory", mode="after")
    @classmethod
    def _quantity(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and not re.match(QUANTITY, v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
        return v


class PreflightSpec(SpecModel):
    """The pre-flight check: a small CPU-only pod from the trainer image that reads and checks all the data,
    tokenises it into the token cache the trainer pods read, and plans memory for the requested devices, before the
    GPU pods are created. A failure fails the job at once with the trainer's message; no GPU is ever requested."""

    enabled: bool = Field(default=True, description="Run the pre-flight before the trainer pods (the operator may "
                          "also turn it off for every job).")
    gpu_memory: Quantity | None = Field(default=None, description="Memory of one GPU, e.g. 80Gi, for the memory "
                                        "plan. Default: the nodeSelector label nvidia.com/gpu.memory (MiB, as GPU "
                                        "Feature Discovery sets it); without either the plan is not checked before "
                                        "the trainer pods start.")
    tokens_per_second: float | None = Field(default=None, description="Training tokens per second per device, for "
                                            "the time estimate (e.g. status.progress.tokensPerSecond of an earlier "
                                            "run). Default: derived from the model's size and the GPU type.", gt=0)

    rules = (
        Rule(cel=_quantity_cel("gpuMemory"),
             message="preflight.gpuMemory must be a positive Kubernetes quantity, e.g. 80Gi",
             check=lambda p: _positive_quantity(p.gpu_memory)),
    )

    @field_validator("gpu_memory", mode="after")
    @classmethod
    def _quantity(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and not re.match(QUANTITY, v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 80Gi)")
        return v


class RunPolicy(SpecModel):
    """Retries, deadlines, clean-up, suspension, cancellation and queueing."""

    backoff_limit: int = Field(default=3, description="Retries after crashes or interruptions, each resuming from "
                               "the latest checkpoint. Bad configuration or data fails at once.", ge=0, le=100)
    active_deadline_seconds: int | None = Field(default=None, description="Fail with DeadlineExceeded after this "
                                                "many seconds of running.", ge=1)
    ttl_seconds_after_finished: int | None = Field(default=None, description="Delete pods, Job, Service and "
                                                   "ConfigMap this long after the end; the FineTuneJob and its "
                                                   "status stay.", ge=0)
    suspend: bool = Field(default=False, description="true stops the pods after a checkpoint; false resumes from it.")
    cancel: bool = Field(
        default=False,
        description="true ends the job for good: the operator deletes its pods (the trainer saves a checkpoint "
        "first), Job, Service and ConfigMap, and the job ends Failed with reason Cancelled; the FineTuneJob, its "
        "status and its checkpoints stay. Cannot be set back to false.",
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "self || !oldSelf", "message": "runPolicy.cancel cannot be undone: a cancelled FineTuneJob stays "
             "Failed; create a new FineTuneJob to train again"}]},
    )
    queue_name: str | None = Field(default=None, description="Kueue LocalQueue: the Job is created suspended and "
                                   "Kueue admits it.", max_length=63, pattern=DNS_LABEL)
    priority_class: Annotated[str | None, Immutable(why="it is the Job's Kueue priority label, set at creation")] = \
        Field(default=None, description="Kueue WorkloadPriorityClass of the job (the kueue.x-k8s.io/priority-class "
              "label of its Job): its order in the queue and which jobs it may preempt. Immutable.",
              max_length=253, pattern=DNS_SUBDOMAIN)


class S3Credentials(SpecModel):
    """Object-store credentials, by Secret reference only."""

    access_key_id: SecretKeyRef = Field(description="Secret key holding AWS_ACCESS_KEY_ID.")
    secret_access_key: SecretKeyRef = Field(description="Secret key holding AWS_SECRET_ACCESS_KEY.")
    session_token: SecretKeyRef | None = Field(default=None, description="Secret key holding AWS_SESSION_TOKEN.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, Ceph, ...).",
                                     max_length=512, pattern=r"^https?://[^\s]+$")
    region: str | None = Field(default=None, description="Region name.", max_length=64)


class CredentialsSpec(SpecModel):
    """Credentials, only as references to Secrets in the FineTuneJob's namespace."""

    hub_token: SecretKeyRef | None = Field(default=None, description="Hugging Face hub token (HF_TOKEN).")
    s3: S3Credentials | None = Field(default=None, description="Credentials for s3:// locations.")


class EarlyStoppingSpec(SpecModel):
    """Stop training when the metric of checkpointing.selectBest stops improving."""

    patience: int = Field(default=3, description="Evaluations in a row without an improvement of more than minDelta "
                          "after which training stops (the output then follows output.model).", ge=1, le=10000)
    min_delta: float = Field(default=0.0, description="Smallest change of the metric, in its own units, that counts "
                             "as an improvement.", ge=0)


class MlflowSpec(SpecModel):
    """An MLflow tracking server, by Secret reference only: rank 0 logs parameters, every logged step and evaluation,
    and at the end metrics.json, loss.png and the model card as artifacts, into one run per FineTuneJob (a resumed
    job continues its run)."""

    tracking_uri: SecretKeyRef = Field(description="Secret key holding the tracking URI (MLFLOW_TRACKING_URI), e.g. "
                                       "https://mlflow.example.com; a Secret because URIs may carry credentials.")
    username: SecretKeyRef | None = Field(default=None, description="Secret key holding the user name for basic "
                                          "authentication (MLFLOW_TRACKING_USERNAME). Needs password.")
    password: SecretKeyRef | None = Field(default=None, description="Secret key holding the password "
                                          "(MLFLOW_TRACKING_PASSWORD). Needs username.")
    token: SecretKeyRef | None = Field(default=None, description="Secret key holding a bearer token "
                                       "(MLFLOW_TRACKING_TOKEN).")
    experiment: str | None = Field(default=None, description="Experiment name, created if missing. Default: the "
                                   "FineTuneJob's namespace (finetune for a manifest without one).", min_length=1,
                                   max_length=256)

    rules = (
        Rule(cel="has(self.username) == has(self.password)",
             message="tracking.mlflow.username and tracking.mlflow.password go together",
             check=lambda m: (m.username is None) == (m.password is None)),
    )


class TrackingSpec(SpecModel):
    """Experiment trackers fed by rank 0 with what metrics.jsonl records (every logged step, every evaluation).
    Tracking never fails training: a tracker that stops answering is reported in the log and left."""

    tensorboard: bool = Field(default=True, description="Write TensorBoard event files to <output.storage>/"
                              "tensorboard (tensorboard --logdir there; no server is started).")
    mlflow: MlflowSpec | None = Field(default=None, description="Log to an MLflow tracking server; off unless set.")


# The column roles of each task, with the column name a role reads by default (None: optional, no default).
TASK_COLUMNS: dict[str, dict[str, str | None]] = {
    name: {c.role: c.default for c in d.columns} for name, d in TASKS.items()}


def _columns_fit_task(spec: FineTuneJobSpec) -> bool:
    allowed = TASK_COLUMNS[spec.task.type]
    used = spec.dataset.columns.model_dump(by_alias=True, exclude_none=True)
    return all(name in allowed for name in used)


def quantization_of(spec: FineTuneJobSpec) -> str:
    """none, 4bit or 8bit: method.lora.quantization (QLoRA), none without LoRA settings."""
    return spec.method.lora.quantization if spec.method.lora else "none"


# CEL: true when no quantization is asked for (the rules below then hold trivially).
_QUANTIZED = ("!has(self.method) || !has(self.method.lora) || !has(self.method.lora.quantization) || "
              "self.method.lora.quantization == 'none'")


_HAS_SELECT = "has(self.checkpointing) && has(self.checkpointing.selectBest)"


def _metric_fits_task_cel() -> str:
    """CEL: selectBest's metric is one the task reports (its variant's set where a variant applies)."""
    metric = "self.checkpointing.selectBest.metric"
    branches = []
    for d in TASKS.values():
        for v in d.variants:
            branches.append(f"(self.task.type == '{d.name}' && {v.cel}) ? {metric} in "
                            f"{[m.name for m in v.metrics]}")
    branches += [f"self.task.type == '{d.name}' ? {metric} in {list(d.metric_names())}" for d in TASKS.values()]
    return f"!({_HAS_SELECT}) || ({' : '.join(branches)} : false)"


def _evaluates(spec: FineTuneJobSpec) -> bool:
    ds = spec.dataset
    return (ds.validation is not None or ds.validation_split is not None) and \
        spec.hyperparameters.eval_every_steps is not None


def _selects(spec: FineTuneJobSpec) -> bool:
    return spec.checkpointing.select_best is not None


# Best checkpoint, early stopping and output.model: what they need from the rest of the spec.
SELECTION_RULES = (
    Rule(
        cel=_metric_fits_task_cel(),
        message=f"checkpointing.selectBest.metric must be one the task reports: {_metrics_words(': ')}",
        check=lambda s: not _selects(s) or s.checkpointing.select_best.metric in task_metrics(s.task),
    ),
    Rule(
        cel=f"!({_HAS_SELECT}) || ((has(self.dataset.validation) || has(self.dataset.validationSplit)) && "
        "has(self.hyperparameters.evalEverySteps))",
        message="checkpointing.selectBest needs evaluations to compare: validation data (dataset.validation or "
        "dataset.validationSplit) and hyperparameters.evalEverySteps",
        check=lambda s: not _selects(s) or _evaluates(s),
    ),
    Rule(
        cel=f"!has(self.earlyStopping) || ({_HAS_SELECT})",
        message="earlyStopping needs checkpointing.selectBest, which names the metric it watches",
        check=lambda s: s.early_stopping is None or _selects(s),
    ),
    Rule(
        cel=f"!has(self.output.model) || self.output.model != 'best' || ({_HAS_SELECT})",
        message="output.model best needs checkpointing.selectBest, which says what best means",
        check=lambda s: s.output.model != "best" or _selects(s),
    ),
)


def output_model(spec: FineTuneJobSpec) -> str:
    """best or last: output.model, defaulted from checkpointing.selectBest."""
    return spec.output.model or ("best" if _selects(spec) else "last")


def _within(location: str, folder: str) -> bool:
    """`location` is `folder` or lies below it, as written (the CEL of `_within_cel` says the same)."""
    return location == folder or location.startswith(folder + "/") or (folder.endswith("/")
                                                                         and location.startswith(folder))


def _within_cel(location: str, folder: str) -> str:
    return (f"({location} == {folder} || {location}.startsWith({folder} + '/') || "
            f"({folder}.endsWith('/') && {location}.startsWith({folder})))")


def _init_from_elsewhere(spec: FineTuneJobSpec) -> bool:
    init = spec.model.init_from
    return init is None or not (_within(init, spec.output.storage) or (
        spec.checkpointing.storage is not None and _within(init, spec.checkpointing.storage)))


def _init_from_elsewhere_cel() -> str:
    init, ckpt = "self.model.initFrom", "self.checkpointing.storage"
    return (f"!has({init}) || !({_within_cel(init, 'self.output.storage')} || (has(self.checkpointing) && "
            f"has({ckpt}) && {_within_cel(init, ckpt)}))")


def _columns_cel() -> str:
    parts = []
    for task, allowed in TASK_COLUMNS.items():
        others = [c for roles in TASK_COLUMNS.values() for c in roles if c not in allowed]
        absent = " && ".join(f"!has(self.dataset.columns.{c})" for c in others)
        parts.append(f"(self.task.type == '{task}' && ({absent}))")
    return "!has(self.dataset.columns) || " + " || ".join(parts)


def _no_fsdp(definition: TaskDefinition) -> Rule:
    return Rule(
        cel=f"self.task.type != '{definition.name}' || !has(self.resources) || !has(self.resources.sharding) || "
        "self.resources.sharding != 'fsdp'",
        message=f"resources.sharding fsdp is not available for task {definition.name} ({definition.no_fsdp}): use "
        "sharding none or auto",
        check=lambda s: s.task.type != definition.name or s.resources.sharding != "fsdp")


def _methods(definition: TaskDefinition) -> Rule:
    allowed = list(definition.methods)
    return Rule(
        cel=f"self.task.type != '{definition.name}' || !has(self.method) || !has(self.method.type) || "
        f"self.method.type in {allowed}",
        message=f"task {definition.name} trains with method.type {' or '.join(allowed)}",
        check=lambda s: s.task.type != definition.name or s.method.type in allowed)


_REJECT_OVER_LONG = [d.name for d in TASKS.values() if d.rejects_over_long]

# What each objective allows of the rest of the spec, and its own cross-field rules (finetune_api.tasks).
TASK_SPEC_RULES: tuple[Rule, ...] = (
    *(_no_fsdp(d) for d in TASKS.values() if d.no_fsdp),
    *(_methods(d) for d in TASKS.values() if set(d.methods) != {"full", "lora"}),
    *(_when_type(d.name, r, subject="self.task") for d in TASKS.values() for r in d.spec_rules),
    Rule(cel=f"!has(self.dataset.overLong) || self.task.type in {_REJECT_OVER_LONG}",
         message=f"dataset.overLong applies only to the tasks that never truncate ({', '.join(_REJECT_OVER_LONG)})",
         check=lambda s: s.dataset.over_long is None or s.task.type in _REJECT_OVER_LONG),
)


class FineTuneJobSpec(SpecModel):
    """A supervised fine-tuning job: model, data, method, hyperparameters, storage, compute and run policy."""

    task: Annotated[TaskSpec, Immutable()] = Field(description="What to learn. Immutable.")
    model: Annotated[ModelSpec, Immutable()] = Field(description="Pretrained starting point. Immutable.")
    dataset: Annotated[DatasetSpec, Immutable()] = Field(description="Training and validation data. Immutable.")
    method: Annotated[MethodSpec, Immutable()] = Field(default_factory=MethodSpec,
                                                       description="full or lora. Immutable.")
    hyperparameters: Annotated[Hyperparameters, Immutable(plural=True)] = Field(
        description="Optimisation settings. Immutable.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec,
                                             description="Checkpoint cadence, retention and storage.")
    output: Annotated[OutputSpec, Immutable()] = Field(description="Where the fine-tuned model goes. Immutable.")
    resources: Annotated[ResourcesSpec, Immutable(
        plural=True, why="they shape the Job's pod template, which cannot change; delete and re-create the "
        "FineTuneJob to change them")] = Field(
        default_factory=ResourcesSpec,
        description="Workers, GPUs, placement, image. Immutable: they shape the Job's pod template, which Kubernetes "
        "does not let change; delete and re-create the FineTuneJob to change them.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadlines, suspend, cancel, Kueue.")
    preflight: PreflightSpec = Field(default_factory=PreflightSpec, description="The CPU-only check of the data, "
                                     "the tokenizer and the memory plan before any GPU is requested.")
    credentials: CredentialsSpec | None = Field(default=None, description="Secret references for the hub and "
                                                "object stores.")
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when the metric of checkpointing.selectBest has not improved for patience "
        "evaluations; off unless set. Needs checkpointing.selectBest.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Metric history beyond metrics.jsonl: "
                                   "TensorBoard files (on by default) and MLflow (opt-in).")

    rules = (
        Rule(
            cel=_columns_cel(),
            message="dataset.columns names a column that the task does not use ("
            + "; ".join(f"{name}: {', '.join(roles)}" for name, roles in TASK_COLUMNS.items()) + ")",
            check=_columns_fit_task,
        ),
        Rule(
            cel=f"{_QUANTIZED} || !has(self.resources) || self.resources.gpusPerWorker > 0",
            message="method.lora.quantization (QLoRA) needs a CUDA GPU: set resources.gpusPerWorker to at least 1, "
            "or quantization to none",
            check=lambda s: quantization_of(s) == "none" or s.resources.gpus_per_worker > 0,
        ),
        Rule(
            cel=f"({_QUANTIZED}) || !has(self.resources) || !has(self.resources.sharding) || "
            "self.resources.sharding != 'fsdp'",
            message="method.lora.quantization cannot be combined with resources.sharding fsdp: use sharding none "
            "or auto, or quantization none",
            check=lambda s: quantization_of(s) == "none" or s.resources.sharding != "fsdp",
        ),
        Rule(
            cel="!has(self.output.mergeAdapter) || !self.output.mergeAdapter || "
            "(has(self.method) && has(self.method.type) && self.method.type == 'lora')",
            message="output.mergeAdapter applies only to method.type lora",
            check=lambda s: not s.output.merge_adapter or s.method.type == "lora",
        ),
        Rule(
            cel=_init_from_elsewhere_cel(),
            message="model.initFrom names this job's own output.storage or checkpointing.storage: a job resumes its "
            "own checkpoints without it; initFrom is for starting from another run's weights",
            check=_init_from_elsewhere,
        ),
        *SELECTION_RULES,
        *TASK_SPEC_RULES,
    )


def resolved_columns(spec: FineTuneJobSpec) -> dict[str, str]:
    """Column roles the task reads, with defaults filled in (keys are camelCase roles, values column names)."""
    given = spec.dataset.columns.model_dump(by_alias=True, exclude_none=True)
    columns = TASKS[spec.task.type].columns
    replaced = {role for c in columns if c.role in given for role in c.replaces}
    defaults = {c.role: c.default for c in columns if c.default is not None and c.role not in replaced}
    return {**defaults, **given}


def checkpoint_storage(spec: FineTuneJobSpec) -> str:
    """Checkpoint location: explicit, else a `checkpoints` folder beside the output."""
    return spec.checkpointing.storage or spec.output.storage.rstrip("/") + "/checkpoints"
