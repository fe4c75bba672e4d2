"""The command line: one grammar for `finetune` and `kubectl finetune` (the `kubectl-finetune` executable).

Local commands: `validate` (the API server's rules, client-side; `-` reads standard input), `run` (the trainer on this
machine), `crd`, `completion`. Cluster commands, with the user's kubeconfig and RBAC: `list`, `status`, `watch`,
`logs`, `suspend`, `resume`, `cancel`, `checkpoints`. Handlers are imported when their command runs, so `validate`
works with pydantic and PyYAML alone. Exit codes: 0 done, 1 failed (or the watched job failed), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import TextIO

from finetune_api import __version__, exitcodes

FINETUNE = "finetune"
KUBECTL_PLUGIN = "kubectl finetune"
CLUSTER_COMMANDS = ("list", "status", "watch", "logs", "suspend", "resume", "cancel", "checkpoints")
SHELLS = ("bash", "zsh", "fish")
COMMANDS_GROUP = "finetune.commands"  # entry points that add subcommands (the trainer adds `run`)

EPILOG = """\
examples:
  finetune validate examples/*.yaml        check manifests before applying them (- reads stdin)
  finetune run examples/sentiment.yaml     fine-tune on this machine
  finetune list -A                          every FineTuneJob you may see
  finetune status sentiment-minilm          phase, progress, ETA, metrics, checkpoints, restarts, reason
  finetune watch sentiment-minilm           a live progress bar until the end
  finetune logs -f sentiment-minilm         the trainer logs of all workers
  finetune suspend|resume|cancel NAME       edit runPolicy; the operator does the rest

The cluster commands use your kubeconfig (KUBECONFIG, --kubeconfig, --context, -n) and your RBAC permissions.
"""


def _version(parser: argparse.ArgumentParser, prog: str) -> None:
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}",
                        help="print the version and exit")


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    """kubectl's connection flags. On the top level as well, with defaults suppressed so neither copy erases the
    other: `finetune -n ns list` and `finetune list -n ns` mean the same."""
    default = argparse.SUPPRESS
    group = parser.add_argument_group("cluster options")
    group.add_argument("--kubeconfig", default=default, metavar="PATH",
                       help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the pod's account)")
    group.add_argument("--context", default=default, help="kubeconfig context (default: the current context)")
    group.add_argument("-n", "--namespace", default=default,
                       help="namespace (default: the context's namespace, else default)")


def _name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the FineTuneJob's name")


def _data_output(parser: argparse.ArgumentParser, extra: tuple[str, ...] = ()) -> None:
    parser.add_argument("-o", "--output", choices=("json", "yaml", *extra), default=None,
                        help="print the data as JSON or YAML instead of text" +
                        (f" ({', '.join(extra)}: see below)" if extra else ""))


def _logs_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--follow", action="store_true", help="stream the logs until the trainers exit")
    parser.add_argument("--tail", type=int, default=None, metavar="LINES", help="only the last LINES lines per worker")
    parser.add_argument("--previous", action="store_true",
                    help="each worker's previous attempt: its newest pod that has ended (after a restart)")
    parser.add_argument("--worker", type=int, default=None, metavar="INDEX", help="only this worker (0 is the first)")
    parser.add_argument("--prefix", action=argparse.BooleanOptionalAction, default=None,
                    help="prefix lines with [worker-N] (default: when the job has several workers)")


def build_parser(prog: str = FINETUNE) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Fine-tune language models with FineTuneJobs: check "
                                     "manifests, train locally, and follow and steer jobs on a cluster.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _version(parser, prog)
    _cluster_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, cluster: bool = False, **kwargs: object) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".", **kwargs)  # type: ignore[arg-type]
        if kwargs.get("add_help", True):
            _version(p, f"{prog} {name}")
        if cluster:
            _cluster_options(p)
        return p

    v = command("validate", "check manifests with the API server's rules; print every problem with its field path")
    v.add_argument("files", nargs="+", metavar="FILE", help="manifest files; - reads standard input")
    v.add_argument("--data", action="store_true", help="also run each job's pre-flight on this machine (the trainer "
                   "extra): read and check its data, tokenise it, plan memory for the requested devices and estimate "
                   "the time, as the operator's pre-flight pod does before any GPU is requested")
    v.add_argument("--pvc-root", metavar="DIR", help="where pvc://<claim>/<path> is read from with --data "
                   "(default ./runs/pvc)")
    command("run", "fine-tune on this machine from a manifest (the pods' code path; `finetune run --help`)",
            add_help=False).add_argument("trainer_args", nargs=argparse.REMAINDER)
    command("crd", "print the generated CustomResourceDefinition")
    c = command("completion", "print the shell completion script (bash, zsh or fish)",
                epilog="bash: source <(finetune completion bash)   zsh: source <(finetune completion zsh)   "
                       "fish: finetune completion fish | source")
    c.add_argument("shell", choices=SHELLS)

    ls = command("list", "list FineTuneJobs: phase, progress, loss, ETA, latest checkpoint, restarts, reason",
                 cluster=True)
    ls.add_argument("-A", "--all-namespaces", action="store_true", help="list the jobs of every namespace")
    _data_output(ls, ("wide", "name"))
    ls.epilog = "-o wide adds the latest metrics; -o name prints finetunejobs.finetune.dev/NAME lines"
    st = command("status", "show one job: phase and reason, progress, ETA, metrics, checkpoints, restarts",
                 cluster=True)
    _name(st)
    _data_output(st)
    w = command("watch", "follow one job with a live progress bar until it ends (exit 0: Succeeded, 1: Failed)",
                cluster=True)
    _name(w)
    w.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="give up after this long (exit 1); 0 waits for the end")
    lg = command("logs", "print the trainer logs of every worker", cluster=True)
    _name(lg)
    _logs_options(lg)
    for name, help_ in (
        ("suspend", "stop a job's pods after a checkpoint (sets runPolicy.suspend)"),
        ("resume", "resume a suspended job from its latest checkpoint (clears runPolicy.suspend)"),
        ("cancel", "stop a job for good; it ends Failed (Cancelled), keeping its status and checkpoints "
                   "(sets runPolicy.cancel)"),
    ):
        _name(command(name, help_, cluster=True))
    cp = command("checkpoints", "show a job's checkpoints: storage, schedule, count, the latest one", cluster=True)
    _name(cp)
    _data_output(cp)
    return parser


# -------------------------------------------------------------------------------------------------- local commands


def _validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from finetune_api.manifest import validate_files

    problems = validate_files(args.files)
    for problem in problems:
        err.write(f"{problem}\n")
    if problems:
        err.write(f"{len(problems)} problem(s) in {len(args.files)} file(s)\n")
        return 1
    for path in args.files:
        out.write(f"{'<stdin>' if path == '-' else path}: valid\n")
    if not args.data:
        return 0
    worst = 0
    for path in args.files:
        if path == "-":
            err.write("--data needs manifest files, not standard input\n")
            return exitcodes.CONFIG_ERROR
        out.write(f"{path}: pre-flight\n")
        out.flush()
        code = _run([path, "--preflight", "--no-progress-bar", *(["--pvc-root", args.pvc_root] if args.pvc_root
                                                                  else [])], "finetune")
        worst = worst or code
    return worst


def _run(trainer_args: list[str], prog: str) -> int:
    if trainer_args in (["--version"],):
        print(f"{prog} run {__version__}")
        return 0
    problem = "the trainer is not installed"
    for entry in entry_points(group=COMMANDS_GROUP, name="run"):  # the trainer registers itself; never named here
        try:
            trainer_main = entry.load()
        except ImportError as exc:  # pragma: no cover - depends on the installed extra
            problem = str(exc)
            break
        return int(trainer_main(trainer_args))
    print(f"finetune run needs the trainer extra (pip install 'finetune-operator[trainer]'): {problem}",
          file=sys.stderr)
    return exitcodes.CONFIG_ERROR


def _crd(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from finetune_api.crd import render

    out.write(render())
    return 0


def _completion(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from finetune_cli.complete import script

    out.write(script(args.shell))
    return 0


LOCAL = {"validate": _validate, "crd": _crd, "completion": _completion}


# ---------------------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None, prog: str = FINETUNE) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # everything after `run` is the trainer's, --help included
        return _run(argv[1:], prog)
    if argv[:1] == ["__complete"]:  # the shells' and kubectl's completion protocol
        from finetune_cli.complete import complete

        return complete(build_parser(prog), argv[1:], sys.stdout)
    args = build_parser(prog).parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        if args.command in LOCAL:
            return LOCAL[args.command](args, out, err)
        from finetune_cli.errors import CliError

        try:
            from finetune_cli.commands import HANDLERS
        except ImportError as exc:
            err.write(f"{prog}: {exc}\n")
            return 1
        try:
            return HANDLERS[args.command](args, out, err)
        except CliError as exc:
            err.write(f"error: {exc.message}\n")
            return exc.code
    except KeyboardInterrupt:
        err.write("\n")
        return 130
    except BrokenPipeError:  # `finetune list | head`
        sys.stdout = None  # type: ignore[assignment]  # no second error when Python flushes at exit
        return 0


def kubectl_main() -> int:
    """`kubectl finetune ...`: kubectl runs the `kubectl-finetune` executable on PATH with the remaining arguments."""
    return main(prog=KUBECTL_PLUGIN)


def kubectl_complete_main() -> int:
    """`kubectl_complete-finetune`: kubectl (1.26+) asks it for completions of `kubectl finetune ...`."""
    return main(["__complete", *sys.argv[1:]], prog=KUBECTL_PLUGIN)


if __name__ == "__main__":
    raise SystemExit(main())
