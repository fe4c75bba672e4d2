"""The command line as a new user meets it: help, --version everywhere, usage errors, stdin, and completion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_api import __version__
from finetune_cli import complete
from finetune_cli.main import CLUSTER_COMMANDS, SHELLS, build_parser, main

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SENTIMENT = REPO / "examples" / "sentiment.yaml"
COMMANDS = ("validate", "crd", "completion", *CLUSTER_COMMANDS)


def run(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None,
        exe: str = "finetune") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / exe), *argv], input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_version_on_every_command(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "--version"] if command else ["--version"]
    with pytest.raises(SystemExit) as exit_:
        main([a for a in argv if a])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"finetune{' ' + command if command else ''} {__version__}\n"


def test_run_help_and_version_reach_the_trainer() -> None:
    """`finetune run --help` used to fail with "unrecognized arguments"."""
    helped = run("run", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: finetune run ") and "--pvc-root" in helped.stdout
    assert run("run", "--version").stdout == f"finetune run {__version__}\n"


def test_the_trainer_names_itself_as_invoked() -> None:
    """--help and usage errors show the command the user typed, however the trainer was started."""
    assert run("run", "--help", exe="kubectl-finetune").stdout.startswith("usage: kubectl finetune run ")
    assert run("--help", exe="finetune-trainer").stdout.startswith("usage: finetune-trainer ")
    module = subprocess.run([sys.executable, "-m", "finetune_trainer", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert module.stdout.startswith("usage: python -m finetune_trainer "), module.stdout
    wrong = run("run", "--bogus")
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: finetune run "), wrong.stderr


def test_usage_errors_exit_2_with_usage() -> None:
    for argv in (["bogus"], ["list", "--bogus"], ["status"], ["list", "-o", "xml"], []):
        result = run(*argv)
        assert result.returncode == 2, argv
        assert result.stderr.startswith("usage: finetune"), result.stderr


def test_help_lists_every_command() -> None:
    text = run("--help").stdout
    for command in (*COMMANDS, "run"):
        assert f"    {command}" in text, command
    assert "finetune watch sentiment-minilm" in text


def test_kubectl_plugin_names_itself() -> None:
    assert run("--version", exe="kubectl-finetune").stdout == f"kubectl finetune {__version__}\n"
    assert run("status", exe="kubectl-finetune").stderr.startswith("usage: kubectl finetune status")


def test_validate_reads_stdin() -> None:
    ok = run("validate", "-", stdin=SENTIMENT.read_text())
    assert ok.returncode == 0 and ok.stdout == "<stdin>: valid\n", ok.stderr
    bad = run("validate", "-", str(SENTIMENT), stdin=SENTIMENT.read_text().replace("epochs: 1", "epochs: 0"))
    assert bad.returncode == 1
    assert bad.stderr.startswith("<stdin>: spec.hyperparameters.epochs: Input should be greater than or equal to 1")
    assert "1 problem(s) in 2 file(s)" in bad.stderr


def test_operator_rejects_unknown_arguments() -> None:
    """`finetune-operator --namespace x` used to start a cluster-wide operator, ignoring the argument."""
    for argv in (["--namespace", "team-a"], ["run"], ["-x"]):
        result = run(*argv, exe="finetune-operator", env={"KUBECONFIG": "/nonexistent"})
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.startswith("usage: finetune-operator"), result.stderr
        assert "unrecognized arguments" in result.stderr or "error:" in result.stderr
    helped = run("--help", exe="finetune-operator")
    assert helped.returncode == 0 and "FINETUNE_NAMESPACES" in helped.stdout
    assert run("--version", exe="finetune-operator").stdout == f"finetune-operator {__version__}\n"


def test_cluster_command_without_a_cluster_says_so(tmp_path: Path) -> None:
    missing = run("list", "--kubeconfig", str(tmp_path / "none"))
    assert missing.returncode == 1 and missing.stderr == f"error: kubeconfig {tmp_path / 'none'} does not exist\n"
    config = tmp_path / "config"
    config.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                      "users: [{name: u, user: {token: t}}]\ncontexts: [{name: here, context: {cluster: c, user: u}}]\n"
                      "current-context: here\n")
    wrong = run("list", "--kubeconfig", str(config), "--context", "there")
    assert wrong.returncode == 1
    assert wrong.stderr == "error: context 'there' is not in the kubeconfig (contexts: here)\n"
    down = run("status", "x", env={"KUBECONFIG": str(config)})
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot reach the Kubernetes API at https://127.0.0.1:1 (context here)")


# ------------------------------------------------------------------------------------------------------ completion


def cands(*words: str) -> tuple[list[str], int]:
    found, directive = complete.candidates(build_parser(), list(words))
    return [c.split("\t")[0] for c in complete._matching(found, words[-1])], directive


def test_completion_engine() -> None:
    assert cands("st") == (["status"], complete.NO_FILES)
    assert cands("") [0][:3] == ["validate", "run", "crd"]
    assert cands("list", "-o", "") == (["json", "yaml", "wide", "name"], complete.NO_FILES)
    assert cands("status", "-o", "y") == (["yaml"], complete.NO_FILES)
    assert cands("validate", "") == ([], complete.FILES)
    assert cands("completion", "") == (list(SHELLS), complete.NO_FILES)
    assert "--all-namespaces" in cands("list", "--")[0] and "--version" in cands("list", "--")[0]
    assert cands("--kubeconfig", "") == ([], complete.FILES)
    assert cands("logs", "-f", "--tail", "") == ([], complete.NO_FILES)


def _bash(line: str) -> list[str]:
    """Complete `line` in a real bash with the generated script; the candidates bash would offer."""
    words = line.split(" ")
    script = (f"source <({BIN / 'finetune'} completion bash)\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_finetune_complete; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=True)
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion() -> None:
    assert _bash("finetune wa") == ["watch"]
    assert _bash("finetune list -o ") == ["json", "yaml", "wide", "name"]
    assert _bash("finetune completion z") == ["zsh"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_load(shell: str) -> None:
    """The scripts parse and define their completion in the real shells (installed by make host-setup)."""
    exe = shutil.which(shell)
    assert exe is not None, f"{shell} is not installed: run `make host-setup`"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if shell == "zsh":
        probe = "autoload -U compinit && compinit -u && source <(finetune completion zsh) && print ${_comps[finetune]}"
        assert subprocess.run([exe, "-f", "-c", probe], capture_output=True, text=True, env=env, timeout=60,
                              check=True).stdout.strip() == "_finetune"
    else:
        probe = "finetune completion fish | source; complete -C 'finetune wat'; complete -C 'finetune list -o j'"
        out = subprocess.run([exe, "--no-config", "-c", probe], capture_output=True, text=True, env=env, timeout=60,
                             check=True).stdout.split()
        assert out[:2] == ["watch", "follow"] and "json" in out
