"""Layering, checked like an import-linter contract: the pure modules import no I/O, and only k8s.py builds requests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "finetune_operator"
PURE = ("builders", "conditions", "state", "progress", "ledger", "observe", "workqueue", "settings")
IO_MODULES = {"kopf", "aiohttp", "kubernetes", "urllib", "http", "socket", "requests", "finetune_operator.k8s",
              "finetune_operator.controller", "finetune_operator.handlers"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    imported = _imports(PACKAGE / f"{module}.py")
    bad = {m for m in imported if m in IO_MODULES or m.split(".")[0] in IO_MODULES}
    assert not bad, f"{module}.py imports {sorted(bad)}"


def test_only_k8s_talks_http_to_the_api() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("k8s", "progress_server"):
            continue
        assert "ClientSession" not in path.read_text(), f"{path.name} opens its own HTTP client"
