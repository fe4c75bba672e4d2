"""Pinned dependencies, one constraints file per image plus one for development and CI, all from pyproject.toml.

    python requirements/lock.py            write operator.txt, trainer.txt and dev.txt (uv pip compile; needs PyPI),
                                           keeping the versions they pin (--upgrade: resolve every pin afresh)
    python requirements/lock.py --check    fail when a file is stale: pyproject.toml changed since it was written
    python requirements/lock.py --floors DIR   resolve every extra with each direct requirement at the floor it
                                           declares (`>=x` taken as `==x`): floors that cannot be installed
                                           together fail; DIR/floors-tested.txt (API, operator, CLI) is what
                                           `make check-floors` then installs and unit-tests

* operator.txt: the operator image (`operator` extra; no torch, no kubernetes client), for every platform.
* trainer.txt: the trainer image (`trainer` and `s3` extras) resolved against the torch of the image's base
  (`BASE_IMAGE` in trainer_image/Dockerfile). torch and what only torch needs (CUDA libraries, triton, sympy, ...)
  are left out: the base image provides them, and the image build must never download a second torch.
* dev.txt: the development and CI environment (operator, cli, trainer, dev extras, torch included), constrained by
  the two image files so that CI tests the versions the images ship.

Standard library only; `uv` comes with the dev extra.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "requirements"
PYPROJECT = REPO / "pyproject.toml"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
PYTHON = "3.11"
LINUX = "x86_64-manylinux_2_28"
DIGEST = "# pyproject digest: "
TORCH_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")

LOCKS: dict[str, dict[str, object]] = {
    "operator": {"extras": ["operator"], "universal": True},
    "trainer": {"extras": ["trainer", "s3"], "drop_torch": True},
    "dev": {"extras": ["operator", "cli", "trainer", "dev"], "constraints": ["operator", "trainer"]},
}
# floors-tested.txt (the API, operator and CLI together) is installed and unit-tested by `make check-floors`; the
# trainer's floors are only resolved (testing them would download a second torch).
FLOOR_SETS = {"api": [], "operator": ["operator"], "cli": ["cli"], "trainer": ["trainer", "s3"],
              "tested": ["operator", "cli"]}


def uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(found).exists():
        raise SystemExit("uv is needed: pip install -e '.[dev]'")
    return found


def pyproject_digest(name: str) -> str:
    """What one file depends on: the project's dependencies, the extras it resolves (those of the files it is
    constrained by too), and for the trainer the image's base. A change elsewhere (a dev-only tool) leaves the image
    files, and so the images' dependency layers, as they are."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras: set[str] = set()
    for lock in (name, *LOCKS[name].get("constraints", [])):  # type: ignore[attr-defined]
        extras.update(LOCKS[lock]["extras"])  # type: ignore[arg-type]
    deps = {"dependencies": project.get("dependencies", []),
            "extras": {e: project.get("optional-dependencies", {}).get(e, []) for e in sorted(extras)},
            "torch": base_torch() if name != "operator" else ""}
    return hashlib.sha256(repr(sorted(deps.items())).encode()).hexdigest()[:16]


def base_torch() -> str:
    """The torch version of the trainer image's default base, e.g. 2.7.1 from pytorch/pytorch:2.7.1-cuda12.8-..."""
    m = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)", TRAINER_DOCKERFILE.read_text(), re.MULTILINE)
    if m is None:
        raise SystemExit(f"{TRAINER_DOCKERFILE}: no `ARG BASE_IMAGE=pytorch/pytorch:<version>-...` line")
    return m[1]


def compile_(extras: list[str], out: Path, *, universal: bool = False, constraints: list[Path] = ()) -> str:
    cmd = [uv(), "pip", "compile", str(PYPROJECT), "--python-version", PYTHON, "--quiet", "--no-header",
           "-o", str(out)]
    cmd += [f"--extra={e}" for e in extras]
    cmd += ["--universal"] if universal else ["--python-platform", LINUX]
    for c in constraints:
        cmd += ["-c", str(c)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"uv pip compile {' '.join(extras)} failed:\n{result.stderr}")
    return out.read_text()


def _blocks(text: str) -> list[tuple[str, str, set[str]]]:
    """(name, block text, the packages it is required by) for each pin of an annotated uv output."""
    blocks: list[tuple[str, str, set[str]]] = []
    for chunk in re.split(r"\n(?=\S)", text.strip()):
        name = re.split(r"[=<>\[; ]", chunk, maxsplit=1)[0].lower()
        vias = set(re.findall(r"#\s+(?:via\s+)?([A-Za-z0-9_.-]+)(?:\s|$)", chunk)) - {"via"}
        blocks.append((name, chunk, {v.lower() for v in vias}))
    return blocks


