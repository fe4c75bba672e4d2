"""The suite guards itself: every test has a deadline, CI never runs with tests switched off or narrowed, and a CI run
that skipped, deselected or did not run a test fails (tests/conftest_guard_plugin.py)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest_guard_plugin import CI_ENV, PROJECT_TIMEOUT

REPO = Path(__file__).resolve().parents[2]


def test_every_test_has_the_projects_deadline(pytestconfig: pytest.Config) -> None:
    """pyproject.toml sets the deadline the guard expects, and this session runs with it (whatever set it)."""
    addopts = shlex.split(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
                          ["addopts"])
    assert f"--timeout={PROJECT_TIMEOUT}" in addopts
    timeout = pytestconfig.pluginmanager.get_plugin("timeout")
    assert timeout is not None, "pytest-timeout is not installed"
    if os.environ.get(CI_ENV) == "1":
        assert timeout.get_env_settings(pytestconfig).timeout == PROJECT_TIMEOUT


def _ci_run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # PATH holds bash only: should a refusal ever break, nothing else of CI can start from here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to("/bin/bash")
    return subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, timeout=30,
                          env={**env, "PATH": str(bin_dir)}, check=False)


@pytest.mark.parametrize("skip", ["FINETUNE_SKIP_CLUSTER", "FINETUNE_SKIP_NODE"])
def test_ci_refuses_to_skip_the_cluster_or_node_tests(tmp_path: Path, skip: str) -> None:
    result = _ci_run(tmp_path, {skip: "1"})
    assert result.returncode == 2, result
    assert result.stderr == f"{skip} is set: CI runs every test, the cluster and real-node tests included; unset it\n"


@pytest.mark.parametrize(("variable", "value"), [("PYTEST_ARGS", "-m 'not node'"), ("PYTEST_ADDOPTS", "--timeout=0"),
                                                 ("PYTEST_ADDOPTS", "--deselect tests/node")])
def test_ci_refuses_pytest_arguments_from_the_environment(tmp_path: Path, variable: str, value: str) -> None:
    result = _ci_run(tmp_path, {variable: value})
    assert result.returncode == 2, result
    assert result.stderr == (f"{variable} is set ({value}): CI runs the whole suite with the project's own pytest "
                             "options; unset it\n")


# ------------------------------------------------------------------------ the guard, in a tiny pytest session

TESTS = '''
import pytest

def test_plain():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.cluster
@pytest.mark.e2e
def test_cluster():
    pass
'''


def _inner(tmp_path: Path, *args: str, ci: bool = True, tests: str = TESTS, conftest: str = "",
           ini: str = f"--timeout={PROJECT_TIMEOUT}", env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """A pytest session of its own on a few tests, with the project's guard plugin and markers, as CI runs one."""
    (tmp_path / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'testpaths = ["suite"]\n'
        f'addopts = "-p tests.conftest_guard_plugin -p no:cacheprovider --strict-markers {ini}"\n'
        'markers = ["cluster: c", "e2e: e", "node: n", "slow: s"]\n')
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "test_inner.py").write_text(tests)
    (suite / "conftest.py").write_text(conftest)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != CI_ENV}
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**clean, "PYTHONPATH": str(REPO), **({CI_ENV: "1"} if ci else {}), **(env or {})})


def _table(output: str) -> dict[str, list[int]]:
    """The guard's per-marker table: marker -> collected, passed, failed, skipped, deselected."""
    body = output.split("tests by marker", 1)[1].split("\nmarker ", 1)[1].splitlines()[1:]
    rows = {}
    for line in body:
        words = line.split()
        if len(words) != 6 or not all(w.isdigit() for w in words[1:]):
            break
        rows[words[0]] = [int(w) for w in words[1:]]
    return rows


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "two xdist workers"])
def test_a_whole_run_passes_and_reports_every_marker(tmp_path: Path, workers: list[str]) -> None:
    result = _inner(tmp_path, *workers)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _table(result.stdout) == {"cluster": [1, 1, 0, 0, 0], "e2e": [1, 1, 0, 0, 0], "slow": [1, 1, 0, 0, 0],
                                     "unmarked": [1, 1, 0, 0, 0], "all": [3, 3, 0, 0, 0]}


@pytest.mark.parametrize(("args", "said"), [
    (["-m", "not cluster"], "-m narrows the run"),
    (["-k", "plain"], "-k narrows the run"),
    (["--deselect", "suite/test_inner.py::test_slow"], "--deselect narrows the run"),
    (["--ignore", "suite/test_other.py"], "--ignore narrows the run"),
    (["suite/test_inner.py::test_plain"], "test paths given (suite/test_inner.py::test_plain)"),
    (["--collect-only"], "--collect-only narrows the run"),
    (["--timeout=0"], f"the effective default timeout is 0.0 s, not the project's {PROJECT_TIMEOUT} s"),
    (["-p", "no:timeout", "-o", "addopts=-p tests.conftest_guard_plugin"], "pytest-timeout is not active"),
], ids=["-m", "-k", "--deselect", "--ignore", "a path", "--collect-only", "--timeout=0", "no timeout plugin"])
def test_ci_refuses_what_narrows_the_run_or_lifts_the_deadline(tmp_path: Path, args: list[str], said: str) -> None:
    result = _inner(tmp_path, *args)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert f"{CI_ENV}=1: CI runs the whole suite with the project's deadlines; refused:" in result.stderr
    assert said in result.stderr, result.stderr


