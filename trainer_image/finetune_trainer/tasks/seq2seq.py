"""seq2seq: translation or summarisation with an encoder-decoder on source/target pairs.

`sourcePrefix` goes before every source (e.g. T5's task prefixes); loss on the target tokens; evaluation loss and
chrF of greedy generations against the targets (sacrebleu).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune_trainer.data import IGNORE_INDEX, Encoded, Split, check_text_columns, chunks, eos_ids
from finetune_trainer.evaluation import Evaluation, Evaluator
from finetune_trainer.tasks.base import Task


def chrf(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


class Seq2Seq(Task):
    name = "seq2seq"
    model_class = "AutoModelForSeq2SeqLM"
    lora_task_type = "SEQ_2_SEQ_LM"
    pipeline_tag = "text2text-generation"

    @property
    def source_prefix(self) -> str:
        return str(self.info.settings.get("sourcePrefix") or "")

    def check_rows(self, split: Split) -> None:
        check_text_columns(split, self.info.columns, ["source", "target"])

    def encode(self, split: Split, tok: Any) -> Encoded:
        info = self.info
        sources = [self.source_prefix + s for s in split.dataset[info.columns["source"]]]
        targets = split.dataset[info.columns["target"]]
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        eos = eos_ids(tok)
        for s in chunks(len(sources)):
            ids.extend(tok(sources[s], truncation=True, max_length=info.max_seq_length)["input_ids"])
            for t in tok(text_target=targets[s], truncation=True, max_length=info.max_seq_length)["input_ids"]:
                if eos and (not t or t[-1] != eos[0]):
                    t = t[: info.max_seq_length - 1] + eos
                labels.append(t)
        # "decoder": the labels are decoder inputs too, so their tokens count as work (batch grouping, tokens/s).
        return Encoded.from_rows({"input_ids": ids, "labels": labels}, {"decoder": np.ones(len(ids), np.int8)})

    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        tok, enc = ev.tok, ev.enc
        generator = getattr(model, "module", model)

        def generate(idx: np.ndarray, batch: dict[str, Any]) -> list[tuple[int, str, str]]:
            max_new = int(enc.lengths("labels")[idx].max()) + 8
            with ev.autocast():
                gen = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         max_new_tokens=max_new, num_beams=1, do_sample=False)
            texts = tok.batch_decode(gen, skip_special_tokens=True)
            out = []
            for j, i in enumerate(idx):
                ref = enc.row("labels", int(i))
                out.append((int(i), texts[j].strip(),
                            tok.decode(ref[ref != IGNORE_INDEX], skip_special_tokens=True).strip()))
            return out

        loss, generated = ev.token_loss(model, shifted=False, per_batch=generate)
        pairs = sorted(generated)
        return Evaluation({"evalLoss": loss, "chrf": chrf([h for _, h, _ in pairs], [r for _, _, r in pairs])})

    def card_text(self) -> str:
        prefix = self.source_prefix
        return "Source to target generation" + (f" with the prefix `{prefix}`." if prefix else ".")


TASK = Seq2Seq