def drop_torch(text: str) -> str:
    """Remove torch and every package that only torch (or another removed package) needs."""
    blocks = _blocks(text)
    dropped = {name for name, _, _ in blocks if TORCH_ONLY.match(name)}
    changed = True
    while changed:
        changed = False
        for name, _, vias in blocks:
            if name not in dropped and vias and vias <= dropped:
                dropped.add(name)
                changed = True
    return "\n".join(chunk for name, chunk, _ in blocks if name not in dropped) + "\n"


def header(name: str) -> str:
    lines = [f"# {name}.txt: generated by `python requirements/lock.py` (see its docstring); do not edit.",
             f"{DIGEST}{pyproject_digest(name)}"]
    if name == "trainer":
        lines.append(f"# torch and its CUDA libraries come from the base image (torch {base_torch()}).")
    return "\n".join(lines) + "\n"


def write(upgrade: bool = False) -> None:
    """Writes the three files. The versions they already pin are kept (uv prefers the pins of the file it writes)
    unless ``upgrade``: a new dependency brings in what it needs, and nothing else moves."""
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(f"torch=={base_torch()}\n")
        for name, how in LOCKS.items():
            out = Path(tmp) / f"{name}.txt"
            if not upgrade and (HERE / f"{name}.txt").is_file():
                shutil.copyfile(HERE / f"{name}.txt", out)
            constraints = [HERE / f"{c}.txt" for c in how.get("constraints", [])]  # type: ignore[attr-defined]
            if how.get("drop_torch"):
                constraints.append(torch_pin)
            text = compile_(list(how["extras"]), out, universal=bool(how.get("universal")),  # type: ignore[call-overload]
                            constraints=constraints)
            if how.get("drop_torch"):
                text = drop_torch(text)
            (HERE / f"{name}.txt").write_text(header(name) + text)
            print(f"wrote requirements/{name}.txt")


def stale() -> list[str]:
    return [f"requirements/{n}.txt" for n in LOCKS if not (HERE / f"{n}.txt").exists()
            or f"{DIGEST}{pyproject_digest(n)}" not in (HERE / f"{n}.txt").read_text().splitlines()]


def floor_requirements(extras: list[str]) -> list[str]:
    """The base dependencies and the given extras, each pinned to the lower bound it declares (`name>=x` -> `==x`)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    pinned = []
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)\s*[^;]*?>=\s*([^,;\s]+)[^;]*(;.*)?$", req)
        if m is None:
            raise SystemExit(f"pyproject.toml: {req!r} declares no floor (name>=version)")
        pinned.append(f"{m[1]}=={m[2]}{m[3] or ''}")
    return pinned


def floors(out_dir: Path) -> int:
    """Resolve each set of extras with every direct requirement at its floor: they must be installable together."""
    failed = []
    for name, extras in FLOOR_SETS.items():
        source = out_dir / f"floors-{name}.in"
        source.write_text("\n".join(floor_requirements(extras)) + "\n")
        cmd = [uv(), "pip", "compile", str(source), "--python-version", PYTHON, "--python-platform", LINUX,
               "--quiet", "--no-header", "--no-annotate", "-o", str(out_dir / f"floors-{name}.txt")]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            failed.append(f"the floors of {name} ({', '.join(extras) or 'base'}) cannot be installed together:\n"
                          f"{result.stderr.strip()}\nraise the floors in pyproject.toml")
        else:
            print(f"{name} floors resolve: {', '.join(floor_requirements(extras))}")
    for problem in failed:
        print(problem, file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python requirements/lock.py", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail when a file is stale; write nothing")
    mode.add_argument("--floors", metavar="DIR", type=Path, help="resolve the floors into DIR and check them")
    parser.add_argument("--upgrade", action="store_true", help="resolve every pin afresh (default: keep the pins)")
    args = parser.parse_args(argv)
    if args.check:
        for path in stale():
            print(f"{path} is stale: run `python requirements/lock.py`", file=sys.stderr)
        return 1 if stale() else 0
    if args.floors is not None:
        args.floors.mkdir(parents=True, exist_ok=True)
        return floors(args.floors)
    write(upgrade=args.upgrade)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
