"""Prompt formatting and tokenization for SFT with the loss on answer tokens only.

Training and generation tokenize a prompt the same way (`prompt_ids`), so that what the model is
trained to continue is exactly what it is asked to continue at evaluation time.
"""

from __future__ import annotations

import logging
from typing import Any

from cpi_ray.config.schema import TaskConfig
from cpi_ray.data.tasks import answer_text, prompt_text

log = logging.getLogger("cpi_ray")

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip


class AnswerTooLongError(ValueError):
    """The answer plus EOS (plus one prompt token to predict it from) exceeds max_seq_len."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, task: TaskConfig, row: dict) -> str:
    """The text the model continues with its answer: the tokenizer's chat template (system prompt
    if the task has one, then the user turn, then the assistant header) where it has one, else
    `"{system}\\n\\n{prompt}\\n"` / `"{prompt}\\n"`."""
    prompt = prompt_text(task, row)
    if not has_chat_template(tokenizer):
        return f"{task.system_prompt}\n\n{prompt}\n" if task.system_prompt else f"{prompt}\n"
    messages = [{"role": "user", "content": prompt}]
    if task.system_prompt:
        try:
            return _apply(tokenizer, [{"role": "system", "content": task.system_prompt}, *messages])
        except Exception:  # some templates reject a system role: fold it into the user turn
            messages = [{"role": "user", "content": f"{task.system_prompt}\n\n{prompt}"}]
    return _apply(tokenizer, messages)


def _apply(tokenizer: Any, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"chat template returned {type(text).__name__}, expected str")
    return text


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
    """`{"input_ids": [...], "labels": [...]}`: prompt tokens then answer tokens then EOS; labels
    are IGNORE_INDEX on the prompt and the token ids on answer+EOS. Over `max_seq_len`, the prompt
    loses tokens from its left (the answer is what is learned); an answer that cannot fit with at
    least one prompt token before it raises AnswerTooLongError (the first position is never a
    prediction target, so the answer's first token needs a token to its left)."""
    p_ids = prompt_ids(tokenizer, format_prompt(tokenizer, task, row))
    a_ids = list(tokenizer(answer_text(task, row), add_special_tokens=False)["input_ids"])
    a_ids.append(eos_id(tokenizer))
    if not p_ids:
        raise ValueError(f"task {task.name!r}: a prompt tokenized to nothing")
    if len(a_ids) + 1 > max_seq_len:
        raise AnswerTooLongError(
            f"task {task.name!r}: answer of {len(a_ids)} tokens (with EOS) does not fit in"
            f" max_seq_len={max_seq_len}"
        )
    budget = max_seq_len - len(a_ids)
    if len(p_ids) > budget:
        p_ids = p_ids[len(p_ids) - budget:]
    return {"input_ids": p_ids + a_ids, "labels": [IGNORE_INDEX] * len(p_ids) + a_ids}


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
        log.warning("task %s: dropped %d of %d rows whose answer exceeds max_seq_len=%d",
                    task.name, dropped, len(rows), max_seq_len)
    if rows and not out:
        raise ValueError(f"task {task.name!r}: no row fits in max_seq_len={max_seq_len}")
    return out
