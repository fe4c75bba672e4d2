"""Where things live: pvc://claim/path on a mounted volume, s3:// (or any fsspec URL) via a local cache, plain paths,
and hub ids, which are left to transformers/datasets.

Remote storage is written locally first and uploaded file by file with the completeness marker last, so a reader
of the bucket never sees a checkpoint as complete before all of its files are there.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.errors import ConfigError, StorageError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")


@dataclass(frozen=True)
class Location:
    """A resolved location: exactly one of `path` (on this machine), `remote` (fsspec URL) or `hub` is set."""

    uri: str
    path: Path | None = None
    remote: str | None = None
    hub: str | None = None


def resolve(uri: str, pvc_root: Path, field_name: str = "location") -> Location:
    """Map a spec location to a local path, a remote URL or a hub id (without touching the network)."""
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://"):]
        claim, _, sub = rest.partition("/")
        if not claim or ".." in Path(sub).parts:
            raise ConfigError(f"{field_name} {uri!r} must look like pvc://<claim>/<path> without '..'")
        return Location(uri, path=pvc_root / claim / sub)
    m = SCHEME.match(uri)
    if m:
        if m.group(1) == "file":
            return Location(uri, path=Path(uri[len("file://"):]))
        return Location(uri, remote=uri.rstrip("/"))
    local = Path(uri).expanduser()
    if uri.startswith((".", "/", "~")) or local.exists() or any(ch in uri for ch in "*?["):
        return Location(uri, path=local)
    if HUB_ID.match(uri):
        return Location(uri, hub=uri)
    return Location(uri, path=local)


def remote_fs(url: str, options: dict[str, Any] | None = None) -> Any:
    """The fsspec filesystem for a URL; a missing optional backend (s3fs) is a configuration error."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with datasets
        raise ConfigError(f"{url}: remote locations need fsspec (pip install 'finetune-operator[s3]')") from None
    scheme = SCHEME.match(url).group(1)  # type: ignore[union-attr]
    try:
        return fsspec.filesystem(scheme, **(options or {}))
    except ImportError as exc:
        extra = "s3" if scheme in ("s3", "s3a") else scheme
        raise ConfigError(f"{url}: {scheme}:// locations need an fsspec backend that is not installed "
                          f"(pip install 'finetune-operator[{extra}]' or s3fs): {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{url}: unknown storage scheme {scheme!r}: {exc}") from None


