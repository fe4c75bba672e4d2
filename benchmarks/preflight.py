"""The pre-flight's two promises, measured with the real trainer on CPU:

1. The memory plan is trustworthy: the plan the trainer makes (the widest batch of the real data, the process itself
   counted on CPU; metrics.json `memory.perDeviceBytes`) against the peak RSS of the largest training process, for
   the demo (examples/sentiment.yaml, shortened), the LoRA example's settings (examples/instruction-lora.yaml: chat
   messages, LoRA r 16 on q/k/v/o, batch 8, maxSeqLength 1024; on a Llama-shaped decoder built from a config, as the
   example's Qwen cannot be downloaded here) and a 2-process FSDP run. Beside them, the plan as it was before (every
   batch maxSeqLength long, logits over the vocabulary for every task, no process baseline).
2. Its work is not wasted: seconds from the trainer process's start to its first optimizer step, without the token
   cache (the trainer tokenises) and after a pre-flight wrote it (the trainer logs that it read the cache).

    python benchmarks/preflight.py            # about 20 minutes on 2 busy cores

The memory runs train one whole epoch (the plan is for the widest batch, which a few steps may not meet). Times are
also given in CPU seconds of the trainer process, which other load on the machine does not change. A plan
accepts a memory limit when its estimate fits 92% of it (`memory.USABLE_FRACTION`), so the table compares the
smallest limit each plan accepts with the peak: below 1, the plan accepts what the kernel kills. The last line is
machine-readable: RESULT accepted_over_peak_min=... accepted_over_peak_max=... old_accepted_over_peak_min=...
old_accepted_over_peak_max=... first_step_cpu_saved_demo=... data_cpu_saved_demo=... first_step_cpu_saved_lora=...
data_cpu_saved_lora=... cache_read=...  (`--only memory` or `--only starts` runs one half)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.trainer_memory import PEAK_RSS  # noqa: E402

GB = 1e9
STEP = re.compile(r"finetune_trainer\.progress: step 1/")
DATA_START = re.compile(r"finetune_trainer\.job: job ")  # the job's first line: data preparation follows it
DATA_END = re.compile(r"finetune_trainer\.job: data: ")
CACHE = re.compile(r"using tokenised \w+ from cache")
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def demo_job(tmp: Path, samples: int) -> dict[str, Any]:
    job = yaml.safe_load((REPO / "examples" / "sentiment.yaml").read_text())
    spec = job["spec"]
    spec["dataset"]["maxSamples"] = samples
    spec["output"]["storage"] = str(tmp / "demo-out")
    spec["checkpointing"] = {"everySteps": 1000, "keepLast": 1}
    spec["hyperparameters"].pop("evalEverySteps")
    spec["dataset"].pop("validation")
    return job


def build_chat_model(path: Path, vocab: int, hidden: int, layers: int) -> None:
    """A Llama-shaped decoder from a config and a word-level tokenizer with a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 4)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def write_chats(path: Path, rows: int, vocab: int, longest: int) -> None:
    """Conversations of varying length (most short, a few long): the length histogram real chat data has."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            words = longest if i == rows // 2 else min(longest, int(rng.lognormvariate(4.0, 0.6)))
            turns = [{"role": "user", "content": " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(words // 2))},
                     {"role": "assistant",
                      "content": " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(words - words // 2))}]
            f.write(json.dumps({"messages": turns}) + "\n")


def lora_job(tmp: Path, steps: int) -> dict[str, Any]:
    """The LoRA example's settings on the local chat model: one epoch (`steps` 0) or `steps` optimizer steps."""
    ex = yaml.safe_load((REPO / "examples" / "instruction-lora.yaml").read_text())["spec"]
    hp = {**ex["hyperparameters"], "epochs": 1, "gradientAccumulationSteps": 1, "precision": "fp32"}
    hp.pop("evalEverySteps")
    if steps:
        hp.pop("epochs")
        hp["maxSteps"] = steps
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "lora"}, "spec": {
        "task": ex["task"], "model": {"source": str(tmp / "chat-model")},
        "dataset": {"train": str(tmp / "chats.jsonl"), "columns": ex["dataset"]["columns"]},
        "method": ex["method"] | {"lora": {**ex["method"]["lora"], "dropout": 0.0}},
        "hyperparameters": hp, "checkpointing": {"everySteps": 1000, "everyEpoch": False},
        "output": {"storage": str(tmp / "lora-out")}, "resources": {"workers": 1, "gpusPerWorker": 0}}}


def fsdp_job(tmp: Path, steps: int) -> dict[str, Any]:
    job = lora_job(tmp, steps)
    spec = job["spec"]
    spec["method"] = {"type": "full"}
    spec["hyperparameters"].update(batchSize=4)
    spec["resources"] = {"workers": 2, "gpusPerWorker": 0, "sharding": "fsdp"}
    spec["output"]["storage"] = str(tmp / "fsdp-out")
    job["metadata"]["name"] = "fsdp"
    return job


