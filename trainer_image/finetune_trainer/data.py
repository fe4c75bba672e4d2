"""Data: load with `datasets`, the helpers the tasks check and tokenise with, a token cache, batches by length.

Every row keeps its origin (file and 1-based row), so a problem is reported where the user can fix it. What a row
must hold and how it is tokenised is the task's business (finetune_trainer.tasks). Tokenised examples are stored as
flat int32 arrays plus offsets (no padding) and padded per batch; batches are drawn from length-sorted groups, so a
batch wastes almost nothing on padding while the epoch order stays random.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.locations import DATA_SUFFIXES

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_VERSION = 3
TOKENIZE_CHUNK = 1000
MEGA_BATCH_FACTOR = 50  # batches per length-sorted group: ~4% padding, order still random at the group level


# ---------------------------------------------------------------------------------------------------------- loading
@dataclass
class Split:
    """A loaded split and where each of its rows came from."""

    name: str
    dataset: Any  # datasets.Dataset
    files: list[str]
    file_of_row: np.ndarray  # index into files, per row
    row_in_file: np.ndarray  # 0-based row within its file, per row

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, i: int) -> str:
        return f"{self.files[int(self.file_of_row[i])]}, row {int(self.row_in_file[i]) + 1}"

    def select(self, idx: Sequence[int] | np.ndarray, name: str | None = None) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        return Split(name or self.name, self.dataset.select(idx), self.files, self.file_of_row[idx],
                     self.row_in_file[idx])

    def fingerprint(self) -> str:
        return str(getattr(self.dataset, "_fingerprint", "")) + f":{len(self)}"


def _builder(path: Path, fmt: str) -> str:
    if fmt not in ("auto", "hub"):
        return "json" if fmt == "jsonl" else fmt
    builder = DATA_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{path}: cannot tell the data format from the extension {path.suffix or '(none)'!r}; "
                          "set dataset.format to jsonl, csv, parquet or arrow")
    return builder


def _json_problem(path: Path) -> str:
    """Find the first line of a JSON-lines file that does not parse, for a message a person can act on."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"line {n} is not valid JSON ({exc.msg} at column {exc.colno})"
                if not isinstance(value, dict):
                    return f"line {n} is not a JSON object"
    return ""


def check_utf8(name: str, path: Path) -> None:
    """Text data must be UTF-8. `datasets` decodes lazily, so a bad byte would otherwise surface mid-run as a crash
    (exit 1, retried from a checkpoint) instead of a data error no retry can fix; report its line and column."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"dataset.{name}: {path}, line {n}, column {exc.start + 1}: not UTF-8 text (byte "
                                f"0x{raw[exc.start]:02x}: {exc.reason}); save the file as UTF-8") from None


def load_files(name: str, uri: str, files: list[Path], fmt: str, cache_dir: Path) -> Split:
    """Load local data files one by one (so rows keep their file) and concatenate them."""
    import datasets

    if not files:
        raise DataError(f"dataset.{name} {uri}: no data files found")
    parts, file_of_row, row_in_file = [], [], []
    for k, path in enumerate(files):
        builder = _builder(path, fmt)
        if builder in ("json", "csv"):
            check_utf8(name, path)
        if builder in ("json", "csv") and not path.read_bytes()[:65536].strip():
            log.warning("dataset.%s: %s is empty", name, path)
            continue
        try:
            if builder == "arrow":
                ds = datasets.Dataset.from_file(str(path))
            else:
                ds = datasets.load_dataset(builder, data_files=[str(path)], split="train",
                                           cache_dir=str(cache_dir / "datasets"))
        except Exception as exc:  # datasets wraps parser errors in many types
            detail = _json_problem(path) if builder == "json" else ""
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DataError(f"dataset.{name}: cannot read {path} as {builder}: {detail or first}") from exc
        parts.append(ds)
        file_of_row.append(np.full(len(ds), k, dtype=np.int32))
        row_in_file.append(np.arange(len(ds), dtype=np.int64))
    if not parts:
        raise DataError(f"dataset.{name} {uri} is empty ({', '.join(map(str, files[:3]))} hold no rows)")
    if len(parts) == 1:
        dataset = parts[0]
    else:
        try:
            dataset = datasets.concatenate_datasets(parts)
        except ValueError as exc:
            raise DataError(f"dataset.{name}: files {', '.join(map(str, files))} do not have the same columns: "
                            f"{exc}") from exc
    return Split(name, dataset, [str(p) for p in files], np.concatenate(file_of_row), np.concatenate(row_in_file))


def load_hub(name: str, dataset_id: str, split: str, subset: str | None, cache_dir: Path) -> Split:
    """Load a split of a hub dataset (rows are reported by index within the split)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, subset, split=split, cache_dir=str(cache_dir / "datasets"))
    except Exception as exc:
        raise ConfigError(f"dataset.{name}: cannot load hub dataset {dataset_id!r} (subset {subset!r}, split "
                          f"{split!r}): {str(exc).splitlines()[0][:300]}") from exc
    return Split(name, ds, [f"{dataset_id}[{split}]"], np.zeros(len(ds), dtype=np.int32),
                 np.arange(len(ds), dtype=np.int64))


