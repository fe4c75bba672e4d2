"""Layering, checked like an import-linter contract: the pure modules import no I/O, only k8s.py builds requests,
finetune_api stands alone, the trainer's modules only import those below them, and each behaviour of the controller
lives in the one module the README's map names for it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "finetune_operator"
README = PACKAGE.parent / "README.md"
API = REPO / "operator" / "finetune_api"
TRAINER = REPO / "trainer_image" / "finetune_trainer"
PURE = ("builders", "conditions", "state", "progress", "ledger", "observe", "workqueue", "settings", "labels",
        "image_policy", "record", "caches", "kinds", "suspend_owner", "queueing", "gang", "preflight",
        "sharing")
IO_MODULES = {"kopf", "aiohttp", "kubernetes", "urllib", "http", "socket", "requests", "finetune_operator.k8s",
              "finetune_operator.controller", "finetune_operator.handlers", "finetune_operator.children",
              "finetune_operator.reconcile", "finetune_operator.runner", "finetune_operator.repair"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "finetune_operator":  # from finetune_operator import builders, state
                names.update(f"finetune_operator.{a.name}" for a in node.names)
    return names


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def _calls(tree: ast.Module, methods: set[str]) -> list[str]:
    """`<something>.kube.<method>(...)` or `kube.<method>(...)` calls in a module, by method name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods:
            target = node.func.value
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name == "kube":
                found.append(node.func.attr)
    return found


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
    ("config", "locations", "distributed", "progress", "memory", "throughput"),
    ("data", "ownership"),
    ("checkpoint", "evaluation", "chat"),
    ("sharded_checkpoint",),
    ("tasks",),
    ("modeling", "tracking", "plots"),
    ("history",),
    ("selection",),
    ("loop",),
    ("output", "model_card"),
    ("job",),
    ("preflight",),
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


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr)}


def test_only_the_objective_plugins_switch_on_the_task_type() -> None:
    """An objective lives in its two modules (finetune_api/tasks/<name>.py, finetune_trainer/tasks/<name>.py): no
    other module of the API, the operator, the CLI or the trainer names a task type (a comparison, a table keyed by
    it), so adding an objective changes nothing else. Docstrings may mention them."""
    from finetune_api.tasks import TASKS

    names = set(TASKS)
    plugins = {API / "tasks", TRAINER / "tasks"}
    for root in (API, PACKAGE, REPO / "operator" / "finetune_cli", TRAINER):
        for path in root.rglob("*.py"):
            if path.parent in plugins and path.stem not in ("__init__", "base"):
                continue
            tree = ast.parse(path.read_text())
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                    named = {n for n in names if n == node.value or f"'{n}'" in node.value or f'"{n}"' in node.value}
                    assert not named, f"{path.relative_to(REPO)}:{node.lineno} names task type(s) {sorted(named)}"


def test_only_children_py_touches_children_on_the_api() -> None:
    """Create (409-as-done), get, patch, delete and evict of Jobs, ConfigMaps, Secrets, Services, pods and Workloads:
    children.py, and its drift repair in repair.py. (leader.py writes its Lease; k8s.py implements the calls.)"""
    for module, tree in _modules().items():
        if module in ("children", "repair", "k8s", "leader"):
            continue
        calls = _calls(tree, {"create", "patch", "delete", "evict", "replace", "get"})
        assert not calls, f"{module}.py calls kube.{calls} on children: that belongs in children.py"


def test_only_the_reconcile_pass_writes_status_and_posts_events() -> None:
    """One status write per pass, then its Events: both in reconcile.py and nowhere else."""
    for module, tree in _modules().items():
        if module in ("reconcile", "k8s"):
            continue
        calls = _calls(tree, {"patch_ftj_status", "post_event"})
        assert not calls, f"{module}.py calls kube.{calls}: status and Events are written by reconcile.py"


def test_per_job_memory_is_one_record() -> None:
    """Everything the operator remembers about a job is a field of record.JobRecord: no parallel per-job maps."""
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                    and node.value.id in ("dict", "set")):
                continue
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if isinstance(args[0], ast.Name) and args[0].id == "Key":
                value = ast.unparse(args[1]) if len(args) > 1 else None
                assert value == "JobRecord", f"{module}.py keeps {ast.unparse(node)}: add a field to JobRecord"


