"""Reproducible installs: the constraints files are current and consistent, the images use them, and the version is
written in one place. (`make check-floors`, which needs PyPI, tests the floors; CI runs it.)"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from finetune_api import __version__

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lock", REPO / "requirements" / "lock.py")
assert _spec is not None and _spec.loader is not None
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def pins(name: str) -> dict[str, str]:
    text = (REPO / "requirements" / f"{name}.txt").read_text()
    return {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", text, re.MULTILINE)}


def requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    return [Requirement(r) for r in reqs]


def test_constraints_files_are_current() -> None:
    assert lock.stale() == [], "pyproject.toml changed: run `python requirements/lock.py` (make lock)"


def test_a_dev_only_dependency_leaves_the_image_files_as_they_are(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file's digest covers only what it resolves: a new test tool must not rewrite requirements/trainer.txt,
    which the trainer image copies first (its 1 GB dependency layer would be rebuilt and imported again)."""
    before = {name: lock.pyproject_digest(name) for name in lock.LOCKS}
    changed = tmp_path / "pyproject.toml"
    changed.write_text((REPO / "pyproject.toml").read_text().replace('dev = [\n', 'dev = [\n  "a-new-tool>=1",\n'))
    monkeypatch.setattr(lock, "PYPROJECT", changed)
    after = {name: lock.pyproject_digest(name) for name in lock.LOCKS}
    assert after["operator"] == before["operator"] and after["trainer"] == before["trainer"]
    assert after["dev"] != before["dev"]


@pytest.mark.parametrize("name", list(lock.LOCKS))
def test_pins_satisfy_pyproject(name: str) -> None:
    pinned = pins(name)
    for req in requirements(list(lock.LOCKS[name]["extras"])):  # type: ignore[call-overload]
        key = req.name.lower().replace("_", "-")
        if name == "trainer" and key == "torch":
            assert lock.base_torch() in req.specifier, f"the base image's torch {lock.base_torch()} breaks {req}"
            continue
        assert key in pinned, f"{name}.txt does not pin {req.name}"
        assert pinned[key] in req.specifier, f"{name}.txt pins {key}=={pinned[key]}, outside {req}"


def test_each_image_gets_only_its_own_stack() -> None:
    operator, trainer, dev = pins("operator"), pins("trainer"), pins("dev")
    assert "kopf" in operator and not {"torch", "transformers", "kubernetes"} & operator.keys(), \
        "the operator image needs neither torch nor the kubernetes client"
    assert "transformers" in trainer and not {"torch", "triton", "kopf", "kubernetes"} & trainer.keys()
    assert not [p for p in trainer if p.startswith("nvidia-")], "CUDA libraries come with the base image's torch"
    assert {"torch", "kopf", "kubernetes", "transformers", "pytest"} <= dev.keys()
    for image, image_pins in (("operator", operator), ("trainer", trainer)):
        differ = {p: (v, dev[p]) for p, v in image_pins.items() if p in dev and dev[p] != v}
        assert not differ, f"CI would test other versions than the {image} image ships: {differ}"


@pytest.mark.parametrize(("dockerfile", "name", "extras"), [("operator/Dockerfile", "operator", ".[operator]"),
                                                          ("trainer_image/Dockerfile", "trainer", ".[trainer,s3]")])
def test_dockerfiles_install_with_their_constraints(dockerfile: str, name: str, extras: str) -> None:
    text = (REPO / dockerfile).read_text()
    assert f"COPY requirements/{name}.txt requirements/{name}.txt" in text
    assert f'pip install -c requirements/{name}.txt "{extras}"' in text
    assert re.search(r"^ARG (PYTHON_IMAGE|BASE_IMAGE)=", text, re.MULTILINE), "the base stays an ARG"


def test_the_makefile_installs_with_the_dev_constraints() -> None:
    text = (REPO / "Makefile").read_text()
    assert "$(PIP) install -c requirements/dev.txt torch" in text
    assert '$(PIP) install -c requirements/dev.txt -e ".[operator,cli,trainer,dev]"' in text


def test_breaking_majors_are_bounded() -> None:
    bounded = {r.name: r.specifier for r in requirements(["operator", "cli", "trainer"])}
    for package, next_major in (("transformers", "6"), ("datasets", "6"), ("kubernetes", "38"), ("kopf", "2"),
                                ("pydantic", "3")):
        assert next_major not in bounded[package] and f"{next_major}.0.0" not in bounded[package], package


def test_the_version_is_written_once() -> None:
    chart = yaml.safe_load((REPO / "helm" / "finetune-operator" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__, "run `python helm/chartgen.py`"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    for path in ("pyproject.toml", "operator/Dockerfile", "trainer_image/Dockerfile",
                 "operator/finetune_operator/settings.py", "operator/finetune_operator/__init__.py",
                 "trainer_image/finetune_trainer/__init__.py", "operator/README.md"):
        assert __version__ not in (REPO / path).read_text(), f"{path} writes the version {__version__} again"
    from finetune_operator import __version__ as operator_version
    from finetune_operator.settings import DEFAULT_TRAINER_IMAGE

    assert operator_version == __version__ and DEFAULT_TRAINER_IMAGE.endswith(f":{__version__}")
