"""The `finetune` console: validate manifests before applying them, run a job locally, print the CRD.

`run` imports the trainer lazily so that `validate` works with nothing but pydantic installed.
"""

from __future__ import annotations

import argparse
import sys

from finetune_api.manifest import validate_files


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
    try:
        from finetune_trainer.__main__ import main as trainer_main
    except ImportError as exc:  # pragma: no cover - depends on the installed extra
        print(f"finetune run needs the trainer extra (pip install 'finetune-operator[trainer]'): {exc}",
              file=sys.stderr)
        return 78
    return trainer_main(args.trainer_args)


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
