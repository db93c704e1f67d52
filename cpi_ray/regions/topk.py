"""Exact global top-k over streamed chunks, with memory independent of the number of elements.

Scores are >= 0 float32, so their IEEE-754 bit patterns, read as int32 *keys*, order exactly like
the values. The selection is the top k units by (key descending, global index ascending); with
weighted units (rows of several elements) it is the longest prefix of that ranking whose weight
is at most k.

Protocol (driver side in `TopKSolver`, chunk side in the `*_chunk` functions):

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
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

HIST_SHIFT = 15  # the stored histogram bins keys by their top 16 bits (sign, exponent, 7 mantissa)
HIST_BINS = 1 << (31 - HIST_SHIFT)
LOW_MASK = (1 << HIST_SHIFT) - 1
MAX_FINITE_KEY = 0x7F7FFFFF  # bit pattern of the largest finite float32


def core_size(p: float, total: int) -> int:
    """k = floor(p * D / 100), computed on the decimal value of p (1.1 means 11/10, not the
    nearest double), so that k never depends on float rounding."""
    return int(Fraction(repr(float(p))) * total // 100)


def keys_of(score: torch.Tensor) -> torch.Tensor:
    """int32 keys of a float32 score tensor (a view; the caller keeps the scores >= 0)."""
    if score.dtype != torch.float32:
        raise TypeError(f"scores must be float32, not {score.dtype}")
    return score.contiguous().view(torch.int32)


def key_to_float(key: int) -> float:
    return struct.unpack("<f", struct.pack("<i", int(key)))[0]


def float_to_key(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def all_finite(keys: torch.Tensor) -> bool:
    """True when every key is a finite, non-negative float (NaN and Inf keys exceed the largest
    finite key; a negative score or -0.0 has the sign bit set, a negative key)."""
    if keys.numel() == 0:
        return True
    lo, hi = torch.aminmax(keys)
    return int(lo) >= 0 and int(hi) <= MAX_FINITE_KEY


def unit_keys(score: torch.Tensor, unit_len: int) -> torch.Tensor:
    """Keys of the units of a flat float32 score: the elements themselves, or the mean of each
    row of `unit_len` elements (summed in float64 so that the value does not depend on how many
    rows are reduced together)."""
    if unit_len == 1:
        return keys_of(score)
    rows = score.view(-1, unit_len).to(torch.float64).sum(dim=1).div_(unit_len)
    return keys_of(rows.to(torch.float32))


# --------------------------------------------------------------------------- chunk side


def histogram_chunk(
    keys: torch.Tensor, weight: int = 1, prefix: Optional[int] = None, shift: int = HIST_SHIFT
) -> np.ndarray:
    """Weighted counts of keys by their bits above `shift` (prefix None), or, for keys whose bits
    above `shift` equal `prefix`, by their low `shift` bits."""
    if prefix is None:
        idx = keys >> shift
        bins = 1 << (31 - shift)
    else:
        sel = keys[(keys >> shift) == prefix]
        idx = sel & ((1 << shift) - 1)
        bins = 1 << shift
    h = torch.bincount(idx, minlength=bins).numpy().astype(np.int64)
    return h * weight if weight != 1 else h


@dataclass
class ScanResult:
    n_above: int  # units with key > hi
    above_bits: np.ndarray  # packed (big bit order) bool of key > hi, one bit per unit
    min_above: int  # smallest key above hi (MAX_FINITE_KEY + 1 when none)
    n_cand: int  # units with lo <= key <= hi
    cand_idx: Optional[np.ndarray]  # chunk-local unit indices (int64), None when over the cap
    cand_keys: Optional[np.ndarray]  # their keys (int32)
    hist: Optional[np.ndarray] = None  # dense 16-bit-prefix histogram (unit counts)
    n_zero: int = 0  # units with score exactly 0 (counted with the histogram)


_NONE_ABOVE = MAX_FINITE_KEY + 1


def scan_chunk(keys: torch.Tensor, lo: int, hi: int, cap: int, with_hist: bool = False) -> ScanResult:
    above = keys > hi
    n_above = int(above.sum())
    min_above = int(torch.where(above, keys, _NONE_ABOVE).amin()) if n_above else _NONE_ABOVE
    bits = np.packbits(above.numpy(), bitorder="big")
    inside = (keys >= lo) & ~above
    n_cand = int(inside.sum())
    cidx = ckeys = None
    if n_cand <= cap:
        nz = inside.nonzero().view(-1)
        cidx = nz.numpy().astype(np.int64)
        ckeys = keys[nz].numpy().astype(np.int32)
    hist = histogram_chunk(keys) if with_hist else None
    n_zero = int((keys == 0).sum()) if with_hist else 0
    return ScanResult(n_above, bits, min_above, n_cand, cidx, ckeys, hist, n_zero)


def quota_chunk(keys: torch.Tensor, value: int, quota: int) -> np.ndarray:
    """Packed bits of the units with key > value, plus the first `quota` units equal to it."""
    sel = keys > value
    if quota > 0:
        eq = (keys == value).nonzero().view(-1)[:quota]
        sel[eq] = True
    return np.packbits(sel.numpy(), bitorder="big")


# --------------------------------------------------------------------------- driver side


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
    twice `max_candidates` whatever the model size: past that, the pass counts as overflowing."""

    def __init__(self, chunks: Sequence[ChunkMeta], k: int, total: int, max_candidates: int):
        self.chunks = {c.idx: c for c in chunks}
        self.order = sorted(self.chunks)
        self.k = int(k)
        self.total = int(total)
        self.max_candidates = max(int(max_candidates), 1)
        self.done = False
        self.threshold_key: Optional[int] = None  # key of the last unit taken (None: k = 0)
        self.hist: Optional[np.ndarray] = None  # weighted 16-bit-prefix histogram, from pass 1
        self.passes: list[str] = []
        self.above_bits: dict[int, np.ndarray] = {}
        self.extra: dict[int, np.ndarray] = {}  # chunk idx -> local unit indices taken as ties
        self.request: Optional[ScanRequest] = None
        self._res: dict[int, object] = {}
        self._held = 0
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
        if isinstance(result, ScanResult) and result.cand_idx is not None:
            self._held += len(result.cand_idx)
            if self._held > 2 * self.max_candidates:
                result.cand_idx = result.cand_keys = None  # over budget: counts only
        self._res[idx] = result

    def end_pass(self) -> Optional[ScanRequest]:
        req, res = self.request, self._res
        assert req is not None and not self.done
        missing = set(self.order) - set(res)
        if missing:
            raise RuntimeError(f"pass {req.kind} lost the results of chunks {sorted(missing)[:5]}")
        self._res, self._held = {}, 0
        self.passes.append(req.kind)
        if req.kind == "scan":
            return self._after_scan(req, res)
        if req.kind == "hist":
            return self._after_hist(req, res)
        self.above_bits = {i: res[i] for i in self.order}
        self.threshold_key = req.value
        self.extra = {}
        return self._finish()

    def feed(self, results: dict) -> Optional[ScanRequest]:
        for i, r in results.items():
            self.add(i, r)
        return self.end_pass()

    def _after_scan(self, req: ScanRequest, res: dict) -> Optional[ScanRequest]:
        if req.with_hist:
            h = np.zeros(HIST_BINS, dtype=np.int64)
            for i in self.order:
                h += res[i].hist * self.chunks[i].unit_len
            self.hist = h
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

    def _after_hist(self, req: ScanRequest, res: dict) -> ScanRequest:
        h = np.zeros(1 << HIST_SHIFT, dtype=np.int64)
        for i in self.order:
            h += res[i]
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
        """The final bool mask (one entry per unit) of one chunk."""
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