def split_off(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a seeded random fraction of the training rows for validation."""
    n = len(train)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"dataset.validationSplit {fraction} leaves no training rows out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return train.select(np.sort(perm[n_val:]), "train"), train.select(np.sort(perm[:n_val]), "validation")


# ----------------------------------------------------------------------------------------------------------- checks
def column(split: Split, col: str, role: str) -> list[Any]:
    """The values of column `col` (the task's `role`); a missing column names the columns that are there."""
    if col not in split.dataset.column_names:
        raise DataError(f"dataset.{split.name} ({', '.join(split.files[:3])}{' ...' if len(split.files) > 3 else ''})"
                        f": column {col!r} (dataset.columns.{role}) is missing; columns found: "
                        f"{', '.join(split.dataset.column_names) or '(none)'}")
    return split.dataset[col]


def _check_strings(split: Split, values: list[Any], col: str) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{split.where(i)}: field {col!r} must be text, got "
                            f"{'nothing (null)' if v is None else type(v).__name__}")


def check_text_columns(split: Split, columns: dict[str, str], roles: Sequence[str]) -> None:
    """Every named role's column is present and holds text in every row."""
    for role in roles:
        _check_strings(split, column(split, columns[role], role), columns[role])


# ------------------------------------------------------------------------------------------------------- tokenising
@dataclass
class Encoded:
    """Tokenised examples without padding: ragged int columns (flat values + offsets) and per-example scalars."""

    ragged: dict[str, tuple[np.ndarray, np.ndarray]]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: dict[str, list[list[int]]], scalars: dict[str, np.ndarray] | None = None) -> Encoded:
        """From token lists per example, e.g. {"input_ids": [[...], ...], "labels": [[...], ...]}."""
        return cls({name: _ragged(r) for name, r in rows.items()}, scalars or {})

    def __len__(self) -> int:
        return len(self.ragged["input_ids"][1]) - 1

    def lengths(self, name: str = "input_ids") -> np.ndarray:
        return np.diff(self.ragged[name][1])

    def cost(self) -> np.ndarray:
        """Per-example work estimate used to group batches (decoder tokens count too for seq2seq)."""
        c = self.lengths().astype(np.int64)
        if "labels" in self.ragged and "decoder" in self.scalars:
            c = c + self.lengths("labels")
        return c

    def row(self, name: str, i: int) -> np.ndarray:
        flat, off = self.ragged[name]
        return flat[off[i]:off[i + 1]]

    def save(self, path: Path) -> None:
        arrays = {f"r.{k}.flat": v[0] for k, v in self.ragged.items()}
        arrays |= {f"r.{k}.off": v[1] for k, v in self.ragged.items()}
        arrays |= {f"s.{k}": v for k, v in self.scalars.items()}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Encoded:
        with np.load(path) as z:
            ragged = {k[2:-5]: (z[k], z[f"{k[:-5]}.off"]) for k in z.files if k.startswith("r.") and
                      k.endswith(".flat")}
            scalars = {k[2:]: z[k] for k in z.files if k.startswith("s.")}
        return cls(ragged, scalars)


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=off[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(off[-1]))
    return flat, off


def chunks(n: int) -> Iterator[slice]:
    """Slices of TOKENIZE_CHUNK rows: the tokenizer's batch calls stay fast without holding everything at once."""
    for s in range(0, n, TOKENIZE_CHUNK):
        yield slice(s, min(n, s + TOKENIZE_CHUNK))