def run(tmp: Path, job: dict[str, Any], processes: int = 1, preflight: bool = False) -> dict[str, Any]:
    """One trainer run (or pre-flight) as a subprocess: seconds to the first step, peak RSS, what it logged."""
    path = tmp / f"{job['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "FINETUNE_THREADS": str(max(1, (os.cpu_count() or 2) // processes)),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE_DIR": str(tmp / "cache"),
           "FINETUNE_PVC_ROOT": str(REPO / "runs" / "pvc")}
    trainer = [sys.executable, "-m", "finetune_trainer", str(path), "--no-progress-bar"]
    if preflight:
        trainer.append("--preflight")
    elif processes > 1:
        trainer = [sys.executable, "-m", "finetune_trainer.launch", "--standalone", "--nproc_per_node",
                   str(processes), "-m", "finetune_trainer", str(path), "--no-progress-bar"]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS, *trainer], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_step, data_start, data_end, lines = None, None, None, []
    cpu_step = cpu_data_start = cpu_data_end = None
    wrapper = psutil.Process(proc.pid)

    def cpu() -> float | None:
        """CPU seconds of the trainer process so far: insensitive to what else runs on the machine."""
        try:
            trainer = max(wrapper.children(recursive=True), key=lambda c: c.memory_info().rss)
            t = trainer.cpu_times()
            return float(t.user + t.system)
        except (ValueError, psutil.Error):
            return None

    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        now = time.monotonic() - start
        if first_step is None and STEP.search(line):
            first_step, cpu_step = now, cpu()
        if data_start is None and DATA_START.search(line):
            data_start, cpu_data_start = now, cpu()
        if data_end is None and DATA_END.search(line):
            data_end, cpu_data_end = now, cpu()
    code = proc.wait()
    text = "".join(lines)
    if code != 0:
        raise SystemExit(f"{job['metadata']['name']} failed ({code}):\n{text[-4000:]}")
    data = data_end - data_start if data_start is not None and data_end is not None else None
    cpu_data = cpu_data_end - cpu_data_start if cpu_data_start is not None and cpu_data_end is not None else None
    out: dict[str, Any] = {"first_step": first_step, "data": data, "cpu_step": cpu_step, "cpu_data": cpu_data,
                           "seconds": time.monotonic() - start, "log": text,
                           "peak_rss": int(text.rsplit("PEAK_RSS ", 1)[1].split()[0]),
                           "cached": bool(CACHE.search(text))}
    metrics = Path(job["spec"]["output"]["storage"]) / "metrics.json"
    if not preflight and metrics.exists():
        out["memory"] = json.loads(metrics.read_text())["memory"]
    return out


def memory_module() -> Any:
    from finetune_trainer import memory

    return memory