def test_the_runner_knows_nothing_of_the_pass() -> None:
    """runner.py schedules passes and maps errors to retries; what a pass does is reconcile.py's business."""
    imported = _imports(PACKAGE / "runner.py")
    inner = {"children", "reconcile", "state", "builders", "caches", "gang", "ledger", "controller"}
    assert not {m for m in imported if m.removeprefix("finetune_operator.") in inner}


def test_children_py_decides_no_status() -> None:
    """Status policy is state.py's (through the reconcile pass); the children module only reports what happened."""
    imported = _imports(PACKAGE / "children.py")
    assert not imported & {"finetune_operator.state", "finetune_operator.conditions", "finetune_operator.reconcile"}


def test_handlers_are_kopf_wiring_only() -> None:
    """handlers.py reaches the controller only through the memo: it imports none of its parts."""
    imported = _imports(PACKAGE / "handlers.py")
    parts = {"controller", "reconcile", "children", "record", "runner", "caches", "state", "builders"}
    assert not {m for m in imported if m.removeprefix("finetune_operator.") in parts}


def test_label_keys_are_spelled_only_in_labels_py() -> None:
    """One definition of every label key and of the children's selector (the watches and the builders use it)."""
    spellings = ("app.kubernetes.io/", "/job-name", "kueue.x-k8s.io/", "batch.kubernetes.io/")
    for module, tree in _modules().items():
        if module == "labels":
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not any(s in node.value for s in spellings), f"{module}.py spells a label: {node.value!r}"


def test_kueue_decides_suspend_only_through_suspend_owner() -> None:
    """Who holds a Job's suspend (the user, a group restart, Kueue) is decided in suspend_owner.py alone: no other
    module reads a Job's queue label (`job.queue_name`) or the operator's suspension mark to decide it (queueing.py
    and preflight.py name the queue in what they report)."""
    for module, tree in _modules().items():
        if module in ("suspend_owner", "observe", "builders", "labels"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            on_job = isinstance(node.value, ast.Name) and node.value.id == "job"
            reports = module in ("queueing", "preflight")
            if node.attr == "suspended_by" or (node.attr == "queue_name" and on_job and not reports):
                raise AssertionError(f"{module}.py reads .{node.attr}: who holds suspend is suspend_owner.py's call")


def test_watched_kinds_are_declared_once() -> None:
    """handlers.py registers watches only from kinds.py; no other module lists resources to watch."""
    source = (PACKAGE / "handlers.py").read_text()
    assert "kinds.watched(" in source
    for resource in ('"jobs"', '"pods"', '"configmaps"', '"services"', '"workloads"'):
        assert resource not in source, f"handlers.py spells {resource}: declare it in kinds.py"


def test_image_registry_policy_is_not_a_builder() -> None:
    """builders.py builds objects; which images are allowed is image_policy.py's."""
    source = (PACKAGE / "builders.py").read_text()
    assert "allowed_registries" not in source and "def image_allowed" not in source


def test_the_readme_map_names_places_that_exist() -> None:
    """Every module in the README's "Where does X live" map exists, and every name next to it is defined there."""
    table = README.read_text().split("### Where does X live", 1)[1].strip().split("\n\n", 1)[0]
    rows = table.splitlines()[2:]
    assert len(rows) >= 10
    for row in rows:
        for cell in row.split("|")[2:-1]:
            modules = re.findall(r"`(\w+)\.py`", cell)
            sources = "\n".join((PACKAGE / f"{m}.py").read_text() for m in modules)
            for token in re.findall(r"`([\w.]+)`", cell):
                if token.endswith(".py"):
                    continue
                for part in filter(None, token.split(".")):
                    defined = rf"(def|class)\s+{part}\b|^\s*{part}\s*[:=]"
                    assert re.search(defined, sources, re.MULTILINE), f"README map: {token} is not in {modules}"
