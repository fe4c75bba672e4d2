"""How the model is laid over the processes: a full copy on each (DDP) or FSDP2 shards per transformer block, with
activation checkpointing per block and, on GPUs, frozen weights stored in the compute precision.

`wrap_model` is the one entry point; the loop then calls forward on `Wrapped.module`, accumulates gradients inside
`Wrapped.accumulating(last)`, clips with `Wrapped.clip_grad_norm` and builds its optimizer over `Wrapped.trainable()`.
The same API serves every device: FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on CUDA with NCCL and, in the
torch this project pins, on CPU with gloo, which is what the CPU tests exercise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune_trainer.distributed import Dist
from finetune_trainer.errors import ConfigError
from finetune_trainer.modeling import Precision

log = logging.getLogger(__name__)

SHARDING_FIELD = "spec.resources.sharding"
CHECKPOINTING_FIELD = "spec.hyperparameters.activationCheckpointing"


# ------------------------------------------------------------------------------------------------ model anatomy
def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes transformers lists in `_no_split_modules` (decoder
    layers, T5 blocks, ...), else the children of the longest ModuleList."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return list(max(lists, key=len)) if lists else []


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpointing, which works with frozen
    inputs, LoRA and FSDP2). Called before sharding, as FSDP2 requires."""
    hf = base_model(model)
    if getattr(hf, "supports_gradient_checkpointing", False):
        enable = getattr(hf, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
        if callable(enable):
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(hf.config, "use_cache"):
            hf.config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
        return
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"{CHECKPOINTING_FIELD}: this architecture ({type(hf).__name__}) has no transformer "
                          "blocks to checkpoint; set it to false")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    ids = {id(b) for b in blocks}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in ids)


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep frozen parameters (the LoRA base, frozen embeddings) in `dtype`; trainable ones stay fp32 for the
    optimizer. Returns the bytes saved. Only worth it, and only done by `wrap_model`, where compute runs in `dtype`."""
    saved = 0
    for p in model.parameters():
        if hasattr(p, "quant_state") or type(p).__name__ in ("Params4bit", "Int8Params"):
            continue  # bitsandbytes' packed weights keep their own storage type
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
            p.data = p.data.to(dtype)
    return saved


# ------------------------------------------------------------------------------------------------------ wrapping
@dataclass
class Wrapped:
    """The model as the loop drives it."""

    module: nn.Module  # call forward on this (DDP, FSDP2 root, or the model)
    model: nn.Module  # the unwrapped model: its parameters are DTensors under FSDP2
    kind: str  # "single" | "ddp" | "fsdp"
    precision: Precision

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's backward. DDP skips its all-reduce until the last micro-batch; FSDP2
        reduce-scatters every micro-batch so that gradients stay sharded (memory over network traffic)."""
        if self.kind == "ddp" and not last:
            return self.module.no_sync()  # type: ignore[operator,no-any-return]
        return contextlib.nullcontext()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """FSDP2's mixed-precision policy already casts the gathered weights; elsewhere autocast does."""
        if self.kind == "fsdp":
            return contextlib.nullcontext()
        return self.precision.autocast(device)  # type: ignore[no-any-return]

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm (over every shard) before clipping; clips in place when max_norm > 0."""
        params = [p for p in self.trainable() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        full = getattr(norm, "full_tensor", None)
        return float(full() if callable(full) else norm)


def mixed_precision_policy(precision: Precision) -> Any:
    """Gather weights in the compute precision and reduce gradients in fp32 (fp32 runs keep fp32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.autocast_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)


def wrap_model(model: nn.Module, *, sharding: str, precision: Precision, dist: Dist,
               activation_checkpointing: bool = False, frozen_in_compute_dtype: bool | None = None) -> Wrapped:
    """Place `model` on this rank's device and wrap it for `sharding` ("none" or "fsdp", as `plan` resolved it).

    `frozen_in_compute_dtype` (default: on GPUs with a 16-bit precision) stores frozen weights in that precision.
    """
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if frozen_in_compute_dtype is None:
        frozen_in_compute_dtype = dist.device.type == "cuda"
    if frozen_in_compute_dtype and precision.autocast_dtype is not None:
        saved = store_frozen_in(model, precision.autocast_dtype)
        if saved:
            log.info("frozen weights kept in %s: %.2f GB less", precision.name, saved / 1e9)
    if not getattr(base_model(model), "is_quantized", False):  # a quantized base was loaded onto its device
        model.to(dist.device)
    model.train()
    if sharding == "fsdp":
        if not dist.enabled:
            raise ConfigError(f"{SHARDING_FIELD} fsdp needs more than one process; this run has one")
        return Wrapped(shard(model, precision, dist), model, "fsdp", precision)
    if sharding != "none":
        raise ValueError(f"sharding {sharding!r}: resolve auto with memory.plan first")
    if not dist.enabled:
        return Wrapped(model, model, "single", precision)
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return Wrapped(DistributedDataParallel(model, device_ids=ids), model, "ddp", precision)


def shard(model: nn.Module, precision: Precision, dist: Dist) -> nn.Module:
    """FSDP2: one parameter group per transformer block, then the root for what is left (embeddings, head, norms)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"{SHARDING_FIELD} fsdp: no transformer blocks found in {type(base_model(model)).__name__}"
                          "; use sharding none")
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    policy = mixed_precision_policy(precision)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's parameters are needed again at once by the backward pass: keep them gathered after the forward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    log.info("FSDP2 over %d processes: %d blocks of %s", dist.world, len(blocks), type(blocks[0]).__name__)
    return model


# ------------------------------------------------------------------------------------------------- measurement
def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors_of(v)


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process actually holds for parameters, gradients and optimizer state: the local shards' storage,
    each storage counted once (tied weights, views). A measurement of live tensors, not a formula."""
    seen: set[int] = set()

    def size(tensors: Iterator[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            local = _local(t)
            if local.device.type == "meta":
                continue
            storage = local.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    params = list(model.parameters())
    out = {"parameters": size(iter(params)),
           "gradients": size(p.grad for p in params if p.grad is not None),
           "optimizer": size(_tensors_of(list(optimizer.state.values()))) if optimizer is not None else 0}
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"]
    return out
