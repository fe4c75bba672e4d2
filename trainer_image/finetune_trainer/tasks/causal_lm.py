"""causal-lm: supervised fine-tuning of a decoder on prompt/response pairs or chat messages.

Loss only on the response (or the assistant turns); an example longer than maxSeqLength is never truncated (the
response would be cut): an error, or left out with `dataset.overLong: drop`; evaluation loss and perplexity.
"""

from __future__ import annotations

import math
from typing import Any

from finetune_trainer.chat import chat_segments, check_messages, plain, render_checked, require_template
from finetune_trainer.data import IGNORE_INDEX, Encoded, Split, check_text_columns, chunks, column, eos_ids
from finetune_trainer.errors import DataError
from finetune_trainer.evaluation import Evaluation, Evaluator
from finetune_trainer.tasks.base import Task


class CausalLM(Task):
    name = "causal-lm"
    model_class = "AutoModelForCausalLM"
    lora_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    padding_side = "right"

    def check_rows(self, split: Split) -> None:
        cols = self.info.columns
        if "messages" in cols:
            check_messages(split, column(split, cols["messages"], "messages"), cols["messages"])
        else:
            check_text_columns(split, cols, ["prompt", "response"])

    def _too_long(self, split: Split, i: int, n: int, what: str) -> DataError:
        return DataError(f"{split.where(i)}: {what} is {n} tokens, longer than hyperparameters.maxSeqLength "
                         f"{self.info.max_seq_length}; causal-lm examples are never truncated (the response would be "
                         "cut): shorten or remove the example, raise maxSeqLength, or set dataset.overLong to drop")

    def _encode_messages(self, split: Split, tok: Any) -> list[tuple[int, list[int], list[int], str]]:
        col = self.info.columns["messages"]
        require_template(tok, f"dataset.columns.messages ({col!r})")
        rows = []
        for i, conv in enumerate(split.dataset[col]):
            messages = plain(conv)
            render_checked(tok, messages, split.where(i), col)
            row_ids: list[int] = []
            row_labels: list[int] = []
            for text, loss in chat_segments(tok, messages, split.where(i), col):
                piece = tok(text, add_special_tokens=False)["input_ids"]
                row_ids += piece
                row_labels += piece if loss else [IGNORE_INDEX] * len(piece)
            rows.append((i, row_ids, row_labels, "the rendered conversation"))
        return rows

    def _encode_pairs(self, split: Split, tok: Any) -> list[tuple[int, list[int], list[int], str]]:
        rows = []
        prompts = split.dataset[self.info.columns["prompt"]]
        responses = split.dataset[self.info.columns["response"]]
        eos = eos_ids(tok)
        for s in chunks(len(prompts)):
            p_ids = tok(prompts[s], add_special_tokens=True)["input_ids"]
            r_ids = tok(responses[s], add_special_tokens=False)["input_ids"]
            for j, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
                rows.append((s.start + j, p + r + eos, [IGNORE_INDEX] * len(p) + r + eos, "prompt + response"))
        return rows

    def encode(self, split: Split, tok: Any) -> Encoded:
        encode = self._encode_messages if "messages" in self.info.columns else self._encode_pairs
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        dropped = 0
        for i, row_ids, row_labels, what in encode(split, tok):
            if all(t == IGNORE_INDEX for t in row_labels):
                raise DataError(f"{split.where(i)}: the response is empty after tokenising, so nothing would be "
                                "learned")
            if len(row_ids) > self.info.max_seq_length:
                if self.info.over_long != "drop":
                    raise self._too_long(split, i, len(row_ids), what)
                dropped += 1
                continue
            ids.append(row_ids)
            labels.append(row_labels)
        return Encoded.from_rows({"input_ids": ids, "labels": labels}, dropped=dropped)

    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        loss, _ = ev.token_loss(model, shifted=True)
        return Evaluation({"evalLoss": loss, "perplexity": math.exp(min(loss, 50.0))})

    def card_text(self) -> str:
        return "Supervised fine-tuning on prompt/response pairs or chat messages; loss on the responses only."


TASK = CausalLM
