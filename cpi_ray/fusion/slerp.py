"""The fusion math as pure functions on numpy arrays (no torch, no Ray).

Every merge the stage does is a linear combination of the input vectors: SLERP of two vectors
is s0*a + s1*b, a fold of SLERPs stays a combination of the originals, and so does a
tangent-space mean on the sphere. The coefficients depend only on the Gram matrix G[i, j] =
<x_i, x_j> of the inputs over the non-core elements of a tensor. So a tensor of any size is
merged in two streaming passes: (1) reduce G in float64, per fixed block of BLOCK elements, the
block sums combined in block order; (2) apply the coefficients chunk by chunk. Because block
boundaries and the reduction order never depend on how the tensor is cut into chunks, the output
is bitwise the same for any chunk size and any number of workers.

Conventions follow mergekit's `slerp`: cos(Omega) between a/|a| and b/|b|, plain lerp when
|cos(Omega)| > 1 - eps (eps = 5e-4 is mergekit's 0.9995 threshold).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

# Elements per reduction block. Part of the numerics: changing it changes output bits.
BLOCK = 1024
DEFAULT_EPS = 5e-4


# ------------------------------------------------------------------ coefficients from a Gram


def _lerp_or_slerp(nn: float, nk: float, dot: float, omega: float, eps: float) -> tuple[float, float]:
    """(s0, s1) so that s0*a + s1*b = slerp(a, b, omega), given |a|^2, |b|^2 and <a, b>."""
    if nn <= 0.0 or nk <= 0.0:
        return 1.0 - omega, omega  # a zero vector has no direction: interpolate linearly
    cos = dot / math.sqrt(nn * nk)
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 1.0 - eps:
        return 1.0 - omega, omega
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1.0 - omega) * theta) / s, math.sin(omega * theta) / s


def slerp_coefficients(gram: np.ndarray, omega: float, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Coefficients (s0, s1) of slerp(x0, x1, omega) from the 2x2 Gram matrix."""
    g = np.asarray(gram, dtype=np.float64)
    return np.array(_lerp_or_slerp(float(g[0, 0]), float(g[1, 1]), float(g[0, 1]), omega, eps))


def fold_coefficients(gram: np.ndarray, omegas: Sequence[float], eps: float = DEFAULT_EPS) -> np.ndarray:
    """Coefficients w with sum_i w_i x_i = the fold theta <- slerp(theta, x_k, omegas[k-1]),
    k = 1..n-1, starting from theta = x_0.

    With omegas[k-1] = 1/(k+1) this is the running spherical mean. Plain Python floats in a fixed
    order, so every worker gets the same bits.
    """
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    if len(omegas) != n - 1:
        raise ValueError(f"{n} vectors need {n - 1} fold weights, got {len(omegas)}")
    w = [0.0] * n
    w[0] = 1.0
    for k in range(1, n):
        nn = 0.0
        for i in range(k):
            for j in range(k):
                nn += w[i] * w[j] * float(g[i, j])
        dot = 0.0
        for i in range(k):
            dot += w[i] * float(g[i, k])
        s0, s1 = _lerp_or_slerp(nn, float(g[k, k]), dot, float(omegas[k - 1]), eps)
        w = [s0 * v for v in w]
        w[k] += s1
    return np.array(w)


def running_mean_omegas(n: int) -> list[float]:
    """Fold weights of the running spherical mean of n vectors: 1/2, 1/3, ..., 1/n."""
    return [1.0 / (k + 1) for k in range(1, n)]