def _cache_name(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def fetch(loc: Location, cache_dir: Path, options: dict[str, Any] | None = None) -> Path:
    """A local path for a readable location, downloading remote files or folders (globs too) into the cache once."""
    if loc.path is not None:
        return loc.path
    if loc.remote is None:
        raise ValueError(f"{loc.uri} is a hub id, not a file location")
    fs = remote_fs(loc.remote, options)
    target = cache_dir / "remote" / _cache_name(loc.remote)
    done = target / ".fetched"
    if done.exists():
        return _single(target, loc.remote)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        matches = fs.glob(loc.remote) if any(ch in loc.remote for ch in "*?[") else [loc.remote]
        if not matches or not all(fs.exists(m) for m in matches):
            raise ConfigError(f"{loc.uri} does not exist")
        for m in matches:
            name = m.rstrip("/").rsplit("/", 1)[-1]
            if fs.isdir(m):
                fs.get(m.rstrip("/") + "/", str(tmp / name) + "/", recursive=True)
            else:
                fs.get(m, str(tmp / name))
        (tmp / ".fetched").write_text(loc.remote)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{loc.uri}: cannot download: {exc}") from exc
    return _single(target, loc.remote)


def _single(target: Path, url: str) -> Path:
    """A single fetched file or folder is returned as itself, several (a glob) as their folder."""
    entries = [p for p in target.iterdir() if p.name != ".fetched"]
    if len(entries) == 1 and not any(ch in url for ch in "*?["):
        return entries[0]
    return target


def expand_files(path: Path) -> list[Path]:
    """Files named by a path: a file, a glob, or every data file in a folder (sorted, so runs repeat)."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        return [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                      and p.suffix.lower() in DATA_SUFFIXES)
    return [path] if path.is_file() else []


DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class Storage:
    """A writable location. Files are written under `local`; for a remote URL they are mirrored up on `publish`."""

    uri: str
    local: Path
    remote: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def fs(self) -> Any:
        return remote_fs(self.remote, self.options) if self.remote else None

    def ensure_writable(self) -> None:
        """Create the folder and write a probe file, so a read-only or missing volume fails before training."""
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            probe = self.local / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            if self.remote:
                fs = self.fs()
                fs.pipe_file(self.remote + f"/.write-test-{os.getpid()}", b"ok")
                fs.rm_file(self.remote + f"/.write-test-{os.getpid()}")
        except OSError as exc:
            raise StorageError(f"storage {self.uri} (at {self.remote or self.local}) is not writable: "
                               f"{exc.strerror or exc}") from exc

    def publish(self, rel: str, last: str | None = None) -> None:
        """Upload local/rel (file or folder) to the remote, the file named `last` after all others."""
        if not self.remote:
            return
        fs = self.fs()
        src = self.local / rel
        dst = f"{self.remote}/{rel}"
        try:
            if src.is_dir():
                files = sorted(p for p in src.rglob("*") if p.is_file())
                files.sort(key=lambda p: p.name == last)
                for p in files:
                    _put(fs, p, f"{dst}/{p.relative_to(src).as_posix()}")
            else:
                _put(fs, src, dst)
        except OSError as exc:
            raise StorageError(f"cannot upload {rel} to {self.uri}: {exc}") from exc

    def remote_entries(self) -> list[str]:
        """Names directly under the remote prefix (empty for local storage or a new prefix)."""
        if not self.remote:
            return []
        fs = self.fs()
        try:
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(self.remote, detail=False)]
        except FileNotFoundError:
            return []

    def remote_exists(self, rel: str) -> bool:
        return bool(self.remote) and self.fs().exists(f"{self.remote}/{rel}")

    def download(self, rel: str) -> None:
        """Copy remote/rel into local/rel (used to resume from a remote checkpoint)."""
        if not self.remote:
            return
        dst = self.local / rel
        shutil.rmtree(dst, ignore_errors=True)
        self.fs().get(f"{self.remote}/{rel}/", str(dst) + "/", recursive=True)

    def remove(self, rel: str) -> None:
        """Delete a folder here and remotely. Locally it is first renamed to a hidden `.tmp-` name (atomic), so a
        crash in the middle leaves a partial that the checkpoint ledger removes on the next start, never a
        half-deleted folder under its own name."""
        target = self.local / rel
        if target.exists():
            doomed = target.with_name(f".tmp-{target.name}-removed-{os.getpid()}")
            os.rename(target, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        if self.remote:
            fs = self.fs()
            if fs.exists(f"{self.remote}/{rel}"):
                fs.rm(f"{self.remote}/{rel}", recursive=True)


def _put(fs: Any, src: Path, dst: str) -> None:
    """Upload one file; object stores need no folders, file systems do (made on demand)."""
    try:
        fs.put_file(str(src), dst)
    except FileNotFoundError:
        fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(src), dst)


def storage(uri: str, pvc_root: Path, cache_dir: Path, options: dict[str, Any] | None = None,
            field_name: str = "storage") -> Storage:
    """A Storage for a spec location; remote ones are staged in the cache folder."""
    loc = resolve(uri, pvc_root, field_name)
    if loc.hub is not None:
        # A bare relative name is a folder in the working directory, not a hub repository.
        return Storage(uri, Path(uri))
    if loc.path is not None:
        return Storage(uri, loc.path)
    remote_fs(loc.remote, options)  # fail early if the backend is missing
    return Storage(uri, cache_dir / "staging" / _cache_name(loc.remote or uri), loc.remote, dict(options or {}))
