"""The suite guards itself: every test has a deadline, and CI never runs with the cluster tests switched off."""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_every_test_has_a_deadline(pytestconfig: pytest.Config) -> None:
    addopts = shlex.split(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
                          ["addopts"])
    assert "--timeout=300" in addopts
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"


def test_ci_refuses_to_skip_the_cluster_tests(tmp_path: Path) -> None:
    # PATH holds bash only: should the refusal ever break, nothing else of CI can start from here.
    (tmp_path / "bash").symlink_to("/bin/bash")
    result = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, timeout=30,
                            env={"FINETUNE_SKIP_CLUSTER": "1", "PATH": str(tmp_path)}, check=False)
    assert result.returncode == 2, result
    assert result.stderr == ("FINETUNE_SKIP_CLUSTER is set: CI runs every test, the cluster and real-node tests "
                             "included; unset it\n")
