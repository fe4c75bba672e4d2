"""Which job a checkpoint storage, a checkpoint or an output folder belongs to, and whether this job may use it.

A job leaves a record, `finetune-owner.json`, in its checkpoint storage, in its output folder and in every checkpoint
it writes: who wrote it (namespace, name, uid) and the fingerprint of what decides the training trajectory (model
source, revision and initFrom; task; data locations and what identifies their content cheaply; method; the
hyperparameters that change the arithmetic). Not in it: checkpoint cadence, retention, tracking, evaluation cadence,
selection and resources (the process count may change between sessions: a resume rescales the data position).

Before anything is written, `problem` reads the records where the job would write, and decides:

- the same namespace/name and the same fingerprint: this job's own. A restarted pod has the same uid; the same
  manifest deleted and applied again (a GitOps re-sync) has a new uid and continues: it declares the same training
  under the same name, so continuing reproduces what the deleted object would have done and touches nothing another
  declaration made;
- the same namespace/name with another fingerprint (a changed manifest applied under the old name, or data changed
  under a job): refused, naming what differs; resuming would splice two trajectories into one model;
- another job, or checkpoints and files without a record (an older trainer, another tool): refused.

A refusal is a configuration error (exit 78) whose message names the path, the writer and what to do. `finetune
run` has no uid: a local run is `namespace/name` of its manifest (no namespace when the manifest names none), so
running the same manifest again continues, and a changed one is refused.

Pure of torch, so that a pre-flight pod can run it before any GPU is held: `for_job(job, pvc_root, options)` gives
the identity and fingerprint, `problem(storage, identity, fingerprint, field)` the verdict on one storage, and
`take(job, storages, ...)` checks every storage, then claims them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api import names
from finetune_api.manifest import FineTuneJob
from finetune_api.spec import FineTuneJobSpec
from finetune_api.times import format_time
from finetune_trainer.errors import ConfigError, StorageError
from finetune_trainer.locations import DATA_SUFFIXES, Location, Storage, expand_files, remote_fs, resolve

log = logging.getLogger(__name__)

RECORD = "finetune-owner.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # a checkpoint folder (checkpoint.py writes them)
COMPLETE_MARKER = "COMPLETE"  # written last into a checkpoint (checkpoint.py)
SAMPLE_BYTES = 64 * 1024  # of each data file's head and tail, hashed with its size: cheap, and follows its content
MAX_DIFFERENCES = 5


# --------------------------------------------------------------------------------------------- who and what
@dataclass(frozen=True)
class Identity:
    """Who runs: the FineTuneJob's namespace, name and uid (no uid for `finetune run`)."""

    namespace: str | None
    name: str
    uid: str | None = None

    @classmethod
    def of(cls, job: FineTuneJob) -> Identity:
        meta = job.metadata
        return cls(meta.namespace, meta.name, (meta.model_extra or {}).get("uid"))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def describe(self) -> str:
        return f"FineTuneJob {self.key} " + (f"(uid {self.uid})" if self.uid else "(a local run, no uid)")


@dataclass(frozen=True)
class Fingerprint:
    """What decides the training trajectory (`trajectory`) and its digest."""

    digest: str
    trajectory: dict[str, Any] = field(compare=False)

    @classmethod
    def of(cls, trajectory: dict[str, Any]) -> Fingerprint:
        text = json.dumps(trajectory, sort_keys=True, separators=(",", ":"))
        return cls("sha256:" + hashlib.sha256(text.encode()).hexdigest(), trajectory)


def trajectory(spec: FineTuneJobSpec, data: dict[str, Any]) -> dict[str, Any]:
    """The parts of the spec that change the arithmetic, and the data's identity. Fields at their default are left
    out (and sections left empty by that, so `lora: {}` is `lora` unset), so that a manifest with every default
    written out (the operator's ConfigMap) has the fingerprint of the same manifest without them, and a field added
    later with a default does not change the fingerprint of older records."""
    def dump(section: Any, exclude: set[str] | None = None) -> Any:
        return _pruned(section.model_dump(by_alias=True, exclude_defaults=True, mode="json", exclude=exclude))

    return {
        "task": dump(spec.task),
        "model": dump(spec.model, {"trust_remote_code"}),
        "dataset": dump(spec.dataset),
        "data": data,
        "method": dump(spec.method),
        "hyperparameters": dump(spec.hyperparameters, {"eval_every_steps", "activation_checkpointing"}),
    }


