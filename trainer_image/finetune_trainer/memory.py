"""Per-device memory before training: what the chosen plan will hold (parameters, gradients, optimizer state,
activations at the configured batch and length), whether it fits the device, and which field to change if not.

`estimate` is a pure function of numbers (`MemoryInputs`), so it is unit-tested by value and used for `auto`
sharding and for the fail-fast check. The constants are the usual accounting for mixed-precision AdamW training
(trainable weights, their gradients and AdamW's two moments in fp32: 16 bytes per trainable parameter), frozen
weights in their storage precision, and activations per token and layer fitted to what torch actually saves for
the backward pass of a Llama-style block (`tests/trainer/test_memory_plan.py` checks the fit against a
measurement). Activations are those of the widest batch the data really makes (batches are grouped by length, so it
is batchSize examples of the longest one), not of batchSize x maxSeqLength; the logits are over the vocabulary only
where the task predicts tokens (a classifier's head has a handful of outputs). On CPU the process itself (the
interpreter, torch, transformers, the data) is counted, as the CUDA context is on GPUs. `for_job` is what the trainer
calls before it loads any weights, and the pre-flight before any GPU is requested.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.progress import MemoryPlanReport
from finetune_api.spec import FineTuneJobSpec, quantization_of
from finetune_trainer.errors import ConfigError

GB = 1e9
# Frozen-weight storage per parameter. NF4 with double quantization: 4 bits plus one 8-bit absmax per 64 weights and
# one fp32 second-level scale per 256 of those. LLM.int8: one byte plus a fp32 scale per row (negligible).
QUANTIZED_BYTES = {"4bit": (4 + 8 / 64 + 32 / (64 * 256)) / 8, "8bit": 1.0}
ADAMW_BYTES = 8  # two fp32 moments per trainable parameter
# Elements kept for the backward pass per token and block: about 8 hidden-sized tensors (norm inputs and outputs,
# q/k/v, attention output, projections' inputs) and 5 intermediate-sized ones (gate, up, activation, product).
ACT_HIDDEN, ACT_INTERMEDIATE = 8, 5
CUDA_RESERVED = 1.0 * GB  # CUDA context, cuBLAS workspaces, allocator slack
# The backward pass of one block on CPU: attention with a padding mask runs torch's math kernel, which materialises
# the scores, the probabilities and their gradient, batch x heads x length^2 each (GPU kernels stream them). Measured
# against the peak RSS of whole epochs (benchmarks/preflight.py).
ATTENTION_TRANSIENTS = 3
USABLE_FRACTION = 0.92  # fragmentation of the caching allocator


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model the estimate needs (from the model itself, or from its config on the meta device)."""

    parameters: int  # every parameter
    trainable: int  # trainable under the job's method (all for full fine-tuning, adapters + head for LoRA)
    embedding: int  # embedding and output-head parameters (never quantized)
    largest_block: int  # parameters of the largest transformer block: FSDP gathers one at a time
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int = 0  # attention heads per block


@dataclass(frozen=True)
class MemoryInputs:
    shape: ModelShape
    sharding: str  # none | fsdp
    processes: int
    batch_size: int  # per device and forward pass
    seq_length: int  # tokens per example of the widest batch (the longest example, at most maxSeqLength)
    precision: str  # fp32 | bf16 | fp16, as resolved for the device
    device: str  # cuda | cpu
    quantization: str = "none"  # none | 4bit | 8bit
    activation_checkpointing: bool = False
    logits: str = "tokens"  # tokens: every input token predicts the vocabulary (causal-lm); head: one row of
    #                         `outputs` per example (classification); decoder: every target token (seq2seq)
    outputs: int = 0  # width of a classification head (logits "head")
    decoder_length: int = 0  # target tokens per example of the widest batch (seq2seq)
    baseline: float = 0.0  # bytes of the process itself on CPU: interpreter, libraries, the data


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float  # kept from the forward pass for the backward pass
    working: float  # transients: FSDP's gathered blocks, DDP's gradient buckets, a checkpointed block's recompute,
    #                the loss's log-softmax, on CPU a block's attention matrices in the backward pass
    baseline: float = 0.0  # the process itself (CPU): interpreter, libraries, data

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.working + self.baseline

    def parts(self) -> dict[str, float]:
        parts = {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                 "activations": self.activations, "working": self.working}
        if self.baseline:
            parts["process"] = self.baseline
        return {**parts, "total": self.total}

    def summary(self) -> str:
        return ", ".join(f"{k} {size(v)}" for k, v in self.parts().items())


