"""The fusion math against independent computations written here from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpi_ray.fusion import slerp as S
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
