"""Models: the tokenizer, the pretrained model with the task's head (the task names the Auto class), LoRA through
peft, the precision that is fast on the hardware at hand and the dtype frozen weights are stored in; and the same
model on the meta device, without weights, for the memory plan.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from finetune_api.spec import LoraSpec
from finetune_trainer.errors import ConfigError
from finetune_trainer.tasks.base import Task

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


def load_tokenizer(source: str, revision: str | None, trust_remote_code: bool, task: Task) -> Any:
    """The model's tokenizer, adjusted for the task; one without a pad token pads with EOS (padding is masked)."""
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
    if task.padding_side is not None:
        tok.padding_side = task.padding_side
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def frozen_dtype(method: str, precision: Precision) -> torch.dtype:
    """The dtype to load the weights in. With LoRA the base is frozen: it is kept in the compute precision when that
    is bf16/fp16 (2 bytes per parameter instead of 4; `precision: auto` is fp32 on CPUs, so only GPUs, or an
    explicit bf16 on a CPU, get there), and only the trainable parameters are made fp32 again (`trainable_in_fp32`).
    Full fine-tuning keeps fp32 weights (autocast lowers the matmuls)."""
    if method == "lora" and precision.autocast_dtype is not None:
        return precision.autocast_dtype
    return torch.float32


def trainable_in_fp32(model: Any) -> None:
    """Trainable parameters (adapters, a new head) in fp32, for the optimizer, whatever the base was loaded in."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def load_model(task: Task, source: str, revision: str | None, trust_remote_code: bool, tok: Any,
               dtype: torch.dtype = torch.float32, **extra: Any) -> Any:
    """The pretrained model with the task's head (a classification head is new and sized to the label set), in
    `dtype`; `extra` goes to from_pretrained (a quantization config)."""
    import transformers

    try:
        auto = getattr(transformers, task.model_class)
        model = auto.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                     **{"dtype": dtype, **task.model_kwargs(), **extra})
    except Exception as exc:
        raise ConfigError(f"model.source {source!r}: cannot load it as a {task.name} model: "
                          f"{_first_line(exc)}") from exc
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def meta_model(task: Task, source: str, revision: str | None, trust_remote_code: bool, method: str,
               lora: LoraSpec | None) -> Any:
    """The job's model (head and LoRA adapters included) built from its config on the meta device: every parameter
    with its shape and trainability, no memory and no weights read, so the memory plan comes before the loading."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision,
                                                         trust_remote_code=trust_remote_code,
                                                         **task.model_kwargs())
        auto = getattr(transformers, task.model_class)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
            if method == "lora":
                model = apply_lora(model, task, lora)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model.source {source!r}: cannot read its configuration as a {task.name} model: "
                          f"{_first_line(exc)}") from exc
    return model


def apply_lora(model: Any, task: Task, lora: LoraSpec | None) -> Any:
    """Wrap the model with peft LoRA adapters (spec defaults when `lora` is unset); a classification head stays
    fully trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = lora or LoraSpec()
    task_type = getattr(TaskType, task.lora_task_type)

    def build(targets: list[str] | None) -> Any:
        cfg = LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=targets)
        return get_peft_model(model, cfg)

    try:
        return build(lora.target_modules)
    except ValueError as exc:
        if lora.target_modules:
            raise ConfigError(f"method.lora.targetModules {lora.target_modules}: {_first_line(exc)}") from exc
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and _LORA_FALLBACK.search(n)})
        if not names:
            raise ConfigError("method.lora: no attention projections found for this architecture; set "
                              "method.lora.targetModules") from exc
        log.info("LoRA targets picked by name: %s", names)
        return build(names)


def merged_adapter(base: Any, adapter: Any) -> Any:
    """The LoRA adapter saved in the folder `adapter` merged into `base` (a freshly loaded, unsharded and unquantized
    base): what `output.mergeAdapter` writes when the trained base cannot be merged in place."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def trainable_summary(model: Any) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"
