"""The memory plan before training (and the job failing at once when it cannot fit), QLoRA's fail-fast on machines
without CUDA, and sharded checkpoints in one process, including an unsharded checkpoint spread over FSDP shards (the
two-process proofs run the real trainer: test_sharded_training.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from finetune_trainer import memory, quantization, sharded_checkpoint
from finetune_trainer.checkpoint import CheckpointManager
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import ConfigError
from finetune_trainer.locations import storage
from finetune_trainer.loop import make_optimizer
from finetune_trainer.sharding import Layout, SavedTensorBytes, Wrapped
from tests.trainer import support

GB = 1e9


@pytest.fixture(scope="module")
def llama7b() -> memory.ModelShape:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    return memory.shape_from_config(cfg)


def _inputs(shape: memory.ModelShape, **kw: object) -> memory.MemoryInputs:
    base = {"shape": shape, "sharding": "none", "processes": 1, "batch_size": 1, "seq_length": 2048,
            "precision": "bf16", "device": "cuda"}
    return memory.MemoryInputs(**{**base, **kw})  # type: ignore[arg-type]


def test_7b_shape_from_config_on_the_meta_device(llama7b: memory.ModelShape) -> None:
    assert 6.6e9 < llama7b.parameters < 6.8e9 and llama7b.trainable == llama7b.parameters
    assert llama7b.layers == 32 and llama7b.hidden == 4096 and llama7b.vocab == 32000
    assert 2.0e8 < llama7b.largest_block < 2.1e8 and llama7b.embedding == 2 * 32000 * 4096


def test_full_fine_tune_of_7b_needs_16_bytes_per_parameter_and_fsdp_divides_it(llama7b: memory.ModelShape) -> None:
    one = memory.estimate(_inputs(llama7b))
    assert one.parameters + one.gradients + one.optimizer == pytest.approx(16 * llama7b.parameters)
    eight = memory.estimate(_inputs(llama7b, sharding="fsdp", processes=8))
    assert eight.parameters + eight.gradients + eight.optimizer == pytest.approx(2 * llama7b.parameters)
    assert eight.activations == one.activations and eight.working < 2 * GB


def test_auto_picks_fsdp_only_when_a_full_copy_does_not_fit(llama7b: memory.ModelShape) -> None:
    plan = memory.plan("auto", _inputs(llama7b, processes=8), 80 * GB)
    assert plan.sharding == "fsdp" and "would need" in plan.reason
    report = plan.report()
    assert report.sharding == "fsdp" and report.per_device_bytes < 80 * GB and report.breakdown is not None
    assert report.per_device_bytes == pytest.approx(sum(report.breakdown.values()), abs=8)
    lora = dataclasses.replace(llama7b, trainable=20_000_000)
    small = memory.plan("auto", _inputs(lora, processes=8, activation_checkpointing=True), 80 * GB, method="lora")
    assert small.sharding == "none" and small.reason == "auto: a full copy fits on each device"
    with pytest.raises(ConfigError) as err:  # a job that cannot be sharded (seq2seq) is never told to shard
        memory.plan("auto", _inputs(llama7b, processes=8), 80 * GB, shardable=False)
    assert "spec.resources.sharding none" in err.value.message
    assert "set spec.resources.sharding to fsdp" not in err.value.message


def test_a_plan_that_cannot_fit_names_the_field_to_change(llama7b: memory.ModelShape) -> None:
    lora = dataclasses.replace(llama7b, trainable=20_000_000)
    with pytest.raises(ConfigError) as err:  # 13.5 GB of bf16 base + 11 GB of activations on a 24 GB card
        memory.plan("auto", _inputs(lora), 24 * GB, method="lora")
    assert err.value.exit_code == 78
    assert "set spec.hyperparameters.activationCheckpointing to true" in err.value.message
    with pytest.raises(ConfigError) as err:  # full fine-tuning on one process: nothing single fits
        memory.plan("none", _inputs(llama7b), 80 * GB)
    assert "spec.resources.sharding fsdp" in err.value.message and "estimated" in err.value.message
    with pytest.raises(ConfigError) as err:  # a full copy per device is asked for where FSDP would fit
        memory.plan("none", _inputs(llama7b, processes=8), 80 * GB)
    assert "set spec.resources.sharding to fsdp" in err.value.message


def test_qlora_7b_fits_in_24_gb_by_the_estimate(llama7b: memory.ModelShape) -> None:
    lora = dataclasses.replace(llama7b, trainable=20_000_000)
    est = memory.estimate(_inputs(lora, quantization="4bit", activation_checkpointing=True))
    assert 3.5 * GB < est.parameters < 4.5 * GB
    assert memory.plan("none", _inputs(lora, quantization="4bit", activation_checkpointing=True), 24 * GB,
                       method="lora").estimate.total < 8 * GB


def test_activation_estimate_matches_a_measurement_within_a_factor_of_two() -> None:
    torch.set_num_threads(1)
    x = support.counting_tokens(4, 128)
    for ac in (False, True):
        model = support.llama_in_memory(num_hidden_layers=4)
        w = Dist().wrap(model, Layout(activation_checkpointing=ac))
        with SavedTensorBytes() as saved:
            w.module(input_ids=x, labels=x)
        est = memory.estimate(memory.MemoryInputs(memory.model_shape(model), "none", 1, 4, 128, "fp32", "cpu",
                                                  activation_checkpointing=ac))
        assert 0.5 < est.activations / saved.bytes < 2.0, (ac, est.activations, saved.bytes)


# ------------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_without_cuda_fails_at_once_with_exit_78_naming_the_field() -> None:
    quantization.require_device("none", torch.device("cpu"))
    for q in ("4bit", "8bit"):
        with pytest.raises(ConfigError) as err:
            quantization.load_kwargs(q, torch.device("cpu"), torch.bfloat16)
        assert err.value.exit_code == 78
        assert f"spec.method.lora.quantization {q} (QLoRA) needs a CUDA GPU" in err.value.message
    assert quantization.load_kwargs("none", torch.device("cpu"), torch.bfloat16) == {}


def test_bnb_config_is_nf4_double_quant_in_the_compute_dtype() -> None:
    cfg = quantization.bnb_config("4bit", torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization.bnb_config("8bit", torch.float16).load_in_8bit


def test_bitsandbytes_imports_without_a_gpu() -> None:
    """The trainer image carries bitsandbytes only because it stays importable where there is no GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([support.PYTHON, "-c", "import bitsandbytes, torch; assert not torch.cuda.is_available()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------- sharded checkpoints
def _trained(lora: bool = False, seed: int = 0, **config: object) -> tuple[Wrapped, torch.optim.Optimizer]:
    w = Dist().wrap(support.llama_in_memory(lora=lora, seed=seed, **config))
    opt = make_optimizer(w.model, 1e-2, 0.0)
    x = support.counting_tokens(4, 16)
    w.module(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    return w, opt


def _manager(path: Path) -> CheckpointManager:
    return CheckpointManager(storage(str(path), Path("."), path / ".cache", {}, "checkpointing.storage"), 2)


def test_sharded_checkpoint_round_trip_and_ledger(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    w, opt = _trained(lora=True)
    manager = _manager(tmp_path)
    info = sharded_checkpoint.save(manager, Dist(), 1, w.module, opt,
                                   write_small_files=lambda tmp: (tmp / "trainer_state.json").write_text("{}"))
    assert info is not None and sharded_checkpoint.is_sharded(info.path)
    marker = json.loads((info.path / "COMPLETE").read_text())
    assert set(marker["files"]) == {".metadata", "__0_0.distcp", "trainer_state.json"}
    assert not list(tmp_path.glob(".tmp-*"))
    # Only trainable state is checkpointed: the LoRA adapters and their two AdamW moments, not the frozen base.
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(info.path)).read_metadata().state_dict_metadata
    tensors = {k: v.size for k, v in saved.items() if hasattr(v, "size") and len(v.size) > 0}
    assert all("lora_" in k for k in tensors), sorted(tensors)[:3]
    assert sum(torch.Size(s).numel() for s in tensors.values()) == 3 * sum(p.numel() for p in w.trainable())

    fresh, fresh_opt = _trained(lora=True, seed=1)
    sharded_checkpoint.load(info.path, fresh.module, fresh_opt)
    for (n, a), (_, b) in zip(w.model.named_parameters(), fresh.model.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=n)
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])

    # A shard cut short no longer matches COMPLETE: the ledger never offers it for resume.
    shard = info.path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert manager.complete() == []



SHARD_TOO_LARGE = """
import json, resource, sys
from pathlib import Path
import torch
from finetune_trainer import sharded_checkpoint
from finetune_trainer.checkpoint import CheckpointManager
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import StorageError
from finetune_trainer.locations import storage
from tests.trainer.test_memory_plan import _trained

root = Path(sys.argv[1])
manager = CheckpointManager(storage(str(root), Path("."), root / ".cache", {}, "checkpointing.storage"), 2)
w, opt = _trained()
sharded_checkpoint.save(manager, Dist(), 1, w.module, opt)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # as a full or quota-limited volume
try:
    sharded_checkpoint.save(manager, Dist(), 2, w.module, opt)
except StorageError as exc:
    print(json.dumps({"exit": exc.exit_code, "message": exc.message}))
"""


def test_a_shard_that_cannot_be_written_is_a_storage_error_and_the_last_checkpoint_stays(tmp_path: Path) -> None:
    """DCP reports a rank's write failure as a CheckpointException (not an Exception): it still becomes exit 74
    naming the storage and the OS's reason, with the previous sharded checkpoint complete and no staging left."""
    done = subprocess.run([support.PYTHON, "-c", SHARD_TOO_LARGE, str(tmp_path)], cwd=support.REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["exit"] == 74
    assert said["message"].startswith(f"cannot write checkpoint shards for step 2 to {tmp_path}")
    assert "File too large" in said["message"] and said["message"].endswith("the last complete checkpoint is kept")
    assert support.complete_steps(tmp_path) == [1]
    assert not list(tmp_path.glob(".tmp-*"))

def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    w, opt = _trained()
    info = sharded_checkpoint.save(_manager(tmp_path), Dist(), 1, w.module, opt)
    assert info is not None
    other, other_opt = _trained(hidden_size=32, intermediate_size=64)
    before = {n: p.detach().clone() for n, p in other.model.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        sharded_checkpoint.load(info.path, other.module, other_opt)
    for n, p in other.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_an_unsharded_checkpoint_is_spread_over_fsdp_shards(tmp_path: Path) -> None:
    """A checkpoint written without sharding (safetensors + optimizer.pt) resumes a sharded run: parameters and AdamW
    state land in the DTensor shards, and the next step is the step the unsharded run takes (one-process group)."""
    import torch.distributed as td

    from finetune_trainer.checkpoint import TrainingFiles
    from finetune_trainer.sharding import shard

    torch.set_num_threads(1)
    plain, opt = _trained()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    TrainingFiles(plain.model, opt, scheduler, torch.device("cpu"), 0).write_tensors(tmp_path)
    td.init_process_group("gloo", store=td.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = support.llama_in_memory(seed=1)
        wrapped = Wrapped(shard(model, None, torch.device("cpu"), 1), model, "fsdp", Layout("fsdp"))
        sharded_opt = make_optimizer(model, 1e-2, 0.0)
        files = sharded_checkpoint.ShardedFiles(wrapped, sharded_opt, torch.optim.lr_scheduler.LambdaLR(
            sharded_opt, lambda s: 1.0), torch.device("cpu"), 0)
        files.apply_tensors(files.read_tensors(tmp_path))
        params = dict(plain.model.named_parameters())
        for name, p in model.named_parameters():
            assert type(p.data).__name__ == "DTensor"
            torch.testing.assert_close(p.full_tensor(), params[name], msg=name)
        x = support.counting_tokens(4, 16, seed=3)
        for w, o in ((plain, opt), (wrapped, sharded_opt)):
            w.module(input_ids=x, labels=x).loss.backward()
            o.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.full_tensor(), params[name], rtol=1e-5, atol=1e-6, msg=name)
    finally:
        td.destroy_process_group()


# ------------------------------------------------------------------------------------- the job fails at once
def _job(tmp: Path, model: str, **spec: object) -> Path:
    base = {"task": {"type": "causal-lm"}, "model": {"source": model},
            "dataset": {"train": str(tmp / "no-such-data.jsonl")}, "hyperparameters": {"maxSteps": 1},
            "resources": {"gpusPerWorker": 0}, "output": {"storage": str(tmp / "out")}}
    return support.manifest(tmp / "job.yaml", {**base, **spec})


def test_a_plan_that_cannot_fit_fails_with_78_before_data_or_weights_are_read(tmp_path: Path, isolated: Path) -> None:
    """A 70B full fine-tune on one process: the plan (from config.json on the meta device) fails the job at once,
    naming the fields to change. The folder has no weights and the data file does not exist: neither was needed."""
    from transformers import LlamaConfig

    from finetune_trainer.__main__ import main

    big = tmp_path / "llama-70b"
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000).save_pretrained(big)
    support.word_tokenizer(big)
    assert main([str(_job(tmp_path, str(big))), "--no-progress-bar"]) == 78
    said = (isolated / "termination-log").read_text()
    assert "the training state would not fit: estimated" in said and "with spec.resources.sharding none" in said
    assert "spec.hyperparameters.activationCheckpointing" in said and "[exit 78:" in said
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_qlora_on_a_cpu_fails_with_78_before_anything_else(tmp_path: Path, isolated: Path) -> None:
    """Not even the model or the data is looked at (neither exists here): the first thing the job checks."""
    from finetune_trainer.__main__ import main

    job = _job(tmp_path, str(tmp_path / "no-such-model"), method={"type": "lora", "lora": {"quantization": "4bit"}},
               resources={"gpusPerWorker": 1})
    assert main([str(job), "--no-progress-bar"]) == 78
    said = (isolated / "termination-log").read_text()
    assert said.startswith("spec.method.lora.quantization 4bit (QLoRA) needs a CUDA GPU and this process has none")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_best_weights_load_into_fsdp_shards_from_either_format(tmp_path: Path, lora: bool) -> None:
    """output.model best under FSDP (`ShardedCheckpointer.load_weights`, which `selection.load_chosen` calls on every
    rank): the trainable weights of a sharded checkpoint and of one written without sharding both land in this run's
    DTensor shards (a LoRA base is left as it is), and the optimizer state is left alone; a damaged checkpoint
    changes nothing and the choice falls back to the last step, saying why (one-process group; two processes:
    test_sharded_training.py)."""
    import torch.distributed as td

    from finetune_trainer.checkpoint import TrainingFiles, TrainState
    from finetune_trainer.selection import Choice, load_chosen
    from finetune_trainer.sharding import shard

    torch.set_num_threads(1)
    manager = _manager(tmp_path / "ckpt")
    whole, whole_opt = _trained(lora=lora, seed=2)
    files = TrainingFiles(whole.model, whole_opt, torch.optim.lr_scheduler.LambdaLR(whole_opt, lambda s: 1.0),
                          torch.device("cpu"), 0)
    manager.save(1, lambda tmp: files.write(tmp, TrainState(step=1), [files.rng_state()]))
    td.init_process_group("gloo", store=td.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        sharded, sharded_opt = _trained(lora=lora, seed=3)
        sharded_checkpoint.save(manager, Dist(), 2, sharded.module, sharded_opt)
        model = support.llama_in_memory(lora=lora, seed=1)
        wrapped = Wrapped(shard(model, None, torch.device("cpu"), 1), model, "fsdp", Layout("fsdp"))
        opt = make_optimizer(model, 1e-2, 0.0)
        x = support.counting_tokens(4, 16, seed=3)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        moments = [s["exp_avg"].full_tensor().clone() for s in opt.state.values()]
        ckpt = sharded_checkpoint.checkpointer(manager, wrapped, opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0), Dist())
        assert isinstance(ckpt, sharded_checkpoint.ShardedCheckpointer)

        def held() -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().clone() for n, p in model.named_parameters()}

        frozen = {n: v for n, v in held().items() if not dict(model.named_parameters())[n].requires_grad}
        assert bool(frozen) == lora
        for step, source in ((2, sharded), (1, whole)):
            assert ckpt.load_weights(step) is None
            expected = dict(source.model.named_parameters())
            for name, value in held().items():
                torch.testing.assert_close(value, frozen[name] if name in frozen else expected[name],
                                           msg=f"step {step}: {name}")
        for before, state in zip(moments, opt.state.values(), strict=True):
            assert torch.equal(before, state["exp_avg"].full_tensor())

        before = held()
        shard_file = manager.path(2) / "__0_0.distcp"
        shard_file.write_bytes(shard_file.read_bytes()[:100])  # cut short after it was verified
        choice = Choice(2, "best", "best evalLoss 1 (min) of 2 evaluation(s), at step 2", {"evalLoss": 1.0},
                        metric="evalLoss", mode="min", value=1.0)
        fallback = load_chosen(choice, ckpt, 3, {"evalLoss": 1.5}, {})
        assert (fallback.step, fallback.model, fallback.value) == (3, "last", 1.5)
        assert fallback.reason.startswith(f"the best checkpoint (step 2) could not be read (cannot read the shards of "
                                          f"{manager.path(2)}: EOFError)")
        assert fallback.reason.endswith("the weights after the last optimizer step (3) were written")
        for name, value in held().items():
            assert torch.equal(value, before[name]), name
    finally:
        td.destroy_process_group()
