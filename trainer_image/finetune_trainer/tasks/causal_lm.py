"""causal-lm: supervised fine-tuning of a decoder on prompt/response pairs or chat messages.

Loss only on the response (or the assistant turns); an example longer than maxSeqLength is an error, never
truncated (the response would be cut); evaluation loss and perplexity.
"""

from __future__ import annotations

import math
from typing import Any

from finetune_trainer.data import IGNORE_INDEX, Encoded, Split, check_text_columns, chunks, column, eos_ids
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.evaluation import Evaluation, Evaluator
from finetune_trainer.tasks.base import Task


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


class CausalLM(Task):
    name = "causal-lm"
    model_class = "AutoModelForCausalLM"
    lora_task_type = "CAUSAL_LM"
    metric_names = ("perplexity",)
    padding_side = "right"

    def check_rows(self, split: Split) -> None:
        cols = self.info.columns
        if "messages" in cols:
            _check_messages(split, column(split, cols["messages"], "messages"), cols["messages"])
        else:
            check_text_columns(split, cols, ["prompt", "response"])

    def _too_long(self, split: Split, i: int, n: int, what: str) -> DataError:
        return DataError(f"{split.where(i)}: {what} is {n} tokens, longer than hyperparameters.maxSeqLength "
                         f"{self.info.max_seq_length}; causal-lm examples are never truncated (the response would be "
                         "cut): shorten or drop the example, or raise maxSeqLength")

    def _encode_messages(self, split: Split, tok: Any) -> tuple[list[list[int]], list[list[int]]]:
        if not getattr(tok, "chat_template", None):
            raise ConfigError("dataset.columns.messages needs a tokenizer with a chat template, and this model's "
                              "tokenizer has none; use prompt/response columns instead")
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        for i, conv in enumerate(split.dataset[self.info.columns["messages"]]):
            segs = chat_segments(tok, [{"role": m["role"], "content": m["content"]} for m in conv])
            row_ids: list[int] = []
            row_labels: list[int] = []
            for text, loss in segs:
                piece = tok(text, add_special_tokens=False)["input_ids"]
                row_ids += piece
                row_labels += piece if loss else [IGNORE_INDEX] * len(piece)
            if len(row_ids) > self.info.max_seq_length:
                raise self._too_long(split, i, len(row_ids), "the rendered conversation")
            ids.append(row_ids)
            labels.append(row_labels)
        return ids, labels

    def _encode_pairs(self, split: Split, tok: Any) -> tuple[list[list[int]], list[list[int]]]:
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        prompts = split.dataset[self.info.columns["prompt"]]
        responses = split.dataset[self.info.columns["response"]]
        eos = eos_ids(tok)
        for s in chunks(len(prompts)):
            p_ids = tok(prompts[s], add_special_tokens=True)["input_ids"]
            r_ids = tok(responses[s], add_special_tokens=False)["input_ids"]
            for j, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
                row = p + r + eos
                if len(row) > self.info.max_seq_length:
                    raise self._too_long(split, s.start + j, len(row), "prompt + response")
                ids.append(row)
                labels.append([IGNORE_INDEX] * len(p) + r + eos)
        return ids, labels

    def encode(self, split: Split, tok: Any) -> Encoded:
        encode = self._encode_messages if "messages" in self.info.columns else self._encode_pairs
        ids, labels = encode(split, tok)
        for i, lab in enumerate(labels):
            if all(t == IGNORE_INDEX for t in lab):
                raise DataError(f"{split.where(i)}: the response is empty after tokenising, so nothing would be "
                                "learned")
        return Encoded.from_rows({"input_ids": ids, "labels": labels})

    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        loss, _ = ev.token_loss(model, shifted=True)
        return Evaluation({"evalLoss": loss, "perplexity": math.exp(min(loss, 50.0))})


TASK = CausalLM
