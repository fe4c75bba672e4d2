"""Layering, checked like an import-linter contract: the pure modules import no I/O, only k8s.py builds requests,
finetune_api stands alone, and the trainer's modules only import those below them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "finetune_operator"
API = REPO / "operator" / "finetune_api"
TRAINER = REPO / "trainer_image" / "finetune_trainer"
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


def _top_level(path: Path) -> set[str]:
    return {m.split(".")[0] for m in _imports(path)}


def test_api_imports_neither_the_operator_nor_the_trainer() -> None:
    """finetune_api is the contract both sides import: pydantic and PyYAML only, never either side of it."""
    for path in API.glob("*.py"):
        outside = _top_level(path) - sys.stdlib_module_names - {"finetune_api"}
        assert outside <= {"pydantic", "yaml"}, f"finetune_api/{path.name} imports {sorted(outside)}"


def test_operator_and_trainer_do_not_import_each_other() -> None:
    """The operator image has no torch, the trainer image no kopf: they meet only in finetune_api."""
    for path in PACKAGE.rglob("*.py"):
        bad = _top_level(path) & {"finetune_trainer", "torch", "transformers", "datasets", "peft"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
    for path in TRAINER.rglob("*.py"):
        bad = _top_level(path) & {"finetune_operator", "kopf", "kubernetes", "aiohttp"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


# The trainer's modules from the bottom up: each imports only modules of the levels below its own (and tasks only
# their base). A new module must be placed here.
TRAINER_LEVELS: tuple[tuple[str, ...], ...] = (
    ("errors", "signals", "launch"),
    ("sharding", "quantization"),
    ("config", "locations", "distributed", "progress", "memory"),
    ("data",),
    ("checkpoint", "evaluation"),
    ("sharded_checkpoint",),
    ("tasks",),
    ("modeling",),
    ("loop",),
    ("output",),
    ("job",),
    ("__main__",),
)


def _trainer_module(path: Path) -> str:
    rel = path.relative_to(TRAINER).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _trainer_imports(path: Path) -> set[str]:
    """Trainer modules imported, relative to the package (`from finetune_trainer import data` counts as data)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "finetune_trainer":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune_trainer."):
            found.add(node.module.removeprefix("finetune_trainer."))  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("finetune_trainer.") for a in node.names
                         if a.name.startswith("finetune_trainer."))
    return found


@pytest.mark.parametrize("path", sorted(p for p in TRAINER.rglob("*.py") if p.name != "__init__.py"
                                        or p.parent != TRAINER), ids=lambda p: str(p.relative_to(TRAINER)))
def test_trainer_modules_import_only_lower_levels(path: Path) -> None:
    level = {name: i for i, names in enumerate(TRAINER_LEVELS) for name in names}
    module = _trainer_module(path)
    assert module in level, f"{module} has no level in TRAINER_LEVELS"
    for imported in _trainer_imports(path):
        top = imported.split(".")[0]
        if top == module:
            continue
        assert level[top] < level[module], f"{path.relative_to(TRAINER)} (level {level[module]}) imports {imported}"


def test_tasks_are_one_module_each() -> None:
    """A task module knows only the task interface, and the rest of the trainer only the interface and the registry:
    adding a task is adding one module."""
    tasks = TRAINER / "tasks"
    for path in TRAINER.rglob("*.py"):
        if path.parent == tasks and path.stem in ("__init__", "base"):
            continue
        specific = {m for m in _trainer_imports(path) if m.startswith("tasks.")} - {"tasks.base"}
        assert not specific, f"{path.relative_to(TRAINER)} imports {sorted(specific)}"