@pytest.mark.parametrize(("source", "env", "ini"), [
    ("PYTEST_TIMEOUT", {"PYTEST_TIMEOUT": "0"}, ""),
    ("PYTEST_ADDOPTS", {"PYTEST_ADDOPTS": "--timeout=5"}, f"--timeout={PROJECT_TIMEOUT}"),
    ("ini", {}, "-o timeout=0"),
], ids=["PYTEST_TIMEOUT", "PYTEST_ADDOPTS", "ini"])
def test_ci_reads_the_effective_timeout_whatever_set_it(tmp_path: Path, source: str, env: dict[str, str],
                                                        ini: str) -> None:
    result = _inner(tmp_path, ini=ini, env=env)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "the effective default timeout is" in result.stderr, (source, result.stderr)


def test_ci_refuses_a_test_whose_deadline_is_switched_off(tmp_path: Path) -> None:
    tests = TESTS + "\n@pytest.mark.timeout(0)\ndef test_forever():\n    pass\n"
    result = _inner(tmp_path, tests=tests)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "these tests have no deadline (timeout marker 0): suite/test_inner.py::test_forever" in \
        result.stdout + result.stderr


@pytest.mark.parametrize(("case", "tests", "conftest", "said"), [
    ("skip", TESTS + "\ndef test_skipped():\n    pytest.skip('not today')\n", "",
     "1 test(s) skipped or xfailed:\n      suite/test_inner.py::test_skipped"),
    ("skip marker", TESTS + "\n@pytest.mark.skipif(True, reason='no')\ndef test_skipped():\n    pass\n", "",
     "1 test(s) skipped or xfailed:\n      suite/test_inner.py::test_skipped"),
    ("xfail", TESTS + "\n@pytest.mark.xfail\ndef test_broken():\n    assert False\n", "",
     "1 test(s) skipped or xfailed:\n      suite/test_inner.py::test_broken"),
    ("deselected by a plugin", TESTS, (
        "def pytest_collection_modifyitems(config, items):\n"
        "    dropped = [i for i in items if i.name == 'test_cluster']\n"
        "    items[:] = [i for i in items if i not in dropped]\n"
        "    config.hook.pytest_deselected(items=dropped)\n"),
     "1 test(s) deselected:\n      suite/test_inner.py::test_cluster"),
], ids=["skip", "skip marker", "xfail", "deselected by a plugin"])
def test_ci_fails_a_run_that_skipped_or_deselected_a_test(tmp_path: Path, case: str, tests: str, conftest: str,
                                                          said: str) -> None:
    result = _inner(tmp_path, tests=tests, conftest=conftest)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert f"{CI_ENV}=1: FAILED, the run did not cover the whole suite" in result.stdout
    assert said in result.stdout, result.stdout


def test_ci_fails_a_skip_under_xdist_workers_too(tmp_path: Path) -> None:
    result = _inner(tmp_path, "-n", "2", tests=TESTS + "\ndef test_skipped():\n    pytest.skip('not today')\n")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "1 test(s) skipped or xfailed:\n      suite/test_inner.py::test_skipped" in result.stdout
    deselected = _inner(tmp_path, "-n", "2", conftest=(
        "def pytest_collection_modifyitems(config, items):\n"
        "    dropped = [i for i in items if i.name == 'test_cluster']\n"
        "    items[:] = [i for i in items if i not in dropped]\n"
        "    config.hook.pytest_deselected(items=dropped)\n"))
    assert deselected.returncode == pytest.ExitCode.TESTS_FAILED, deselected.stdout + deselected.stderr
    assert "1 test(s) deselected:\n      suite/test_inner.py::test_cluster" in deselected.stdout


def test_outside_ci_a_run_may_be_narrowed_and_the_table_shows_what_it_left_out(tmp_path: Path) -> None:
    tests = TESTS + "\ndef test_skipped():\n    pytest.skip('not today')\n"
    result = _inner(tmp_path, "-m", "not cluster", tests=tests, ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _table(result.stdout) == {"cluster": [0, 0, 0, 0, 1], "e2e": [0, 0, 0, 0, 1], "slow": [1, 1, 0, 0, 0],
                                     "unmarked": [2, 1, 0, 1, 0], "all": [3, 2, 0, 1, 1]}
    assert "FAILED, the run did not cover" not in result.stdout
