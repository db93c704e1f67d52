"""Exact global top-k over streamed chunks, with memory independent of the number of elements.

Scores are >= 0 float32, so their IEEE-754 bit patterns, read as int32 *keys*, order exactly like
the values. The selection is the top k units by (key descending, global index ascending); with
weighted units (rows of several elements) it is the longest prefix of that ranking whose weight
is at most k.

Protocol (driver side in `TopKSolver`, chunk side in `ChunkRun`):

1. A small sample of keys, read by the driver, brackets the k-th key in an interval [lo, hi].
2. One streaming *scan* pass: each chunk returns the packed bits of its units above `hi`, the
   units inside [lo, hi] as candidates (index, key) unless there are more than its share of the
   candidate budget, and a 16-bit-prefix histogram of its keys. If the weight above `hi` is at
   most k and the candidates reach k, the driver sorts the candidates and is done: exact, in one
   pass.
3. Otherwise (a poor sample, or a flood of equal keys), the histogram names the exact bucket of
   the k-th key; a scan of that bucket, and if it still holds too many candidates a histogram of
   the low 15 bits and a scan of the single key value, narrow it down. When one key value holds
   more units than the budget, a *quota* pass takes, chunk by chunk in global order, as many of
   its units as the per-chunk counts allow.

Every step is exact; the sample only decides how much work is left after the first pass.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

HIST_SHIFT = 15  # the stored histogram bins keys by their top 16 bits (sign, exponent, 7 mantissa)
HIST_BINS = 1 << (31 - HIST_SHIFT)
LOW_MASK = (1 << HIST_SHIFT) - 1
MAX_FINITE_KEY = 0x7F7FFFFF  # bit pattern of the largest finite float32


def core_size(p: float, total: int) -> int:
    """k = floor(p * D / 100), computed on the decimal value of p (1.1 means 11/10, not the
    nearest double), so that k never depends on float rounding."""
    return int(Fraction(repr(float(p))) * total // 100)


def keys_of(score: np.ndarray) -> np.ndarray:
    """int32 keys of a float32 score array (a view; the caller keeps the scores >= 0)."""
    score = np.asarray(score)
    if score.dtype != np.float32:
        raise TypeError(f"scores must be float32, not {score.dtype}")
    return np.ascontiguousarray(score).view(np.int32)


def key_to_float(key: int) -> float:
    return struct.unpack("<f", struct.pack("<i", int(key)))[0]


def float_to_key(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def all_finite(keys: np.ndarray) -> bool:
    """True when every key is a finite, non-negative float (NaN and Inf keys exceed the largest
    finite key; a negative score or -0.0 has the sign bit set, a negative key)."""
    if keys.size == 0:
        return True
    return int(keys.min()) >= 0 and int(keys.max()) <= MAX_FINITE_KEY


def unit_keys(score: np.ndarray, unit_len: int) -> np.ndarray:
    """Keys of the units of a flat float32 score: the elements themselves, or the mean of each
    row of `unit_len` elements (summed in float64 so that the value does not depend on how many
    rows are reduced together)."""
    if unit_len == 1:
        return keys_of(score)
    rows = np.asarray(score).reshape(-1, unit_len).sum(axis=1, dtype=np.float64)
    rows /= unit_len
    return keys_of(rows.astype(np.float32))


# --------------------------------------------------------------------------- chunk side
# numpy on int32 keys: np.count_nonzero / packbits / flatnonzero cost a fraction of a pass (a
# torch bool `.sum()` cost several passes).


def as_keys(keys) -> np.ndarray:
    """int32 keys as a numpy array."""
    k = np.asarray(keys)
    if k.dtype != np.int32:
        raise TypeError(f"keys must be int32, not {k.dtype}")
    return k


def histogram_chunk(
    keys, weight: int = 1, prefix: Optional[int] = None, shift: int = HIST_SHIFT
) -> np.ndarray:
    """Weighted counts of keys by their bits above `shift` (prefix None), or, for keys whose bits
    above `shift` equal `prefix`, by their low `shift` bits."""
    k = as_keys(keys)
    low = (1 << shift) - 1
    if prefix is None:
        idx = k >> shift
        bins = 1 << (31 - shift)
    else:
        sel = k[(k >= prefix << shift) & (k <= (prefix << shift) | low)]
        idx = sel & low
        bins = 1 << shift
    h = np.bincount(idx, minlength=bins).astype(np.int64, copy=False)
    return h * weight if weight != 1 else h


@dataclass
class ScanResult:
    n_above: int  # units with key > hi
    above_bits: Optional[np.ndarray]  # packed (big bit order) bool of key > hi, one bit per unit
    min_above: int  # smallest key above hi (MAX_FINITE_KEY + 1 when none)
    n_cand: int  # units with lo <= key <= hi
    cand_idx: Optional[np.ndarray]  # chunk-local unit indices (int64), None when over the cap
    cand_keys: Optional[np.ndarray]  # their keys (int32)
    hist: Optional[np.ndarray] = None  # dense 16-bit-prefix histogram (unit counts)
    n_zero: int = 0  # units with score exactly 0 (counted with the histogram)


_NONE_ABOVE = MAX_FINITE_KEY + 1


class ChunkRun:
    """What one chunk computes for a request, fed the chunk's unit keys block by block (each block
    a multiple of 8 units but the last, so that packed bits concatenate). Shared by the in-memory
    driver and the Ray UDF, which streams a chunk block by block for every task at once."""

    def __init__(self, req: "ScanRequest", cap: int, idx: int, unit_len: int = 1):
        self.req, self.cap, self.idx, self.unit_len = req, cap, idx, unit_len
        self.partial = False
        self.off = 0
        self.bits: list[np.ndarray] = []
        if req.kind == "hist":
            self.hist = np.zeros(1 << HIST_SHIFT, dtype=np.int64)
        elif req.kind == "quota":
            self.quota = req.quotas.get(idx, 0)
        else:
            self.n_above = self.n_cand = self.n_zero = 0
            self.min_above = _NONE_ABOVE
            self.ci: list[np.ndarray] = []
            self.ck: list[np.ndarray] = []
            self.over = False
            self.hist = np.zeros(HIST_BINS, dtype=np.int64) if req.with_hist else None

    def add(self, keys) -> None:
        if self.partial:
            raise ValueError("only the last block of a chunk may hold a non-multiple of 8 units")
        k = as_keys(keys)
        self.partial = k.size % 8 != 0
        req = self.req
        if req.kind == "hist":
            self.hist += histogram_chunk(k, self.unit_len, prefix=req.prefix)
        elif req.kind == "quota":
            sel = k > req.value
            if self.quota > 0:
                eq = np.flatnonzero(k == req.value)[: self.quota]
                sel[eq] = True
                self.quota -= len(eq)
            self.bits.append(np.packbits(sel, bitorder="big"))
        else:
            self._scan(k, req)
        self.off += k.size

    def _scan(self, k: np.ndarray, req: "ScanRequest") -> None:
        above = k > req.hi
        n_above = int(np.count_nonzero(above))
        self.n_above += n_above
        if n_above:
            self.min_above = min(self.min_above, int(k[above].min()))
        self.bits.append(np.packbits(above, bitorder="big"))
        if req.lo <= req.hi:
            inside = k >= req.lo
            if req.lo <= req.hi + 1:
                np.logical_xor(inside, above, out=inside)  # above is a subset of inside here
            else:
                inside &= ~above
            n_cand = int(np.count_nonzero(inside))
            self.n_cand += n_cand
            if self.n_cand > self.cap:
                self.over = True
                self.ci, self.ck = [], []
            elif n_cand and not self.over:
                i = np.flatnonzero(inside)
                self.ci.append(i + self.off)
                self.ck.append(k[i])
        if self.hist is not None:
            self.hist += histogram_chunk(k)
            self.n_zero += k.size - int(np.count_nonzero(k))

    def result(self):
        cat = np.concatenate
        bits = cat(self.bits) if self.bits else np.empty(0, np.uint8)
        if self.req.kind == "hist":
            return self.hist
        if self.req.kind == "quota":
            return bits
        return ScanResult(
            self.n_above,
            bits,
            self.min_above,
            self.n_cand,
            None if self.over else (cat(self.ci).astype(np.int64) if self.ci else np.empty(0, np.int64)),
            None if self.over else (cat(self.ck) if self.ck else np.empty(0, np.int32)),
            self.hist,
            self.n_zero,
        )


# --------------------------------------------------------------------------- driver side


def _add_hist(acc: Optional[np.ndarray], bins: int, hist, weight: int) -> np.ndarray:
    """acc + weight * hist, for a dense histogram or a sparse (bins, counts) pair."""
    if acc is None:
        acc = np.zeros(bins, dtype=np.int64)
    if isinstance(hist, tuple):
        nz, c = hist
        acc[nz] += np.asarray(c, dtype=np.int64) * weight  # bins are distinct
    else:
        acc += np.asarray(hist, dtype=np.int64) * weight
    return acc


@dataclass
class ScanRequest:
    kind: str  # "scan" | "hist" | "quota"
    lo: int = 0
    hi: int = 0
    with_hist: bool = False
    prefix: int = 0  # hist: the 16-bit bucket whose low bits are counted
    value: int = 0  # quota: the key value shared by the ties
    quotas: dict[int, int] = field(default_factory=dict)  # quota: chunk idx -> units to take


@dataclass
class ChunkMeta:
    idx: int
    units: int
    unit_len: int  # the weight of each unit, in elements
    unit_offset: int


def sample_interval(
    sample_keys: np.ndarray, sample_weights: np.ndarray, k: int, total: int, max_candidates: int
) -> tuple[int, int]:
    """[lo, hi] around the estimated k-th key of a sample, wide enough to expect about a quarter
    of the candidate budget (and at least a few standard errors of the sample quantile)."""
    n = len(sample_keys)
    if n == 0 or k <= 0 or k >= total:
        return 0, MAX_FINITE_KEY
    order = np.argsort(-sample_keys.astype(np.int64), kind="stable")
    sk = sample_keys[order].astype(np.int64)
    cw = np.cumsum(sample_weights[order].astype(np.float64))
    wtot = cw[-1]
    q = k / total
    half = max(
        0.25 * max_candidates / max(total, 1),  # budget share (fraction of the weight)
        6 * math.sqrt(q * (1 - q) / n) + 16 / n,
    )
    i_hi = int(np.searchsorted(cw, (q - half) * wtot, side="left"))
    i_lo = int(np.searchsorted(cw, (q + half) * wtot, side="left"))
    hi = MAX_FINITE_KEY if q - half <= 0 else int(sk[min(i_hi, n - 1)])
    lo = 0 if i_lo >= n else int(sk[i_lo])
    return min(lo, hi), hi


class TopKSolver:
    """Driver-side state of one exact top-k. Each pass: `request` says what the chunks compute,
    `add(idx, result)` takes each chunk's result as it streams in, `end_pass()` decides the next
    request (None when the selection is known). Candidates kept in memory never exceed about
    twice `max_candidates` whatever the model size: past that, the pass counts as overflowing.

    `sink(idx, bits)`, when given, takes each chunk's packed unit bits (of units above the
    threshold) as they arrive, instead of the solver holding them: every pass that has bits
    has them for every chunk, so the last pass's bits plus `extra` are the selection."""

    def __init__(
        self,
        chunks: Sequence[ChunkMeta],
        k: int,
        total: int,
        max_candidates: int,
        sink: Optional[Callable[[int, np.ndarray], None]] = None,
    ):
        self.chunks = {c.idx: c for c in chunks}
        self.order = sorted(self.chunks)
        self.k = int(k)
        self.total = int(total)
        self.max_candidates = max(int(max_candidates), 1)
        self.sink = sink
        self.done = False
        self.threshold_key: Optional[int] = None  # key of the last unit taken (None: k = 0)
        self.hist: Optional[np.ndarray] = None  # weighted 16-bit-prefix histogram, from pass 1
        self.passes: list[str] = []
        self.above_bits: dict[int, np.ndarray] = {}
        self.extra: dict[int, np.ndarray] = {}  # chunk idx -> local unit indices taken as ties
        self.request: Optional[ScanRequest] = None
        self._res: dict[int, object] = {}
        self._held = 0
        self._pass_hist: Optional[np.ndarray] = None
        if self.k <= 0:
            # nothing to rank: still one scan, for the histogram and the finiteness check
            self.request = ScanRequest("scan", lo=_NONE_ABOVE, hi=MAX_FINITE_KEY, with_hist=True)
        elif self.k >= self.total:
            self.request = ScanRequest("scan", lo=0, hi=-1, with_hist=True)

    @property
    def trivial(self) -> bool:
        return self.k <= 0 or self.k >= self.total

    def cap(self, idx: int) -> int:
        return self.max_candidates

    def start(self, sample_keys: np.ndarray, sample_weights: np.ndarray) -> ScanRequest:
        if self.request is None:
            lo, hi = sample_interval(sample_keys, sample_weights, self.k, self.total, self.max_candidates)
            self.request = ScanRequest("scan", lo=lo, hi=hi, with_hist=True)
        return self.request

    # -- feeding results

    def add(self, idx: int, result) -> None:
        if self.sink is not None and self.request is not None and self.request.kind != "hist":
            if isinstance(result, ScanResult):
                self.sink(idx, result.above_bits)
                result.above_bits = None
            else:  # quota: the bits alone
                self.sink(idx, result)
                result = None
        # histograms are summed as they arrive: one per chunk would grow with the model
        if isinstance(result, ScanResult) and result.hist is not None:
            self._pass_hist = _add_hist(self._pass_hist, HIST_BINS, result.hist, self.chunks[idx].unit_len)
            result.hist = None
        elif self.request is not None and self.request.kind == "hist":
            self._pass_hist = _add_hist(self._pass_hist, 1 << HIST_SHIFT, result, 1)  # weighted already
            result = None
        self._res[idx] = result

    def end_pass(self) -> Optional[ScanRequest]:
        req, res = self.request, self._res
        assert req is not None and not self.done
        missing = set(self.order) - set(res)
        if missing:
            raise RuntimeError(f"pass {req.kind} lost the results of chunks {sorted(missing)[:5]}")
        self._res, self._held = {}, 0
        self._pass_hist, pass_hist = None, self._pass_hist
        self.passes.append(req.kind)
        if req.kind == "scan":
            return self._after_scan(req, res, pass_hist)
        if req.kind == "hist":
            return self._after_hist(req, pass_hist)
        self.above_bits = {i: res[i] for i in self.order}
        self.threshold_key = req.value
        self.extra = {}
        return self._finish()

    def feed(self, results: dict) -> Optional[ScanRequest]:
        for i, r in results.items():
            self.add(i, r)
        return self.end_pass()

    def _after_scan(
        self, req: ScanRequest, res: dict, pass_hist: Optional[np.ndarray]
    ) -> Optional[ScanRequest]:
        if req.with_hist:
            self.hist = pass_hist if pass_hist is not None else np.zeros(HIST_BINS, dtype=np.int64)
        min_above = min((res[i].min_above for i in self.order), default=_NONE_ABOVE)
        if self.trivial:
            self.above_bits = {i: res[i].above_bits for i in self.order}
            self.threshold_key = None if self.k <= 0 or min_above == _NONE_ABOVE else min_above
            return self._finish()
        a = sum(res[i].n_above * self.chunks[i].unit_len for i in self.order)
        need = self.k - a
        if need >= 0:
            overflow = any(res[i].cand_idx is None for i in self.order)
            cw = sum(res[i].n_cand * self.chunks[i].unit_len for i in self.order)
            if need == 0 or (not overflow and (cw >= need or req.lo == 0)):
                self._resolve(res, need, min_above)
                return self._finish()
            if overflow and req.lo == req.hi:
                # one key value with more units than the budget: take them in global order
                counts = {i: res[i].n_cand for i in self.order}
                return self._set(ScanRequest("quota", value=req.lo, quotas=self._quotas(counts, need)))
        if req.with_hist:
            # the common flood of ties is exact zeros (untouched weights): when every non-zero
            # unit fits in k, the rest are zeros taken in global order, without narrowing down
            zero_w = sum(res[i].n_zero * self.chunks[i].unit_len for i in self.order)
            if self.total - zero_w <= self.k:
                counts = {i: res[i].n_zero for i in self.order}
                need = self.k - (self.total - zero_w)
                return self._set(ScanRequest("quota", value=0, quotas=self._quotas(counts, need)))
        # the interval missed (or overflowed): narrow down from the histogram
        b, _ = self._bucket(self.hist, self.k)
        lo_b, hi_b = b << HIST_SHIFT, (b << HIST_SHIFT) | LOW_MASK
        if req.lo <= lo_b and req.hi >= hi_b:
            return self._set(ScanRequest("hist", prefix=b))  # the whole bucket overflowed
        return self._set(ScanRequest("scan", lo=lo_b, hi=hi_b))

    def _after_hist(self, req: ScanRequest, pass_hist: Optional[np.ndarray]) -> ScanRequest:
        h = pass_hist if pass_hist is not None else np.zeros(1 << HIST_SHIFT, dtype=np.int64)
        _, above_prefix = self._bucket(self.hist, self.k)
        low, _ = self._bucket(h, self.k - above_prefix)
        v = (req.prefix << HIST_SHIFT) | low
        return self._set(ScanRequest("scan", lo=v, hi=v))

    def _set(self, req: ScanRequest) -> ScanRequest:
        self.request = req
        return req

    def _finish(self) -> None:
        self.done = True
        self.request = None
        return None

    @staticmethod
    def _bucket(hist: np.ndarray, k: int) -> tuple[int, int]:
        """The bin (from the top) where the cumulative weight first exceeds k, and the weight of
        the bins above it."""
        rev = np.cumsum(hist[::-1])
        j = min(int(np.searchsorted(rev, k, side="right")), len(hist) - 1)
        above = int(rev[j - 1]) if j > 0 else 0
        return len(hist) - 1 - j, above

    def _resolve(self, res: dict, need: int, min_above: int) -> None:
        self.above_bits = {i: res[i].above_bits for i in self.order}
        self.extra = {}
        self.threshold_key = min_above if min_above != _NONE_ABOVE else None
        if need == 0:
            return
        gidx, keys, w, src, loc = [], [], [], [], []
        for i in self.order:
            r = res[i]
            if r.cand_idx is None or not len(r.cand_idx):
                continue
            c = self.chunks[i]
            gidx.append(r.cand_idx + c.unit_offset)
            keys.append(r.cand_keys.astype(np.int64))
            w.append(np.full(len(r.cand_idx), c.unit_len, dtype=np.int64))
            src.append(np.full(len(r.cand_idx), i, dtype=np.int64))
            loc.append(r.cand_idx)
        if not gidx:
            return
        gidx, keys, w = np.concatenate(gidx), np.concatenate(keys), np.concatenate(w)
        src, loc = np.concatenate(src), np.concatenate(loc)
        order = np.lexsort((gidx, -keys))  # key descending, then global index ascending
        n = int(np.searchsorted(np.cumsum(w[order]), need, side="right"))  # prefix weight <= need
        take = order[:n]
        if n:
            self.threshold_key = int(keys[take[-1]])
        for i in np.unique(src[take]):
            self.extra[int(i)] = np.sort(loc[take][src[take] == i])

    def _quotas(self, counts: dict[int, int], need: int) -> dict[int, int]:
        """Per chunk, how many of its tied units to take: the prefix of the ties in global
        order whose weight fits in `need`."""
        q: dict[int, int] = {}
        for i in self.order:
            c = self.chunks[i]
            n = counts[i]
            t = min(n, need // c.unit_len)
            q[i] = t
            need -= t * c.unit_len
            if t < n:  # the prefix stops here: nothing after it is taken
                break
        return q

    def unit_mask(self, idx: int) -> np.ndarray:
        """The final bool mask (one entry per unit) of one chunk (without a sink)."""
        c = self.chunks[idx]
        m = np.unpackbits(self.above_bits[idx], count=c.units, bitorder="big").astype(bool)
        ex = self.extra.get(idx)
        if ex is not None:
            m[ex] = True
        return m

    @property
    def threshold(self) -> Optional[float]:
        """The score of the last unit taken (the k-th largest, for element granularity)."""
        return None if self.threshold_key is None else key_to_float(self.threshold_key)


# --------------------------------------------------------------------------- in-memory drivers


def run_request(req: ScanRequest, key_blocks: Iterable, unit_len: int, cap: int, idx: int):
    """What one chunk computes for a request, from its unit keys given as consecutive blocks."""
    run = ChunkRun(req, cap, idx, unit_len)
    for kb in key_blocks:
        run.add(kb)
    return run.result()


def run_in_memory(
    unit_keys_per_chunk: Sequence[np.ndarray],
    unit_lens: Sequence[int],
    k: int,
    max_candidates: int = 1 << 21,
    sample: Optional[np.ndarray] = None,
    block_units: int = 0,
) -> tuple[list[np.ndarray], TopKSolver]:
    """Run the streaming protocol over in-memory chunks (the reference the Ray passes follow,
    and what the tests exercise). `sample` (indices into the concatenated units) overrides the
    default sample. Returns one bool unit mask per chunk and the solver."""
    unit_keys_per_chunk = [as_keys(kk).reshape(-1) for kk in unit_keys_per_chunk]
    metas, off = [], 0
    for i, (kk, L) in enumerate(zip(unit_keys_per_chunk, unit_lens)):
        metas.append(ChunkMeta(i, kk.size, L, off))
        off += kk.size
    total = sum(m.units * m.unit_len for m in metas)
    solver = TopKSolver(metas, k, total, max_candidates)
    allk = np.concatenate(unit_keys_per_chunk)
    allw = np.concatenate([np.full(m.units, m.unit_len) for m in metas])
    if sample is None:
        sample = np.arange(0, len(allk), max(1, len(allk) // 4096))
    req = solver.start(allk[sample], allw[sample])
    while req is not None:
        for m, kk in zip(metas, unit_keys_per_chunk):
            step = block_units or max(kk.size, 1)
            blocks = [kk[a : a + step] for a in range(0, kk.size, step)] or [kk]
            solver.add(m.idx, run_request(req, blocks, m.unit_len, solver.cap(m.idx), m.idx))
        req = solver.end_pass()
    return [solver.unit_mask(m.idx) for m in metas], solver


def reference_topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Plain exact top-k of a flat score vector with the flat-index tie-break (independent of
    the streaming protocol): sort by (score descending, index ascending), keep the first k."""
    s = np.asarray(scores).reshape(-1)
    order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))
    mask = np.zeros(len(s), dtype=bool)
    mask[order[:k]] = True
    return mask
