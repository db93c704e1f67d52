"""Prompt formatting and tokenization for SFT with the loss on answer tokens only.

Training and generation tokenize a prompt the same way (`prompt_ids`), so that what the model is
trained to continue is exactly what it is asked to continue at evaluation time.
"""

from __future__ import annotations

import logging
from typing import Any

from cpi_ray.config.schema import TaskConfig
from cpi_ray.data.tasks import answer_text, conversation

log = logging.getLogger("cpi_ray")

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip


class AnswerTooLongError(ValueError):
    """The answer plus EOS (plus one prompt token to predict it from) exceeds max_seq_len."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, task: TaskConfig, row: dict) -> str:
    """The text the model continues with its answer: every turn before the scored assistant turn,
    through the tokenizer's chat template with the assistant header, where it has one; else plain
    text (`"{system}\\n\\n{user}\\n"`, earlier assistant turns as `"{assistant}\\n"`)."""
    return _prompt_of(tokenizer, conversation(task, row)[:-1])


def _prompt_of(tokenizer: Any, turns: list[dict]) -> str:
    if not has_chat_template(tokenizer):
        return "".join(f"{t['content']}\n\n" if t["role"] == "system" else f"{t['content']}\n" for t in turns)
    return _render(tokenizer, turns, generation_prompt=True)


def _render(tokenizer: Any, turns: list[dict], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:
        if turns[0]["role"] != "system":
            raise
        # Some templates reject a system role: fold it into the first user turn.
        system, rest = turns[0]["content"], [dict(t) for t in turns[1:]]
        first_user = next(i for i, t in enumerate(rest) if t["role"] == "user")
        rest[first_user]["content"] = f"{system}\n\n{rest[first_user]['content']}"
        text = tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"chat template returned {type(text).__name__}, expected str")
    return text


def _context_segments(tokenizer: Any, turns: list[dict]) -> list[tuple[str, bool]]:
    """The text before the scored answer as (text, learned) pieces: with a chat template, each
    earlier assistant turn as the template writes it (its end-of-turn tokens included) is learned,
    everything else is not. A template that rewrites earlier turns as the conversation goes on
    (so that a longer conversation does not extend a shorter one) keeps them as context only."""
    prompt = _prompt_of(tokenizer, turns)
    if not has_chat_template(tokenizer) or all(t["role"] != "assistant" for t in turns):
        return [(prompt, False)]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, t in enumerate(turns):
        if t["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], generation_prompt=True)
        after = _render(tokenizer, turns[: i + 1], generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            return [(prompt, False)]
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    if not prompt.startswith(done):
        return [(prompt, False)]
    return [*segments, (prompt[len(done) :], False)]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a formatted prompt. A chat template already writes every special token it
    wants (BOS included), so none are added; a plain prompt gets the tokenizer's usual ones."""
    add_special = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; answers could not end")
    return int(tokenizer.eos_token_id)


def encode_example(tokenizer: Any, task: TaskConfig, row: dict, max_seq_len: int) -> dict:
    """`{"input_ids": [...], "labels": [...]}`: the prompt (`format_prompt`), then the answer
    tokens then EOS; labels are the token ids on the answer+EOS and on earlier assistant turns of
    a conversation, IGNORE_INDEX elsewhere (system and user turns, template headers). Over
    `max_seq_len`, the sequence loses tokens from its left (the answer is what is learned); an
    answer that cannot fit with at least one token before it raises AnswerTooLongError (the first
    position is never a prediction target, so the answer's first token needs a token to its
    left)."""
    turns = conversation(task, row)
    ids: list[int] = []
    labels: list[int] = []
    for k, (text, learned) in enumerate(_context_segments(tokenizer, turns[:-1])):
        # The first piece is tokenized as a prompt is (`prompt_ids`); the rest continue it.
        seg = (
            prompt_ids(tokenizer, text)
            if k == 0
            else list(tokenizer(text, add_special_tokens=False)["input_ids"])
        )
        ids += seg
        labels += seg if learned else [IGNORE_INDEX] * len(seg)
    a_ids = list(tokenizer(answer_text(task, row), add_special_tokens=False)["input_ids"])
    a_ids.append(eos_id(tokenizer))
    if not ids:
        raise ValueError(f"task {task.name!r}: a prompt tokenized to nothing")
    if len(a_ids) + 1 > max_seq_len:
        raise AnswerTooLongError(
            f"task {task.name!r}: answer of {len(a_ids)} tokens (with EOS) does not fit in"
            f" max_seq_len={max_seq_len}"
        )
    budget = max_seq_len - len(a_ids)
    if len(ids) > budget:
        ids, labels = ids[len(ids) - budget :], labels[len(labels) - budget :]
    return {"input_ids": ids + a_ids, "labels": labels + a_ids}


def encode_rows(tokenizer: Any, task: TaskConfig, rows: list[dict], max_seq_len: int) -> list[dict]:
    """`encode_example` over rows; rows whose answer cannot fit are dropped, counted in one
    warning. Raises if every row is dropped."""
    out, dropped = [], 0
    for row in rows:
        try:
            out.append(encode_example(tokenizer, task, row, max_seq_len))
        except AnswerTooLongError:
            dropped += 1
    if dropped:
        log.warning(
            "task %s: dropped %d of %d rows whose answer exceeds max_seq_len=%d",
            task.name,
            dropped,
            len(rows),
            max_seq_len,
        )
    if rows and not out:
        raise ValueError(f"task {task.name!r}: no row fits in max_seq_len={max_seq_len}")
    return out
