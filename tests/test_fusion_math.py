"""The fusion math against independent computations written here from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpi_ray.fusion import slerp as S
from cpi_ray.fusion import task_vectors as TV
from cpi_ray.io.raw import bf16_to_f32, f32_to_bf16


def ref_slerp(a, b, t, eps=5e-4):
    """SLERP from its definition, in float64 (mergekit's convention for cos and the fallback)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cos = float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    if abs(cos) > 1 - eps:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b


def rel_err(x, y):
    return float(np.max(np.abs(np.asarray(x, np.float64) - y)) / np.max(np.abs(y)))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_formula(t):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(5000).astype(np.float32)
    b = (0.6 * a + rng.standard_normal(5000)).astype(np.float32)
    got = S.slerp(a, b, t)
    assert got.dtype == np.float32
    assert rel_err(got, ref_slerp(a, b, t)) < 1e-6
    # the end points are the inputs
    if t == 0.0:
        np.testing.assert_array_equal(got, a)


def test_slerp_is_not_lerp_for_distant_vectors():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3000).astype(np.float32)
    b = rng.standard_normal(3000).astype(np.float32)
    got = S.slerp(a, b, 0.5)
    lerp = 0.5 * a.astype(np.float64) + 0.5 * b
    # nearly orthogonal: SLERP keeps the norm up where lerp shrinks it by about 1/sqrt(2)
    assert np.linalg.norm(got) / np.linalg.norm(lerp) > 1.3


def test_lerp_fallback_for_nearly_colinear():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(4000).astype(np.float32)
    b = (a * 1.5 + 1e-3 * rng.standard_normal(4000)).astype(np.float32)  # cos > 0.9995
    got = S.slerp(a, b, 0.3)
    np.testing.assert_allclose(got, 0.7 * a.astype(np.float64) + 0.3 * b, rtol=1e-6, atol=1e-6)
    # with a tiny eps the same pair goes through the SLERP branch, which differs measurably
    exact = ref_slerp(a, b, 0.3, eps=1e-12)
    assert rel_err(S.slerp(a, b, 0.3, eps=1e-12), exact) < 1e-5
    # and a negative, nearly opposite pair also falls back
    np.testing.assert_allclose(S.slerp(a, -a, 0.25), 0.75 * a - 0.25 * a, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_identical_inputs_return_themselves(n):
    x = np.random.default_rng(3).standard_normal(2500).astype(np.float32)
    np.testing.assert_array_equal(S.fold([x] * n), x)
    np.testing.assert_array_equal(S.fold([x] * n, omega=0.3), x)
    g = np.full((n, n), float(np.dot(x.astype(np.float64), x)))
    c = S.multislerp_coefficients(g, [1.0] * n)
    np.testing.assert_array_equal(S.combine([x] * n, c), x)


def test_fold_is_sequential_slerp_running_mean():
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(3000).astype(np.float32) + (i * 0.3) for i in range(4)]
    want = np.asarray(xs[0], np.float64)
    for k in range(1, 4):
        want = ref_slerp(want, xs[k], 1.0 / (k + 1))
    assert rel_err(S.fold(xs), want) < 1e-6
    want = np.asarray(xs[0], np.float64)
    for k in range(1, 4):
        want = ref_slerp(want, xs[k], 0.7)
    assert rel_err(S.fold(xs, omega=0.7), want) < 1e-6


def ref_multislerp(xs, w):
    """Tangent-space mean on the sphere, written directly: log map at the normalized weighted
    mean direction, weighted average, exp map, rescale to the weighted mean norm."""
    xs = [np.asarray(x, np.float64) for x in xs]
    w = np.asarray(w, np.float64) / np.sum(w)
    norms = [np.linalg.norm(x) for x in xs]
    us = [x / n for x, n in zip(xs, norms)]
    p = sum(wi * u for wi, u in zip(w, us))
    p /= np.linalg.norm(p)
    v = np.zeros_like(p)
    for wi, u in zip(w, us):
        th = math.acos(np.clip(np.dot(u, p), -1, 1))
        v += wi * (u - math.cos(th) * p) * (th / math.sin(th) if th > 1e-12 else 1.0)
    nv = np.linalg.norm(v)
    q = math.cos(nv) * p + (math.sin(nv) / nv) * v
    return q * float(np.dot(w, norms))


