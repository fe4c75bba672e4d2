"""The trainer at LLM scale on one GPU, in one run of under 8 minutes (see gpu_check.sh, which starts this).

Two decoder shapes built from configs with random weights (throughput and memory do not depend on the weights, and
there is no hub): a 1B class (TinyLlama-1.1B's shape) and a 7B class (Llama-2-7B's shape). For each, on the same
data (random tokens, fixed seed) and batch:

  ours full      this trainer's model set-up and step (`ours` below: the modules a FineTuneJob runs, down to
                 `loop.OptimizerStep`): fp32 weights and AdamW state, bf16 autocast, fused AdamW, clipping
  Trainer full   stock transformers.Trainer, bf16=True, same model, data, batch and activation checkpointing
  ours LoRA      LoRA r=16 on the attention projections, frozen base stored in bf16 (`modeling.frozen_dtype`)
  ours QLoRA     the base loaded 4-bit (NF4) through `job.load_trainable` (transformers' BitsAndBytesConfig)

Reported per row: samples/s and tokens/s after one warm-up step, MFU (6 x non-embedding parameters x tokens/s over
the GPU's dense bf16 peak; full fine-tuning rows), the peak of allocated GPU memory during training, and the
`memory.estimate` for the same plan beside it. The last line is machine-readable (RESULT ...).

--dry shrinks both models to a few layers of width 64 and runs everything on the CPU (QLoRA then checks that it fails
fast with exit 78), so the suite can run the script end to end without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
BUDGET_S = 420.0  # stop starting rows after this (the whole script must end well inside 8 minutes)

SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
DRY_SHAPES = {
    "1b": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 256},
    "7b": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 256},
}
# batch, sequence length, timed steps, activation checkpointing (7B full fine-tuning needs it to fit 141 GB)
RUNS = {"1b": (8, 2048, 8, False), "7b": (2, 2048, 4, True)}
DRY_RUNS = {"1b": (2, 32, 2, False), "7b": (2, 32, 2, True)}
ROWS = ["ours_full", "trainer_full", "ours_lora", "ours_qlora"]
LABELS = {"ours_full": "ours, full bf16", "trainer_full": "stock Trainer, full bf16",
          "ours_lora": "ours, LoRA bf16 base", "ours_qlora": "ours, QLoRA 4-bit"}
# Dense bf16 peak by GPU name (vendor data sheets, SXM parts); anything else uses the measured matmul peak.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


# ------------------------------------------------------------------------------------------------- one process
def _setup() -> tuple[Any, Any]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return torch, device


def _config(shape: dict[str, int], seq: int) -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=seq)
    cfg.use_cache = False
    return cfg


def _data(torch: Any, cfg: Any, batch: int, seq: int, steps: int, device: Any) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(steps + 1)]


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(torch: Any, device: Any) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(torch: Any, device: Any) -> float | None:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None  # CPU: not tracked


class _Tokenizer:
    pad_token_id = 0  # the trainer's model loading only asks the tokenizer for its pad id


def ours(row: str, shape: dict[str, int], run: tuple[int, int, int, bool], tmp: Path) -> dict[str, Any]:
    """This trainer's set-up and step, as a FineTuneJob with these settings runs them: the weights in
    `modeling.frozen_dtype` (fp32 for full fine-tuning; a bf16 base for LoRA), LoRA through `modeling.apply_lora`,
    QLoRA through `job.load_trainable` (BitsAndBytesConfig, peft's k-bit preparation), then `loop.OptimizerStep`
    (`Dist.wrap`: activation checkpointing; bf16 autocast, fused AdamW, clipping at 1.0, the schedule) on batches
    collated by `data.collate`. Only the data (random tokens) and the model's weights (random, built from a config
    instead of read from a hub) differ from a real job."""
    torch, device = _setup()
    import numpy as np
    from transformers import AutoModelForCausalLM

    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer import memory, quantization, tasks
    from finetune_trainer.data import Encoded
    from finetune_trainer.distributed import Dist
    from finetune_trainer.job import load_trainable
    from finetune_trainer.loop import LoopSettings, OptimizerStep
    from finetune_trainer.modeling import apply_lora, choose_precision, frozen_dtype, trainable_in_fp32
    from finetune_trainer.sharding import Layout

    batch, seq, steps, ac = run
    cfg = _config(shape, seq)
    precision = choose_precision("bf16", device)
    method = "full" if row == "ours_full" else "lora"
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "quantization": "4bit" if row == "ours_qlora" else "none"}
    spec = FineTuneJobSpec.model_validate({
        "task": {"type": "causal-lm"}, "model": {"source": str(tmp / "base")}, "dataset": {"train": "random"},
        "method": {"type": method, **({"lora": lora} if method == "lora" else {})},
        "hyperparameters": {"maxSteps": steps + 1, "batchSize": batch, "maxSeqLength": seq, "learningRate": 1e-5,
                            "lrScheduler": {"type": "constant"}, "precision": "bf16", "maxGradNorm": 1.0,
                            "activationCheckpointing": ac},
        "output": {"storage": str(tmp / "out")}})
    task = tasks.for_spec(spec)
    dist = Dist(device=device)
    torch.manual_seed(0)
    if row == "ours_qlora":
        quantization.require_device("4bit", device)  # on CPU: ConfigError (exit 78), reported by the caller
        with torch.device(device):
            AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp / "base")
        gc.collect()
        torch.cuda.empty_cache()
        model = load_trainable(spec, task, str(tmp / "base"), _Tokenizer(), dist, precision)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=frozen_dtype(method, precision))
        if method == "lora":
            model = apply_lora(model, task, spec.method.lora)
        trainable_in_fp32(model)
    layout = Layout("none", precision.autocast_dtype, precision.grad_scaling, ac)
    step = OptimizerStep(model, dist, LoopSettings.of(spec), precision, steps + 1, layout)
    shape_now = memory.model_shape(step.wrapped.model)
    est = memory.estimate(memory.MemoryInputs(shape_now, "none", 1, batch, seq, precision.name, device.type,
                                              lora["quantization"] if method == "lora" else "none", ac))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.vocab_size, ((steps + 1) * batch, seq), generator=g).tolist()
    data = Encoded.from_rows({"input_ids": rows, "labels": rows})
    _peak_reset(torch, device)
    t_first = 0.0
    loss = float("nan")
    for i in range(steps + 1):
        loss, _, _ = step(data, [np.arange(i * batch, (i + 1) * batch)], pad_id=0)
        if i == 0:
            _sync(torch, device)
            t_first = time.perf_counter()
    _sync(torch, device)
    seconds = time.perf_counter() - t_first
    return {"samples_per_second": steps * batch / seconds, "tokens_per_second": steps * batch * seq / seconds,
            "peak_bytes": _peak(torch, device), "estimate_bytes": est.total, "loss": loss,
            "non_embedding_parameters": shape_now.parameters - shape_now.embedding, "device": _device_name(device)}


def trainer(row: str, shape: dict[str, int], run: tuple[int, int, int, bool], tmp: Path) -> dict[str, Any]:
    """Stock transformers.Trainer on the same model, data, batch and activation checkpointing."""
    torch, device = _setup()
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    batch, seq, steps, ac = run
    cfg = _config(shape, seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    rows = [{"input_ids": r, "labels": r} for x in _data(torch, cfg, batch, seq, steps, torch.device("cpu"))
            for r in x]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(torch, device)
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=batch,
                             max_steps=steps + 1, learning_rate=1e-5, bf16=True, use_cpu=device.type == "cpu",
                             gradient_checkpointing=ac, gradient_checkpointing_kwargs={"use_reentrant": False},
                             logging_strategy="no", save_strategy="no", report_to=[],
                             dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, seed=0)
    tr = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    _peak_reset(torch, device)
    tr.train()
    seconds = times[-1] - times[0]
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
    return {"samples_per_second": steps * batch / seconds, "tokens_per_second": steps * batch * seq / seconds,
            "peak_bytes": _peak(torch, device), "estimate_bytes": None, "loss": None,
            "non_embedding_parameters": sum(p.numel() for p in model.parameters()) - emb,
            "device": _device_name(device)}


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matmul_peak() -> float:
    """A measured dense bf16 matmul rate on this GPU (8192^3, mean of 10 after 3 warm-ups)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


