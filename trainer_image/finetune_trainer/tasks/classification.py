"""sequence-classification: text (or text pairs) to one of `labels`, or to a number (`numLabels: 1`, regression).

A new head sized to the label set; cross-entropy (MSE for regression); accuracy, macro-F1, the validation loss and the
confusion matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from finetune_trainer.data import Encoded, Split, check_text_columns, chunks, column
from finetune_trainer.errors import DataError
from finetune_trainer.evaluation import Evaluation, Evaluator
from finetune_trainer.tasks.base import Task


def classification_metrics(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (classes absent from both predictions and gold are left out of the mean)."""
    cm = confusion_matrix(pred, gold, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
            "f1Macro": float(f1[present].mean()) if present.any() else 0.0}


def confusion_matrix(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (gold.astype(np.int64), pred.astype(np.int64)), 1)
    return cm


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix as a small text table (rows true, columns predicted)."""
    width = max([len(str(v)) for row in matrix for v in row] + [len(s) for s in labels] + [4])
    head = " " * (width + 2) + " ".join(f"{s:>{width}}" for s in labels) + "   <- predicted"
    lines = [head] + [f"{labels[i]:>{width}}  " + " ".join(f"{v:>{width}}" for v in row)
                      for i, row in enumerate(matrix)]
    return "\n".join(lines)


class SequenceClassification(Task):
    name = "sequence-classification"
    model_class = "AutoModelForSequenceClassification"
    lora_task_type = "SEQ_CLS"
    pipeline_tag = "text-classification"

    @property
    def labels(self) -> list[str] | None:
        return self.info.settings.get("labels")

    @property
    def regression(self) -> bool:
        return self.info.settings.get("numLabels") == 1

    @property
    def n_classes(self) -> int:
        return len(self.labels) if self.labels else int(self.info.settings.get("numLabels") or 0)

    def check_rows(self, split: Split) -> None:
        cols = self.info.columns
        check_text_columns(split, cols, ["text", "textPair"] if cols.get("textPair") else ["text"])
        self.label_ids(split)

    def label_ids(self, split: Split) -> np.ndarray:
        """Check the label column and map it to class ids (int64) or regression targets (float32)."""
        col = self.info.columns["label"]
        values = column(split, col, "label")
        if self.regression:
            out = np.empty(len(values), dtype=np.float32)
            for i, v in enumerate(values):
                try:
                    if isinstance(v, bool) or v is None:
                        raise ValueError
                    out[i] = float(v)
                    if not math.isfinite(out[i]):
                        raise ValueError
                except (TypeError, ValueError):
                    raise DataError(f"{split.where(i)}: field {col!r} must be a finite number for regression "
                                    f"(task.numLabels 1), got {v!r}") from None
            return out
        labels = self.labels
        index = {name: k for k, name in enumerate(labels or [])}
        n = self.n_classes
        ids = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            if isinstance(v, str) and v in index:
                ids[i] = index[v]
            elif isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v < n:
                ids[i] = int(v)
            else:
                allowed = f"one of {labels} or an index 0..{n - 1}" if labels else f"an integer 0..{n - 1}"
                raise DataError(f"{split.where(i)}: field {col!r} has label {v!r}, outside the label set (expected "
                                f"{allowed})")
        return ids

    def encode(self, split: Split, tok: Any) -> Encoded:
        texts = split.dataset[self.info.columns["text"]]
        pair_col = self.info.columns.get("textPair")
        pairs = split.dataset[pair_col] if pair_col else None
        ids: list[list[int]] = []
        types: list[list[int]] = []
        for s in chunks(len(texts)):
            enc = tok(texts[s], pairs[s] if pairs else None, truncation=True, max_length=self.info.max_seq_length)
            ids.extend(enc["input_ids"])
            if pairs and "token_type_ids" in enc:
                types.extend(enc["token_type_ids"])
        rows = {"input_ids": ids, **({"token_type_ids": types} if types else {})}
        return Encoded.from_rows(rows, {"labels": self.label_ids(split)})

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_labels": self.n_classes, "ignore_mismatched_sizes": True,
                                  "problem_type": "regression" if self.regression else "single_label_classification"}
        if self.labels:
            kwargs["id2label"] = dict(enumerate(self.labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(self.labels)}
        return kwargs

    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        local_idx, local_pred, loss_sum = [], [], 0.0
        for idx in ev.batches():
            out, _ = ev.forward(model, idx)
            logits = out.logits.float()
            local_pred.append(logits.squeeze(-1).cpu().numpy() if self.regression
                              else logits.argmax(-1).cpu().numpy())
            local_idx.append(idx)
            loss_sum += float(out.loss) * len(idx)  # the model's mean over the batch
        parts = ev.gather((np.concatenate(local_idx) if local_idx else np.zeros(0, np.int64),
                           np.concatenate(local_pred) if local_pred else np.zeros(0), loss_sum))
        idx = np.concatenate([p[0] for p in parts])
        pred = np.concatenate([p[1] for p in parts])
        gold = ev.enc.scalars["labels"][idx]
        if self.regression:
            mse = float(np.mean((pred.astype(np.float64) - gold.astype(np.float64)) ** 2))
            return Evaluation({"mse": mse, "evalLoss": mse})
        cm = confusion_matrix(pred, gold, self.n_classes)
        names = self.labels or [str(i) for i in range(self.n_classes)]
        # Cross-entropy per example: the validation loss beside the training loss.
        metrics = {**classification_metrics(pred, gold, self.n_classes),
                   "evalLoss": sum(p[2] for p in parts) / max(1, len(idx))}
        return Evaluation(metrics, {"confusionMatrix": {"labels": names, "matrix": cm.tolist()}})

    def summary(self, metrics: dict[str, float], extras: dict[str, Any]) -> list[str]:
        lines = super().summary(metrics, extras)
        cm = extras.get("confusionMatrix")
        if cm:
            lines.append("confusion matrix (rows: true label, columns: predicted):")
            lines.append(format_confusion(cm["matrix"], cm["labels"]))
        return lines

    def card_text(self) -> str:
        if self.labels:
            return f"Labels, in index order: {', '.join(f'`{x}`' for x in self.labels)}."
        if self.regression:
            return "Regression (one output, mean squared error)."
        return f"{self.n_classes} classes, labelled 0..{self.n_classes - 1}."


TASK = SequenceClassification