def old_plan(job: dict[str, Any], processes: int) -> float:
    """The estimate as the trainer made it before: batchSize x maxSeqLength for every batch, vocabulary logits for
    every task, no process baseline."""
    from finetune_api.manifest import FineTuneJob
    from finetune_trainer import job as job_mod
    from finetune_trainer import memory, tasks
    from finetune_trainer.config import RunConfig

    spec = FineTuneJob.model_validate(job).spec
    task = tasks.for_spec(spec)
    cfg = RunConfig(manifest=Path("x"), pvc_root=REPO / "runs" / "pvc")
    shape = job_mod.model_shape(spec, task, job_mod.model_source(spec, cfg, Path(tempfile.gettempdir())))
    hp = spec.hyperparameters
    inp = memory.MemoryInputs(dataclasses.replace(shape, heads=0), "fsdp" if spec.resources.sharding == "fsdp"
                              else "none", processes, hp.batch_size, hp.max_seq_length, "fp32", "gpu")
    est = memory.estimate(inp)  # "gpu": no process baseline, no CPU attention transients, as before
    return est.total - hp.batch_size * hp.max_seq_length * shape.vocab * 4  # nor the loss's log-softmax


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-samples", type=int, default=320, help="examples of the demo's memory run (one epoch)")
    ap.add_argument("--chats", type=int, default=200, help="conversations of the LoRA and FSDP memory runs (one epoch)")
    ap.add_argument("--start-chats", type=int, default=3000, help="conversations of the time-to-first-step runs")
    ap.add_argument("--repeats", type=int, default=2, help="cold and warm starts, interleaved; the best counts")
    ap.add_argument("--only", choices=("memory", "starts"), help="one of the two measurements")
    args = ap.parse_args()
    subprocess.run([sys.executable, str(REPO / "examples" / "stage_demo.py")], check=True, capture_output=True)
    rows: list[tuple[str, float, float, float]] = []
    starts: dict[str, tuple[Any, ...]] = {}
    with tempfile.TemporaryDirectory(prefix="preflight-bench-") as name:
        tmp = Path(name)
        build_chat_model(tmp / "chat-model", vocab=8000, hidden=512, layers=4)
        write_chats(tmp / "chats.jsonl", args.chats, vocab=8000, longest=900)
        # Memory: one whole epoch, so that the widest batch the plan is made for is trained.
        memory_runs = [] if args.only == "starts" else [
            ("demo", demo_job(tmp, args.demo_samples), 1), ("lora", lora_job(tmp, 0), 1), ("fsdp", fsdp_job(tmp, 0), 2)]
        for key, job, procs in memory_runs:
            measured = run(tmp, job, procs)
            plan = measured["memory"]["perDeviceBytes"]
            rows.append((key, plan, old_plan(job, procs), measured["peak_rss"]))
            print(f"  {key}: plan {plan / GB:.2f} GB, peak RSS {measured['peak_rss'] / GB:.2f} GB", file=sys.stderr,
                  flush=True)
        # Start to first step: more data, one step; without the cache, and after a pre-flight wrote it.
        write_chats(tmp / "chats.jsonl", args.start_chats, vocab=8000, longest=900)
        start_runs = [] if args.only == "memory" else [("demo", demo_job(tmp, 4000)), ("lora", lora_job(tmp, 0))]
        for key, job in start_runs:
            job["spec"]["hyperparameters"] = {**job["spec"]["hyperparameters"], "maxSteps": 1}
            job["spec"]["hyperparameters"].pop("epochs", None)
            measured: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "cold_cpu", "warm_cpu",
                                                                  "cold_data", "warm_data")}
            cached = True
            for _ in range(args.repeats):
                shutil.rmtree(job["spec"]["output"]["storage"], ignore_errors=True)  # no token cache
                before = run(tmp, job)
                shutil.rmtree(job["spec"]["output"]["storage"], ignore_errors=True)
                run(tmp, job, preflight=True)  # writes the token cache
                after = run(tmp, job)
                for name, r in (("cold", before), ("warm", after)):
                    measured[name].append(r["first_step"])
                    measured[f"{name}_cpu"].append(r["cpu_step"])
                    measured[f"{name}_data"].append(r["cpu_data"])
                cached = cached and after["cached"]
            starts[key] = (*(min(measured[k]) for k in ("cold", "warm", "cold_cpu", "warm_cpu", "cold_data",
                                                        "warm_data")), cached)
            print(f"  {key}: first step {starts[key]}", file=sys.stderr, flush=True)
    labels = {"demo": "demo (MiniLM, sequence-classification, batch 32, maxSeqLength 128)",
              "lora": "LoRA example's settings (chat messages, r 16, batch 8, maxSeqLength 1024)",
              "fsdp": "2-process FSDP (full, the same data, batch 4), largest process"}
    usable = memory_module().USABLE_FRACTION
    results: list[str] = []
    if rows:
        print("| set-up | plan now | smallest memory it accepts | plan before | peak RSS measured | accepted / peak "
              "now | accepted / peak before |")
        print("|---|---|---|---|---|---|---|")
        for key, plan, old, peak in rows:
            print(f"| {labels[key]} | {plan / GB:.2f} GB | {plan / usable / GB:.2f} GB | {old / GB:.2f} GB | "
                  f"{peak / GB:.2f} GB | {plan / usable / peak:.2f} | {old / usable / peak:.2f} |")
        accepted = [plan / usable / peak for _, plan, _, peak in rows]
        old_accepted = [old / usable / peak for _, _, old, peak in rows]
        results += [f"accepted_over_peak_min={min(accepted):.2f}", f"accepted_over_peak_max={max(accepted):.2f}",
                    f"old_accepted_over_peak_min={min(old_accepted):.2f}",
                    f"old_accepted_over_peak_max={max(old_accepted):.2f}"]
    if starts:
        print("\n| data | start to first step: wall, tokenising | after a pre-flight | CPU seconds to the first step, "
              "tokenising | after a pre-flight | CPU seconds of data preparation, tokenising | after a pre-flight "
              "(cache read, checks skipped) | cache read |")
        print("|---|---|---|---|---|---|---|---|")
        sizes = {"demo": "demo, 4,000 sentences",
                 "lora": f"LoRA example's settings, {args.start_chats:,} conversations"}
        for key, (cold, warm, cold_cpu, warm_cpu, cold_data, warm_data, cached) in starts.items():
            print(f"| {sizes[key]} | {cold:.1f} s | {warm:.1f} s | {cold_cpu:.1f} s | {warm_cpu:.1f} s | "
                  f"{cold_data:.1f} s | {warm_data:.1f} s | {'yes' if cached else 'NO'} |")
        for key, (_, _, cold_cpu, warm_cpu, cold_data, warm_data, _) in starts.items():
            results += [f"first_step_cpu_saved_{key}={cold_cpu - warm_cpu:.1f}",
                        f"data_cpu_saved_{key}={cold_data - warm_data:.1f}"]
        results.append(f"cache_read={int(all(v[-1] for v in starts.values()))}")
    print("RESULT " + " ".join(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
