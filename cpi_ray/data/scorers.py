"""Per-task scorers: `scorer(prediction, row) -> float in [0, 1]`.

`exact_match` compares the stripped prediction with the stripped answer, case-sensitively;
`numeric` compares the final numbers of the two (GSM8K style: the number after `####` when there
is one, else the last number; `1,000`, `1000.0` and `$1000` are equal); `reasoning_gym` asks
the generating dataset's own `score_answer(answer, entry)`; any other value `module:function`
names a callable with the same signature (e.g. `cpi_ray.data.scorers:exact_match_ignore_case`
or `cpi_ray.data.scorers:char_accuracy`), whose row holds the task's answer text under "answer"
whatever the task's format and fields.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional

from cpi_ray.config.schema import TaskConfig
from cpi_ray.data.tasks import answer_text

log = logging.getLogger("cpi_ray")

Scorer = Callable[[str, dict], float]


def exact_match_ignore_case(prediction: str, row: dict) -> float:
    return float(prediction.strip().casefold() == str(row["answer"]).strip().casefold())


def char_accuracy(prediction: str, row: dict) -> float:
    """Partial credit: characters equal at the same position over the longer of prediction and
    answer (both stripped). Shows a small model's progress long before exact matches do."""
    pred, ans = prediction.strip(), str(row["answer"]).strip()
    if not pred and not ans:
        return 1.0
    return sum(a == b for a, b in zip(pred, ans)) / max(len(pred), len(ans))


_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def final_number(text: str) -> Optional[Decimal]:
    """A text's final answer as a number: the number right after its last `####` if it has one
    (GSM8K's convention, lm-eval's strict match), else its last number (lm-eval's flexible
    extract); thousands separators ignored. None when there is no number."""
    marked = "####" in text
    found = _NUMBER.findall(text.rsplit("####", 1)[1] if marked else text)
    if not found:
        return None
    try:
        return Decimal((found[0] if marked else found[-1]).replace(",", ""))
    except InvalidOperation:  # e.g. "-," cannot be, but a stray pattern must cost the row only
        return None


def numeric_match(prediction: str, row: dict) -> float:
    pred, ans = final_number(prediction), final_number(str(row["answer"]))
    return float(pred is not None and ans is not None and pred == ans)


def get_scorer(task: TaskConfig) -> Scorer:
    if task.scorer == "exact_match":

        def score(prediction: str, row: dict) -> float:
            return float(prediction.strip() == answer_text(task, row))
    elif task.scorer == "numeric":

        def score(prediction: str, row: dict) -> float:
            return numeric_match(prediction, {"answer": answer_text(task, row)})
    elif task.scorer == "reasoning_gym":
        if task.reasoning_gym is None:
            raise ValueError(f"task {task.name!r}: scorer reasoning_gym needs a reasoning_gym source")
        src = task.reasoning_gym
        dataset = _rg_dataset(src.name, src.size, src.seed, json.dumps(src.options, sort_keys=True))

        def score(prediction: str, row: dict) -> float:
            try:
                return float(dataset.score_answer(prediction, row))
            except Exception as e:  # a malformed generation must cost the row, not the run
                log.debug("task %s: score_answer raised %r; scored 0", task.name, e)
                return 0.0
    else:
        module_name, _, fn_name = task.scorer.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task {task.name!r}: scorer {task.scorer!r} cannot be imported: {e}") from e
        if not callable(fn):
            raise ValueError(f"task {task.name!r}: scorer {task.scorer!r} is not callable")

        def score(prediction: str, row: dict) -> float:
            # The answer as the task defines it (answer_field may be nested or named otherwise).
            return float(fn(prediction, {**row, "answer": answer_text(task, row)}))

    return _checked(task.name, score)


def _checked(task_name: str, score: Scorer) -> Scorer:
    """A scorer outside [0, 1] is a bug in the scorer; fail loudly rather than skew averages."""

    @functools.wraps(score)
    def wrapped(prediction: str, row: dict) -> float:
        value = score(prediction, row)
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"task {task_name!r}: scorer returned {value}, outside [0, 1]")
        return value

    return wrapped


@functools.lru_cache(maxsize=32)
def _rg_dataset(name: str, size: int, seed: int, options_json: str):
    import reasoning_gym  # an optional extra (cpi-ray[demo])

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **json.loads(options_json))