def eos_ids(tok: Any) -> list[int]:
    """The end-of-sequence token as a list to append (empty when the tokenizer has none)."""
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def tokenizer_fingerprint(tok: Any) -> str:
    """A stable hash of the tokenizer's behaviour (its full JSON for fast tokenizers)."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tok.get_vocab()).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items())).encode())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    return h.hexdigest()


def cache_key(split: Split, settings: Any, tok_fp: str) -> str:
    """The token cache's key: data, task settings (a dataclass) and tokenizer."""
    blob = json.dumps({"v": CACHE_VERSION, "data": split.fingerprint(), "files": split.files,
                       "task": settings.__dict__, "tok": tok_fp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_path(split: Split, settings: Any, cache_dir: Path | None, tok_fp: str) -> Path | None:
    return cache_dir / "tokens" / f"{split.name}-{cache_key(split, settings, tok_fp)}.npz" if cache_dir else None


def cached_tokens(split: Split, settings: Any, cache_dir: Path | None, tok_fp: str) -> Encoded | None:
    """The split's tokens from `<cache>/tokens/<key>.npz` when the data, tokenizer and settings are unchanged. Only a
    split that passed the task's checks is ever tokenised, so an entry also means: checked."""
    path = _cache_path(split, settings, cache_dir, tok_fp)
    if path is None or not path.exists():
        return None
    try:
        enc = Encoded.load(path)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable token cache %s: %s", path, exc)
        return None
    if len(enc) != len(split):
        return None
    log.info("using tokenised %s from cache %s", split.name, path)
    return enc


def encode_cached(split: Split, settings: Any, encode: Callable[[], Encoded], cache_dir: Path | None, tok_fp: str,
                  write: bool = True) -> Encoded:
    """Tokenise once: reuse `<cache>/tokens/<key>.npz` when the data, tokenizer and settings are unchanged."""
    enc = cached_tokens(split, settings, cache_dir, tok_fp)
    if enc is not None:
        return enc
    enc = encode()
    path = _cache_path(split, settings, cache_dir, tok_fp)
    if path is not None and write:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            enc.save(path)
        except OSError as exc:  # a cache is an optimisation: never fail the job for it
            log.warning("cannot write token cache %s: %s", path, exc)
    return enc


# -------------------------------------------------------------------------------------------------------- batching
def epoch_batches(cost: np.ndarray, batch_size: int, seed: int, epoch: int, world: int = 1, rank: int = 0,
                  grouped: bool = True) -> list[np.ndarray]:
    """This rank's batches for one epoch, deterministic in (seed, epoch) so a resumed run replays the same order.

    Grouped: shuffle, cut into groups of MEGA_BATCH_FACTOR batches, sort each group by length, cut into batches,
    shuffle the batches. Every rank gets the same number of batches (the remainder is dropped), so DDP never waits.
    """
    n = len(cost)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    batches: list[np.ndarray] = []
    group = batch_size * MEGA_BATCH_FACTOR if grouped else n
    for s in range(0, n, group):
        chunk = perm[s:s + group]
        if grouped:
            chunk = chunk[np.argsort(-cost[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    if grouped:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    usable = len(batches) // world * world
    return batches[rank:usable:world]


def eval_batches(cost: np.ndarray, batch_size: int, world: int = 1, rank: int = 0) -> list[np.ndarray]:
    """Evaluation order: sorted by length (least padding), sharded across ranks without dropping any example."""
    order = np.argsort(-cost, kind="stable")
    mine = order[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def _pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate(enc: Encoded, idx: np.ndarray, pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """Pad a batch to its own longest example; return the model inputs and the count of real tokens."""
    rows = [enc.row("input_ids", int(i)) for i in idx]
    batch = {"input_ids": _pad(rows, pad_id)}
    lengths = torch.tensor([len(r) for r in rows])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
    tokens = int(lengths.sum())
    if "token_type_ids" in enc.ragged:
        batch["token_type_ids"] = _pad([enc.row("token_type_ids", int(i)) for i in idx], 0)
    if "labels" in enc.ragged:
        label_rows = [enc.row("labels", int(i)) for i in idx]
        batch["labels"] = _pad(label_rows, IGNORE_INDEX)
        if "decoder" in enc.scalars:
            tokens += sum(len(r) for r in label_rows)
    elif "labels" in enc.scalars:
        batch["labels"] = torch.from_numpy(enc.scalars["labels"][idx])
    return batch, tokens