def run_model(model: str, dry: bool, rows: list[str], out: Path, deadline: float) -> None:
    """All rows of one model shape, in this process (one start-up); a row that runs out of memory is reported so."""
    shape = (DRY_SHAPES if dry else SHAPES)[model]
    run = (DRY_RUNS if dry else RUNS)[model]
    results: dict[str, Any] = {}
    if not dry and model == "1b":
        results["_matmul_peak"] = matmul_peak()
    for row in rows:
        if time.monotonic() > deadline:
            results[row] = {"status": "skipped: time budget"}
            continue
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            try:
                fn = trainer if row == "trainer_full" else ours
                results[row] = {"status": "ok", **fn(row, shape, run, Path(tmp))}
            except Exception as exc:
                name = type(exc).__name__
                code = getattr(exc, "exit_code", None)
                status = "OOM" if "OutOfMemory" in name else f"{name}{f' (exit {code})' if code else ''}"
                results[row] = {"status": status, "message": str(exc).splitlines()[0][:300] if str(exc) else ""}
        gc.collect()
        out.write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------------------ driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny models on the CPU: checks the script end to end")
    ap.add_argument("--model", choices=sorted(SHAPES), help=argparse.SUPPRESS)  # a child process's part
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model:
        run_model(args.model, args.dry, ROWS, args.out, args.deadline)
        return 0
    start = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for model in SHAPES:
            out = Path(tmp) / f"{model}.json"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(REPO / "operator"), str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")])}
            # time.monotonic() is the machine's clock, shared with the child: the deadline passes as it is.
            cmd = [sys.executable, __file__, "--model", model, "--out", str(out), "--deadline", str(start + BUDGET_S)]
            done = subprocess.run([*cmd, *(["--dry"] if args.dry else [])], cwd=REPO, env=env, check=False,
                                  timeout=BUDGET_S + 60)
            results[model] = json.loads(out.read_text()) if out.exists() else {}
            if done.returncode != 0:
                print(f"{model}: the run exited {done.returncode}", file=sys.stderr)
    return report(results, args.dry, time.monotonic() - start)