def _pruned(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    kept = {k: _pruned(v) for k, v in value.items()}
    return {k: v for k, v in kept.items() if v != {}}


def _file_identity(path: Path, name: str) -> list[Any]:
    """[name, bytes, hash of the first and last SAMPLE_BYTES]: a copy keeps it, an edit almost always changes it."""
    try:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    except OSError as exc:
        return [name, None, f"unreadable: {exc.strerror or exc}"]  # the data check reports it properly
    return [name, size, digest.hexdigest()[:16]]


def _glob_base(text: str) -> Path:
    """The folder above a glob's first wildcard."""
    cut = min(i for i, ch in enumerate(text) if ch in "*?[")
    return Path(text[:cut]).parent


def _content(uri: str, fmt: str, pvc_root: Path, options: dict[str, Any] | None, field_name: str) -> Any:
    """What identifies one data location: its files (name relative to the location, size, head and tail hash), a
    remote object's size and ETag, or a hub dataset's name."""
    loc = resolve(uri, pvc_root, field_name)
    if loc.hub is not None and (fmt not in ("auto", "hub") or Path(uri).suffix.lower() in DATA_SUFFIXES):
        loc = Location(uri, path=Path(uri))  # a file name that does not exist, not a hub dataset (as job.py reads it)
    if fmt == "hub" or loc.hub is not None:
        return {"hub": uri}
    if loc.path is not None:
        text = str(loc.path)
        base = _glob_base(text) if any(ch in text for ch in "*?[") else (
            loc.path if loc.path.is_dir() else loc.path.parent)
        return [_file_identity(f, os.path.relpath(f, base)) for f in expand_files(loc.path)]
    assert loc.remote is not None
    fs = remote_fs(loc.remote, options)
    try:
        if any(ch in loc.remote for ch in "*?["):
            found = fs.glob(loc.remote, detail=True)
        else:
            found = fs.find(loc.remote, detail=True) if fs.isdir(loc.remote) else {loc.remote: fs.info(loc.remote)}
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{field_name} {uri}: cannot list it to identify the data: {exc}") from exc
    out = []
    for name, info in sorted(found.items()):
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        out.append([name.rsplit("/", 1)[-1] if name == loc.remote else name[len(loc.remote):].lstrip("/"),
                    info.get("size"), str(tag) if tag is not None else None])
    return out


def data_identity(spec: FineTuneJobSpec, pvc_root: Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training and validation data as the fingerprint sees them (no download; a few KiB read per file)."""
    ds = spec.dataset
    out: dict[str, Any] = {"train": _content(ds.train, ds.format, pvc_root, options, "dataset.train")}
    if ds.validation is not None:
        out["validation"] = _content(ds.validation, ds.format, pvc_root, options, "dataset.validation")
    return out


def for_job(job: FineTuneJob, pvc_root: Path, options: dict[str, Any] | None = None) -> tuple[Identity, Fingerprint]:
    """This job's identity and fingerprint."""
    return Identity.of(job), Fingerprint.of(trajectory(job.spec, data_identity(job.spec, pvc_root, options)))


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """finetune-owner.json: who wrote the folder and what training it holds."""

    owner: Identity
    fingerprint: Fingerprint
    time: str | None = None

    @classmethod
    def of(cls, owner: Identity, fingerprint: Fingerprint) -> Record:
        return cls(owner, fingerprint, format_time())

    def text(self) -> str:
        return json.dumps({
            "apiVersion": names.API_VERSION, "kind": names.KIND, "namespace": self.owner.namespace,
            "name": self.owner.name, "uid": self.owner.uid, "fingerprint": self.fingerprint.digest,
            "trajectory": self.fingerprint.trajectory, "time": self.time,
        }, indent=2, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, raw: bytes) -> Record:
        """ValueError when it is not a record."""
        try:
            doc = json.loads(raw)
            owner = Identity(doc.get("namespace"), str(doc["name"]), doc.get("uid"))
            return cls(owner, Fingerprint(str(doc["fingerprint"]), dict(doc.get("trajectory") or {})), doc.get("time"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a {RECORD}: {exc}") from None

    def write(self, folder: Path) -> None:
        """Into a folder being written (a checkpoint before its COMPLETE marker)."""
        (folder / RECORD).write_text(self.text())


def differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Where two trajectories differ, as `field: old -> new` (a field at its default is absent from a trajectory:
    "the default"; data: which location's content changed)."""
    out: list[str] = []
    for key in sorted(set(recorded) | set(current)):
        path = f"{prefix}.{key}" if prefix else key
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, path)
        elif path.startswith("data."):
            out.append(f"the content of dataset.{path.removeprefix('data.')} changed")
        else:
            out.append(f"{path}: {_shown(old, path)} -> {_shown(new, path)}")
    return out


def _shown(value: Any, path: str) -> str:
    if value is None:
        default = _default_of(path)
        return "the default" + (f" ({json.dumps(default)})" if default is not None else "")
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _default_of(path: str) -> Any:
    """The spec's default at a trajectory path such as `hyperparameters.learningRate` (None when it has none)."""
    model: Any = FineTuneJobSpec
    value: Any = None
    for part in path.split("."):
        fields = {f.alias or n: f for n, f in getattr(model, "model_fields", {}).items()}
        if part not in fields:
            return None
        info = fields[part]
        value = info.get_default(call_default_factory=True)
        kinds = [t for t in (info.annotation, *typing.get_args(info.annotation)) if isinstance(t, type)]
        model = next((t for t in kinds if hasattr(t, "model_fields")), None)
    return value if isinstance(value, str | int | float | bool) else None


def verdict(record: Record, identity: Identity, fingerprint: Fingerprint) -> str | None:
    """None when `record` is this job's (same namespace/name, same fingerprint); else why it is not."""
    if (record.owner.namespace, record.owner.name) != (identity.namespace, identity.name):
        return "another job"
    if record.fingerprint.digest != fingerprint.digest:
        diff = differences(record.fingerprint.trajectory, fingerprint.trajectory) or ["the training setup"]
        more = len(diff) - MAX_DIFFERENCES
        return "a different training setup: " + "; ".join(diff[:MAX_DIFFERENCES]) + (
            f"; and {more} more" if more > 0 else "")
    return None


# ---------------------------------------------------------------------------------------- reading a storage
class _Folder:
    """A storage's contents as seen by the check: the local folder, or for remote storage the remote copy (the
    truth; the local one is only staging)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.fs = storage.fs() if storage.remote else None

    def _remote(self, rel: str) -> str:
        return f"{self.storage.remote}/{rel}" if rel else str(self.storage.remote)

    def read(self, rel: str) -> bytes | None:
        try:
            if self.fs is not None:
                return bytes(self.fs.cat_file(self._remote(rel)))
            return (self.storage.local / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def entries(self, rel: str = "") -> list[tuple[str, bool]]:
        """(name, is a folder) of what lies directly in `rel`; empty when it does not exist."""
        try:
            if self.fs is not None:
                return [(str(e["name"]).rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory")
                        for e in self.fs.ls(self._remote(rel), detail=True)]
            with os.scandir(self.storage.local / rel) as it:
                return [(e.name, e.is_dir()) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def has_files(self, rel: str) -> bool:
        if self.fs is not None:
            return bool(self.fs.find(self._remote(rel)))
        return any(files for _, _, files in os.walk(self.storage.local / rel))


def _where(field_name: str, storage: Storage, rel: str = "") -> str:
    uri = storage.uri.rstrip("/") + (f"/{rel}" if rel else "")
    at = str(storage.remote or storage.local).rstrip("/") + (f"/{rel}" if rel else "")
    return f"{field_name} {uri}" + (f" ({at})" if at != uri else "")


def _refusal(where: str, record: Record, why: str, identity: Identity, field_name: str) -> str:
    writer = record.owner.describe() + (f", written {record.time}" if record.time else "")
    if (record.owner.namespace, record.owner.name) != (identity.namespace, identity.name):
        what = (f"{where} holds the checkpoints or model of {writer}, and this job is {identity.describe()}. A job "
                "resumes only its own checkpoints and never overwrites another job's model")
    else:
        what = (f"{where} holds the checkpoints or model of {writer}, trained with {why}. "
                "Resuming them would splice two different trainings into one model")
    return (f"{what}. Give this job another spec.{field_name}, or delete that folder if what it holds is no longer "
            "needed; to start from that run's weights, set spec.model.initFrom to one of its checkpoints")


def problem(storage: Storage, identity: Identity, fingerprint: Fingerprint, field_name: str = "output.storage",
            ) -> str | None:
    """Why this job must not write to `storage` (its checkpoint storage or output folder), or None. Reads only.

    The folder's own record must be this job's; so must the record of every folder directly in it that has one
    (another job's output nested in it, the default checkpoint storage inside the output, every checkpoint); a
    complete checkpoint without a record, and any file in a folder without a record, belong to an unknown writer."""
    folder = _Folder(storage)
    raw = folder.read(RECORD)
    owned = raw is not None
    if raw is not None and (found := _judge(raw, storage, "", identity, fingerprint, field_name)) is not None:
        return found
    for name, is_dir in sorted(folder.entries()):
        if name.startswith(".") or name == RECORD:
            continue
        if not is_dir:
            if not owned:
                return _unknown(_where(field_name, storage), f"the file {name}", field_name)
            continue
        sub = folder.read(f"{name}/{RECORD}")
        if sub is not None:
            if (found := _judge(sub, storage, name, identity, fingerprint, field_name)) is not None:
                return found
        elif CHECKPOINT_RE.match(name) and folder.read(f"{name}/{COMPLETE_MARKER}") is not None:
            return _unknown(_where(field_name, storage, name), "a complete checkpoint", field_name)
        elif not owned and folder.has_files(name):
            return _unknown(_where(field_name, storage), f"the folder {name}/", field_name)
    return None


def _judge(raw: bytes, storage: Storage, rel: str, identity: Identity, fingerprint: Fingerprint,
           field_name: str) -> str | None:
    where = _where(field_name, storage, rel)
    try:
        record = Record.parse(raw)
    except ValueError as exc:
        return (f"{where} has a {RECORD} that cannot be read ({exc}), so it cannot be told whose checkpoints or "
                f"model it holds. Give this job another spec.{field_name}, or delete that folder if what it holds is "
                "no longer needed")
    why = verdict(record, identity, fingerprint)
    return None if why is None else _refusal(where, record, why, identity, field_name)


def _unknown(where: str, what: str, field_name: str) -> str:
    return (f"{where} holds {what} without a {RECORD} saying which job wrote it (written by an older trainer or "
            f"another tool), and a job writes only where it or nothing has written. Give this job another "
            f"spec.{field_name}, or move or delete what is there; to start from a checkpoint's weights, set "
            "spec.model.initFrom to it")


# ---------------------------------------------------------------------------------------------------- claiming
def claim(storage: Storage, record: Record, identity: Identity, fingerprint: Fingerprint,
          field_name: str = "output.storage") -> None:
    """Write this job's record into `storage` (which `problem` found to be this job's or nobody's), atomically. A
    storage that no record claims yet is claimed by an exclusive create, so of two jobs starting at once only one
    wins: ConfigError for the other. StorageError when it cannot be written."""
    target = storage.local / RECORD
    tmp = target.with_name(f".{RECORD}.tmp{os.getpid()}")
    try:
        storage.local.mkdir(parents=True, exist_ok=True)
        held = _Folder(storage).read(RECORD)
        previous = _parsed(held)
        if previous is not None and verdict(previous, identity, fingerprint) is not None:
            raise ConfigError(problem(storage, identity, fingerprint, field_name) or "claimed by another job")
        if previous is not None and previous.owner == record.owner and previous.fingerprint == record.fingerprint:
            return
        if previous is not None and previous.owner.uid != record.owner.uid:
            log.info("%s: continuing what %s wrote (the same namespace/name and training setup, applied again)",
                     _where(field_name, storage), previous.owner.describe())
        tmp.write_text(record.text())
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if held is None and not storage.remote:
            try:
                os.link(tmp, target)  # fails if another job created it since the check
            except FileExistsError:
                if (why := problem(storage, identity, fingerprint, field_name)) is not None:
                    raise ConfigError(why) from None
                os.replace(tmp, target)
            except OSError:  # a file system without hard links: a plain replace (the operator's check still holds)
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
        storage.publish(RECORD)
    except OSError as exc:
        raise StorageError(f"storage {storage.uri} (at {storage.remote or storage.local}) is not writable: cannot "
                           f"write {RECORD}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _parsed(raw: bytes | None) -> Record | None:
    try:
        return None if raw is None else Record.parse(raw)
    except ValueError:
        return None  # refused by `problem` before; one written meanwhile is replaced by a readable one


def take(job: FineTuneJob, storages: Sequence[tuple[str, Storage]], pvc_root: Path,
         options: dict[str, Any] | None = None) -> Record:
    """Before a job writes anything: refuse storage that is not its own (ConfigError, exit 78), make sure each one
    can be written (StorageError, exit 74), then claim them. `storages`: (spec field, storage), e.g.
    [("checkpointing.storage", ...), ("output.storage", ...)]. Returns the record every checkpoint will carry."""
    identity, fingerprint = for_job(job, pvc_root, options)
    for field_name, storage in storages:
        if (why := problem(storage, identity, fingerprint, field_name)) is not None:
            raise ConfigError(why)
    for _, storage in storages:
        storage.ensure_writable()
    record = Record.of(identity, fingerprint)
    for field_name, storage in storages:
        claim(storage, record, identity, fingerprint, field_name)
    return record
