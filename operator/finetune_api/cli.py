"""The `finetune` console: validate manifests before applying them, run a job locally, print the CRD.

`run` is provided by the trainer, which registers its entry point in the `finetune.commands` group; this package never
names the trainer, so `validate` works with nothing but pydantic installed.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from finetune_api import exitcodes
from finetune_api.manifest import validate_files

COMMANDS_GROUP = "finetune.commands"  # entry points that add subcommands (the trainer adds `run`)


def _validate(args: argparse.Namespace) -> int:
    problems = validate_files(args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {len(args.files)} file(s)", file=sys.stderr)
        return 1
    for path in args.files:
        print(f"{path}: valid")
    return 0


def _run(args: argparse.Namespace) -> int:
    problem = "the trainer is not installed"
    for entry in entry_points(group=COMMANDS_GROUP, name="run"):
        try:
            trainer_main = entry.load()
        except ImportError as exc:  # pragma: no cover - depends on the installed extra
            problem = str(exc)
            break
        return int(trainer_main(args.trainer_args))
    print(f"finetune run needs the trainer extra (pip install 'finetune-operator[trainer]'): {problem}",
          file=sys.stderr)
    return exitcodes.CONFIG_ERROR


def _crd(_: argparse.Namespace) -> int:
    from finetune_api.crd import render

    sys.stdout.write(render())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description="FineTuneJob tools: validate, run locally, CRD.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check manifests with the same rules as the API server; print each problem")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_validate)
    r = sub.add_parser("run", help="fine-tune locally from a manifest (same code path as the pods)",
                       add_help=False)
    r.add_argument("trainer_args", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)
    c = sub.add_parser("crd", help="print the generated CustomResourceDefinition")
    c.set_defaults(func=_crd)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
