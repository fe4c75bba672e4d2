"""Evaluation: accuracy, macro-F1 and the confusion matrix (classification), MSE (regression), loss and perplexity
(causal LM), loss and chrF (seq2seq). Metric keys are camelCase, as the progress contract and the status use them.

Each rank evaluates a shard (length-sorted, so little padding) and the per-example results are gathered, so the
numbers do not depend on the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from finetune_trainer.data import IGNORE_INDEX, Encoded, TaskInfo, collate, eval_batches


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


def chrf(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix as a small text table (rows true, columns predicted)."""
    width = max([len(str(v)) for row in matrix for v in row] + [len(s) for s in labels] + [4])
    head = " " * (width + 2) + " ".join(f"{s:>{width}}" for s in labels) + "   <- predicted"
    lines = [head] + [f"{labels[i]:>{width}}  " + " ".join(f"{v:>{width}}" for v in row)
                      for i, row in enumerate(matrix)]
    return "\n".join(lines)


class EvaluationStopped(Exception):
    """A stop was requested (SIGTERM) between two evaluation batches: the caller checkpoints and exits instead of
    finishing an evaluation that may outlast the grace period."""


class Evaluator:
    """Runs the model over the validation data and computes the task's metrics."""

    def __init__(self, task: TaskInfo, enc: Encoded, tok: Any, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any], rank: int = 0, world: int = 1,
                 gather: Callable[[Any], list[Any]] | None = None) -> None:
        self.task, self.enc, self.tok = task, enc, tok
        self.batch_size = max(1, batch_size)
        self.device, self.autocast = device, autocast
        self.rank, self.world = rank, world
        self.gather = gather or (lambda x: [x])
        self.labels = task.labels or [str(i) for i in range(task.n_classes)]
        self._should_stop: Callable[[], bool] | None = None

    def _batches(self) -> list[np.ndarray]:
        return eval_batches(self.enc.cost(), self.batch_size, self.world, self.rank)

    @torch.no_grad()
    def run(self, model: Any, should_stop: Callable[[], bool] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Return (scalar metrics, extras such as the confusion matrix). `should_stop` is asked before every batch;
        when it answers True, EvaluationStopped is raised (single process only: ranks would disagree on when)."""
        self._should_stop = should_stop if self.world == 1 else None
        was_training = model.training
        model.eval()
        try:
            if self.task.type == "sequence-classification":
                return self._classification(model)
            return self._generative(model)
        finally:
            model.train(was_training)

    def _forward(self, model: Any, idx: np.ndarray) -> tuple[Any, dict[str, torch.Tensor]]:
        if self._should_stop is not None and self._should_stop():
            raise EvaluationStopped
        batch, _ = collate(self.enc, idx, self.tok.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            out = model(**batch)
        return out, batch

    def _classification(self, model: Any) -> tuple[dict[str, float], dict[str, Any]]:
        local_idx, local_pred = [], []
        for idx in self._batches():
            out, _ = self._forward(model, idx)
            logits = out.logits.float()
            local_pred.append(logits.squeeze(-1).cpu().numpy() if self.task.regression
                              else logits.argmax(-1).cpu().numpy())
            local_idx.append(idx)
        parts = self.gather((np.concatenate(local_idx) if local_idx else np.zeros(0, np.int64),
                             np.concatenate(local_pred) if local_pred else np.zeros(0)))
        idx = np.concatenate([p[0] for p in parts])
        pred = np.concatenate([p[1] for p in parts])
        gold = self.enc.scalars["labels"][idx]
        if self.task.regression:
            mse = float(np.mean((pred.astype(np.float64) - gold.astype(np.float64)) ** 2))
            return {"mse": mse, "evalLoss": mse}, {}
        metrics = classification_metrics(pred, gold, self.task.n_classes)
        cm = confusion_matrix(pred, gold, self.task.n_classes)
        return metrics, {"confusionMatrix": {"labels": self.labels, "matrix": cm.tolist()}}

    def _generative(self, model: Any) -> tuple[dict[str, float], dict[str, Any]]:
        loss_sum, count = 0.0, 0
        hyps: list[tuple[int, str, str]] = []
        seq2seq = self.task.type == "seq2seq"
        gen_model = getattr(model, "module", model)
        for idx in self._batches():
            out, batch = self._forward(model, idx)
            labels = batch["labels"]
            # Token-weighted loss: the model's mean times its number of predicted tokens.
            n = int((labels[:, 1:] != IGNORE_INDEX).sum()) if not seq2seq else int((labels != IGNORE_INDEX).sum())
            loss_sum += float(out.loss) * n
            count += n
            if seq2seq:
                max_new = int(self.enc.lengths("labels")[idx].max()) + 8
                with self.autocast():
                    gen = gen_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             max_new_tokens=max_new, num_beams=1, do_sample=False)
                texts = self.tok.batch_decode(gen, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    ref = self.enc.row("labels", int(i))
                    hyps.append((int(i), texts[j].strip(),
                                 self.tok.decode(ref[ref != IGNORE_INDEX], skip_special_tokens=True).strip()))
        parts = self.gather((loss_sum, count, hyps))
        loss_sum = sum(p[0] for p in parts)
        count = sum(p[1] for p in parts)
        loss = loss_sum / max(1, count)
        metrics = {"evalLoss": loss}
        if seq2seq:
            pairs = sorted(h for p in parts for h in p[2])
            metrics["chrf"] = chrf([h for _, h, _ in pairs], [r for _, _, r in pairs])
        else:
            metrics["perplexity"] = math.exp(min(loss, 50.0))
        return metrics, {}
