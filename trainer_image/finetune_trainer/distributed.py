"""torchrun support: process group from the environment (NCCL on GPUs, gloo on CPU), the model's wrapping across the
processes (DDP or FSDP2, finetune_trainer.sharding) and the few collectives the trainer needs. With one process every
helper is a no-op, so the single-process path has no distributed code.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from finetune_trainer import errors
from finetune_trainer.errors import TrainerError
from finetune_trainer.sharding import Layout, Wrapped, wrap

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum across ranks of a few floats (one small all-reduce)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, error: TrainerError | None) -> None:
        """Raise the same error on every rank if any rank failed, so no rank waits forever in a collective."""
        found = [e for e in self.gather((type(error).__name__, error.message) if error else None) if e]
        if found:
            cls = getattr(errors, found[0][0], TrainerError)
            raise cls(found[0][1])

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run `work` on rank 0 alone, then raise the TrainerError it raised there on every rank; the other ranks
        get None. Anything else `work` raises is a crash of rank 0 and propagates there."""
        result: T | None = None
        error: TrainerError | None = None
        if self.main:
            try:
                result = work()
            except TrainerError as exc:
                error = exc
        self.agree(error)
        return result

    def wrap(self, model: torch.nn.Module, layout: Layout | None = None) -> Wrapped:
        """The model as the loop trains it, on this rank's device: DDP across processes (gradients averaged in
        backward) or FSDP2 shards, as `layout` says (default: DDP, no activation checkpointing), else the model."""
        return wrap(model, layout or Layout(), self.device, self.world)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# What torch's transports say when the other end of a connection went away: gloo's TCP pairs and the TCPStore
# ("Connection reset/closed by peer"), NCCL's remote errors. Deliberately narrow: a local fault misread as a lost peer
# would not be counted against backoffLimit.
PEER_LOSS_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "remote process exited or there was a network error",  # ncclRemoteError
)


def is_peer_loss(exc: BaseException, world: int) -> bool:
    """Whether `exc` (or what caused it) says that another process of the group died or became unreachable."""
    if world <= 1:
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, dist.DistNetworkError):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_LOSS_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


def init_from_env(timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun group if WORLD_SIZE > 1; pick the device (this rank's GPU, else CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    d = Dist(rank, world, local_rank, device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return d
