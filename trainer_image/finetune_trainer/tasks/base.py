"""What a task is to the trainer: one object that checks and tokenises the data, names the model class and the LoRA
task type, and evaluates. Each task type is one module of this package that defines `TASK`, a `Task` subclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_trainer.data import Encoded, Split
from finetune_trainer.errors import DataError
from finetune_trainer.evaluation import Evaluation, Evaluator


@dataclass(frozen=True)
class TaskInfo:
    """The spec's task settings that the checks, the tokeniser and the token cache key depend on."""

    type: str
    columns: dict[str, str]  # role (camelCase) -> column name, defaults filled in
    labels: list[str] | None = None
    num_labels: int | None = None
    max_seq_length: int = 256
    source_prefix: str = ""


class Task(ABC):
    """One task type (`spec.task.type`): everything about it that differs from the other tasks."""

    name: ClassVar[str]  # spec.task.type
    model_class: ClassVar[str]  # the transformers Auto class that loads the pretrained model with this task's head
    lora_task_type: ClassVar[str]  # the peft TaskType member
    metric_names: ClassVar[tuple[str, ...]]  # the task's own metrics, in the order the console summary shows them
    padding_side: ClassVar[str | None] = None  # the tokenizer's, when the task needs one side

    def __init__(self, info: TaskInfo) -> None:
        self.info = info

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

    @abstractmethod
    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        """The task's metrics over the validation data (ev runs the batches on this rank and gathers results)."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments, e.g. the size of a new head."""
        return {}

    def summary(self, metrics: dict[str, float], extras: dict[str, Any]) -> list[str]:
        """Console lines at the end of a run: the task's metrics, then the losses."""
        order = [*self.metric_names, "evalLoss", "trainLoss"]
        return ["  ".join(f"{k} {metrics[k]:.4f}" for k in order if k in metrics)]
