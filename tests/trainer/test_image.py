"""The trainer image cannot be built here (no Docker engine): check what it declares against what is installed —
the ENTRYPOINT is our console script, its default argument runs the trainer, and the final stage stays lean."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from finetune_api import exitcodes
from tests.trainer import support

DOCKERFILE = support.REPO / "trainer_image" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_entrypoint_is_the_trainer_console_script(tmp_path: Path) -> None:
    final = dict(_final_stage())
    entrypoint = json.loads(final["ENTRYPOINT"])
    cmd = json.loads(final["CMD"])
    scripts = tomllib.loads((support.REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["finetune-trainer"]
    assert scripts["finetune-trainer"] == "finetune_trainer.__main__:main"
    assert cmd == ["/etc/finetune/job.yaml"]
    script = Path(sys.executable).parent / entrypoint[0]
    # The declared default argument reaches the trainer: the manifest is missing here, a configuration error.
    log = tmp_path / "termination-log"
    env = support.trainer_env(tmp_path, FINETUNE_TERMINATION_LOG=str(log))
    done = subprocess.run([str(script), *cmd], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == exitcodes.CONFIG_ERROR, done.stderr
    assert "/etc/finetune/job.yaml does not exist" in log.read_text()
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60).stdout
    for option in ("--pvc-root", "--metrics-port", "--progress-url", "--grace-period", "--threads",
                   "--no-progress-bar"):
        assert option in help_text


def test_finetune_run_reaches_the_trainer_through_its_entry_point(tmp_path: Path) -> None:
    """`finetune run` (finetune_api's console) finds the trainer by its entry point, not by importing it."""
    log = tmp_path / "termination-log"
    env = support.trainer_env(tmp_path, FINETUNE_TERMINATION_LOG=str(log))
    script = Path(sys.executable).parent / "finetune"
    done = subprocess.run([str(script), "run", str(tmp_path / "missing.yaml")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == exitcodes.CONFIG_ERROR, done.stderr
    assert f"{tmp_path / 'missing.yaml'} does not exist" in log.read_text()


def test_image_is_multi_stage_non_root_and_trainer_only() -> None:
    ins = _instructions()
    assert sum(1 for w, _ in ins if w == "FROM") >= 2
    final = _final_stage()
    user = [rest for w, rest in final if w == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    final_text = " ".join(rest for _, rest in final)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make)\b", final_text)
    installs = " ".join(rest for w, rest in ins if w == "RUN" and "pip install" in rest)
    assert "[trainer" in installs and "operator" not in installs and "dev" not in installs
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "FINETUNE_PVC_ROOT=/mnt/pvc" in env and "FINETUNE_TERMINATION_LOG=/dev/termination-log" in env