def multislerp_coefficients(
    gram: np.ndarray, weights: Sequence[float], eps: float = DEFAULT_EPS
) -> np.ndarray:
    """Coefficients of a weighted mean on the sphere: the inputs' directions are mapped to the
    tangent space at their normalized weighted Euclidean mean (log map), averaged there, mapped
    back (exp map), and the result is scaled to the weighted mean of the input norms.

    For two vectors of equal norm and equal weights this is slerp(a, b, 1/2). Falls back to the
    weighted linear mean when an input is zero or all directions agree to within eps.
    """
    g = np.asarray(gram, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    if np.any(norms <= 0.0):
        return w.copy()
    u = g / np.outer(norms, norms)  # Gram of the unit directions
    if np.all(np.abs(u) > 1.0 - eps):
        return w.copy()
    m2 = float(w @ u @ w)  # |sum_i w_i u_i|^2
    if m2 <= eps * eps:
        return w.copy()  # directions cancel out: no meaningful mean direction
    m = math.sqrt(m2)
    # p = sum_i w_i u_i / m. cos(theta_i) = <u_i, p>
    cos = np.clip((u @ w) / m, -1.0, 1.0)
    theta = np.arccos(cos)
    f = np.where(theta > 1e-12, theta / np.where(theta > 1e-12, np.sin(theta), 1.0), 1.0)
    # v = sum_i w_i f_i (u_i - cos_i p) = sum_i a_i u_i
    a = w * f - float(np.sum(w * f * cos)) * w / m
    v2 = max(float(a @ u @ a), 0.0)
    vn = math.sqrt(v2)
    sinc = math.sin(vn) / vn if vn > 1e-12 else 1.0
    b = math.cos(vn) * w / m + sinc * a  # q = cos|v| p + sin|v|/|v| v, in the u basis
    scale = float(np.sum(w * norms))
    return b * scale / norms


# ------------------------------------------------------------------ the two passes


def pair_index(n: int) -> list[tuple[int, int]]:
    """Upper-triangle pairs (i <= j) in the fixed order the Gram partials are stored in."""
    return [(i, j) for i in range(n) for j in range(i, n)]


def block_gram(xs: Sequence[np.ndarray], block: int = BLOCK) -> np.ndarray:
    """Per-block Gram partials of float64 vectors of equal length: array (nblocks, npairs).

    The vectors must start on a block boundary of the tensor; the last block may be short.
    Each block is reduced on its own (same length, same order, whatever the chunking).
    """
    n = len(xs)
    size = xs[0].shape[0]
    full = size // block
    tail = size - full * block
    pairs = pair_index(n)
    out = np.empty((full + (1 if tail else 0), len(pairs)), dtype=np.float64)
    for p, (i, j) in enumerate(pairs):
        if full:
            out[:full, p] = np.einsum(
                "ij,ij->i",
                xs[i][: full * block].reshape(full, block),
                xs[j][: full * block].reshape(full, block),
            )
        if tail:
            out[full, p] = np.einsum("i,i->", xs[i][full * block :], xs[j][full * block :])
    return out


def gram_from_partials(partials: np.ndarray, n: int) -> np.ndarray:
    """Sum the per-block partials (all blocks of a tensor, in block order) into the Gram."""
    tot = partials.sum(axis=0) if partials.shape[0] else np.zeros(partials.shape[1])
    g = np.zeros((n, n), dtype=np.float64)
    for p, (i, j) in enumerate(pair_index(n)):
        g[i, j] = g[j, i] = tot[p]
    return g


def combine(
    xs: Sequence[np.ndarray],
    coeffs: Sequence[float],
    out: Optional[np.ndarray] = None,
    tmp: Optional[np.ndarray] = None,
) -> np.ndarray:
    """sum_i c_i x_i, evaluated as x_0 + (sum c - 1) x_0 + sum_{i>0} c_i (x_i - x_0) in the
    inputs' dtype.

    The delta form makes a combination whose coefficients sum to one return x_0 bitwise when all
    inputs are equal (identical models merge to themselves), and loses less precision when the
    inputs are close to each other, as task models fine-tuned from one base are.
    """
    x0 = xs[0]
    dt = x0.dtype.type
    if out is None:
        out = np.empty_like(x0)
    if tmp is None and len(xs) > 1:
        tmp = np.empty_like(x0)
    c = [float(v) for v in coeffs]
    d = sum(c) - 1.0  # in float64, then rounded once
    np.multiply(x0, dt(d), out=out)
    out += x0
    for xi, ci in zip(xs[1:], c[1:]):
        np.subtract(xi, x0, out=tmp)
        tmp *= dt(ci)
        out += tmp
    return out


# ------------------------------------------------------------------ reference forms


def slerp(a: np.ndarray, b: np.ndarray, omega: float, eps: float = DEFAULT_EPS) -> np.ndarray:
    """slerp(a, b, omega) of two whole vectors, computed like the stage computes it."""
    a = np.asarray(a)
    b = np.asarray(b)
    fa, fb = a.reshape(-1), b.reshape(-1)
    g = gram_from_partials(block_gram([fa.astype(np.float64), fb.astype(np.float64)]), 2)
    c = slerp_coefficients(g, omega, eps)
    return combine([fa, fb], c).reshape(a.shape)


def fold(xs: Sequence[np.ndarray], omega: Optional[float] = None, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Fold of whole vectors: theta <- slerp(theta, x_k, omega or 1/(k+1))."""
    flat = [np.asarray(x).reshape(-1) for x in xs]
    g = gram_from_partials(block_gram([f.astype(np.float64) for f in flat]), len(flat))
    om = running_mean_omegas(len(flat)) if omega is None else [omega] * (len(flat) - 1)
    return combine(flat, fold_coefficients(g, om, eps)).reshape(np.asarray(xs[0]).shape)


# ------------------------------------------------------------------ core ownership


def resolve_core(
    values: Sequence[np.ndarray],
    owned: Sequence[Optional[np.ndarray]],
    policy: str,
    base: Optional[np.ndarray] = None,
    ranks: Optional[Sequence[int]] = None,
    out: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Core values of one chunk from the task models that own each element.

    values[t]: task t's values; owned[t]: bool mask of the elements in task t's core (None:
    none). Policies: `magnitude` (largest |theta_t - base| wins, ties to the earlier task),
    `mean` (average of the owners), `priority` (lowest rank, i.e. earliest group, wins; within a
    group the largest |delta|, then the earlier task). Returns (values, any_owner); values are
    meaningful only where any_owner.
    """
    size = values[0].shape[0]
    dt = values[0].dtype
    if out is None:
        out = np.zeros(size, dtype=dt)
    anyo = np.zeros(size, dtype=bool)
    if policy == "mean":
        count = np.zeros(size, dtype=dt)
        first = True
        for v, m in zip(values, owned):
            if m is None:
                continue
            if first:
                np.copyto(out, np.where(m, v, dt.type(0)))
                first = False
            else:
                np.add(out, v, out=out, where=m)
            count += m
            anyo |= m
        # a single owner divides by one: exact, so a lone owner's value passes through bitwise
        np.divide(out, count, out=out, where=anyo)
        return out, anyo
    if policy not in ("magnitude", "priority"):
        raise ValueError(f"unknown core policy {policy!r}")
    if base is None:
        raise ValueError(f"policy {policy!r} needs the base values")
    best = np.full(size, -np.inf, dtype=dt)
    rank = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
    delta = np.empty(size, dtype=dt)
    for t, (v, m) in enumerate(zip(values, owned)):
        if m is None:
            continue
        np.subtract(v, base, out=delta)
        np.abs(delta, out=delta)
        if policy == "magnitude":
            win = m & (delta > best)
        else:
            r = int(ranks[t])
            win = m & ((r < rank) | ((r == rank) & (delta > best)))
            np.copyto(rank, r, where=win)
        # masked copies, not fancy indexing: no gather/scatter temporaries per chunk
        np.copyto(best, delta, where=win)
        np.copyto(out, v, where=win)
        anyo |= m
    return out, anyo
