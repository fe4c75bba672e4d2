"""dpo: direct preference optimisation on (prompt, chosen, rejected) pairs.

Data: `prompt`/`chosen`/`rejected` as text or chat messages; without a prompt column the prompt is the shared
beginning of chosen and rejected (text, or whole conversations); the hosted fine-tuning APIs' preference rows
(`input.messages`, `preferred_output`, `non_preferred_output`) as they are. Each pair is tokenised once into the
prompt and the two answers; a batch of B pairs is one forward pass over 2B rows (chosen rows, then rejected rows),
padded on the right, with the loss only on the answers' tokens.

The loss of a pair, with log-probabilities summed over the answer's tokens (IPO: averaged per token):
    logits = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    sigmoid: -log sigmoid(beta * logits) (1 - eps) - log sigmoid(-beta * logits) eps     (label smoothing eps)
    ipo:     (logits - 1 / (2 beta))^2
    hinge:   max(0, 1 - beta * logits)
and the rewards beta * (log pi(y|x) - log pi_ref(y|x)). The reference is the starting model: under LoRA the same
model with its adapters disabled (no second copy), otherwise a frozen copy (sharded like the model under FSDP), or
neither when its log-probabilities are computed once before training (`precomputeReferenceLogProbs`).

Metrics: evalLoss, rewardAccuracy (chosen reward above rejected; a tie counts half, so the untrained model scores
0.5), rewardMargin, rewardChosen, rewardRejected (means over the validation pairs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune_trainer.chat import message_problem, plain, render_checked, require_template
from finetune_trainer.data import IGNORE_INDEX, Encoded, Split, column, eos_ids
from finetune_trainer.errors import DataError
from finetune_trainer.evaluation import Evaluation, Evaluator
from finetune_trainer.memory import MemoryEstimate, MemoryInputs, estimate
from finetune_trainer.sharding import base_model, shard
from finetune_trainer.tasks.base import RunContext, Task

log = logging.getLogger(__name__)

# The hosted fine-tuning APIs' preference rows, read as they are when the data has these columns instead.
HOSTED = {"prompt": "input", "chosen": "preferred_output", "rejected": "non_preferred_output"}
REF = "ref_logps"  # the batch key of precomputed reference log-probabilities (chosen rows, then rejected rows)
KEEP = "logits_to_keep"  # the batch key of how many last positions need logits


# ------------------------------------------------------------------------------------------------------ the loss
@dataclasses.dataclass(frozen=True)
class Settings:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    max_prompt_length: int | None = None
    precompute: bool = False

    @classmethod
    def of(cls, block: dict[str, Any] | None) -> Settings:
        b = block or {}
        return cls(beta=float(b.get("beta", 0.1)), loss_type=str(b.get("lossType", "sigmoid")),
                   label_smoothing=float(b.get("labelSmoothing", 0.0)), max_prompt_length=b.get("maxPromptLength"),
                   precompute=bool(b.get("precomputeReferenceLogProbs", False)))


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the log-probabilities of the labelled tokens (a decoder predicts token t+1 at t) and how
    many there are. `logits` may cover only the last K positions (the model's `logits_to_keep`). Cross-entropy per
    token: the same fused kernel as the model's own loss, no full log-softmax kept beyond what its backward needs."""
    # Labels shifted left instead of logits shifted right: the logits stay one contiguous view, never copied.
    keep = logits.shape[1]
    target = torch.cat([labels[:, labels.shape[1] - keep + 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    per_token = -F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    return per_token.sum(-1), (target != IGNORE_INDEX).sum(-1)


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor,
                s: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, from [2B] summed log-probabilities and answer lengths
    (chosen rows first). IPO compares per-token averages of the log-ratios (as TRL does, with its authors'
    agreement); the rewards are always the summed ones."""
    n = policy.shape[0] // 2
    ratios = policy - reference
    chosen, rejected = ratios[:n], ratios[n:]
    logits = chosen - rejected
    if s.loss_type == "ipo":
        per_token = ratios / counts.clamp(min=1)
        losses = (per_token[:n] - per_token[n:] - 1 / (2 * s.beta)) ** 2
    elif s.loss_type == "hinge":
        losses = torch.relu(1 - s.beta * logits)
    else:
        losses = (-F.logsigmoid(s.beta * logits) * (1 - s.label_smoothing)
                  - F.logsigmoid(-s.beta * logits) * s.label_smoothing)
    return losses, s.beta * chosen.detach(), s.beta * rejected.detach()


# ---------------------------------------------------------------------------------------------------- the data
@dataclasses.dataclass(frozen=True)
class Pair:
    """One row as conversations or as text: the prompt and the two answers."""

    prompt: list[dict[str, str]] | str
    chosen: list[dict[str, str]] | str
    rejected: list[dict[str, str]] | str
    tools: Any = None


def _common_prefix(a: list[Any] | str, b: list[Any] | str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _as_messages(value: Any) -> list[Any] | None:
    """Messages from a value: a list of them, one message object, or the hosted APIs' `{"messages": [...]}`."""
    if isinstance(value, dict):
        return value["messages"] if isinstance(value.get("messages"), list) else [value]
    return value if isinstance(value, list) else None


class Dpo(Task):
    name = "dpo"
    model_class = "AutoModelForCausalLM"
    lora_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    padding_side = "right"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.s = Settings.of(self.info.settings.get("dpo"))
        self.reference: torch.nn.Module | None = None  # a frozen copy (full fine-tuning without precomputation)
        self._keeps_logits: bool | None = None  # whether the model's forward takes logits_to_keep
        self._told: set[str] = set()  # splits whose format was logged

    # ---------------------------------------------------------------------------------------------- columns
    def _columns(self, split: Split) -> tuple[str | None, str, str]:
        """prompt (None: implicit), chosen and rejected column names for this split."""
        cols, present = self.info.columns, set(split.dataset.column_names)
        mapped = set(self.info.mapped)
        if not mapped & {"chosen", "rejected"} and cols["chosen"] not in present and {
                HOSTED["chosen"], HOSTED["rejected"]} <= present:
            if split.name not in self._told:
                self._told.add(split.name)
                log.info("dataset.%s: preference rows in the hosted fine-tuning format (%s)", split.name,
                         ", ".join(HOSTED.values()))
            return (HOSTED["prompt"] if HOSTED["prompt"] in present else None), HOSTED["chosen"], HOSTED["rejected"]
        prompt = cols["prompt"] if ("prompt" in mapped or cols["prompt"] in present) else None
        return prompt, cols["chosen"], cols["rejected"]

    def _pairs(self, split: Split) -> Iterator[tuple[int, Pair]]:
        """Every row checked and read as a Pair (DataError naming file, row and field at the first bad one)."""
        prompt_col, chosen_col, rejected_col = self._columns(split)
        prompts = column(split, prompt_col, "prompt") if prompt_col else None
        chosen = column(split, chosen_col, "chosen")
        rejected = column(split, rejected_col, "rejected")
        for i in range(len(split)):
            yield i, self._pair(split.where(i), prompts[i] if prompts is not None else None, chosen[i], rejected[i],
                                (prompt_col, chosen_col, rejected_col))

    def _pair(self, where: str, prompt: Any, chosen: Any, rejected: Any, cols: tuple[str | None, str, str]) -> Pair:
        prompt_col, chosen_col, rejected_col = cols
        tools = prompt.get("tools") if isinstance(prompt, dict) else None
        for value, col in ((chosen, chosen_col), (rejected, rejected_col)):
            if value is None:
                raise DataError(f"{where}: field {col!r} is missing (null): a pair needs both answers")
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise DataError(f"{where}: fields {chosen_col!r} and {rejected_col!r} must both be text or both be "
                            "messages")
        if isinstance(chosen, str):
            if prompt_col is not None and not isinstance(prompt, str):
                raise DataError(f"{where}: field {prompt_col!r} must be text when the answers are text, got "
                                f"{'nothing (null)' if prompt is None else type(prompt).__name__}")
            pair = Pair(prompt if prompt_col else "", chosen, rejected)
            if prompt_col is None:
                cut = _common_prefix(chosen, rejected)
                pair = Pair(chosen[:cut], chosen[cut:], rejected[cut:])
        else:
            pair = self._message_pair(where, prompt, chosen, rejected, cols, tools)
        for side, col in ((pair.chosen, chosen_col), (pair.rejected, rejected_col)):
            if not (side.strip() if isinstance(side, str) else any(m["content"].strip() for m in side)):
                raise DataError(f"{where}: field {col!r} is empty{' after the shared prompt' if not prompt_col else ''}"
                                ": a pair needs two answers")
        if pair.chosen == pair.rejected:
            raise DataError(f"{where}: fields {chosen_col!r} and {rejected_col!r} are the same answer, so there is no "
                            "preference to learn")
        return pair

    def _message_pair(self, where: str, prompt: Any, chosen: Any, rejected: Any, cols: tuple[str | None, str, str],
                      tools: Any) -> Pair:
        prompt_col, chosen_col, rejected_col = cols
        answers = []
        for value, col in ((chosen, chosen_col), (rejected, rejected_col)):
            messages = _as_messages(value)
            problem = message_problem(messages, need_assistant=False, only_assistant=prompt_col is not None)
            if problem:
                raise DataError(f"{where}: field {col!r} {problem}")
            answers.append(plain(messages))  # type: ignore[arg-type]
        if prompt_col is None:
            cut = _common_prefix(answers[0], answers[1])
            return Pair(answers[0][:cut], answers[0][cut:], answers[1][cut:], tools)
        messages = _as_messages(prompt)
        problem = message_problem(messages, need_assistant=False)
        if problem:
            raise DataError(f"{where}: field {prompt_col!r} {problem}")
        return Pair(plain(messages), answers[0], answers[1], tools)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------------- checks
    def check_rows(self, split: Split) -> None:
        for _ in self._pairs(split):
            pass

    def _tokens(self, pair: Pair, tok: Any, where: str) -> tuple[list[int], list[int], list[int]]:
        """Prompt, chosen and rejected token ids. Text: the prompt with the tokenizer's special tokens, each answer
        followed by EOS. Messages: the chat template's rendering, the prompt with the generation prompt and each
        answer as what the template adds after it (its end-of-turn tokens included)."""
        if isinstance(pair.chosen, str):
            eos = eos_ids(tok)
            prompt = tok(pair.prompt, add_special_tokens=True)["input_ids"] if pair.prompt else \
                tok("", add_special_tokens=True)["input_ids"]
            return (prompt, tok(pair.chosen, add_special_tokens=False)["input_ids"] + eos,
                    tok(pair.rejected, add_special_tokens=False)["input_ids"] + eos)
        require_template(tok, "the preference data")
        col = self.info.columns["prompt"]
        messages: list[dict[str, str]] = pair.prompt  # type: ignore[assignment]
        head = render_checked(tok, messages, where, col, generation_prompt=True, tools=pair.tools) if messages else ""
        answers = []
        for side, name in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            full = render_checked(tok, messages + side, where, self.info.columns[name],  # type: ignore[operator]
                                  tools=pair.tools)
            if not full.startswith(head):
                raise DataError(f"{where}: the chat template does not render the {name} answer after the prompt as "
                                "rendered on its own (it changes earlier turns), so the answer cannot be located")
            answers.append(tok(full[len(head):], add_special_tokens=False)["input_ids"])
        return tok(head, add_special_tokens=False)["input_ids"], answers[0], answers[1]

    def encode(self, split: Split, tok: Any) -> Encoded:
        prompts: list[list[int]] = []
        chosen: list[list[int]] = []
        rejected: list[list[int]] = []
        limit, dropped = self.info.max_seq_length, 0
        for i, pair in self._pairs(split):
            p, c, r = self._tokens(pair, tok, split.where(i))
            if self.s.max_prompt_length is not None and len(p) > self.s.max_prompt_length:
                p = p[len(p) - self.s.max_prompt_length:]  # keep the end, next to the answers
            if not c or not r:
                raise DataError(f"{split.where(i)}: an answer is empty after tokenising, so there is nothing to "
                                "compare")
            longest = len(p) + max(len(c), len(r))
            if longest > limit:
                if self.info.over_long == "drop":
                    dropped += 1
                    continue
                raise DataError(f"{split.where(i)}: prompt + answer is {longest} tokens, longer than "
                                f"hyperparameters.maxSeqLength {limit}; dpo examples are never truncated (the answer "
                                "would be cut): shorten or remove the pair, raise maxSeqLength, set "
                                "task.dpo.maxPromptLength, or set dataset.overLong to drop")
            prompts.append(p)
            chosen.append(c)
            rejected.append(r)
        cost = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)],
                        dtype=np.int64)
        return Encoded.from_rows({"input_ids": prompts, "chosen": chosen, "rejected": rejected}, {"cost": cost},
                                 dropped=dropped)

    # ------------------------------------------------------------------------------------------------ batches
    def collate(self, data: Encoded, idx: np.ndarray, pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
        """2B rows, the chosen answers first, each after its prompt; labels only on the answers' tokens."""
        rows, labels = [], []
        for side in ("chosen", "rejected"):
            for i in idx:
                p, a = data.row("input_ids", int(i)), data.row(side, int(i))
                rows.append(np.concatenate([p, a]))
                labels.append(np.concatenate([np.full(len(p), IGNORE_INDEX), a]))
        width = max(len(r) for r in rows)
        # Logits are needed from the last prompt token on: the positions before the shortest prompt's end are skipped.
        keep = width - min(len(data.row("input_ids", int(i))) for i in idx) + 1
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        lab = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for k, (r, y) in enumerate(zip(rows, labels, strict=True)):
            ids[k, :len(r)], lab[k, :len(r)], mask[k, :len(r)] = r, y, 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                 "labels": torch.from_numpy(lab), KEEP: torch.tensor(min(keep, width))}
        if "ref_chosen" in data.scalars:
            batch[REF] = torch.from_numpy(np.concatenate([data.scalars["ref_chosen"][idx],
                                                          data.scalars["ref_rejected"][idx]]))
        return batch, int(mask.sum())

    # ------------------------------------------------------------------------------------------------- models
    def attach(self, run: RunContext) -> None:
        """The reference: precomputed log-probabilities, the adapters disabled (LoRA), or a frozen copy."""
        if self.s.precompute:
            self._precompute(run)
        elif run.method != "lora":
            ref = run.load_frozen()
            ref.to(run.dist.device)
            if run.layout.sharding == "fsdp":
                ref = shard(ref, run.layout.compute_dtype, run.dist.device, run.dist.world, keep_root=False)
            self.reference = ref
            log.info("dpo reference: a frozen copy of the starting weights%s",
                     " (sharded)" if run.layout.sharding == "fsdp" else "")
        else:
            log.info("dpo reference: the model with its adapters disabled")

    def _precompute(self, run: RunContext) -> None:
        """Every pair's reference log-probabilities, with the starting weights (the model as loaded, adapters
        disabled): each rank computes its share, then every rank has all of them."""
        model, dist = run.model, run.dist
        if not getattr(model, "is_quantized", False):
            model.to(dist.device)
        was_training = model.training
        model.eval()
        try:
            for data in run.data:
                n = len(data)
                mine = np.arange(dist.rank, n, dist.world)
                out = np.zeros((2, n), dtype=np.float64)
                for s in range(0, len(mine), run.batch_size):
                    idx = mine[s:s + run.batch_size]
                    batch, _ = self.collate(data, idx, run.pad_id)
                    batch = {k: v.to(dist.device) for k, v in batch.items()}
                    with torch.no_grad(), run.autocast():
                        logps = self._reference_logps(model, batch)
                    out[:, idx] = logps.double().view(2, -1).cpu().numpy()
                total = np.sum(dist.gather(out), axis=0)
                data.scalars["ref_chosen"], data.scalars["ref_rejected"] = total[0], total[1]
        finally:
            model.train(was_training)
        log.info("dpo reference: log-probabilities of %s pairs computed before training",
                 " and ".join(str(len(d)) for d in run.data))

    @staticmethod
    def _adapters_off(model: Any) -> contextlib.AbstractContextManager[Any]:
        inner = getattr(model, "module", model)  # DDP's module; FSDP2 shards the model in place
        disable = getattr(inner, "disable_adapter", None)
        return disable() if callable(disable) else contextlib.nullcontext()

    def _reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's summed log-probabilities of the batch's answers [2B]."""
        if REF in batch:
            return batch[REF]
        inputs = self._inputs(model, batch)
        with torch.no_grad():
            if self.reference is not None:
                logits = self.reference(**inputs).logits
            else:
                inner = getattr(model, "module", model)
                with self._adapters_off(model):
                    logits = inner(**inputs).logits
            return answer_logps(logits, batch["labels"])[0]

    def _inputs(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The model's inputs; logits only for the positions that predict answer tokens where the model can."""
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._keeps_logits is None:
            forward = type(base_model(getattr(model, "module", model))).forward
            self._keeps_logits = "logits_to_keep" in inspect.signature(forward).parameters
        if self._keeps_logits and KEEP in batch:
            inputs[KEEP] = int(batch[KEEP])
        return inputs

    def scores(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
        """Per pair: the loss, the chosen reward and the rejected reward. The reference pass comes first, so that
        nothing runs between the policy's forward and its backward."""
        reference = self._reference_logps(model, batch)
        logits = model(**self._inputs(model, batch)).logits
        policy, counts = answer_logps(logits, batch["labels"])
        return pair_losses(policy, reference.to(policy.dtype), counts, self.s)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(model, batch)[0].mean()

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        return self.scores(model, batch)

    def memory(self, inp: MemoryInputs, est: MemoryEstimate) -> MemoryEstimate:
        """Two sequences per pair; a full model's frozen reference copy in the compute precision (its shard under
        fsdp), unless its log-probabilities are precomputed; under LoRA the base serves as the reference."""
        pairs = estimate(dataclasses.replace(inp, batch_size=2 * inp.batch_size))
        copy = inp.shape.trainable >= inp.shape.parameters and not self.s.precompute
        reference = inp.shape.parameters * (4 if inp.precision == "fp32" else 2) if copy else 0.0
        if inp.sharding == "fsdp" and inp.processes > 1:
            reference /= inp.processes
        return dataclasses.replace(est, activations=pairs.activations, reference=float(reference))

    # --------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, ev: Evaluator, model: Any) -> Evaluation:
        local = []
        for idx in ev.batches():
            (losses, chosen, rejected), _ = ev.forward(model, idx)
            local.append(torch.stack([losses.float(), chosen.float(), rejected.float()], 1).cpu().numpy())
        mine = np.concatenate(local) if local else np.zeros((0, 3))
        rows = np.concatenate(ev.gather(mine))
        losses, chosen, rejected = rows[:, 0], rows[:, 1], rows[:, 2]
        wins = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
        n = max(1, len(rows))
        return Evaluation({"evalLoss": float(losses.sum() / n), "rewardAccuracy": float(wins.sum() / n),
                           "rewardMargin": float((chosen - rejected).sum() / n),
                           "rewardChosen": float(chosen.sum() / n), "rewardRejected": float(rejected.sum() / n)})

    def card_text(self) -> str:
        s = self.s
        reference = ("log-probabilities precomputed before training" if s.precompute else
                     "the starting model (the base with its adapters disabled under LoRA, else a frozen copy)")
        return (f"Direct preference optimisation on prompt/chosen/rejected pairs: {s.loss_type} loss, beta {s.beta}"
                + (f", label smoothing {s.label_smoothing}" if s.label_smoothing else "")
                + f"; the reference is {reference}. Rewards are beta x the log-probability ratio of the model and the "
                "reference over an answer's tokens; reward accuracy is the share of validation pairs whose chosen "
                "answer earns the higher reward (a tie counts half).")


TASK = Dpo
