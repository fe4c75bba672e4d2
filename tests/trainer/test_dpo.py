"""DPO (task type dpo): the loss and rewards equal TRL's DPOTrainer per pair, prompt tokens carry no loss and padding
changes nothing, the data formats (text, messages, implicit prompt, the hosted APIs' preference rows) and their
checks, and a preference the model learns: held-out reward accuracy from 0.5 to at least 0.9, greedy generations
that follow the chosen answers, with the metrics everywhere metrics go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune_api import exitcodes
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import tasks
from finetune_trainer.__main__ import main
from finetune_trainer.data import IGNORE_INDEX, Encoded, load_files
from finetune_trainer.errors import DataError
from finetune_trainer.tasks.dpo import Dpo, answer_logps
from tests.trainer import support


def _spec(model: Path, train: Path, out: Path, dpo: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "task": {"type": "dpo", **({"dpo": dpo} if dpo is not None else {})},
        "model": {"source": str(model)},
        "dataset": {"train": str(train)},
        "hyperparameters": {"maxSteps": 4, "batchSize": 8, "learningRate": 5e-3, "maxSeqLength": 48},
        "output": {"storage": str(out)},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def _task(spec: dict[str, Any]) -> Dpo:
    task = tasks.for_spec(FineTuneJobSpec.model_validate(spec))
    assert isinstance(task, Dpo)
    return task


def _encoded(tmp: Path, rows: list[dict[str, Any]], task: Dpo, tok: Any, name: str = "train") -> Encoded:
    path = support.write_jsonl(tmp / f"{name}.jsonl", rows)
    split = load_files(name, str(path), [path], "jsonl", tmp / "cache")
    task.check(split)
    return task.encode(split, tok)


def _models(llama: Path) -> tuple[Any, Any, Any]:
    """The reference (the saved tiny Llama) and a policy that differs from it (perturbed weights), and the
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(llama).eval()
    policy = AutoModelForCausalLM.from_pretrained(llama).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return policy, reference, AutoTokenizer.from_pretrained(llama)


def _chat(row: dict[str, str]) -> dict[str, Any]:
    """A text pair as the hosted fine-tuning APIs write preference rows."""
    return {"input": {"messages": [{"role": "user", "content": row["prompt"]}]},
            "preferred_output": [{"role": "assistant", "content": row["chosen"].strip()}],
            "non_preferred_output": [{"role": "assistant", "content": row["rejected"].strip()}]}


# ----------------------------------------------------------------------------------------------- against TRL
@pytest.mark.parametrize(("fmt", "loss_type"), [("text", "sigmoid"), ("text", "ipo"), ("text", "hinge"),
                                                ("hosted chat", "sigmoid")])
