"""Bad data and bad configuration stop before training with the right exit code and a message that names the file,
row and field; storage that cannot be written stops with 74."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_api import exitcodes
from finetune_trainer.__main__ import main
from tests.trainer import support


def _run(tmp: Path, model: Path, train_rows: list[dict[str, Any]] | str, task: dict[str, Any] | None = None,
         **spec_extra: Any) -> tuple[int, str]:
    train = tmp / "data" / "train.jsonl"
    if isinstance(train_rows, str):
        train.parent.mkdir(parents=True, exist_ok=True)
        train.write_text(train_rows)
    else:
        support.write_jsonl(train, train_rows)
    spec: dict[str, Any] = {
        "task": task or {"type": "sequence-classification", "labels": ["negative", "positive"]},
        "model": {"source": str(model)},
        "dataset": {"train": str(train)},
        "hyperparameters": {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 16},
        "output": {"storage": str(tmp / "out")},
        **spec_extra,
    }
    code = main([str(support.manifest(tmp / "job.yaml", spec))])
    log = tmp / "termination-log"
    message = log.read_text() if log.exists() else ""
    return code, message


def _no_training(tmp: Path) -> None:
    assert not list((tmp / "out" / "checkpoints").glob("checkpoint-*"))
    assert not (tmp / "out" / "metrics.json").exists()


def test_missing_column(isolated: Path, models: dict[str, Path]) -> None:
    code, msg = _run(isolated, models["bert"], [{"sentence": "the cat", "label": "positive"}])
    assert code == exitcodes.DATA_ERROR
    assert "train.jsonl" in msg and "'text'" in msg and "sentence" in msg
    _no_training(isolated)


def test_label_outside_set_names_row(isolated: Path, models: dict[str, Path]) -> None:
    rows = [*support.sentiment_rows(5), {"text": "the dog", "label": "neutral"}]
    code, msg = _run(isolated, models["bert"], rows)
    assert code == exitcodes.DATA_ERROR
    assert "train.jsonl, row 6" in msg and "'label'" in msg and "'neutral'" in msg
    _no_training(isolated)


def test_non_numeric_regression_target(isolated: Path, models: dict[str, Path]) -> None:
    rows = [{"text": "the cat", "label": 0.5}, {"text": "the dog", "label": "high"}]
    code, msg = _run(isolated, models["bert"], rows, task={"type": "sequence-classification", "numLabels": 1})
    assert code == exitcodes.DATA_ERROR
    assert "row 2" in msg and "finite number" in msg and "'high'" in msg


def test_empty_split(isolated: Path, models: dict[str, Path]) -> None:
    code, msg = _run(isolated, models["bert"], "")
    assert code == exitcodes.DATA_ERROR
    train = isolated / "data" / "train.jsonl"
    assert f"dataset.train {train} is empty: {train} holds no rows" in msg


def test_empty_files_are_listed_in_a_sentence() -> None:
    from finetune_trainer.data import listed_files

    assert [listed_files([Path(f"{c}.jsonl") for c in "abcde"[:n]]) for n in (1, 2, 3, 5)] == [
        "a.jsonl", "a.jsonl and b.jsonl", "a.jsonl, b.jsonl and c.jsonl", "a.jsonl, b.jsonl, c.jsonl and 2 more files"]


def test_invalid_json_line(isolated: Path, models: dict[str, Path]) -> None:
    text = '{"text": "the cat", "label": "positive"}\n{"text": "the dog", "label": \n'
    code, msg = _run(isolated, models["bert"], text)
    assert code == exitcodes.DATA_ERROR
    assert "train.jsonl" in msg and "line 2" in msg


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv"])
def test_non_utf8_bytes_are_a_data_error_naming_file_and_line(isolated: Path, models: dict[str, Path],
                                                              name: str) -> None:
    """Not exit 1 (a crash, retried on GPUs from a checkpoint): 65, which no retry repeats."""
    path = isolated / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    good = support.sentiment_rows(3)
    if name.endswith(".jsonl"):
        lines = [json.dumps(r).encode() for r in good] + [b'{"text": "caf\xe9 latte", "label": "positive"}']
    else:
        lines = [b"text,label"] + [f"{r['text']},{r['label']}".encode() for r in good] + [b"caf\xe9 latte,positive"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, msg = _run(isolated, models["bert"], [], dataset={"train": str(path)})
    assert code == exitcodes.DATA_ERROR, msg
    assert f"{path}, line {len(lines)}, column" in msg and "not UTF-8" in msg and "0xe9" in msg
    _no_training(isolated)


def test_over_long_causal_example_rejected(isolated: Path, models: dict[str, Path]) -> None:
    rows = [*support.qa_rows(3), {"prompt": "question : " + "what " * 20, "response": "the cat is red"}]
    code, msg = _run(isolated, models["gpt2"], rows, task={"type": "causal-lm"})
    assert code == exitcodes.DATA_ERROR
    assert "row 4" in msg and "maxSeqLength 16" in msg
    _no_training(isolated)


def test_messages_without_assistant_turn(isolated: Path, models: dict[str, Path]) -> None:
    rows = [{"messages": [{"role": "user", "content": "hello"}]}]
    code, msg = _run(isolated, models["gpt2"], rows, task={"type": "causal-lm"},
                     dataset={"train": str(isolated / "data" / "train.jsonl"), "columns": {"messages": "messages"}})
    assert code == exitcodes.DATA_ERROR
    assert "row 1" in msg and "assistant" in msg


def test_missing_model_is_config_error(isolated: Path) -> None:
    code, msg = _run(isolated, isolated / "no-such-model", support.sentiment_rows(4))
    assert code == exitcodes.CONFIG_ERROR
    assert "no-such-model" in msg


def test_invalid_manifest_is_config_error(isolated: Path) -> None:
    path = isolated / "job.yaml"
    path.write_text("apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {}\n")
    assert main([str(path)]) == exitcodes.CONFIG_ERROR
    assert "spec.task" in (isolated / "termination-log").read_text()


def test_unwritable_storage_exits_74_before_training(isolated: Path, models: dict[str, Path]) -> None:
    blocker = isolated / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    code, msg = _run(isolated, models["bert"], support.sentiment_rows(8),
                     output={"storage": str(blocker / "out")})
    assert code == exitcodes.STORAGE_ERROR
    assert "not writable" in msg and "not-a-folder" in msg


@pytest.mark.parametrize("secret", ["s3cr3t-value"])
def test_termination_message_has_no_secret(isolated: Path, models: dict[str, Path], secret: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("FINETUNE_PROGRESS_TOKEN", secret)
    code, msg = _run(isolated, models["bert"], [{"text": "x", "label": "maybe"}])
    assert code == exitcodes.DATA_ERROR and secret not in msg


@pytest.mark.parametrize(("message", "words"), [
    ({"role": "bot", "content": "hello"}, "message 1 has role 'bot'; the roles a chat template renders are"),
    ({"role": "user", "content": [{"type": "text", "text": "hello"}]}, "message 1 (user) has content list"),
    ({"role": "user"}, "message 1 (user) has content nothing (null)"),
    ("hello", "message 1 is str, not a {role, content} object"),
])
def test_chat_rows_are_checked_structurally(isolated: Path, models: dict[str, Path], message: Any,
                                            words: str) -> None:
    """A role the template does not know, content that is not text, a message that is not an object: the row is
    refused before training, naming file, row and field, not trained on silently."""
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
            {"messages": [message, {"role": "assistant", "content": "yes"}]}]
    code, msg = _run(isolated, models["gpt2"], rows, task={"type": "causal-lm"},
                     dataset={"train": str(isolated / "data" / "train.jsonl"), "columns": {"messages": "messages"}})
    assert code == exitcodes.DATA_ERROR, msg
    assert "train.jsonl, row 2: field 'messages'" in msg and words in msg
    _no_training(isolated)


def test_over_long_causal_examples_can_be_dropped_and_counted(isolated: Path, models: dict[str, Path]) -> None:
    rows = [*support.qa_rows(7), {"prompt": "question : " + "what " * 20, "response": "the cat is red"}]
    code, msg = _run(isolated, models["gpt2"], rows, task={"type": "causal-lm"},
                     dataset={"train": str(isolated / "data" / "train.jsonl"), "overLong": "drop"})
    assert code == 0, msg
    doc = json.loads((isolated / "out" / "metrics.json").read_text())
    assert doc["droppedExamples"] == {"train": 1} and doc["trainExamples"] == 7
