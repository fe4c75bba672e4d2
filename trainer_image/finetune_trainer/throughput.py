"""How long a job should take, before it starts: training tokens per second per device, and the time they add up to.

The figure comes from the spec when the user has one (`spec.preflight.tokensPerSecond`, e.g. from an earlier run's
`status.progress.tokensPerSecond`), else from the model's size: training costs about 6 FLOPs per parameter and token
(2 forward, 4 backward; frozen weights need no weight gradient, so LoRA's base costs 4; activation checkpointing one
more forward, 2), divided by what the device does. A GPU's dense 16-bit peak comes from its type (the nodeSelector's
`nvidia.com/gpu.product`, GPU Feature Discovery's label) at an assumed utilisation; a CPU's fp32 matmul rate is
measured on the spot at the utilisation this project's throughput benchmark measured for its own trainer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from finetune_api.spec import FineTuneJobSpec
from finetune_api.times import humanize_eta

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by a substring of the
# product label; the first match wins, so longer names come first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100-PCIE", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0),
)
DEFAULT_GPU = ("A100", 312.0)  # when the job does not say which GPU: a common data-centre GPU
GPU_UTILISATION = 0.40  # assumed: typical for fine-tuning; not measured on a GPU in this project yet
CPU_UTILISATION = 0.60  # benchmarks/trainer_throughput.py: the trainer reached 62% of fp32 matmul peak on 2 cores
PRODUCT_LABEL = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float  # training tokens per second per device
    basis: str  # where it comes from, for status


def flops_per_token(non_embedding_params: int, trainable_share: float, checkpointing: bool) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for the inputs' gradients plus 2N for trainable weights."""
    n = float(non_embedding_params)
    return 2 * n + 2 * n + 2 * n * trainable_share + (2 * n if checkpointing else 0.0)


def gpu_peak(product: str | None) -> tuple[str, float]:
    """(name, peak FLOP/s) of a GPU product label; the default GPU when unknown."""
    upper = (product or "").upper()
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in upper:
            return key, tflops * 1e12
    return DEFAULT_GPU[0], DEFAULT_GPU[1] * 1e12


def measure_cpu_flops(threads: int, seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s of this machine with `threads` threads (a few tenths of a second of work)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        torch.mm(a, b)
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            torch.mm(a, b)
            n += 1
        return 2 * 512**3 * n / max(elapsed, 1e-9)
    finally:
        torch.set_num_threads(before)


def for_spec(spec: FineTuneJobSpec, flops: float, cpu_flops: float | None = None) -> Throughput:
    """The job's training throughput per device, and where the figure comes from. `flops`: training FLOPs per
    token; `cpu_flops`: the measured fp32 rate of the CPU the job would train on (CPU jobs)."""
    given = spec.preflight.tokens_per_second
    if given is not None:
        return Throughput(given, "spec.preflight.tokensPerSecond")
    if spec.resources.gpus_per_worker > 0:
        product = (spec.resources.node_selector or {}).get(PRODUCT_LABEL)
        name, peak = gpu_peak(product)
        where = f"nodeSelector {PRODUCT_LABEL} {product}" if product else f"no GPU type given: assumed {name}"
        return Throughput(peak * GPU_UTILISATION / flops,
                          f"derived: {flops / 1e9:.3g} GFLOP per token over {name} bf16 peak {peak / 1e12:.0f} "
                          f"TFLOP/s at an assumed {GPU_UTILISATION:.0%} utilisation ({where})")
    rate = cpu_flops or 0.0
    return Throughput(rate * CPU_UTILISATION / flops,
                      f"derived: {flops / 1e9:.3g} GFLOP per token over this CPU's measured fp32 matmul rate "
                      f"{rate / 1e9:.0f} GFLOP/s at the trainer's measured {CPU_UTILISATION:.0%} utilisation")


@dataclass(frozen=True)
class TimeEstimate:
    wall_seconds: int
    gpu_seconds: int

    @property
    def wall(self) -> str:
        return humanize_eta(self.wall_seconds) or "0s"


def estimate(train_tokens: float, eval_tokens: float, evaluations: int, tokens_per_second: float, devices: int,
             gpus: int) -> TimeEstimate:
    """Wall time for `train_tokens` on `devices` devices sharing the work, plus the evaluations (forward passes
    only: a third of a training token's work); GPU-seconds for `gpus` GPUs held all that time."""
    rate = max(tokens_per_second, 1e-9) * max(1, devices)
    wall = train_tokens / rate + evaluations * eval_tokens / (3 * rate)
    return TimeEstimate(round(wall), round(wall * gpus))
