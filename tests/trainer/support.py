"""Helpers for the trainer tests: tiny offline models and tokenizers, manifests, data files, and a trainer
subprocess that tests poll with deadlines (never with fixed sleeps)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

WORDS = [
    "the", "a", "an", "is", "was", "red", "green", "blue", "cat", "dog", "bird", "fish", "small", "big", "fast",
    "slow", "happy", "sad", "good", "bad", "what", "colour", "size", "speed", "mood", "of", "answer", "question",
    "say", "repeat", "translate", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "yes", "no", "please", "thanks", "hello", "world"
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(save_to: Path | None = None) -> Any:
    """A word-level tokenizer built offline from a fixed vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + [str(d) for d in range(10)] + [".", ",", "?", ":"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=specials[4:])
    tok.chat_template = CHAT_TEMPLATE
    if save_to is not None:
        tok.save_pretrained(save_to)
    return tok


def tiny_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer(path)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def tiny_llama(path: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny Llama-shaped decoder (the architecture of the 7B-70B models the sharding is for)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


LLAMA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def llama_in_memory(lora: bool = False, seed: int = 0, **config: Any) -> Any:
    """A tiny Llama built in memory (no files), optionally with LoRA on the attention projections, for the unit
    tests of the sharding, memory and checkpoint modules."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **config, "use_cache": False}))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def counting_tokens(rows: int, seq: int, seed: int = 0, vocab: int = LLAMA["vocab_size"]) -> Any:
    """Learnable token rows: each counts up from a random start."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (rows, 1), generator=g) + torch.arange(seq)) % vocab


def tiny_t5(path: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = word_tokenizer(path)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2,
                   num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


def tiny_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    tok = word_tokenizer(path)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Short, clearly labelled sentences in the word tokenizer's vocabulary (also fine for MiniLM)."""
    good = ["happy", "good", "fast", "big"]
    bad = ["sad", "bad", "slow", "small"]
    animals = ["cat", "dog", "bird", "fish"]
    rows = []
    for i in range(offset, offset + n):
        pos = i % 2 == 0
        adj = (good if pos else bad)[i // 2 % 4]
        extra = " the dog was happy" * (i % 3) if pos else " the cat was sad" * (i % 3)
        rows.append({"text": f"the {animals[i % 4]} was {adj}{extra} .", "label": "positive" if pos else "negative"})
    return rows


def qa_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    colours = ["red", "green", "blue"]
    animals = ["cat", "dog", "bird", "fish"]
    out = []
    for i in range(offset, offset + n):
        a, c = animals[i % 4], colours[i % 3]
        out.append({"prompt": f"question : what colour is the {a} ? answer :", "response": f"the {a} is {c}"})
    return out


COLOURS = ["red", "green", "blue"]
ANIMALS = ["cat", "dog", "bird", "fish"]
REFUSAL = " no"


def preference_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """prompt/chosen/rejected text pairs with a preference a tiny model learns: an answer is preferred to a refusal."""
    fillers = ["", "please ", "say ", "please say "]
    rows = []
    for i in range(offset, offset + n):
        animal = ANIMALS[i % 4]
        rows.append({"prompt": f"question : {fillers[i // 4 % 4]}what colour is the {animal} ? answer :",
                     "chosen": f" the {animal} is {COLOURS[i % 3]}", "rejected": REFUSAL})
    return rows


def manifest(path: Path, spec: dict[str, Any], name: str = "test-job") -> Path:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "FINETUNE_THREADS": "1", "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
                "FINETUNE_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("FINETUNE_PVC_ROOT", None)
    env.pop("FINETUNE_PROGRESS_URL", None)
    env.update(extra)
    return env


def start_trainer(args: list[str], env: dict[str, str], log: Path, module: str = "finetune_trainer",
                  **popen: Any) -> subprocess.Popen[bytes]:
    """The trainer as a real process (`python -m finetune_trainer`, or the launcher), its output copied to a log file
    line by line; ``wait_for`` wakes on each line it writes."""
    proc = subprocess.Popen([PYTHON, "-m", module, *args, "--no-progress-bar"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    output = _Output()
    _OUTPUTS[proc.pid] = output
    sink = log.open("wb")  # exists before start_trainer returns: a test may read it at once
    threading.Thread(target=output.drain, args=(proc, sink), name=f"trainer-{proc.pid}-output", daemon=True).start()
    return proc


def launch_two_processes(job: Path, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    """A job on two gloo processes through the launcher (torchrun standalone), its output in ``<tmp>/<name>.log``."""
    env = trainer_env(tmp, OMP_NUM_THREADS="1", FINETUNE_LOG_LEVEL="INFO", FINETUNE_PROGRESS_INTERVAL="0.1")
    return start_trainer(["--standalone", "--nproc_per_node", "2", "-m", "finetune_trainer", str(job)], env,
                         tmp / f"{name}.log", module="finetune_trainer.launch")


def train_two_processes(spec: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    """Runs a job on two processes to the end; its metrics.json."""
    job = manifest(tmp / f"{name}.yaml", spec, name=name)
    code = launch_two_processes(job, tmp, name).wait(timeout=600)
    assert code == 0, tail(tmp / f"{name}.log", 8000)
    return dict(json.loads((Path(spec["output"]["storage"]) / "metrics.json").read_text()))


class _Output:
    """Counts the lines a process wrote (to its log), and wakes whoever waits for the next one."""

    def __init__(self) -> None:
        self.lines = 0
        self.changed = threading.Condition()

    def drain(self, proc: subprocess.Popen[bytes], sink: BinaryIO) -> None:
        assert proc.stdout is not None
        with sink as out:
            for line in iter(proc.stdout.readline, b""):
                out.write(line)
                out.flush()
                with self.changed:
                    self.lines += 1
                    self.changed.notify_all()
        with self.changed:  # the end of its output (it exited, or closed it)
            self.lines += 1
            self.changed.notify_all()

    def wait_past(self, seen: int, timeout: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.lines > seen, timeout=timeout)


_OUTPUTS: dict[int, _Output] = {}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None, interval: float = 0.2) -> Any:
    """Until predicate() is truthy; fails with the trainer's log if the deadline passes or the process exits. The
    predicate is checked every ``interval`` seconds, and for a process of start_trainer also as soon as it writes a
    line (a checkpoint, an evaluation, a step): waits are short without polling so fast that the checks take CPU from
    the processes under test."""
    deadline = time.monotonic() + timeout
    output = _OUTPUTS.get(proc.pid) if proc is not None else None
    while time.monotonic() < deadline:
        seen = output.lines if output is not None else 0
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n{tail(log)}")
        remaining = max(0.0, deadline - time.monotonic())
        if output is not None:
            output.wait_past(seen, min(interval, remaining))
        else:
            time.sleep(min(interval, remaining))
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{tail(log)}")


def tail(log: Path | None, n: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n:]


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of checkpoints with a COMPLETE marker."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if (p / "COMPLETE").exists())
