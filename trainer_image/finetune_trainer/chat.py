"""Chat data for the objectives that read conversations (causal-lm `messages`, dpo prompts and answers): the
structural check of every row, the tokenizer's chat template, and where the assistant turns lie in its output.

A row is checked twice before training: its structure without the tokenizer (`check_messages`: a list of
{role, content} with text content and a role from ROLES), then against the template while it is rendered
(`render_checked`: the template raises, or leaves a message out of its output, as some do with roles they do not
know). Every problem names the file, the row, the field and what is allowed.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.data import Split
from finetune_trainer.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")


def message_problem(value: Any, need_assistant: bool = True, only_assistant: bool = False) -> str | None:
    """What is wrong with one conversation's structure, in words (None: nothing)."""
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of {role, content} messages"
    for n, m in enumerate(value, 1):
        if not isinstance(m, dict):
            return f"message {n} is {type(m).__name__}, not a {{role, content}} object"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            return f"message {n} has no role (a string: {', '.join(ROLES)})"
        if role not in ROLES:
            return f"message {n} has role {role!r}; the roles a chat template renders are {', '.join(ROLES)}"
        if only_assistant and role != "assistant":
            return f"message {n} has role {role!r}; an answer holds assistant messages only"
        if not isinstance(content, str):
            got = "nothing (null)" if content is None else type(content).__name__
            return f"message {n} ({role}) has content {got}; content must be text"
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        return "has no assistant message, so nothing would be learned"
    return None


def check_messages(split: Split, values: list[Any], col: str, need_assistant: bool = True) -> None:
    """Every row of a messages column is a well-formed conversation (DataError naming file, row and field)."""
    for i, conv in enumerate(values):
        problem = message_problem(conv, need_assistant)
        if problem:
            raise DataError(f"{split.where(i)}: field {col!r} {problem}")


def plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Only role and content: what the template renders (other keys of a hosted API's rows are left out)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool, tools: Any = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs))


def require_template(tok: Any, field: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{field} holds chat messages, which need a tokenizer with a chat template, and this "
                          "model's tokenizer has none; use text columns instead")


def render_checked(tok: Any, messages: list[dict[str, str]], where: str, col: str, generation_prompt: bool = False,
                   tools: Any = None) -> str:
    """The rendered conversation; DataError when the template refuses it or drops one of its messages."""
    try:
        text = render(tok, messages, generation_prompt, tools)
    except Exception as exc:  # jinja2's TemplateError, raise_exception() in the template
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DataError(f"{where}: field {col!r}: the chat template cannot render this conversation: {first}") \
            from None
    for n, m in enumerate(messages, 1):
        if m["content"].strip() and m["content"].strip() not in text:
            raise DataError(f"{where}: field {col!r}: message {n} (role {m['role']!r}) does not appear in what the "
                            "chat template renders, so the template does not know this role; use the roles it "
                            "renders")
    return text


def chat_segments(tok: Any, messages: list[dict[str, str]], where: str | None = None,
                  col: str = "messages") -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, carries_loss) pieces: only assistant replies carry loss.

    Rendering prefixes of the conversation finds where each reply starts and ends in the template's output, so any
    template that renders a conversation as the concatenation of its turns works, without special markers. A
    template that rewrites earlier turns (some drop the reasoning of earlier replies) is a DataError naming the row
    (`where`), or a ConfigError without one.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tok, messages[:k], generation_prompt=True) if k else ""
        upto = render(tok, messages[:k + 1], generation_prompt=False)
        if not before.startswith(done) or not upto.startswith(before):
            what = ("the tokenizer's chat template does not render this conversation as the concatenation of its "
                    "turns (it changes earlier turns), so its assistant replies cannot be located")
            if where is not None:
                raise DataError(f"{where}: field {col!r}: {what}; use text columns instead")
            raise ConfigError(f"{what}; use prompt/response columns instead")
        segments.append((before[len(done):], False))
        segments.append((upto[len(before):], True))
        done = upto
    full = render(tok, messages, generation_prompt=False)
    if full[len(done):]:
        segments.append((full[len(done):], False))
    return [(t, loss) for t, loss in segments if t]
