"""Trainer memory per rank: DDP, FSDP2, FSDP2 + activation checkpointing, and LoRA with a bf16 base, on CPU with 2
gloo processes: the real trainer (`python -m finetune_trainer.launch`, torchrun) running one FineTuneJob manifest per
set-up, on the same Llama-shaped decoder (built from a config with random weights and saved with save_pretrained, with
a word-level tokenizer of the same vocabulary), data and batch.

Each set-up is its own torchrun group. Measured per rank, never computed, and reported by the trainer itself in
metrics.json (`memory.measuredPerRank`, after the first optimizer step of the run):
  - training state: bytes of the parameters, gradients and AdamW state this rank holds (the storage of its local
    shards);
  - activations: bytes autograd keeps from the first micro-batch's forward pass for the backward pass;
and by this script: the peak RSS of the largest worker, and samples/s over the training steps (metrics.json;
CPU bf16 is slow on most CPUs: reported, not tuned for). Beside them, the trainer's own estimate (`memory.estimate`)
of the per-device total. The last line is machine-readable:

  RESULT fsdp_memory_ratio=<FSDP/DDP training state> ckpt_activation_ratio=<FSDP+AC/FSDP activations> ...

    python benchmarks/trainer_memory.py              # about 5 min on 2 idle cores
    python benchmarks/trainer_memory.py --hidden 256 --layers 2 --steps 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MB = 2**20

SETUPS = [
    ("ddp", "DDP (full copy per rank)", {"resources": {"sharding": "none"}}),
    ("fsdp", "FSDP2", {"resources": {"sharding": "fsdp"}}),
    ("fsdp_ac", "FSDP2 + activation checkpointing", {"resources": {"sharding": "fsdp"},
                                                      "hyperparameters": {"activationCheckpointing": True}}),
    ("lora_bf16", "LoRA, bf16 base (DDP)", {"resources": {"sharding": "none"}, "hyperparameters": {"precision": "bf16"},
                                             "method": {"type": "lora", "lora": {"dropout": 0.0}}}),
]
# Runs the launcher and reports the peak RSS of its largest descendant (the workers are reaped by the launcher).
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
            "sys.exit(code)")


def build_model(path: Path, args: argparse.Namespace) -> None:
    """A Llama-shaped decoder and a word-level tokenizer over the words w0 .. w<vocab>."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(args.vocab - 4)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    tok.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def write_data(path: Path, args: argparse.Namespace) -> None:
    """Prompt/response rows of random words that fill the sequence length (one token per word, plus EOS)."""
    rng = random.Random(0)
    half = (args.seq - 2) // 2
    rows = args.batch * args.processes * (args.steps + 1)
    with path.open("w") as f:
        for _ in range(rows):
            prompt, response = ([f"w{rng.randrange(args.vocab - 4)}" for _ in range(half)] for _ in range(2))
            f.write(json.dumps({"prompt": " ".join(prompt), "response": " ".join(response)}) + "\n")


def spec(args: argparse.Namespace, tmp: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task": {"type": "causal-lm"},
        "model": {"source": str(tmp / "model")},
        "dataset": {"train": str(tmp / "train.jsonl")},
        "method": {"type": "full"},
        "hyperparameters": {"maxSteps": args.steps, "batchSize": args.batch, "learningRate": 1e-4,
                            "maxSeqLength": args.seq, "precision": "fp32", "seed": 0},
        "checkpointing": {"everySteps": 1000, "everyEpoch": False},
        "resources": {"workers": args.processes, "gpusPerWorker": 0},
        "output": {"storage": str(tmp / name)},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if key != "method" else value
    return base


def run_setup(name: str, doc: dict[str, Any], tmp: Path, processes: int) -> dict[str, Any]:
    job = tmp / f"{name}.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                   "metadata": {"name": name.replace("_", "-")}, "spec": doc}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE_DIR": str(tmp / "cache"), "HF_DATASETS_CACHE": str(tmp / "hf")}
    log = tmp / f"{name}.log"
    with log.open("wb") as f:
        code = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "finetune_trainer.launch",
                               "--standalone", "--nproc_per_node", str(processes), "-m", "finetune_trainer",
                               str(job), "--no-progress-bar"], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=3600).returncode
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{name} failed ({code}):\n{text[-4000:]}")
    result = json.loads((Path(doc["output"]["storage"]) / "metrics.json").read_text())
    result["peak_rss"] = int(text.rsplit("PEAK_RSS ", 1)[1].split()[0])
    return dict(result)


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
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="trainer-memory-") as name:
        tmp = Path(name)
        build_model(tmp / "model", args)
        write_data(tmp / "train.jsonl", args)
        for key, _, overrides in SETUPS:
            results[key] = run_setup(key, spec(args, tmp, key, overrides), tmp, args.processes)
            print(f"  {key} done", file=sys.stderr, flush=True)

    params = _parameters(args)
    print(f"Llama-shaped decoder: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {params / 1e6:.1f}M "
          f"parameters; {args.processes} processes (gloo, CPU), {args.batch} x {args.seq} tokens per rank and step, "
          f"AdamW, {args.steps} steps; the real trainer, one manifest per set-up. Rank 0 (the training state of "
          f"the other ranks differs by at most {_rank_spread(results):.1%}):\n")
    print("| set-up | params | grads | optimizer | training state | activations kept | estimate (total) "
          "| peak RSS | samples/s | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, label, _ in SETUPS:
        r = results[key]
        m = r["memory"]["measuredPerRank"][0]
        parts = " | ".join(f"{m[k] / MB:.1f} MB" for k in ("parameters", "gradients", "optimizer", "total"))
        print(f"| {label} | {parts} | {m['activations'] / MB:.1f} MB | {r['memory']['perDeviceBytes'] / MB:.1f} MB "
              f"| {r['peak_rss'] / MB:.0f} MB | {r['samplesPerSecond']:.2f} | {r['lossCurve'][-1][1]:.4f} |")
    ddp, fsdp, ac, lora = (results[k]["memory"]["measuredPerRank"][0] for k in ("ddp", "fsdp", "fsdp_ac", "lora_bf16"))
    loss = {k: results[k]["lossCurve"][-1][1] for k in results}
    print(f"\nFSDP/DDP loss difference at the last step: {abs(loss['fsdp'] - loss['ddp']):.2e}; "
          f"FSDP+AC/FSDP: {abs(loss['fsdp_ac'] - loss['fsdp']):.2e}")
    print(f"RESULT fsdp_memory_ratio={fsdp['total'] / ddp['total']:.3f} "
          f"ckpt_activation_ratio={ac['activations'] / fsdp['activations']:.3f} "
          f"fsdp_rss_ratio={results['fsdp']['peak_rss'] / results['ddp']['peak_rss']:.3f} "
          f"lora_bf16_state_ratio={lora['total'] / ddp['total']:.3f} "
          f"ckpt_slowdown={results['fsdp']['samplesPerSecond'] / results['fsdp_ac']['samplesPerSecond']:.2f}")
    return 0


def _rank_spread(results: dict[str, dict[str, Any]]) -> float:
    """The largest relative difference of any rank's training state from rank 0's."""
    spread = 0.0
    for r in results.values():
        ranks = r["memory"]["measuredPerRank"]
        spread = max(spread, *(abs(m["total"] - ranks[0]["total"]) / ranks[0]["total"] for m in ranks))
    return spread


def _parameters(args: argparse.Namespace) -> int:
    h, i, v, n = args.hidden, int(args.hidden * 2.6875), args.vocab, args.layers
    kv = h * max(1, h // 128) // max(1, h // 64)
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


if __name__ == "__main__":
    raise SystemExit(main())
