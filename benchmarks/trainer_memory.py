"""Trainer memory per rank: DDP, FSDP2, FSDP2 + activation checkpointing, and LoRA with a bf16 base, on CPU with 2
gloo processes, the same Llama-shaped decoder (built from a config, random weights), data and batch.

Each set-up is its own torchrun group (so peak RSS is its own). Measured per rank, never computed:
  - training state: bytes of the parameters, gradients and AdamW state this rank holds after an optimizer step (the
    storage of its local shards);
  - activations: bytes autograd keeps from the forward pass for the backward pass (saved-tensor hooks);
  - peak RSS over the run, and its growth over the process after imports;
  - samples/s over the training steps (CPU bf16 is slow on most CPUs: reported, not tuned for).
The last line is machine-readable:

  RESULT fsdp_memory_ratio=<FSDP/DDP training state> ckpt_activation_ratio=<FSDP+AC/FSDP activations> ...

    python benchmarks/trainer_memory.py              # ~4 min on 2 idle cores
    python benchmarks/trainer_memory.py --hidden 256 --layers 2 --steps 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 2**20

SETUPS = [
    ("ddp", "DDP (full copy per rank)", {"sharding": "none", "method": "full"}),
    ("fsdp", "FSDP2", {"sharding": "fsdp", "method": "full"}),
    ("fsdp_ac", "FSDP2 + activation checkpointing", {"sharding": "fsdp", "method": "full",
                                                      "activation_checkpointing": True}),
    ("lora_bf16", "LoRA, bf16 base (DDP)", {"sharding": "none", "method": "lora", "precision": "bf16",
                                             "frozen_in_compute_dtype": True}),
]


def run_setup(name: str, run: dict[str, Any], tmp: Path, processes: int) -> dict[str, Any]:
    out = tmp / f"{name}.json"
    cfg = tmp / f"{name}-config.json"
    cfg.write_text(json.dumps({"out": str(out), "runs": [{"name": name, **run}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp / f"{name}.log"
    with log.open("wb") as f:
        code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(processes), "-m", "tests.trainer.sharded_worker", str(cfg)], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=3600).returncode
    if code != 0:
        raise SystemExit(f"{name} failed ({code}):\n{log.read_text()[-4000:]}")
    return json.loads(out.read_text())[name]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=4, help="rows per rank and micro-batch")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    config = {"vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": int(args.hidden * 2.6875),
              "num_hidden_layers": args.layers, "num_attention_heads": max(1, args.hidden // 64),
              "num_key_value_heads": max(1, args.hidden // 128), "max_position_embeddings": args.seq}
    common = {"config": config, "steps": args.steps, "grad_accum": 1, "global_batch": args.batch * args.processes,
              "seq": args.seq, "lr": 1e-4}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="trainer-memory-") as tmp:
        for name, _, run in SETUPS:
            results[name] = run_setup(name, {**common, **run}, Path(tmp), args.processes)
            print(f"  {name} done", file=sys.stderr, flush=True)

    params = _parameters(config)
    print(f"Llama-shaped decoder: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {params / 1e6:.1f}M "
          f"parameters; {args.processes} processes (gloo, CPU), {args.batch} x {args.seq} tokens per rank and step, "
          f"AdamW, {args.steps} steps. Per rank (rank 0; rank 1 within 1%):\n")
    print("| set-up | params | grads | optimizer | training state | activations kept | peak RSS | RSS growth "
          "| samples/s | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, label, _ in SETUPS:
        r = results[name]
        m = r["memory"][0]
        growth = r["peak_rss"][0] - r["start_rss"][0]
        parts = " | ".join(f"{m[k] / MB:.1f} MB" for k in ("parameters", "gradients", "optimizer", "total"))
        print(f"| {label} | {parts} | {r['saved_activation_bytes'][0] / MB:.1f} MB "
              f"| {r['peak_rss'][0] / MB:.0f} MB | {growth / MB:.0f} MB | {r['samples_per_second']:.2f} "
              f"| {r['losses'][-1]:.4f} |")
    ddp, fsdp, ac, lora = (results[k] for k in ("ddp", "fsdp", "fsdp_ac", "lora_bf16"))
    fsdp_ratio = fsdp["memory"][0]["total"] / ddp["memory"][0]["total"]
    ac_ratio = ac["saved_activation_bytes"][0] / fsdp["saved_activation_bytes"][0]
    rss_ratio = (fsdp["peak_rss"][0] - fsdp["start_rss"][0]) / max(1, ddp["peak_rss"][0] - ddp["start_rss"][0])
    lora_ratio = lora["memory"][0]["total"] / ddp["memory"][0]["total"]
    ac_slowdown = fsdp["samples_per_second"] / ac["samples_per_second"]
    print(f"\nFSDP/DDP loss difference at the last step: {abs(fsdp['losses'][-1] - ddp['losses'][-1]):.2e}; "
          f"FSDP+AC/FSDP: {abs(ac['losses'][-1] - fsdp['losses'][-1]):.2e}")
    print(f"RESULT fsdp_memory_ratio={fsdp_ratio:.3f} ckpt_activation_ratio={ac_ratio:.3f} "
          f"fsdp_rss_growth_ratio={rss_ratio:.3f} lora_bf16_state_ratio={lora_ratio:.3f} "
          f"ckpt_slowdown={ac_slowdown:.2f}")
    return 0


def _parameters(config: dict[str, Any]) -> int:
    h, i, v, n = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


if __name__ == "__main__":
    raise SystemExit(main())
