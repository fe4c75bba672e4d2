"""The model's layout in one process: activation checkpointing gives the same gradients with fewer kept activations,
transformer blocks are found for the architectures FSDP shards, LoRA's frozen base is loaded in the compute precision
with fp32 adapters, and fsdp on one process is a configuration error. The two-process proofs run the real trainer
(test_sharded_training.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import tasks
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import ConfigError
from finetune_trainer.job import load_trainable
from finetune_trainer.modeling import choose_precision, load_tokenizer
from finetune_trainer.sharding import Layout, SavedTensorBytes, transformer_blocks
from tests.trainer import support


def test_activation_checkpointing_same_gradients_fewer_kept_activations() -> None:
    """Per-block recomputation: identical loss and gradients, and the bytes kept for backward measured lower."""
    torch.set_num_threads(1)
    x = support.counting_tokens(4, 128)
    measured, grads = {}, {}
    for ac in (False, True):
        w = Dist().wrap(support.llama_in_memory(num_hidden_layers=4), Layout(activation_checkpointing=ac))
        with SavedTensorBytes() as saved:
            loss = w.module(input_ids=x, labels=x).loss
        loss.backward()
        measured[ac] = (float(loss.detach()), saved.bytes)
        grads[ac] = [p.grad.clone() for p in w.trainable()]
    assert measured[True][0] == pytest.approx(measured[False][0], rel=1e-6)
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert measured[True][1] / measured[False][1] < 0.5, measured


def test_transformer_blocks_found_for_llama_gpt2_and_lora() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    assert [type(b).__name__ for b in transformer_blocks(support.llama_in_memory())] == ["LlamaDecoderLayer"] * 2
    assert len(transformer_blocks(support.llama_in_memory(lora=True))) == 2
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert [type(b).__name__ for b in transformer_blocks(gpt2)] == ["GPT2Block"] * 3


def test_lora_base_loaded_in_the_compute_precision_adapters_in_fp32(models: dict[str, Path]) -> None:
    """precision bf16 with LoRA: the frozen base is read in bf16 (2 bytes per parameter), the adapters are fp32 for
    AdamW, and a bf16 forward and backward gives fp32 gradients."""
    spec = FineTuneJobSpec.model_validate({
        "task": {"type": "causal-lm"}, "model": {"source": str(models["llama"])},
        "dataset": {"train": "unused.jsonl"}, "method": {"type": "lora"},
        "hyperparameters": {"maxSteps": 1, "precision": "bf16"}, "output": {"storage": "unused"}})
    task = tasks.for_spec(spec)
    tok = load_tokenizer(str(models["llama"]), None, False, task)
    precision = choose_precision("bf16", torch.device("cpu"))
    model = load_trainable(spec, task, str(models["llama"]), tok, Dist(), precision)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    w = Dist().wrap(model, Layout(compute_dtype=torch.bfloat16))
    x = torch.tensor([[2, 8, 9, 10, 3]])
    with w.autocast(torch.device("cpu")):
        loss = w.module(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in w.trainable())


def test_fsdp_on_one_process_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"spec\.resources\.sharding fsdp needs more than one process") as err:
        Dist().wrap(support.llama_in_memory(), Layout("fsdp"))
    assert err.value.exit_code == 78