def report(results: dict[str, dict[str, Any]], dry: bool, seconds: float) -> int:
    measured_peak = results.get("1b", {}).get("_matmul_peak", 0.0)
    device = next((r.get("device") for m in results.values() for r in m.values()
                   if isinstance(r, dict) and r.get("device")), "?")
    peak = next((v for k, v in BF16_PEAK.items() if k in str(device)), measured_peak) or 0.0
    print(f"gpu_check{' --dry (tiny models on the CPU: no GPU figures)' if dry else ''}: device {device}, bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s (measured matmul {measured_peak / 1e12:.0f}); {seconds:.0f} s\n")
    print("| model | set-up | batch x seq | samples/s | tokens/s | MFU | peak GPU memory | estimate | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, str] = {}
    for model, rows in results.items():
        batch, seq, _, _ = (DRY_RUNS if dry else RUNS)[model]
        for row in ROWS:
            r = rows.get(row, {"status": "missing"})
            sps = r.get("samples_per_second")
            mfu = (6 * r["non_embedding_parameters"] * r["tokens_per_second"] / peak
                   if peak and sps and row.endswith("full") else None)
            cells = [model, LABELS[row], f"{batch} x {seq}", _num(sps, ".2f"), _num(r.get("tokens_per_second"), ",.0f"),
                     _num(mfu, ".1%"), _gb(r.get("peak_bytes")), _gb(r.get("estimate_bytes")),
                     r.get("status", "?") + (f": {r['message']}" if r.get("message") else "")]
            print("| " + " | ".join(cells) + " |")
            if sps:
                summary[f"{model}_{row}_sps"] = f"{sps:.3f}"
            if mfu is not None and row == "ours_full":
                summary[f"mfu_{model}_full"] = f"{mfu:.3f}"
            if r.get("peak_bytes"):
                summary[f"{model}_{row}_peak_gb"] = f"{r['peak_bytes'] / GB:.2f}"
        ours_sps = rows.get("ours_full", {}).get("samples_per_second")
        hf_sps = rows.get("trainer_full", {}).get("samples_per_second")
        if ours_sps and hf_sps:
            summary[f"speedup_vs_trainer_{model}"] = f"{ours_sps / hf_sps:.2f}"
    qlora7 = results.get("7b", {}).get("ours_qlora", {}).get("peak_bytes")
    if qlora7:
        summary["qlora_7b_fits_24gb"] = str(int(qlora7 < 24 * 2**30))
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in {"dry": str(int(dry)), **summary}.items()))
    return 0


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _gb(v: float | None) -> str:
    if not v:
        return "-"
    return f"{v / GB:.2f} GB" if v >= 0.1 * GB else f"{v / 2**20:.1f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
