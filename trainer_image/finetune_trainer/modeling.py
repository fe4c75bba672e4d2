"""Models: the transformers Auto classes per task, a fresh head of the right size, LoRA through peft, and the
precision that is fast on the hardware at hand.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from finetune_trainer.data import TaskInfo
from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

# Attention projections by naming convention, used when peft has no default for the architecture.
_LORA_FALLBACK = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|query|key|value|q|k|v|o|c_attn|qkv_proj|Wqkv)$")


@dataclass(frozen=True)
class Precision:
    """What the forward pass runs in: parameters stay fp32; autocast lowers matmuls where the hardware has it."""

    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None
    grad_scaling: bool

    def autocast(self, device: torch.device) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def choose_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPUs (bf16 autocast on CPUs without native bf16
    ran ~12x slower, and where it is native the gain is small and numerics change), as the spec documents."""
    fp32 = Precision("fp32", None, False)
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            requested = "bf16" if bf16_ok else "fp16"
        if requested == "bf16" and not bf16_ok:
            raise ConfigError("hyperparameters.precision bf16: this GPU does not support bf16; use fp16 or auto")
    elif requested == "auto":
        return fp32
    if requested == "fp32":
        return fp32
    if requested == "fp16":
        if device.type != "cuda":
            log.warning("precision fp16 needs a GPU; training in fp32 on %s", device.type)
            return fp32
        return Precision("fp16", torch.float16, True)
    if device.type == "cpu":
        log.warning("precision bf16 on CPU uses autocast; it is only fast where the CPU has native bf16")
    return Precision("bf16", torch.bfloat16, False)


def load_tokenizer(source: str, revision: str | None, trust_remote_code: bool, task: str) -> Any:
    """The model's tokenizer; causal LMs without a pad token pad with EOS (padding is masked anyway)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ConfigError(f"model.source {source!r}: cannot load the tokenizer: {_first_line(exc)}") from exc
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ConfigError(f"model.source {source!r}: the tokenizer has no pad, eos or unk token to pad with")
    if task == "causal-lm":
        tok.padding_side = "right"
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def load_model(task: TaskInfo, source: str, revision: str | None, trust_remote_code: bool, tok: Any) -> Any:
    """The pretrained model with the task's head; a classification head is new and sized to the label set."""
    import transformers

    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code,
                              "dtype": torch.float32}
    try:
        if task.type == "sequence-classification":
            n = task.n_classes
            kwargs: dict[str, Any] = {"num_labels": n, "ignore_mismatched_sizes": True,
                                      "problem_type": "regression" if task.regression else
                                      "single_label_classification"}
            if task.labels:
                kwargs["id2label"] = dict(enumerate(task.labels))
                kwargs["label2id"] = {name: i for i, name in enumerate(task.labels)}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(source, **common, **kwargs)
        elif task.type == "causal-lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **common)
        else:
            model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source, **common)
    except Exception as exc:
        raise ConfigError(f"model.source {source!r}: cannot load it as a {task.type} model: "
                          f"{_first_line(exc)}") from exc
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def apply_lora(model: Any, task: TaskInfo, r: int, alpha: int, dropout: float,
               target_modules: list[str] | None) -> Any:
    """Wrap the model with peft LoRA adapters; the classification head stays fully trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = {"sequence-classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM,
                 "seq2seq": TaskType.SEQ_2_SEQ_LM}[task.type]

    def build(targets: list[str] | None) -> Any:
        cfg = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        return get_peft_model(model, cfg)

    try:
        return build(target_modules)
    except ValueError as exc:
        if target_modules:
            raise ConfigError(f"method.lora.targetModules {target_modules}: {_first_line(exc)}") from exc
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and _LORA_FALLBACK.search(n)})
        if not names:
            raise ConfigError("method.lora: no attention projections found for this architecture; set "
                              "method.lora.targetModules") from exc
        log.info("LoRA targets picked by name: %s", names)
        return build(names)


def trainable_summary(model: Any) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"


def non_embedding_parameters(model: Any) -> int:
    """Parameters that cost 6 FLOPs per token in training (embedding lookups are nearly free)."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)