def size(n: float) -> str:
    """Bytes for people: GB down to 0.1 GB, MB below."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def _compute_bytes(inp: MemoryInputs) -> int:
    return 4 if inp.precision == "fp32" else 2


def estimate(inp: MemoryInputs) -> MemoryEstimate:
    """Per-device bytes of the plan described by `inp`."""
    s = inp.shape
    c = _compute_bytes(inp)
    frozen = s.parameters - s.trainable
    frozen_bytes = c  # frozen weights are stored in the compute dtype (modeling.frozen_dtype)
    if inp.quantization in QUANTIZED_BYTES:  # bitsandbytes quantizes the blocks' linear layers, not embeddings
        frozen_embed = min(frozen, s.embedding)
        frozen_total = frozen_embed * c + (frozen - frozen_embed) * QUANTIZED_BYTES[inp.quantization]
    else:
        frozen_total = frozen * frozen_bytes
    params = s.trainable * 4 + frozen_total
    grads = s.trainable * 4.0
    optim = s.trainable * float(ADAMW_BYTES)
    decoder = inp.batch_size * inp.decoder_length if inp.logits == "decoder" else 0
    tokens = inp.batch_size * inp.seq_length + decoder  # an encoder-decoder runs both through its blocks
    per_block = tokens * (ACT_HIDDEN * s.hidden + ACT_INTERMEDIATE * s.intermediate) * c
    # With checkpointing only the block inputs are kept; one block at a time is recomputed in the backward pass
    # (a transient, counted as working memory).
    kept = s.layers * tokens * s.hidden * c if inp.activation_checkpointing else s.layers * per_block
    recompute = per_block if inp.activation_checkpointing else 0
    # Logits, their fp32 upcast for the loss, and its gradient: over the vocabulary for every token that predicts one.
    predicting = {"tokens": tokens, "decoder": decoder}.get(inp.logits, 0)
    logits = predicting * s.vocab * (c + 4 + 4) + inp.batch_size * inp.outputs * (c + 4 + 4)
    activations = kept + logits + tokens * s.hidden * c
    # Transients of the backward pass: the loss's log-softmax over the vocabulary (fp32), and on CPU one block's
    # attention matrices.
    longest = max(inp.seq_length, inp.decoder_length if inp.logits == "decoder" else 0)
    attention = ATTENTION_TRANSIENTS * inp.batch_size * s.heads * longest**2 * c if inp.device == "cpu" else 0
    recompute += predicting * s.vocab * 4 + attention
    n = max(1, inp.processes)
    if inp.sharding == "fsdp" and n > 1:
        trainable_share = s.trainable / max(1, s.parameters)
        # The current and the prefetched block gathered in the compute dtype, and one block's unsharded gradient.
        working = 2 * s.largest_block * c + s.largest_block * trainable_share * 4
        params, grads, optim = params / n, grads / n, optim / n
    else:
        working = grads if n > 1 else 0.0  # DDP's gradient buckets are a second copy of the gradients
    baseline = inp.baseline if inp.device == "cpu" else 0.0
    return MemoryEstimate(float(params), grads, optim, float(activations), float(working + recompute), baseline)


# ------------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Plan:
    """The sharding chosen for a job, the estimate behind it and the device it was compared with."""

    sharding: str
    estimate: MemoryEstimate
    device_bytes: float
    reason: str

    def fits(self, device: str) -> bool:
        return self.estimate.total <= usable(self.device_bytes, device)

    def report(self) -> MemoryPlanReport:
        """For the progress document (and so the FineTuneJob's status) and metrics.json."""
        parts = {k: round(v) for k, v in self.estimate.parts().items() if k != "total"}
        return MemoryPlanReport(sharding=self.sharding, reason=self.reason, per_device_bytes=round(self.estimate.total),
                                device_bytes=round(self.device_bytes), breakdown=parts)

    def describe(self) -> str:
        return (f"memory plan: sharding {self.sharding} ({self.reason}); estimated per device: "
                f"{self.estimate.summary()}; device memory {size(self.device_bytes)}")


def usable(device_bytes: float, device: str) -> float:
    reserve = CUDA_RESERVED if device == "cuda" else 0.0
    return max(0.0, device_bytes * USABLE_FRACTION - reserve)


def _alternatives(inp: MemoryInputs, method: str, shardable: bool) -> list[tuple[str, str, MemoryInputs]]:
    """Single-field changes that lower memory, most effective kinds first: (field, new value, inputs)."""
    out: list[tuple[str, str, MemoryInputs]] = []
    if inp.sharding != "fsdp" and inp.processes > 1 and shardable:
        out.append(("spec.resources.sharding", "fsdp", dataclasses.replace(inp, sharding="fsdp")))
    if not inp.activation_checkpointing:
        out.append(("spec.hyperparameters.activationCheckpointing", "true",
                    dataclasses.replace(inp, activation_checkpointing=True)))
    if method == "lora" and inp.quantization == "none" and inp.device == "cuda" and inp.sharding != "fsdp":
        out.append(("spec.method.lora.quantization", "4bit", dataclasses.replace(inp, quantization="4bit")))
    batch = inp.batch_size // 2
    while batch >= 1:
        out.append(("spec.hyperparameters.batchSize", str(batch), dataclasses.replace(inp, batch_size=batch)))
        batch //= 2
    return out


def plan(requested: str, inp: MemoryInputs, device_bytes: float, method: str = "full",
         shardable: bool = True, check: bool = True) -> Plan:
    """Resolve `resources.sharding` (auto, none, fsdp) for this job and check that it fits; ConfigError (exit 78)
    naming the field to change when it does not, before any weights are loaded. `shardable`: whether fsdp is
    possible for this job at all (not with a quantized base, nor for seq2seq, whose evaluation generates text).
    `check` false: the device's memory is not known (a pre-flight without it); the plan is made, not judged."""
    limit = usable(device_bytes, inp.device) if check else float("inf")
    if requested == "auto" and not check:
        chosen, reason = "none", ("auto: the device's memory is unknown, so a full copy per device is planned; the "
                                  "trainer pods decide on the real device")
    elif requested == "auto":
        single = estimate(dataclasses.replace(inp, sharding="none"))
        if single.total <= limit:
            chosen, reason = "none", "auto: a full copy fits on each device"
        elif inp.processes <= 1 or not shardable:
            chosen, reason = "none", "auto: it cannot be sharded"  # and does not fit: the error below says so
        else:
            chosen = "fsdp"
            reason = (f"auto: a full copy per device would need {single.total / GB:.2f} GB, more than the "
                      f"{limit / GB:.2f} GB usable")
    else:
        chosen, reason = requested, "as requested"
    inp = dataclasses.replace(inp, sharding=chosen)
    est = estimate(inp)
    if est.total <= limit:
        return Plan(chosen, est, device_bytes, reason)
    hints = []
    for field, value, alt in _alternatives(inp, method, shardable):
        after = estimate(alt).total
        if after <= limit:
            hints.append(f"set {field} to {value} (about {after / GB:.2f} GB)")
            break
    process = est.baseline if inp.device == "cpu" else 0.0
    if hints:
        advice = hints[0]
    elif process:
        advice = f"set spec.resources.memory to at least {est.total / USABLE_FRACTION / 2**30 + 0.05:.1f}Gi"
    else:
        advice = ("no single change fits: combine spec.resources.sharding fsdp with more processes "
                  "(spec.resources.gpusPerWorker, spec.resources.workers), "
                  "spec.hyperparameters.activationCheckpointing, a smaller spec.hyperparameters.batchSize, or "
                  "spec.method.type lora")
    what, itself = ("training process", f", of which {process / GB:.2f} GB is the process itself (Python, torch, "
                    "transformers and the data)") if process else ("training state", "")
    raise ConfigError(f"the {what} would not fit: estimated {est.total / GB:.2f} GB per device ({est.summary()})"
                      f"{itself} with spec.resources.sharding {chosen}, and the device has {limit / GB:.2f} GB usable "
                      f"of {device_bytes / GB:.2f} GB; {advice}")


@dataclass(frozen=True)
class DataShape:
    """What the plan needs from the tokenised data: the widest example (grouped batches put batchSize examples of
    about that length together) and, for seq2seq, the longest target."""

    longest: int
    longest_target: int = 0

    @classmethod
    def of(cls, encoded: Any) -> DataShape:
        """From a tokenised split (`data.Encoded`)."""
        lengths = encoded.lengths()
        target = encoded.lengths("labels") if "decoder" in encoded.scalars else None
        return cls(int(lengths.max()) if len(lengths) else 0,
                   int(target.max()) if target is not None and len(target) else 0)


def _logits(spec: FineTuneJobSpec) -> tuple[str, int]:
    """How the task's logits scale: every token over the vocabulary, or one small head row per example."""
    if spec.task.type == "sequence-classification":
        return "head", len(spec.task.labels) if spec.task.labels else int(spec.task.num_labels or 1)
    return ("decoder", 0) if spec.task.type == "seq2seq" else ("tokens", 0)


def for_job(spec: FineTuneJobSpec, shape: ModelShape, processes: int, precision: str, device: str,
            device_bytes: float, data: DataShape | None = None, baseline: float = 0.0, check: bool = True) -> Plan:
    """The job's plan: its batch size, the widest batch of its data (maxSeqLength when the data is not known yet),
    method, quantization and activation checkpointing on `processes` devices of `device_bytes` each; on CPU the
    process `baseline` (interpreter and libraries) and the data count too."""
    hp = spec.hyperparameters
    quantization = quantization_of(spec)
    logits, outputs = _logits(spec)
    width = min(data.longest, hp.max_seq_length) if data is not None and data.longest else hp.max_seq_length
    target = hp.max_seq_length if data is None or not data.longest_target else min(data.longest_target,
                                                                                   hp.max_seq_length)
    inp = MemoryInputs(shape=shape, sharding="none", processes=processes, batch_size=hp.batch_size,
                       seq_length=width, precision=precision, device=device, quantization=quantization,
                       activation_checkpointing=hp.activation_checkpointing, logits=logits, outputs=outputs,
                       decoder_length=target if logits == "decoder" else 0,
                       baseline=baseline)
    shardable = quantization == "none" and spec.task.type != "seq2seq"
    return plan(spec.resources.sharding, inp, device_bytes, spec.method.type, shardable, check=check)


def state_fits(spec: FineTuneJobSpec, shape: ModelShape, processes: int, precision: str, device: str,
               device_bytes: float) -> None:
    """The plan with the smallest possible batch (one token per example) and without the process: a lower bound,
    checked before any data is read, so that a job whose training state alone cannot fit (a 70B full fine-tune on
    one device) fails at once instead of after reading its data. ConfigError as `plan` raises it."""
    for_job(spec, shape, processes, precision, device, device_bytes, DataShape(longest=1, longest_target=1))


# --------------------------------------------------------------------------------------------- from the machine
def device_memory(device: Any, local_processes: int = 1) -> float:
    """Bytes one process may use: the GPU's memory, or on CPU its share of the pod's memory limit (cgroup) or of
    the machine's memory."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    limit = _cgroup_limit()
    if limit is None:
        import psutil

        limit = float(psutil.virtual_memory().total)
    return limit / max(1, local_processes)


def _cgroup_limit() -> float | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return float(text)
    return None


def model_shape(model: Any) -> ModelShape:
    """The shape of an instantiated model (real or on the meta device), trainable as its requires_grad says."""
    from torch import nn

    from finetune_trainer.sharding import base_model, transformer_blocks

    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    embed_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(base_model(model), "get_output_embeddings", lambda: None)()
    if head is not None:
        embed_ids |= {id(p) for p in head.parameters()}
    embedding = sum(p.numel() for p in params if id(p) in embed_ids)
    blocks = transformer_blocks(model)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    cfg = getattr(base_model(model), "config", None)

    def pick(*names: str) -> int:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return 0

    hidden = pick("hidden_size", "n_embd", "d_model")
    inter = pick("intermediate_size", "n_inner", "d_ff") or 4 * hidden
    return ModelShape(parameters=total, trainable=trainable, embedding=embedding, largest_block=largest,
                      layers=len(blocks) or pick("num_hidden_layers", "n_layer", "num_layers"), hidden=hidden,
                      intermediate=inter, vocab=pick("vocab_size"),
                      heads=pick("num_attention_heads", "n_head", "num_heads"))


def shape_from_config(config: Any, lora_r: int | None = None, lora_targets: list[str] | None = None) -> ModelShape:
    """The shape of a causal LM built from `config` on the meta device (no memory, no weights); with `lora_r`, the
    trainable count of LoRA adapters of that rank on the named linear layers (default: attention projections)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if lora_r is not None:
        targets = set(lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj"])
        for p in model.parameters():
            p.requires_grad_(False)
        shape = model_shape(model)
        extra = sum(lora_r * (m.in_features + m.out_features) for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets)
        return dataclasses.replace(shape, parameters=shape.parameters + extra, trainable=extra)
    return model_shape(model)


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def process_baseline() -> float:
    """Bytes this process holds now (resident set): what a training process holds before its model and optimizer,
    once the libraries are imported and the data is read."""
    import psutil

    return float(psutil.Process().memory_info().rss)
