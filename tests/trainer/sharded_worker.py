"""A small training loop over the trainer's sharding modules, run under torchrun (or as one plain process) by the
sharding tests and the memory benchmark until the real loop is wired to them.

It trains a tiny Llama built from a config (same seed on every rank, so every run starts from the same weights) on
deterministic token batches: step s, micro-batch m draws a global batch of `global_batch` rows and rank r trains on
its slice, so DDP, FSDP and a single process see the same data and should follow the same trajectory.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.trainer.sharded_worker config.json

The config (JSON) lists runs; rank 0 writes results to config["out"]: per-step losses, every rank's measured
parameter/gradient/optimizer bytes, saved-activation bytes and samples/s.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from finetune_trainer import memory, sharded_checkpoint, sharding
from finetune_trainer.checkpoint import CheckpointManager
from finetune_trainer.distributed import Dist, init_from_env
from finetune_trainer.locations import storage
from finetune_trainer.loop import make_optimizer
from finetune_trainer.modeling import choose_precision

LLAMA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def build_model(run: dict[str, Any]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(run.get("seed", 0))
    cfg = LlamaConfig(**{**LLAMA, **run.get("config", {})})
    cfg.use_cache = False
    model = LlamaForCausalLM(cfg)
    if run.get("method") == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def batch(run: dict[str, Any], step: int, micro: int, dist: Dist) -> torch.Tensor:
    rows, seq = run.get("global_batch", 4), run.get("seq", 16)
    vocab = run.get("config", {}).get("vocab_size", LLAMA["vocab_size"])
    g = torch.Generator().manual_seed(1000 * step + micro)
    # Learnable data: each row counts up from a random start, so the loss falls well below chance.
    starts = torch.randint(0, vocab, (rows, 1), generator=g)
    full = (starts + torch.arange(seq)) % vocab
    per = rows // dist.world
    return full[dist.rank * per:(dist.rank + 1) * per].to(dist.device)


def train(run: dict[str, Any], dist: Dist) -> dict[str, Any]:
    precision = choose_precision(run.get("precision", "fp32"), dist.device)
    model = build_model(run)
    w = sharding.wrap_model(model, sharding=run["sharding"], precision=precision, dist=dist,
                            activation_checkpointing=run.get("activation_checkpointing", False),
                            frozen_in_compute_dtype=run.get("frozen_in_compute_dtype"))
    opt = make_optimizer(w.model, run.get("lr", 1e-2), 0.0)
    accum, steps = run.get("grad_accum", 2), run["steps"]
    ckpt_dir = Path(run["checkpoint_dir"]) if run.get("checkpoint_dir") else None
    manager = None
    if ckpt_dir is not None and dist.main:
        manager = CheckpointManager(storage(str(ckpt_dir), Path("."), ckpt_dir / ".cache", {},
                                           "checkpointing.storage"), keep_last=run.get("keep_last", 2))
        manager.clean_partials()
    start, losses, resumed = 0, [], None
    if ckpt_dir is not None:
        steps_done = dist.gather([c.step for c in manager.complete()] if manager is not None else None)[0]
        if steps_done:
            path = ckpt_dir / f"checkpoint-{steps_done[-1]}"
            sharded_checkpoint.load(path, w.module, opt)
            state = json.loads((path / "trainer_state.json").read_text())
            start, losses, resumed = state["step"], state["losses"], state["step"]
    measured: dict[str, int] | None = None
    act_bytes = 0
    t0, timed_from = time.perf_counter(), start
    for step in range(start, steps):
        loss_sum = 0.0
        for m in range(accum):
            x = batch(run, step, m, dist)
            with w.accumulating(last=m == accum - 1):
                with memory.SavedTensorBytes() as saved, w.autocast(dist.device):
                    out = w.module(input_ids=x, labels=x)
                act_bytes = max(act_bytes, saved.bytes)
                (out.loss / accum).backward()
            loss_sum += float(out.loss.detach()) / accum
        w.clip_grad_norm(run.get("max_grad_norm", 0.5))
        opt.step()
        if measured is None:  # after the first step: optimizer state exists, gradients are still there
            measured = sharding.resident_bytes(w.model, opt)
            t0, timed_from = time.perf_counter(), step + 1  # throughput without the warm-up step
        opt.zero_grad(set_to_none=True)
        losses.append(dist.sum([loss_sum])[0] / dist.world)
        done = step + 1
        if ckpt_dir is not None and done % run.get("checkpoint_every", 2) == 0:
            state = {"step": done, "losses": losses}
            sharded_checkpoint.save(manager, dist, done, w.module, opt, root=ckpt_dir,
                                    write_small_files=lambda tmp, s=state: (tmp / "trainer_state.json").write_text(
                                        json.dumps(s)))
        if run.get("pause_after_step") == done:
            _pause(run, dist)
    seconds = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result: dict[str, Any] = {"losses": losses, "resumed_from": resumed, "world": dist.world,
                              "peak_rss": dist.gather(peak_rss), "start_rss": dist.gather(run.get("_start_rss", 0)),
                              "memory": dist.gather(measured), "saved_activation_bytes": dist.gather(act_bytes),
                              "samples_per_second": (steps - timed_from) * accum * run.get("global_batch", 4) / seconds}
    if run.get("final_dir"):
        sharded_checkpoint.save_pretrained(w.module, w.model, Path(run["final_dir"]), dist,
                                           adapters_only=run.get("method") == "lora")
        with torch.no_grad():
            x = batch(run, 10_000, 0, dist)
            eval_loss = float(w.module(input_ids=x, labels=x).loss)
        result["eval_loss"] = dist.sum([eval_loss])[0] / dist.world
    return result


def _pause(run: dict[str, Any], dist: Dist) -> None:
    """Tell the test this step is done, then wait for it (it normally kills the group here)."""
    gate = Path(run["gate"])
    if dist.main:
        (gate.parent / f"{gate.name}.reached").write_text("1")
    deadline = time.monotonic() + 600
    while not gate.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the test never released the pause gate")
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(os.environ.get("FINETUNE_THREADS", "1")))
    dist = init_from_env(timeout_s=300)
    import psutil

    start_rss = psutil.Process().memory_info().rss  # after the imports: what each run adds on top of it
    results: dict[str, Any] = {}
    try:
        for run in config["runs"]:
            results[run["name"]] = train({**config.get("defaults", {}), **run, "_start_rss": start_rss}, dist)
            if dist.main:
                Path(config["out"]).write_text(json.dumps(results, indent=1))
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
