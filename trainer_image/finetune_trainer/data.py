"""Data: load with `datasets`, check before any training, tokenise once into a cache, batch by length.

Every row keeps its origin (file and 1-based row), so a problem is reported where the user can fix it. Tokenised
examples are stored as flat int32 arrays plus offsets (no padding) and padded per batch; batches are drawn from
length-sorted groups, so a batch wastes almost nothing on padding while the epoch order stays random.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
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
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as exc:
                        return f"line {n} is not valid JSON ({exc.msg} at column {exc.colno})"
                    if not isinstance(value, dict):
                        return f"line {n} is not a JSON object"
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    return ""


def load_files(name: str, uri: str, files: list[Path], fmt: str, cache_dir: Path) -> Split:
    """Load local data files one by one (so rows keep their file) and concatenate them."""
    import datasets

    if not files:
        raise DataError(f"dataset.{name} {uri}: no data files found")
    parts, file_of_row, row_in_file = [], [], []
    for k, path in enumerate(files):
        builder = _builder(path, fmt)
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
@dataclass(frozen=True)
class TaskInfo:
    """What the data check and the tokeniser need to know about the task."""

    type: str
    columns: dict[str, str]
    labels: list[str] | None = None
    num_labels: int | None = None
    max_seq_length: int = 256
    source_prefix: str = ""

    @property
    def regression(self) -> bool:
        return self.type == "sequence-classification" and self.num_labels == 1

    @property
    def n_classes(self) -> int:
        return len(self.labels) if self.labels else int(self.num_labels or 0)


def _column(split: Split, col: str, role: str) -> list[Any]:
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


def label_ids(split: Split, task: TaskInfo) -> np.ndarray:
    """Check the label column and map it to class ids (int64) or regression targets (float32)."""
    col = task.columns["label"]
    values = _column(split, col, "label")
    if task.regression:
        out = np.empty(len(values), dtype=np.float32)
        for i, v in enumerate(values):
            try:
                if isinstance(v, bool) or v is None:
                    raise ValueError
                out[i] = float(v)
                if not math.isfinite(out[i]):
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(f"{split.where(i)}: field {col!r} must be a finite number for regression "
                                f"(task.numLabels 1), got {v!r}") from None
        return out
    index = {name: k for k, name in enumerate(task.labels or [])}
    n = task.n_classes
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, str) and v in index:
            out[i] = index[v]
        elif isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v < n:
            out[i] = int(v)
        else:
            allowed = f"one of {task.labels} or an index 0..{n - 1}" if task.labels else f"an integer 0..{n - 1}"
            raise DataError(f"{split.where(i)}: field {col!r} has label {v!r}, outside the label set (expected "
                            f"{allowed})")
    return out


def _check_messages(split: Split, values: list[Any], col: str) -> None:
    for i, conv in enumerate(values):
        ok = isinstance(conv, list) and conv and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conv)
        if not ok:
            raise DataError(f"{split.where(i)}: field {col!r} must be a list of {{role, content}} messages with "
                            "text content")
        if not any(m["role"] == "assistant" for m in conv):
            raise DataError(f"{split.where(i)}: field {col!r} has no assistant message, so nothing would be learned")


def check_split(split: Split, task: TaskInfo) -> None:
    """Everything that can be checked before tokenising: non-empty, columns present, values of the right kind."""
    if len(split) == 0:
        raise DataError(f"dataset.{split.name} ({', '.join(split.files[:3])}) is empty")
    cols = task.columns
    if task.type == "sequence-classification":
        _check_strings(split, _column(split, cols["text"], "text"), cols["text"])
        if cols.get("textPair"):
            _check_strings(split, _column(split, cols["textPair"], "textPair"), cols["textPair"])
        label_ids(split, task)
    elif task.type == "causal-lm":
        if "messages" in cols:
            _check_messages(split, _column(split, cols["messages"], "messages"), cols["messages"])
        else:
            for role in ("prompt", "response"):
                _check_strings(split, _column(split, cols[role], role), cols[role])
    else:
        for role in ("source", "target"):
            _check_strings(split, _column(split, cols[role], role), cols[role])


# ------------------------------------------------------------------------------------------------------- tokenising
@dataclass
class Encoded:
    """Tokenised examples without padding: ragged int columns (flat values + offsets) and per-example scalars."""

    ragged: dict[str, tuple[np.ndarray, np.ndarray]]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

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


def _chunks(n: int) -> Iterator[slice]:
    for s in range(0, n, TOKENIZE_CHUNK):
        yield slice(s, min(n, s + TOKENIZE_CHUNK))


def _encode_classification(split: Split, task: TaskInfo, tok: Any) -> Encoded:
    texts = split.dataset[task.columns["text"]]
    pair_col = task.columns.get("textPair")
    pairs = split.dataset[pair_col] if pair_col else None
    ids: list[list[int]] = []
    types: list[list[int]] = []
    for s in _chunks(len(texts)):
        enc = tok(texts[s], pairs[s] if pairs else None, truncation=True, max_length=task.max_seq_length)
        ids.extend(enc["input_ids"])
        if pairs and "token_type_ids" in enc:
            types.extend(enc["token_type_ids"])
    ragged = {"input_ids": _ragged(ids)}
    if types:
        ragged["token_type_ids"] = _ragged(types)
    return Encoded(ragged, {"labels": label_ids(split, task)})


def _eos(tok: Any) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def _too_long(split: Split, i: int, n: int, task: TaskInfo, what: str) -> DataError:
    return DataError(f"{split.where(i)}: {what} is {n} tokens, longer than hyperparameters.maxSeqLength "
                     f"{task.max_seq_length}; causal-lm examples are never truncated (the response would be cut): "
                     "shorten or drop the example, or raise maxSeqLength")


def _render_chat(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tok: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, carries_loss) pieces: only assistant replies carry loss.

    Rendering prefixes of the conversation finds where each reply starts and ends in the template's output, so any
    template that renders a conversation as the concatenation of its turns works, without special markers.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render_chat(tok, messages[:k], generation_prompt=True) if k else ""
        upto = _render_chat(tok, messages[:k + 1], generation_prompt=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ConfigError("the tokenizer's chat template does not render a conversation as the concatenation "
                              "of its turns, so the assistant replies cannot be located; use prompt/response "
                              "columns instead")
        segments.append((before[len(done):], False))
        segments.append((upto[len(before):], True))
        done = upto
    full = _render_chat(tok, messages, generation_prompt=False)
    if full[len(done):]:
        segments.append((full[len(done):], False))
    return [(t, loss) for t, loss in segments if t]


def _encode_causal(split: Split, task: TaskInfo, tok: Any) -> Encoded:
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    cols = task.columns
    if "messages" in cols:
        if not getattr(tok, "chat_template", None):
            raise ConfigError("dataset.columns.messages needs a tokenizer with a chat template, and this model's "
                              "tokenizer has none; use prompt/response columns instead")
        for i, conv in enumerate(split.dataset[cols["messages"]]):
            segs = chat_segments(tok, [{"role": m["role"], "content": m["content"]} for m in conv])
            row_ids: list[int] = []
            row_labels: list[int] = []
            for text, loss in segs:
                piece = tok(text, add_special_tokens=False)["input_ids"]
                row_ids += piece
                row_labels += piece if loss else [IGNORE_INDEX] * len(piece)
            if len(row_ids) > task.max_seq_length:
                raise _too_long(split, i, len(row_ids), task, "the rendered conversation")
            ids.append(row_ids)
            labels.append(row_labels)
    else:
        prompts = split.dataset[cols["prompt"]]
        responses = split.dataset[cols["response"]]
        eos = _eos(tok)
        for s in _chunks(len(prompts)):
            p_ids = tok(prompts[s], add_special_tokens=True)["input_ids"]
            r_ids = tok(responses[s], add_special_tokens=False)["input_ids"]
            for j, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
                row = p + r + eos
                if len(row) > task.max_seq_length:
                    raise _too_long(split, s.start + j, len(row), task, "prompt + response")
                ids.append(row)
                labels.append([IGNORE_INDEX] * len(p) + r + eos)
    for i, lab in enumerate(labels):
        if all(t == IGNORE_INDEX for t in lab):
            raise DataError(f"{split.where(i)}: the response is empty after tokenising, so nothing would be learned")
    return Encoded({"input_ids": _ragged(ids), "labels": _ragged(labels)})


def _encode_seq2seq(split: Split, task: TaskInfo, tok: Any) -> Encoded:
    sources = [task.source_prefix + s for s in split.dataset[task.columns["source"]]]
    targets = split.dataset[task.columns["target"]]
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    eos = _eos(tok)
    for s in _chunks(len(sources)):
        ids.extend(tok(sources[s], truncation=True, max_length=task.max_seq_length)["input_ids"])
        for t in tok(text_target=targets[s], truncation=True, max_length=task.max_seq_length)["input_ids"]:
            if eos and (not t or t[-1] != eos[0]):
                t = t[: task.max_seq_length - 1] + eos
            labels.append(t)
    return Encoded({"input_ids": _ragged(ids), "labels": _ragged(labels)}, {"decoder": np.ones(len(ids), np.int8)})


def encode(split: Split, task: TaskInfo, tok: Any) -> Encoded:
    """Tokenise a checked split for the task."""
    if task.type == "sequence-classification":
        return _encode_classification(split, task, tok)
    if task.type == "causal-lm":
        return _encode_causal(split, task, tok)
    return _encode_seq2seq(split, task, tok)


def tokenizer_fingerprint(tok: Any) -> str:
    """A stable hash of the tokenizer's behaviour (its full JSON for fast tokenizers)."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tok.get_vocab()).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items())).encode())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    return h.hexdigest()


def cache_key(split: Split, task: TaskInfo, tok_fp: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "data": split.fingerprint(), "files": split.files, "task": task.__dict__,
                       "tok": tok_fp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def encode_cached(split: Split, task: TaskInfo, tok: Any, cache_dir: Path | None, tok_fp: str,
                  write: bool = True) -> Encoded:
    """Tokenise once: reuse `<cache>/tokens/<key>.npz` when the data, tokenizer and settings are unchanged."""
    path = cache_dir / "tokens" / f"{split.name}-{cache_key(split, task, tok_fp)}.npz" if cache_dir else None
    if path is not None and path.exists():
        try:
            enc = Encoded.load(path)
            if len(enc) == len(split):
                log.info("using tokenised %s from cache %s", split.name, path)
                return enc
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable token cache %s: %s", path, exc)
    enc = encode(split, task, tok)
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
