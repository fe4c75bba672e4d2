"""Sharded training on CPU with 2 gloo processes: FSDP2 follows DDP's loss, holds half the training state per rank
(measured from the live tensors), resumes after a SIGKILL from its sharded checkpoint on 2 processes or on 1, and
gathers a normal save_pretrained model at the end. Activation checkpointing keeps the loss and saves memory.

The loop here is the test worker's (tests/trainer/sharded_worker.py) until the trainer's loop is wired to these
modules."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from finetune_trainer import memory, sharding
from finetune_trainer.distributed import Dist
from finetune_trainer.modeling import choose_precision
from tests.trainer import sharded_worker, support

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _launch(config: dict[str, Any], tmp: Path, name: str, processes: int = 2) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{name}.json"
    cfg.write_text(json.dumps(config))
    log = tmp / f"{name}.log"
    env = support.trainer_env(tmp, FINETUNE_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    args = (["torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
             "-m", "tests.trainer.sharded_worker"] if processes > 1 else ["tests.trainer.sharded_worker"])
    out = log.open("wb")
    return subprocess.Popen([support.PYTHON, "-m", *args, str(cfg)], cwd=support.REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _run(config: dict[str, Any], tmp: Path, name: str, processes: int = 2) -> dict[str, Any]:
    proc = _launch(config, tmp, name, processes)
    code = proc.wait(timeout=900)
    assert code == 0, support.tail(tmp / f"{name}.log", 6000)
    return json.loads(Path(config["out"]).read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One torchrun group that trains every comparison run in turn (one start-up instead of six)."""
    tmp = tmp_path_factory.mktemp("sharding")
    config = {"out": str(tmp / "results.json"), "defaults": {"steps": 4, "grad_accum": 2, "seq": 32},
              "runs": [{"name": "ddp-full", "sharding": "none", "method": "full"},
                       {"name": "fsdp-full", "sharding": "fsdp", "method": "full", "final_dir": str(tmp / "full")},
                       {"name": "fsdp-full-ac", "sharding": "fsdp", "method": "full",
                        "activation_checkpointing": True},
                       {"name": "ddp-lora", "sharding": "none", "method": "lora"},
                       {"name": "fsdp-lora", "sharding": "fsdp", "method": "lora", "final_dir": str(tmp / "lora")},
                       {"name": "reference-8", "sharding": "fsdp", "method": "full", "steps": 8}]}
    return _run(config, tmp, "two-ranks"), tmp


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_follows_ddp_and_holds_half_the_state(two_ranks: tuple[dict[str, Any], Path], method: str) -> None:
    results, _ = two_ranks
    ddp, fsdp = results[f"ddp-{method}"], results[f"fsdp-{method}"]
    # Same seed and data, gradient accumulation 2 and clipping at 0.5: the same trajectory within float noise.
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), **TOL)
    assert fsdp["losses"][-1] < fsdp["losses"][0]
    for rank in (0, 1):  # measured from the live tensors each rank holds after an optimizer step
        ratio = fsdp["memory"][rank]["total"] / ddp["memory"][rank]["total"]
        assert 0.45 <= ratio <= 0.6, (rank, fsdp["memory"][rank], ddp["memory"][rank])
        assert fsdp["memory"][rank]["optimizer"] < 0.6 * ddp["memory"][rank]["optimizer"]


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_same_loss_less_activation_memory(
        two_ranks: tuple[dict[str, Any], Path]) -> None:
    results, _ = two_ranks
    plain, ac = results["fsdp-full"], results["fsdp-full-ac"]
    torch.testing.assert_close(torch.tensor(ac["losses"]), torch.tensor(plain["losses"]), **TOL)
    for rank in (0, 1):
        assert ac["saved_activation_bytes"][rank] < 0.6 * plain["saved_activation_bytes"][rank]


