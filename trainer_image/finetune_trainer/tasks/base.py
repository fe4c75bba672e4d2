"""What an objective is to the trainer: one object that checks and tokenises the data, batches it, computes the loss
from the model and a batch, evaluates, and says what it needs besides the trainable model (a reference model,
values computed before training) and what that costs in memory. The loop, the evaluation, the memory plan, the model
card and the console summary ask it instead of switching on the type.

Each objective is one module of this package that defines `TASK`, a `Task` subclass, named like its API definition
in `finetune_api.tasks` (columns, metrics and their direction, settings, rules), which the class reads.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from finetune_api.tasks import TASKS as DEFINITIONS
from finetune_api.tasks.base import TaskDefinition
from finetune_trainer.data import Encoded, Split, collate
from finetune_trainer.distributed import Dist
from finetune_trainer.errors import DataError
from finetune_trainer.evaluation import Evaluation, Evaluator
from finetune_trainer.memory import MemoryEstimate, MemoryInputs
from finetune_trainer.sharding import Layout


@dataclass(frozen=True)
class TaskInfo:
    """The spec's task settings that the checks, the tokeniser and the token cache key depend on."""

    type: str
    columns: dict[str, str]  # role (camelCase) -> column name, defaults filled in
    max_seq_length: int = 256
    over_long: str = "fail"  # dataset.overLong: fail | drop, for the objectives that never truncate
    mapped: tuple[str, ...] = ()  # the roles dataset.columns names explicitly
    settings: dict[str, Any] = field(default_factory=dict)  # the objective's own fields of spec.task (camelCase)


@dataclass
class RunContext:
    """What an objective may need before training besides its data: the trainable model as loaded (not yet wrapped
    for the processes), how to load a frozen copy of the starting weights, the layout and the process group."""

    model: Any
    method: str  # full | lora
    load_frozen: Callable[[], Any]  # a fresh, frozen copy of the starting weights in the compute precision
    layout: Layout
    dist: Dist
    data: list[Encoded]  # training, then validation when there is any
    pad_id: int
    batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]


class Task(ABC):
    """One objective (`spec.task.type`): everything about it that differs from the other objectives."""

    name: ClassVar[str]  # spec.task.type
    model_class: ClassVar[str]  # the transformers Auto class that loads the pretrained model with this task's head
    lora_task_type: ClassVar[str]  # the peft TaskType member
    pipeline_tag: ClassVar[str]  # the hub's pipeline tag, for the model card
    metric_names: ClassVar[tuple[str, ...]]  # its metrics but evalLoss, in the order the console summary shows them
    padding_side: ClassVar[str | None] = None  # the tokenizer's, when the task needs one side

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.metric_names = tuple(dict.fromkeys(
                m.name for m in DEFINITIONS[cls.name].all_metrics() if m.name != "evalLoss"))

    def __init__(self, info: TaskInfo) -> None:
        self.info = info

    @property
    def definition(self) -> TaskDefinition:
        return DEFINITIONS[self.name]

    # ------------------------------------------------------------------------------------------------------ data
    def check(self, split: Split) -> None:
        """Everything that can be checked before tokenising: non-empty, columns present, values of the right kind."""
        if len(split) == 0:
            raise DataError(f"dataset.{split.name} ({', '.join(split.files[:3])}) is empty")
        self.check_rows(split)

    @abstractmethod
    def check_rows(self, split: Split) -> None:
        """Raise DataError naming the file, row and field of the first row the task cannot use."""

    @abstractmethod
    def encode(self, split: Split, tok: Any) -> Encoded:
        """Tokenise a checked split."""

    def collate(self, data: Encoded, idx: np.ndarray, pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
        """One padded batch of the examples `idx` and its count of real tokens."""
        return collate(data, idx, pad_id)

    # --------------------------------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments, e.g. the size of a new head."""
        return {}

    def attach(self, run: RunContext) -> None:
        """Prepare what training needs besides the trainable model (a reference model, values computed before the
        first step); called once the model is loaded, before it is wrapped for the processes."""
        return None

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (the model's own, for objectives whose loss the model computes)."""
        return model(**batch).loss

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        """What evaluation needs of one batch (the model's output)."""
        return model(**batch)

    def memory(self, inp: MemoryInputs, est: MemoryEstimate) -> MemoryEstimate:
        """The memory plan's estimate with what this objective adds (a reference model, longer batches)."""
        return est

    # -------------------------------------------------------------------------------------------- evaluation
    @abstractmethod
    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        """The task's metrics over the validation data (ev runs the batches on this rank and gathers results)."""

    # ---------------------------------------------------------------------------------------------- describing
    def summary(self, metrics: dict[str, float], extras: dict[str, Any]) -> list[str]:
        """Console lines at the end of a run: the task's metrics, then the losses."""
        order = [*self.metric_names, "evalLoss", "trainLoss"]
        return ["  ".join(f"{k} {metrics[k]:.4f}" for k in order if k in metrics)]

    def card_text(self) -> str:
        """The model card's Task section."""
        summary = self.definition.summary
        return f"{summary[0].upper()}{summary[1:]}."
