"""How the model is laid over the processes: a full copy on each (DDP) or FSDP2 shards per transformer block, with
activation checkpointing per block. `Dist.wrap` is the one caller of `wrap`.

The loop then calls forward on `Wrapped.module`, runs each micro-batch's backward inside `Wrapped.accumulating`,
clips with `Wrapped.clip_grad_norm` (correct for DTensor shards: the norm is over every rank's shard) and builds
its optimizer over `Wrapped.trainable()`. FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on CUDA with NCCL and,
in the torch this project pins, on CPU with gloo, which is what the CPU tests exercise.

This module knows torch and transformers' model anatomy, nothing of the job: the layout comes in as a `Layout`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

SHARDING_FIELD = "spec.resources.sharding"
CHECKPOINTING_FIELD = "spec.hyperparameters.activationCheckpointing"


@dataclass(frozen=True)
class Layout:
    """How to wrap: `sharding` none (DDP across processes) or fsdp, as the memory plan resolved it; the compute
    dtype (None: fp32) that FSDP gathers weights in and autocast runs in elsewhere; fp16 loss scaling; activation
    checkpointing per transformer block."""

    sharding: str = "none"
    compute_dtype: torch.dtype | None = None
    grad_scaling: bool = False
    activation_checkpointing: bool = False


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


def is_quantized(model: nn.Module) -> bool:
    """A base loaded quantized by bitsandbytes: already on its device, and its packed weights cannot move."""
    return bool(getattr(base_model(model), "is_quantized", False))


# ------------------------------------------------------------------------------------------------------ wrapping
def clip_norm_(params: list[torch.Tensor], max_norm: float) -> None:
    """Clip the gradients of plain tensors to `max_norm`. On CPU, torch's clip_grad_norm_ without its unconditional
    rescale: gradients are only rewritten when the norm is over the limit (the same result; one pass over all
    gradients fewer on most steps). On accelerators torch's (reading the norm back would stall the queue)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if grads[0].device.type != "cpu":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    norm = float(total)
    if norm > max_norm or not math.isfinite(norm):
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


@dataclass
class Wrapped:
    """The model as the loop drives it."""

    module: nn.Module  # call forward on this (DDP, the FSDP2 root, or the model)
    model: nn.Module  # the unwrapped model: its parameters are DTensors under FSDP2
    kind: str  # "single" | "ddp" | "fsdp"
    layout: Layout

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's forward and backward. DDP skips its all-reduce until the last micro-batch;
        FSDP2 reduce-scatters every micro-batch so that gradients stay sharded (memory over network traffic)."""
        if self.kind == "ddp" and not last:
            return self.module.no_sync()  # type: ignore[operator,no-any-return]
        return contextlib.nullcontext()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """FSDP2's mixed-precision policy already gathers the weights in the compute dtype; elsewhere autocast."""
        if self.sharded:
            return contextlib.nullcontext()
        if self.layout.compute_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.layout.compute_dtype)

    def grad_scaler(self) -> Any:
        """fp16 loss scaling (None otherwise); the sharded scaler agrees on inf/nan across ranks' shards."""
        if not self.layout.grad_scaling:
            return None
        if self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler()
        return torch.amp.GradScaler("cuda")

    def clip_grad_norm(self, max_norm: float) -> None:
        """Clip to the global gradient norm. Under FSDP2 torch's clip_grad_norm_ computes it over every rank's shard
        (the DTensor norm is reduced across ranks), so every rank scales by the same factor."""
        params = self.trainable()
        if self.sharded:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        else:
            clip_norm_(params, max_norm)


def mixed_precision_policy(compute_dtype: torch.dtype | None) -> Any:
    """Gather weights in the compute precision and reduce gradients in fp32 (fp32 runs keep fp32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def wrap(model: nn.Module, layout: Layout, device: torch.device, world: int) -> Wrapped:
    """Place `model` on `device` and wrap it for `layout` across `world` processes (an initialised group)."""
    if layout.activation_checkpointing:
        enable_activation_checkpointing(model)
    if not is_quantized(model):
        model.to(device)
    model.train()
    if layout.sharding == "fsdp":
        if world <= 1:
            raise ConfigError(f"{SHARDING_FIELD} fsdp needs more than one process; this run has one")
        return Wrapped(shard(model, layout.compute_dtype, device, world), model, "fsdp", layout)
    if layout.sharding != "none":
        raise ValueError(f"sharding {layout.sharding!r}: resolve auto with memory.plan first")
    if world <= 1:
        return Wrapped(model, model, "single", layout)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return Wrapped(DistributedDataParallel(model, device_ids=ids), model, "ddp", layout)


def shard(model: nn.Module, compute_dtype: torch.dtype | None, device: torch.device, world: int,
          keep_root: bool = True) -> nn.Module:
    """FSDP2: one parameter group per transformer block, then the root for what is left (embeddings, head, norms).
    `keep_root`: keep the root's parameters gathered after the forward pass, for a backward pass that needs them
    at once (a frozen model that only runs forward passes frees them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"{SHARDING_FIELD} fsdp: no transformer blocks found in {type(base_model(model)).__name__}"
                          "; use sharding none")
    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision_policy(compute_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's parameters are needed again at once by the backward pass: keep them gathered after the forward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=not keep_root)
    log.info("FSDP2 over %d processes: %d blocks of %s", world, len(blocks), type(blocks[0]).__name__)
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


class SavedTensorBytes:
    """Measures the activation memory of a forward pass: the bytes of the tensors autograd keeps for the backward
    pass (each storage once; parameters excluded). With activation checkpointing only what the checkpoints keep is
    seen, which is what it saves. The loop measures its first micro-batch with it."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.bytes = 0
        self._ctx: Any = None

    def _pack(self, t: Any) -> Any:
        if not isinstance(t, nn.Parameter) and t.device.type != "meta":
            storage = _local(t).untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