def test_multislerp_matches_formula():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(2048).astype(np.float32) * (1 + i) + 0.2 for i in range(3)]
    f = [x.astype(np.float64) for x in xs]
    g = S.gram_from_partials(S.block_gram(f), 3)
    for w in ([1, 1, 1], [0.5, 0.3, 0.2]):
        got = S.combine(xs, S.multislerp_coefficients(g, w))
        assert rel_err(got, ref_multislerp(xs, w)) < 1e-6
    # two vectors of equal norm, equal weights: the geodesic midpoint, i.e. slerp at 1/2
    a = xs[0]
    b = (xs[1] / np.linalg.norm(xs[1]) * np.linalg.norm(a)).astype(np.float32)
    g2 = S.gram_from_partials(S.block_gram([a.astype(np.float64), b.astype(np.float64)]), 2)
    got = S.combine([a, b], S.multislerp_coefficients(g2, [1, 1]))
    assert rel_err(got, ref_slerp(a, b, 0.5)) < 1e-5


def test_block_gram_is_independent_of_chunking():
    rng = np.random.default_rng(6)
    n = 10 * S.BLOCK + 77
    xs = [rng.standard_normal(n) for _ in range(3)]
    whole = S.gram_from_partials(S.block_gram(xs), 3)
    for chunk in (S.BLOCK, 3 * S.BLOCK, 7 * S.BLOCK):
        parts = np.concatenate([S.block_gram([x[a : a + chunk] for x in xs]) for a in range(0, n, chunk)])
        assert np.array_equal(S.gram_from_partials(parts, 3), whole)
    want = np.array([[np.dot(a, b) for b in xs] for a in xs])
    np.testing.assert_allclose(whole, want, rtol=1e-12)


def owners_example():
    rng = np.random.default_rng(7)
    base = rng.standard_normal(64).astype(np.float32)
    vals = [base + rng.standard_normal(64).astype(np.float32) for _ in range(3)]
    owned = [rng.random(64) < 0.5 for _ in range(3)]
    return base, vals, owned


def test_core_policies():
    base, vals, owned = owners_example()
    any_owner = owned[0] | owned[1] | owned[2]
    mag, a1 = S.resolve_core(vals, owned, "magnitude", base=base)
    mean, a2 = S.resolve_core(vals, owned, "mean")
    prio, a3 = S.resolve_core(vals, owned, "priority", base=base, ranks=[1, 0, 1])
    for a in (a1, a2, a3):
        np.testing.assert_array_equal(a, any_owner)
    for j in np.flatnonzero(any_owner):
        own = [t for t in range(3) if owned[t][j]]
        d = [abs(float(vals[t][j]) - float(base[j])) for t in own]
        assert mag[j] == vals[own[int(np.argmax(d))]][j]
        assert mean[j] == pytest.approx(np.mean([vals[t][j] for t in own]), rel=1e-6)
        if len(own) == 1:
            assert mean[j] == vals[own[0]][j]
        pr = [t for t in own if t == 1] or own  # task 1 is in the earliest group
        dd = [abs(float(vals[t][j]) - float(base[j])) for t in pr]
        assert prio[j] == vals[pr[int(np.argmax(dd))]][j]


def test_magnitude_ties_go_to_the_earlier_task():
    base = np.zeros(4, np.float32)
    vals = [np.array([1, -2, 3, 0], np.float32), np.array([-1, 2, 3, 5], np.float32)]
    owned = [np.ones(4, bool), np.ones(4, bool)]
    got, _ = S.resolve_core(vals, owned, "magnitude", base=base)
    np.testing.assert_array_equal(got, [1, -2, 3, 5])


def test_bf16_round_trip_matches_torch():
    x = torch.randn(10000) * 100
    x[:4] = torch.tensor([0.0, -0.0, 1e-40, 3.0e38])
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16(x.numpy())
    np.testing.assert_array_equal(got, want)
    back = bf16_to_f32(got)
    np.testing.assert_array_equal(back, x.to(torch.bfloat16).float().numpy())


# ------------------------------------------------------------------ task-vector merges


def ref_topk(mag, candidates, k):
    """Top k of `mag` among `candidates` by (magnitude descending, index ascending)."""
    idx = np.flatnonzero(candidates)
    order = idx[np.lexsort((idx, -mag[idx].astype(np.float64)))]
    out = np.zeros(mag.shape, dtype=bool)
    out[order[:k]] = True
    return out


