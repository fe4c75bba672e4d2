"""QLoRA: the frozen base loaded quantized by bitsandbytes through transformers' BitsAndBytesConfig, adapters trained
in the compute precision.

bitsandbytes' 4-bit and 8-bit kernels need a CUDA device. Without one the job fails before anything else happens
(exit 78, naming the field): `require_device` is meant to run right after the manifest is read, so a pod without
GPUs never loads data or weights first and never crashes partway.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune_trainer.errors import ConfigError

FIELD = "spec.method.lora.quantization"


def require_device(quantization: str, device: torch.device) -> None:
    """ConfigError (exit 78) unless `quantization` is none or this process has a CUDA device and bitsandbytes."""
    if quantization == "none":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"{FIELD} {quantization} (QLoRA) needs a CUDA GPU and this process has none (device "
                          f"{device}); run it with spec.resources.gpusPerWorker of at least 1 on a GPU node, or set "
                          f"{FIELD} to none")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise ConfigError(f"{FIELD} {quantization}: bitsandbytes cannot be loaded in this image "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); use the "
                          "project's trainer image or set it to none") from exc


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for `quantization`. 4bit: NF4 with double quantization, computing in
    `compute_dtype`. 8bit: LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization {quantization!r}")


def load_kwargs(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> dict[str, Any]:
    """Extra `from_pretrained` arguments that load the base quantized onto this rank's GPU ({} for none)."""
    if quantization == "none":
        return {}
    require_device(quantization, device)
    return {"quantization_config": bnb_config(quantization, compute_dtype), "device_map": {"": device.index or 0},
            "dtype": compute_dtype}


def prepare(model: Any) -> Any:
    """peft's preparation of a quantized base for training (norms and other unquantized weights in fp32). Activation
    checkpointing is not switched on here: `Dist.wrap` does it, non-reentrant, as for any model."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