def run_request(req: ScanRequest, key_blocks: Iterable[torch.Tensor], unit_len: int, cap: int, idx: int):
    """What one chunk computes for a request, from its unit keys given as consecutive blocks
    (each a multiple of 8 units but the last, so packed bits concatenate). Shared by the
    in-memory driver and the Ray UDF, which streams a chunk block by block."""
    key_blocks = _aligned(key_blocks)
    if req.kind == "hist":
        h = np.zeros(1 << HIST_SHIFT, dtype=np.int64)
        for kb in key_blocks:
            h += histogram_chunk(kb, unit_len, prefix=req.prefix)
        return h
    if req.kind == "quota":
        q = req.quotas.get(idx, 0)
        parts = []
        for kb in key_blocks:
            sel = kb > req.value
            if q > 0:
                eq = (kb == req.value).nonzero().view(-1)[:q]
                sel[eq] = True
                q -= len(eq)
            parts.append(_pack_block(sel))
        return np.concatenate(parts) if parts else np.empty(0, np.uint8)
    n_above = n_cand = off = n_zero = 0
    min_above = _NONE_ABOVE
    bits, ci, ck = [], [], []
    hist = np.zeros(HIST_BINS, dtype=np.int64) if req.with_hist else None
    over = False
    for kb in key_blocks:
        r = scan_chunk(kb, req.lo, req.hi, -1 if over else cap - n_cand, req.with_hist)
        n_above += r.n_above
        min_above = min(min_above, r.min_above)
        bits.append(r.above_bits)
        n_cand += r.n_cand
        if r.cand_idx is None:
            over = True
            ci, ck = [], []
        elif not over:
            ci.append(r.cand_idx + off)
            ck.append(r.cand_keys)
        if hist is not None:
            hist += r.hist
        n_zero += r.n_zero
        off += kb.numel()
    cat = np.concatenate
    return ScanResult(
        n_above,
        cat(bits) if bits else np.empty(0, np.uint8),
        min_above,
        n_cand,
        None if over else (cat(ci) if ci else np.empty(0, np.int64)),
        None if over else (cat(ck) if ck else np.empty(0, np.int32)),
        hist,
        n_zero,
    )