def test_per_pair_loss_and_rewards_equal_trl(tmp_path: Path, models: dict[str, Path], fmt: str,
                                             loss_type: str) -> None:
    """Same model, pairs and beta: TRL's DPOTrainer (one pair per batch, its own tokenisation and collator) and this
    trainer (all pairs in one padded batch) give the same tokens, per-pair losses and rewards within 1e-5. The chat
    case reads the hosted APIs' rows here and TRL's conversational prompt/chosen/rejected there."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference, tok = _models(models["llama"])
    rows = support.preference_rows(6)
    rows[1]["rejected"] += " thanks"  # answers of different lengths, so the batch has padding
    trl_rows = rows if fmt == "text" else [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant",
         "content": r["chosen"].strip()}], "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
        for r in rows]
    ours = rows if fmt == "text" else [_chat(r) for r in rows]
    beta = 0.2
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[], bf16=False,
                     use_cpu=True, per_device_train_batch_size=1, max_length=None, disable_dropout=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(trl_rows))

    task = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o", {"beta": beta, "lossType": loss_type}))
    enc = _encoded(tmp_path, ours, task, tok)
    for i, example in enumerate(trainer.train_dataset):  # the same tokens, prompt and answers apart
        assert example["prompt_ids"] == enc.row("input_ids", i).tolist()
        assert example["chosen_ids"] == enc.row("chosen", i).tolist()
        assert example["rejected_ids"] == enc.row("rejected", i).tolist()

    expected = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        with torch.no_grad():
            loss = trainer.compute_loss(policy, batch)
        logged = trainer._metrics["eval"]  # the models are in eval mode
        expected.append([float(loss), logged["rewards/chosen"][-1], logged["rewards/rejected"][-1]])

    task.reference = reference
    batch, _ = task.collate(enc, np.arange(len(enc)), tok.pad_token_id)
    with torch.no_grad():
        losses, chosen, rejected = task.scores(policy, batch)
    got = torch.stack([losses, chosen, rejected], 1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=0, atol=1e-5)
    assert got[:, 1].abs().max() > 1e-3, "the policy differs from the reference: rewards are not all zero"


def test_label_smoothing_is_conservative_dpo(tmp_path: Path, models: dict[str, Path]) -> None:
    """sigmoid with label smoothing eps: (1 - eps) * -log sigmoid(beta d) + eps * -log sigmoid(-beta d) (cDPO; TRL
    1.16 dropped it from its sigmoid loss, so it is checked against the formula)."""
    policy, reference, tok = _models(models["llama"])
    plain = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o", {"beta": 0.5}))
    smooth = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o", {"beta": 0.5,
                                                                                  "labelSmoothing": 0.2}))
    enc = _encoded(tmp_path, support.preference_rows(4), plain, tok)
    batch, _ = plain.collate(enc, np.arange(4), tok.pad_token_id)
    with torch.no_grad():
        plain.reference = smooth.reference = reference
        base, chosen, rejected = plain.scores(policy, batch)
        got = smooth.scores(policy, batch)[0]
    d = (chosen - rejected) / 0.5
    flipped = -torch.nn.functional.logsigmoid(-0.5 * d)
    torch.testing.assert_close(got, 0.8 * base + 0.2 * flipped)


# -------------------------------------------------------------------------------------------- tokens and padding
def test_prompt_tokens_carry_no_loss_and_padding_changes_nothing(tmp_path: Path, models: dict[str, Path]) -> None:
    """Labels only on answer tokens; chosen and rejected rows share the prompt's tokens; the logits at prompt and
    padding positions do not enter the log-probabilities; a pair scores the same alone and padded in a batch."""
    policy, reference, tok = _models(models["llama"])
    task = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o"))
    task.reference = reference
    rows = support.preference_rows(4)
    rows[2]["chosen"] += " please please please"
    rows[3]["prompt"] = "question : please say please say please say " + rows[3]["prompt"].split(": ", 1)[1]
    enc = _encoded(tmp_path, rows, task, tok)
    batch, tokens = task.collate(enc, np.arange(4), tok.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert tokens == int(mask.sum())
    for i in range(4):
        p, c, r = (len(enc.row(k, i)) for k in ("input_ids", "chosen", "rejected"))
        assert (labels[i, :p] == IGNORE_INDEX).all() and (labels[4 + i, :p] == IGNORE_INDEX).all()
        assert torch.equal(ids[i, :p], ids[4 + i, :p])  # one prompt, shared
        assert (labels[i, p:p + c] != IGNORE_INDEX).all() and (labels[i, p + c:] == IGNORE_INDEX).all()
        assert (labels[4 + i, p:p + r] != IGNORE_INDEX).all() and (mask[4 + i, p + r:] == 0).all()

    logits = torch.randn(*ids.shape, len(tok))
    noisy = logits.clone()
    for i in range(8):  # any values at positions that predict a prompt token or follow the answer
        answer = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        keep = set((answer - 1).tolist())
        for t in range(ids.shape[1]):
            if t not in keep:
                noisy[i, t] = torch.randn(len(tok)) * 10
    torch.testing.assert_close(answer_logps(noisy, labels)[0], answer_logps(logits, labels)[0])

    with torch.no_grad():
        together = torch.stack(task.scores(policy, batch), 1)
        for i in range(4):
            alone, _ = task.collate(enc, np.array([i]), tok.pad_token_id)
            torch.testing.assert_close(torch.stack(task.scores(policy, alone), 1)[0], together[i], rtol=0,
                                       atol=1e-5)


# ---------------------------------------------------------------------------------------------- data formats
def test_formats_read_the_same_pairs(tmp_path: Path, models: dict[str, Path]) -> None:
    """Chat messages, the hosted APIs' rows and an implicit prompt (whole conversations sharing their beginning)
    give the same tokens; text with an implicit prompt cuts at the shared beginning."""
    tok = support.word_tokenizer()
    task = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o"))
    base = support.preference_rows(3)
    hosted = [_chat(r) for r in base]
    chat = [{"prompt": h["input"]["messages"], "chosen": h["preferred_output"],
             "rejected": h["non_preferred_output"]} for h in hosted]
    implicit = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]} for c in chat]
    encodings = [_encoded(tmp_path, rows, task, tok, name) for name, rows in
                 (("hosted", hosted), ("chat", chat), ("implicit", implicit))]
    for enc in encodings[1:]:
        for key in ("input_ids", "chosen", "rejected"):
            assert all((enc.row(key, i) == encodings[0].row(key, i)).all() for i in range(3))
    text = _encoded(tmp_path, [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                               for r in base], task, tok, "text-implicit")
    assert tok.decode(text.row("input_ids", 0)).endswith("answer :")  # the shared beginning
    assert tok.decode(text.row("chosen", 0)).split() == ["the", "cat", "is", "red", "</s>"]
    assert tok.decode(text.row("rejected", 0)).split() == ["no", "</s>"]


@pytest.mark.parametrize(("row", "words"), [
    ({"prompt": "q", "chosen": "a"}, "column 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "field 'rejected' is missing"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be text or both"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "an answer holds assistant messages only"),
    ({"prompt": [{"role": "narrator", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "role 'narrator'"),
    ({"prompt": [{"role": "user", "content": ["q"]}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "content must be text"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "a"}]}, "'preferred_output' and "),
])
def test_bad_pairs_are_named_by_file_row_and_field(tmp_path: Path, models: dict[str, Path], row: dict[str, Any],
                                                    words: str) -> None:
    task = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o"))
    good = support.preference_rows(2) if "input" not in row else [_chat(r) for r in support.preference_rows(2)]
    rows = [row] if words.startswith("column") else [*good, row]  # a column missing in every row, or one bad row
    with pytest.raises(DataError) as err:
        _encoded(tmp_path, rows, task, support.word_tokenizer())
    assert words in str(err.value)
    assert "train.jsonl" in str(err.value) and ("row 3" in str(err.value) or words.startswith("column"))


def test_a_role_the_template_drops_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    """A template that renders only some roles leaves a message out: the row is refused, not trained on."""
    tok = support.word_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|> {{ m['content'] }} "
                         "</s> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    task = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o"))
    row = {"prompt": [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hello"}],
           "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}
    with pytest.raises(DataError, match=r"row 1: field 'prompt': message 1 \(role 'system'\) does not appear"):
        _encoded(tmp_path, [row], task, tok)


def test_over_long_pairs_fail_or_are_dropped_and_counted(isolated: Path, models: dict[str, Path]) -> None:
    rows = support.preference_rows(16)
    rows[5]["chosen"] = " the cat is " + "red " * 60
    train = support.write_jsonl(isolated / "train.jsonl", rows)
    code = main([str(support.manifest(isolated / "job.yaml", _spec(models["llama"], train, isolated / "a")))])
    assert code == exitcodes.DATA_ERROR
    assert "row 6" in (isolated / "termination-log").read_text()
    spec = _spec(models["llama"], train, isolated / "b", dataset={"overLong": "drop"})
    assert main([str(support.manifest(isolated / "job2.yaml", spec))]) == 0
    doc = json.loads((isolated / "b" / "metrics.json").read_text())
    assert doc["droppedExamples"] == {"train": 1} and doc["trainExamples"] == 15
    progress = json.loads((isolated / "b" / "checkpoints" / "progress.json").read_text())
    assert progress["metrics"]["droppedExamples"] == 1


def test_memory_plan_counts_pairs_and_the_reference_copy(models: dict[str, Path], tmp_path: Path) -> None:
    """Two sequences per pair; a full model's frozen copy (halved per process under fsdp) unless precomputed; none
    under LoRA."""
    from transformers import AutoConfig

    from finetune_trainer.memory import MemoryInputs, estimate, shape_from_config

    cfg = AutoConfig.from_pretrained(models["llama"])
    full, lora = shape_from_config(cfg), shape_from_config(cfg, lora_r=8)
    inp = MemoryInputs(shape=full, sharding="none", processes=1, batch_size=4, seq_length=32, precision="fp32",
                       device="cpu")
    plain = estimate(inp)
    dpo = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o"))
    est = dpo.memory(inp, plain)
    assert est.reference == full.parameters * 4
    assert est.activations == estimate(MemoryInputs(**{**inp.__dict__, "batch_size": 8})).activations
    fsdp = MemoryInputs(**{**inp.__dict__, "sharding": "fsdp", "processes": 2})
    assert dpo.memory(fsdp, estimate(fsdp)).reference == full.parameters * 2
    pre = _task(_spec(models["llama"], tmp_path / "t.jsonl", tmp_path / "o", {"precomputeReferenceLogProbs": True}))
    assert pre.memory(inp, plain).reference == 0
    adapters = MemoryInputs(**{**inp.__dict__, "shape": lora})
    assert dpo.memory(adapters, estimate(adapters)).reference == 0


# ---------------------------------------------------------------------------------------- learning a preference
@pytest.fixture(scope="module")
def sft_model(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama after supervised fine-tuning on both answers alike (causal-lm): it has learned the answers'
    form and is undecided between answering and refusing, the starting point preference tuning is for."""
    tmp = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": r["prompt"], "response": r[side]} for r in support.preference_rows(48)
            for side in ("chosen", "rejected")]
    train = support.write_jsonl(tmp / "train.jsonl", rows)
    spec = {"task": {"type": "causal-lm"}, "model": {"source": str(models["llama"])}, "dataset": {"train": str(train)},
            "hyperparameters": {"maxSteps": 30, "batchSize": 16, "learningRate": 1e-2, "maxSeqLength": 48},
            "checkpointing": {"keepLast": 1}, "output": {"storage": str(tmp / "out")},
            "tracking": {"tensorboard": False}}
    assert main([str(support.manifest(tmp / "sft.yaml", spec)), "--no-progress-bar"]) == 0
    return tmp / "out"


