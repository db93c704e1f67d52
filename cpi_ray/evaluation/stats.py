"""Sampling error of the scores: a task score is a mean over eval rows, a benchmark figure a mean
over seeds; both are reported with their standard error, and two figures whose difference is
within the standard error of that difference are a tie."""

from __future__ import annotations

import math
from typing import Sequence


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); the error is
    NaN for fewer than two values, where it cannot be estimated."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = math.fsum(values) / n
    if n < 2:
        return m, float("nan")
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of a − b over paired samples (the same seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    return mean_se([x - y for x, y in zip(a, b)])


def verdict(diff: float, se: float) -> str:
    """'win' or 'loss' when the difference exceeds its standard error, 'tie' within it, 'n/a'
    when the error is unknown (one sample decides nothing)."""
    if math.isnan(se):
        return "n/a"
    if abs(diff) <= se:
        return "tie"
    return "win" if diff > 0 else "loss"


def fmt_mean_se(m: float, se: float, digits: int = 1) -> str:
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"
