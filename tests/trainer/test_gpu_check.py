"""benchmarks/gpu_check.sh runs end to end without a GPU in its dry mode (tiny models on the CPU), so a session that
is lent a GPU can run it at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.trainer import support

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_prints_every_row_and_a_result_line(tmp_path: Path) -> None:
    env = support.trainer_env(tmp_path)
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry"], cwd=support.REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("RESULT dry=1 ")
    rows = [line for line in lines if line.startswith("| 1b |") or line.startswith("| 7b |")]
    assert len(rows) == 8
    for line in rows:
        if "QLoRA" in line:  # no CUDA: the fail-fast path, exit 78 naming the field
            assert "ConfigError (exit 78): spec.method.lora.quantization 4bit (QLoRA) needs a CUDA GPU" in line
        else:
            assert line.rstrip().endswith("| ok |"), line
    for key in ("1b_ours_full_sps", "1b_trainer_full_sps", "speedup_vs_trainer_7b"):
        assert f" {key}=" in lines[-1]