def _first_word(model: Any, tok: Any, prompts: list[str]) -> tuple[list[str], float]:
    """Greedy first answer word per prompt, and the mean probability of answering ("the") rather than refusing."""
    words, answering = [], 0.0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
            p = model(**ids).logits[0, -1].softmax(-1)
        words.append(str(tok.decode(out[0, -1:])).strip())
        answering += float(p[tok.convert_tokens_to_ids("the")]) / len(prompts)
    return words, answering


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_learnable_preference_is_learned(isolated: Path, sft_model: Path, method: str) -> None:
    """After SFT on both answers, DPO preferring answers to refusals: held-out reward accuracy goes from 0.5 (the
    model is its own reference) to at least 0.9, greedy generations answer instead of refusing, and the metrics reach
    metrics.json, metrics.jsonl, progress (status) and the model card; selectBest keeps the best by reward accuracy
    (the model is the last step's: accuracy reaches 1 early, the margin keeps growing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = support.write_jsonl(isolated / "train.jsonl", support.preference_rows(48))
    val = support.write_jsonl(isolated / "val.jsonl", support.preference_rows(16, offset=48))
    out = isolated / "out"
    spec = _spec(sft_model, train, out, {"beta": 0.1}, dataset={"validation": str(val)},
                 hyperparameters={"maxSteps": 16, "evalEverySteps": 1, "learningRate": 3e-3,
                                  "lrScheduler": {"type": "linear", "warmupRatio": 0.1}},
                 checkpointing={"everySteps": 100, "selectBest": {"metric": "rewardAccuracy"}},
                 output={"model": "last"})
    if method == "lora":
        spec["method"] = {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
    assert main([str(support.manifest(isolated / "job.yaml", spec)), "--no-progress-bar"]) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    # Warmup gives the first step a learning rate of 0, so the first evaluation is of the starting model, its own
    # reference: every pair a tie, 0.5.
    assert evals[0]["step"] == 1 and evals[0]["rewardAccuracy"] == 0.5 and evals[0]["rewardMargin"] == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["metrics"]["rewardAccuracy"] >= 0.9 and doc["metrics"]["rewardMargin"] > 0
    assert doc["metrics"]["rewardChosen"] > doc["metrics"]["rewardRejected"]
    assert doc["output"]["metric"] == "rewardAccuracy" and doc["output"]["mode"] == "max"
    assert doc["output"]["model"] == "last" and "best rewardAccuracy 1 was at step" in doc["output"]["reason"]
    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert progress["metrics"]["rewardAccuracy"] == doc["metrics"]["rewardAccuracy"]
    card = (out / "README.md").read_text()
    assert "rewardAccuracy" in card and "Direct preference optimisation" in card and "`dpo.beta`" in card

    tok = AutoTokenizer.from_pretrained(out)
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
    before = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    prompts = [r["prompt"] for r in support.preference_rows(8, offset=64)]
    words, answering = _first_word(model, tok, prompts)
    words_before, answering_before = _first_word(before, tok, prompts)
    assert words_before == ["no"] * len(prompts)  # the SFT model refuses more often than it answers
    assert words == ["the"] * len(prompts) and answering > answering_before, (words, answering, answering_before)
