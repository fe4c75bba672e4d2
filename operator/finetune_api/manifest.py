"""Reading FineTuneJob manifests and validating them client-side with the same models the CRD is generated from.

Files are read as kubectl reads them (`kubeyaml`) and validated as strictly as the API server's schema: no string
becomes a number or a boolean, no float an integer, and fields are known only by their camelCase names.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from finetune_api import kubeyaml, names
from finetune_api.crd import MAX_NAME_LENGTH
from finetune_api.errors import problems as validation_problems
from finetune_api.rules import SpecModel
from finetune_api.spec import FineTuneJobSpec

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ObjectMeta(SpecModel):
    """The part of metadata a manifest author writes."""

    model_config = {"extra": "allow"}

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class FineTuneJob(SpecModel):
    """A whole FineTuneJob document (status is ignored when reading manifests)."""

    model_config = {"extra": "ignore"}

    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: FineTuneJobSpec


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, with the field path a user can find in their file."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}"


def validate_document(doc: Any, source: str = "<input>") -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate one parsed YAML document; return the parsed job or every problem found."""
    if not isinstance(doc, dict):
        return None, [Problem(source, "(document)", "expected a mapping with apiVersion, kind, metadata and spec")]
    problems: list[Problem] = []
    if doc.get("apiVersion") != names.API_VERSION:
        problems.append(Problem(source, "apiVersion", f"must be {names.API_VERSION}, got {doc.get('apiVersion')!r}"))
    if doc.get("kind") != names.KIND:
        problems.append(Problem(source, "kind", f"must be {names.KIND}, got {doc.get('kind')!r}"))
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if isinstance(name, str) and not NAME_RE.match(name):
        problems.append(Problem(source, "metadata.name", "must be a DNS-1035 label (lowercase letters, digits and "
                                "'-', starting with a letter): it names the job's headless Service"))
    try:
        job = FineTuneJob.model_validate(doc, strict=True, by_alias=True, by_name=False)
    except ValidationError as exc:
        problems.extend(Problem(source, path, message) for path, message in validation_problems(exc))
        return None, problems
    return (job if not problems else None), problems


STDIN = "-"


def load_documents(path: str | Path) -> list[Any]:
    """The documents of a file, as kubectl would send them; `-` reads standard input (raises OSError, yaml.YAMLError
    or ValueError)."""
    text = sys.stdin.read() if str(path) == STDIN else Path(path).read_text()
    return kubeyaml.load_all(text)


def load_job(path: str | Path) -> FineTuneJob:
    """Load and validate the first FineTuneJob in a file; raise ValueError listing every problem."""
    docs = load_documents(path)
    if not docs:
        raise ValueError(f"{path}: no YAML document found")
    job, problems = validate_document(docs[0], str(path))
    if job is None:
        raise ValueError("\n".join(str(p) for p in problems))
    return job


def validate_files(paths: list[str]) -> list[Problem]:
    problems: list[Problem] = []
    for path in paths:
        name = "<stdin>" if path == STDIN else path
        try:
            docs = load_documents(path)
        except (OSError, yaml.YAMLError, ValueError) as exc:
            problems.append(Problem(name, "(file)", str(exc).replace("\n", " ")))
            continue
        if not docs:
            problems.append(Problem(name, "(file)", "no YAML document found"))
        for i, doc in enumerate(docs):
            source = name if len(docs) == 1 else f"{name}#{i}"
            problems.extend(validate_document(doc, source)[1])
    return problems
