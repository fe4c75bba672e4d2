"""Evaluation: running the model over the validation data on every rank; the batches, the forward pass and the
metrics themselves are the task's (finetune_trainer.tasks). Metric keys are camelCase, as the progress contract and
the status use them.

Each rank evaluates a shard (length-sorted, so little padding) and the per-example results are gathered, so the
numbers do not depend on the number of processes. With a sharded model (FSDP) every forward pass is a collective,
so every rank runs the same number of them: a rank with fewer batches runs extra forward passes whose results are
dropped (`lockstep`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finetune_trainer.data import IGNORE_INDEX, Encoded, collate, eval_batches

Collate = Callable[[Encoded, np.ndarray, int], tuple[dict[str, torch.Tensor], int]]


@dataclass
class Evaluation:
    """One evaluation's results: scalar metrics (progress, status, metrics.json) and extras such as the confusion
    matrix (metrics.json and the console summary)."""

    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


class EvaluationStopped(Exception):
    """A stop was requested (SIGTERM) between two evaluation batches: the caller checkpoints and exits instead of
    finishing an evaluation that may outlast the grace period."""


class Evaluator:
    """Runs a task's evaluation over the validation data: this rank's batches, the forward pass, gathering."""

    def __init__(self, metrics: Callable[[Evaluator, Any], Evaluation], enc: Encoded, tok: Any, batch_size: int,
                 device: torch.device, autocast: Callable[[], Any], rank: int = 0, world: int = 1,
                 gather: Callable[[Any], list[Any]] | None = None, lockstep: bool = False,
                 collate: Collate = collate, forward: Callable[[Any, dict[str, torch.Tensor]], Any] | None = None,
                 ) -> None:
        self.metrics = metrics  # the task's evaluate(evaluator, model)
        self.collate = collate  # the task's batches
        self.step = forward or (lambda model, batch: model(**batch))  # the task's forward pass
        self.enc, self.tok = enc, tok
        self.batch_size = max(1, batch_size)
        self.device, self.autocast = device, autocast
        self.rank, self.world = rank, world
        self.gather = gather or (lambda x: [x])
        self.lockstep = lockstep and world > 1
        self._should_stop: Callable[[], bool] | None = None
        self._model: Any = None

    @torch.no_grad()
    def run(self, model: Any, should_stop: Callable[[], bool] | None = None) -> Evaluation:
        """Evaluate in eval mode. `should_stop` is asked before every batch; when it answers True,
        EvaluationStopped is raised (single process only: ranks would disagree on when)."""
        self._should_stop = should_stop if self.world == 1 else None
        was_training = model.training
        model.eval()
        self._model = model
        try:
            return self.metrics(self, model)
        finally:
            self._model = None
            model.train(was_training)

    def batches(self) -> Iterator[np.ndarray]:
        """This rank's share of the validation examples, longest first. In lockstep, once they are done, as many
        forward passes on one example as other ranks have batches more (their outputs are dropped)."""
        cost = self.enc.cost()
        mine = eval_batches(cost, self.batch_size, self.world, self.rank)
        extra = max(self.gather(len(mine))) - len(mine) if self.lockstep else 0
        yield from mine
        for _ in range(extra):
            self.forward(self._model, np.argsort(-cost, kind="stable")[:1])

    def forward(self, model: Any, idx: np.ndarray) -> tuple[Any, dict[str, torch.Tensor]]:
        """The model's output on one batch, and the batch as it went in."""
        if self._should_stop is not None and self._should_stop():
            raise EvaluationStopped
        batch, _ = self.collate(self.enc, idx, self.tok.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            out = self.step(model, batch)
        return out, batch

    def token_loss(self, model: Any, shifted: bool,
                   per_batch: Callable[[np.ndarray, dict[str, torch.Tensor]], list[Any]] | None = None,
                   ) -> tuple[float, list[Any]]:
        """Loss per predicted token over all ranks (`shifted`: a decoder predicts token t+1 from t, so the first
        label is never predicted), and what `per_batch` returned for every batch of every rank."""
        loss_sum, count, items = 0.0, 0, []
        for idx in self.batches():
            out, batch = self.forward(model, idx)
            labels = batch["labels"]
            # Token-weighted loss: the model's mean times its number of predicted tokens.
            n = int((labels[:, 1:] != IGNORE_INDEX).sum()) if shifted else int((labels != IGNORE_INDEX).sum())
            loss_sum += float(out.loss) * n
            count += n
            if per_batch is not None:
                items.extend(per_batch(idx, batch))
        parts = self.gather((loss_sum, count, items))
        total = sum(p[0] for p in parts)
        return total / max(1, sum(p[1] for p in parts)), [x for p in parts for x in p[2]]