def _pack_block(sel: torch.Tensor) -> np.ndarray:
    return np.packbits(sel.numpy(), bitorder="big")


def _aligned(blocks: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Pass blocks through, refusing a block after one that does not fill its last byte (packed
    bits of blocks concatenate only when every block but the last is a multiple of 8 units)."""
    partial = False
    for b in blocks:
        if partial:
            raise ValueError("only the last block of a chunk may hold a non-multiple of 8 units")
        partial = b.numel() % 8 != 0
        yield b


def run_in_memory(
    unit_keys_per_chunk: Sequence[torch.Tensor],
    unit_lens: Sequence[int],
    k: int,
    max_candidates: int = 1 << 21,
    sample: Optional[np.ndarray] = None,
    block_units: int = 0,
) -> tuple[list[np.ndarray], TopKSolver]:
    """Run the streaming protocol over in-memory chunks (the reference the Ray passes follow,
    and what the tests exercise). `sample` (indices into the concatenated units) overrides the
    default sample. Returns one bool unit mask per chunk and the solver."""
    metas, off = [], 0
    for i, (kk, L) in enumerate(zip(unit_keys_per_chunk, unit_lens)):
        metas.append(ChunkMeta(i, kk.numel(), L, off))
        off += kk.numel()
    total = sum(m.units * m.unit_len for m in metas)
    solver = TopKSolver(metas, k, total, max_candidates)
    allk = torch.cat([kk.reshape(-1) for kk in unit_keys_per_chunk]).numpy()
    allw = np.concatenate([np.full(m.units, m.unit_len) for m in metas])
    if sample is None:
        sample = np.arange(0, len(allk), max(1, len(allk) // 4096))
    req = solver.start(allk[sample], allw[sample])
    while req is not None:
        for m, kk in zip(metas, unit_keys_per_chunk):
            blocks = kk.split(block_units) if block_units else [kk]
            solver.add(m.idx, run_request(req, blocks, m.unit_len, solver.cap(m.idx), m.idx))
        req = solver.end_pass()
    return [solver.unit_mask(m.idx) for m in metas], solver


def reference_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Plain exact top-k of a flat score vector with the flat-index tie-break (independent of
    the streaming protocol): sort by (score descending, index ascending), keep the first k."""
    s = scores.reshape(-1).numpy()
    order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))
    mask = np.zeros(len(s), dtype=bool)
    mask[order[:k]] = True
    return torch.from_numpy(mask)