def ref_ties(base, xs, scale, density, decided):
    """TIES from the paper's three steps, in float64 over whole vectors (trim over `decided`)."""
    base64 = base.astype(np.float64)
    ds = []
    for x in xs:
        d = x.astype(np.float64) - base64
        mag = np.abs(x.astype(np.float32) - base.astype(np.float32)).astype(np.float32)
        k = int(math.floor(density * int(decided.sum()) + 1e-9))
        ds.append(np.where(ref_topk(mag, decided, k), d, 0.0))
    ds = np.stack(ds)
    sign = np.where(ds.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(ds) == sign
    n = agree.sum(0)
    merged = np.where(n > 0, (ds * agree).sum(0) / np.maximum(n, 1), 0.0)
    return base64 + scale * merged


def task_models(rng, size, n, ties_every=0):
    base = rng.standard_normal(size).astype(np.float32)
    xs = []
    for t in range(n):
        d = rng.standard_normal(size).astype(np.float32) * 0.01 * (1 + t)
        if ties_every:
            # many equal magnitudes, so the trim threshold falls inside a run of ties
            d = np.round(d * 300) / 300
            d[::ties_every] = 0
        xs.append(base + d)
    return base, xs


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_task_arithmetic_is_base_plus_scaled_sum(scale):
    base, xs = task_models(np.random.default_rng(0), 5000, 4)
    got = TV.task_arithmetic(base, xs, scale)
    want = base.astype(np.float64) + scale * sum(x.astype(np.float64) - base for x in xs)
    assert rel_err(got, want) < 1e-6
    assert np.array_equal(TV.task_arithmetic(base, [base.copy()] * 3, scale), base)


def stream_trim(base, xs, density, decided, chunk):
    """The worker's protocol: two histogram passes, then selection chunk by chunk."""
    n = base.shape[0]
    trims = [TV.TopKStream(density) for _ in xs]

    def keys(t, a, b):
        b = min(b, n)
        return TV.magnitude_keys(xs[t][a:b], base[a:b], decided[a:b], np.empty(b - a, np.int32))

    for top in (True, False):
        for a in range(0, n, chunk):
            for t, tr in enumerate(trims):
                tr.add_top(keys(t, a, a + chunk)) if top else tr.add_low(keys(t, a, a + chunk))
        for tr in trims:
            tr.end_top() if top else tr.end_low()
    return [
        np.concatenate([tr.select(keys(t, a, a + chunk)) for a in range(0, n, chunk)])
        for t, tr in enumerate(trims)
    ]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.999, 1.0, 1e-4])
@pytest.mark.parametrize("chunk", [1024, 3000, 100_000])
def test_trim_is_the_exact_top_share_with_index_tie_break(density, chunk):
    rng = np.random.default_rng(1)
    base, xs = task_models(rng, 20_000, 3, ties_every=7)
    decided = rng.random(20_000) > 0.1
    got = stream_trim(base, xs, density, decided, chunk)
    for x, sel in zip(xs, got):
        mag = np.abs(x - base).astype(np.float32)
        k = int(math.floor(density * int(decided.sum()) + 1e-9))
        assert np.array_equal(sel, ref_topk(mag, decided, k))


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_matches_the_three_steps(density):
    rng = np.random.default_rng(2)
    base, xs = task_models(rng, 12_000, 4, ties_every=11)
    decided = rng.random(12_000) > 0.2
    kept = stream_trim(base, xs, density, decided, 4096) if density < 1 else None
    got = TV.ties(base, xs, 0.7, kept=kept)
    want = ref_ties(base, xs, 0.7, density, decided if density < 1 else np.ones(12_000, bool))
    assert rel_err(got[decided], want[decided]) < 1e-6
    # each element is the base plus scale times a mean of agreeing deltas: never beyond the
    # largest agreeing delta
    lim = np.max(np.abs(np.stack(xs) - base), axis=0) * 0.7 + 1e-6
    assert np.all(np.abs(got - base) <= lim)
    assert np.array_equal(TV.ties(base, [base.copy()] * 3, 0.7), base)


def test_ties_drops_the_minority_sign():
    base = np.zeros(3, np.float32)
    xs = [
        np.array([1.0, -1.0, 0.5], np.float32),
        np.array([2.0, 3.0, -0.25], np.float32),
        np.array([-4.0, 1.0, -0.5], np.float32),
    ]
    # sums -1, 3, -0.25: element 0 keeps -4; element 1 averages 3 and 1; element 2 -0.25 and -0.5
    assert np.allclose(TV.ties(base, xs, 1.0), [-4.0, 2.0, -0.375])
