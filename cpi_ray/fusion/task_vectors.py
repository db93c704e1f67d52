"""Merges on task vectors, as pure functions on numpy chunks (no torch, no Ray).

Why they exist beside SLERP: fine-tunes of one base point in the same direction within SLERP's
threshold in every tensor (cos > 0.9995), so every spherical mean of base and task models is their
linear mean, and each task's update outside its core reaches the fused model at 1/(n+1) of its
size. These merges work on the updates themselves, the task vectors tau_t = theta_t - base:

- `task_arithmetic` (Ilharco et al., 2022): base + scale * sum_t tau_t.
- `ties` (Yadav et al., 2023): each tau_t trimmed to its `density` share of largest magnitudes
  (per tensor, over the elements the merge decides); per element the sign of sum_t tau_t is
  elected (>= 0 counts as +); the trimmed deltas that agree with it are averaged; base + scale *
  that average.

Conventions follow mergekit's `task_arithmetic` and `ties` (normalised, sign by sum). Everything is
element-wise except the trim threshold, which `TopKStream` finds exactly in two histogram passes
over the tensor, ties broken by flat index like the regions stage's top-k; so the output does not
depend on how a tensor is cut into chunks.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from cpi_ray.regions.topk import histogram_chunk, keys_of

METHODS = ("task_arithmetic", "ties")


def task_arithmetic(
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    scale: float,
    out: Optional[np.ndarray] = None,
    tmp: Optional[np.ndarray] = None,
) -> np.ndarray:
    """base + scale * sum_t (x_t - base), in the inputs' dtype; the deltas are summed in task order
    before scaling, so models equal to the base return the base bitwise."""
    dt = base.dtype.type
    out = np.empty_like(base) if out is None else out
    tmp = np.empty_like(base) if tmp is None else tmp
    out.fill(0)
    for x in xs:
        np.subtract(x, base, out=tmp)
        out += tmp
    out *= dt(scale)
    out += base
    return out


def magnitude_keys(
    x: np.ndarray, base: np.ndarray, decided: Optional[np.ndarray], out: np.ndarray
) -> np.ndarray:
    """int32 keys of |x - base| as float32 (they order like the magnitudes), -1 where the merge does
    not decide the element (`decided` False: a core element), so it is never selected or counted."""
    mag = np.abs(np.subtract(x, base, dtype=np.float32), dtype=np.float32)
    np.copyto(out, keys_of(mag))
    if decided is not None:
        np.copyto(out, np.int32(-1), where=~decided)
    return out


class TopKStream:
    """Exact top `density` share of a tensor's keys (>= 0; -1 = not a candidate), streamed in index
    order: the k-th key is named by a histogram of the top 16 bits, then of the low 15 bits of its
    bucket; `select` then marks, chunk by chunk, every key above it and the first keys equal to it
    until k are marked (ties by flat index). k = floor(density * candidates)."""

    def __init__(self, density: float):
        self.density = Fraction(repr(float(density)))
        self.top = np.zeros(1 << 16, dtype=np.int64)
        self.low: Optional[np.ndarray] = None
        self.k = 0
        self.prefix = -1
        self.key = -1
        self.quota = 0  # how many keys equal to `key` are still to take

    @property
    def all(self) -> bool:
        return self.density >= 1

    def add_top(self, keys: np.ndarray) -> None:
        self.top += histogram_chunk(keys[keys >= 0])

    def end_top(self) -> None:
        self.k = int(self.density * int(self.top.sum()))
        if self.k == 0:
            return
        above = np.cumsum(self.top[::-1])  # above[i]: keys in the top i+1 buckets
        i = int(np.searchsorted(above, self.k))
        self.prefix = len(self.top) - 1 - i
        self.above_prefix = int(above[i - 1]) if i else 0
        self.low = np.zeros(1 << 15, dtype=np.int64)

    def add_low(self, keys: np.ndarray) -> None:
        if self.low is not None:
            self.low += histogram_chunk(keys[keys >= 0], prefix=self.prefix)

    def end_low(self) -> None:
        if self.low is None:
            return
        need = self.k - self.above_prefix
        above = np.cumsum(self.low[::-1])
        i = int(np.searchsorted(above, need))
        self.key = (self.prefix << 15) | (len(self.low) - 1 - i)
        self.quota = need - (int(above[i - 1]) if i else 0)

    def select(self, keys: np.ndarray) -> np.ndarray:
        """The chunk's selected elements; call on consecutive chunks in index order."""
        if self.all:
            return keys >= 0
        if self.k == 0:
            return np.zeros(keys.shape, dtype=bool)
        sel = keys > self.key
        if self.quota:
            eq = np.flatnonzero(keys == self.key)[: self.quota]
            sel[eq] = True
            self.quota -= len(eq)
        return sel


def ties(
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    scale: float,
    kept: Optional[Sequence[Optional[np.ndarray]]] = None,
    out: Optional[np.ndarray] = None,
    deltas: Optional[Sequence[np.ndarray]] = None,
) -> np.ndarray:
    """TIES merge of one chunk: `kept[t]` marks the elements of tau_t that survive the trim (None:
    all). `deltas`: one scratch array per task."""
    dt = base.dtype.type
    n = len(xs)
    out = np.empty_like(base) if out is None else out
    ds = [np.empty_like(base) for _ in range(n)] if deltas is None else deltas
    for t, x in enumerate(xs):
        np.subtract(x, base, out=ds[t])
        if kept is not None and kept[t] is not None:
            np.copyto(ds[t], dt(0), where=~kept[t])
    out.fill(0)
    for d in ds:
        out += d
    positive = out >= 0
    out.fill(0)
    count = np.zeros(base.shape, dtype=base.dtype)
    for d in ds:
        agree = np.where(positive, d > 0, d < 0)  # a zero delta has no sign: it never agrees
        np.add(out, d, out=out, where=agree)
        count += agree
    np.divide(out, count, out=out, where=count > 0)
    out *= dt(scale)
    out += base
    return out