@pytest.mark.slow
def test_final_output_is_a_normal_pretrained_folder(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """The gathered weights, written by rank 0 alone, load with from_pretrained and give the sharded model's loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results, tmp = two_ranks
    one = Dist()
    x = sharded_worker.batch({"global_batch": 4, "seq": 32}, 10_000, 0, one)
    full = AutoModelForCausalLM.from_pretrained(tmp / "full")
    with torch.no_grad():
        assert float(full(input_ids=x, labels=x).loss) == pytest.approx(results["fsdp-full"]["eval_loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp / "lora").iterdir()) == ["README.md", "adapter_config.json",
                                                                 "adapter_model.safetensors"]
    base = sharded_worker.build_model({"method": "full"})
    lora = PeftModel.from_pretrained(base, tmp / "lora")
    with torch.no_grad():
        assert float(lora(input_ids=x, labels=x).loss) == pytest.approx(results["fsdp-lora"]["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_sigkill_then_resume_from_sharded_checkpoint_on_two_or_one_process(
        two_ranks: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    reference = two_ranks[0]["reference-8"]["losses"]
    ckpts = tmp_path / "checkpoints"
    gate = tmp_path / "gate"
    run = {"name": "resumable", "sharding": "fsdp", "method": "full", "steps": 8, "grad_accum": 2, "seq": 32,
           "checkpoint_dir": str(ckpts), "checkpoint_every": 2}
    proc = _launch({"out": str(tmp_path / "killed.json"), "runs": [{**run, "pause_after_step": 5,
                                                                     "gate": str(gate)}]}, tmp_path, "killed")
    try:
        support.wait_for(lambda: (tmp_path / "gate.reached").exists(), 600, "step 5 of the run to be killed", proc,
                         tmp_path / "killed.log", interval=0.1)
    finally:  # SIGKILL the launcher and both workers: no handler runs, nothing is flushed
        group = psutil.Process(proc.pid)
        for p in [*group.children(recursive=True), group]:
            p.kill()
        proc.wait(timeout=60)
    assert support.complete_steps(ckpts) == [2, 4]
    assert sorted(f.name for f in (ckpts / "checkpoint-4").iterdir()) == [
        ".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"]

    # One process (no process group, no sharding) picks the 2-rank shards up and continues the same trajectory.
    single = tmp_path / "single"
    shutil.copytree(ckpts, single)
    one = _run({"out": str(tmp_path / "one.json"), "runs": [{**run, "sharding": "none",
                                                            "checkpoint_dir": str(single)}]},
               tmp_path, "one", processes=1)["resumable"]
    assert one["resumed_from"] == 4 and one["world"] == 1
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(reference), rtol=1e-4, atol=1e-5)

    two = _run({"out": str(tmp_path / "two.json"), "runs": [run]}, tmp_path, "two")["resumable"]
    assert two["resumed_from"] == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(reference), **TOL)
    assert support.complete_steps(ckpts) == [6, 8]
    assert not list(ckpts.glob(".tmp-*"))


def test_activation_checkpointing_single_process_same_gradients_less_memory() -> None:
    """Per block recomputation: identical loss and gradients, and the bytes kept for backward measured lower."""
    torch.set_num_threads(1)
    run = {"method": "full", "sharding": "none", "config": {"num_hidden_layers": 4}, "global_batch": 4, "seq": 128}
    x = sharded_worker.batch(run, 0, 0, Dist())
    measured = {}
    grads = {}
    for ac in (False, True):
        w = sharding.wrap_model(sharded_worker.build_model(run), sharding="none",
                                precision=choose_precision("fp32", torch.device("cpu")), dist=Dist(),
                                activation_checkpointing=ac)
        with memory.SavedTensorBytes() as saved:
            loss = w.module(input_ids=x, labels=x).loss
        loss.backward()
        measured[ac] = (float(loss.detach()), saved.bytes)
        grads[ac] = [p.grad.clone() for p in w.trainable()]
    assert measured[True][0] == pytest.approx(measured[False][0], rel=1e-6)
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    ratio = measured[True][1] / measured[False][1]
    assert ratio < 0.5, measured


def test_transformer_blocks_found_for_llama_gpt2_and_lora() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = sharded_worker.build_model({"method": "full"})
    assert [type(b).__name__ for b in sharding.transformer_blocks(llama)] == ["LlamaDecoderLayer"] * 2
    lora = sharded_worker.build_model({"method": "lora"})
    assert len(sharding.transformer_blocks(lora)) == 2
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert [type(b).__name__ for b in sharding.transformer_blocks(gpt2)] == ["GPT2Block"] * 3


def test_frozen_weights_stored_in_compute_dtype_trainable_stay_fp32() -> None:
    model = sharded_worker.build_model({"method": "lora"})
    w = sharding.wrap_model(model, sharding="none", precision=choose_precision("bf16", torch.device("cpu")),
                            dist=Dist(), frozen_in_compute_dtype=True)
    frozen = {p.dtype for p in w.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in w.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    x = sharded_worker.batch({}, 0, 0, Dist())
    with w.autocast(torch.device("cpu")):
        loss = w.module(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in w.trainable())


def test_fsdp_on_one_process_is_a_config_error_naming_the_field() -> None:
    from finetune_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"spec\.resources\.sharding fsdp needs more than one process") as err:
        sharding.wrap_model(sharded_worker.build_model({}), sharding="fsdp",
                            precision=choose_precision("fp32", torch.device("cpu")), dist=Dist())
    assert err.value.exit_code == 78
