"""Pure top-k protocol, no Ray: exact k, flat-index tie-break, every fallback path."""

import numpy as np
import pytest
import torch

from cpi_ray.regions.topk import (
    HIST_SHIFT,
    MAX_FINITE_KEY,
    all_finite,
    core_size,
    float_to_key,
    key_to_float,
    keys_of,
    run_in_memory,
    sample_interval,
    unit_keys,
)


def ref_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: stable sort by descending score keeps equal scores in flat order."""
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    m = np.zeros(len(scores), dtype=bool)
    m[order[:k]] = True
    return m


def split(keys: np.ndarray, cuts):
    return np.split(keys, cuts)


@pytest.mark.parametrize("budget", [1, 50, 1 << 20])
@pytest.mark.parametrize("kind", ["ties", "uniform", "zeros", "few_values"])
def test_exact_k_with_ties(kind, budget):
    g = torch.Generator().manual_seed(3)
    n = 1501
    s = {
        "ties": torch.randint(0, 40, (n,), generator=g).float() / 8,
        "uniform": torch.rand(n, generator=g),
        "zeros": torch.zeros(n),
        "few_values": torch.tensor([0.5, 0.25])[torch.randint(0, 2, (n,), generator=g)],
    }[kind]
    chunks = split(keys_of(s), [7, 800, 801, 1200])
    for k in [0, 1, 9, 700, n - 1, n]:
        masks, solver = run_in_memory(chunks, [1] * len(chunks), k, max_candidates=budget, block_units=200)
        got = np.concatenate(masks)
        assert got.sum() == k
        np.testing.assert_array_equal(got, ref_mask(s.numpy(), k))
        if 0 < k:
            # the threshold is the k-th largest score exactly
            assert solver.threshold == float(np.sort(s.numpy())[::-1][k - 1])


def test_fallback_paths_are_taken_and_exact():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4000, generator=g)
    s[1000:3000] = 0.3  # a flood of equal scores at the threshold
    chunks = split(keys_of(s), [500, 1500, 2500])
    k = 1500
    # a sample that sees only the top: the first interval misses
    masks, solver = run_in_memory(chunks, [1] * 4, k, max_candidates=100, sample=np.array([0, 1, 2]))
    assert solver.passes[0] == "scan" and "quota" in solver.passes
    got = np.concatenate(masks)
    np.testing.assert_array_equal(got, ref_mask(s.numpy(), k))
    # with a budget the ties fit in: resolved from candidates, no quota pass
    masks, solver = run_in_memory(chunks, [1] * 4, k, max_candidates=10_000)
    assert "quota" not in solver.passes
    np.testing.assert_array_equal(np.concatenate(masks), ref_mask(s.numpy(), k))


def test_refine_within_bucket():
    # many distinct values inside one 16-bit bucket: the hist pass on the low bits is needed
    base = float_to_key(1.0)
    keys = torch.arange(base, base + 20000, dtype=torch.int32)[torch.randperm(20000)]
    assert int(keys.max()) >> HIST_SHIFT == base >> HIST_SHIFT
    s = keys.view(torch.float32)
    chunks = split(keys, [3333, 10000])
    masks, solver = run_in_memory(chunks, [1] * 3, 777, max_candidates=64, sample=np.array([5]))
    assert "hist" in solver.passes
    np.testing.assert_array_equal(np.concatenate(masks), ref_mask(s.numpy(), 777))


def test_weighted_units_prefix_rule():
    # rows of different lengths: the longest prefix of the ranking with weight <= k
    g = torch.Generator().manual_seed(1)
    a = torch.rand(10, generator=g)  # 10 rows of 7 elements
    b = torch.rand(30, generator=g)  # 30 rows of 1 element
    b[4] = a[2]  # a cross-tensor tie, broken by the global index (a's row comes first)
    for k in [0, 6, 7, 50, 100, 370]:
        masks, _ = run_in_memory([keys_of(a), keys_of(b)], [7, 1], k, max_candidates=4, block_units=8)
        scores = np.concatenate([a.numpy(), b.numpy()])
        w = np.array([7] * 10 + [1] * 30)
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        want = np.zeros(40, dtype=bool)
        used = 0
        for i in order:
            if used + w[i] > k:
                break
            want[i] = True
            used += w[i]
        np.testing.assert_array_equal(np.concatenate(masks), want)


def test_unit_keys_rows_and_finiteness():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.5])
    rows = unit_keys(s, 3)
    assert [key_to_float(int(x)) for x in rows] == [2.0, 1.5]
    assert all_finite(keys_of(s))
    for bad in [float("nan"), float("inf"), -1.0, -0.0]:
        t = s.clone()
        t[2] = bad
        assert not all_finite(keys_of(t)), bad
    assert float_to_key(float("inf")) == MAX_FINITE_KEY + 1


def test_core_size_is_floor_on_the_decimal_p():
    assert core_size(1, 100) == 1
    assert core_size(1, 99) == 0
    assert core_size(7, 100) == 7
    assert core_size(0.07, 10000) == 7  # 0.07*10000/100 in floats is 6.999...
    assert core_size(100, 12345) == 12345
    assert core_size(1.1, 1000) == 11


def test_sample_interval_brackets_the_kth_value():
    g = torch.Generator().manual_seed(2)
    s = torch.rand(200_000, generator=g) ** 3
    keys = keys_of(s)
    k = 2000
    samp = keys[::50]
    lo, hi = sample_interval(samp, np.ones(len(samp)), k, len(keys), max_candidates=4000)
    kth = np.sort(keys)[::-1][k - 1]
    assert lo <= kth <= hi
    inside = ((keys >= lo) & (keys <= hi)).sum()
    assert inside <= 8000  # about the budget's share, not the whole model


def test_zero_flood_takes_two_passes():
    s = torch.zeros(5000)
    s[torch.randperm(5000, generator=torch.Generator().manual_seed(4))[:300]] = 1.0 + torch.rand(300)
    chunks = split(keys_of(s), [1000, 2500])
    masks, solver = run_in_memory(chunks, [1] * 3, 1000, max_candidates=10)
    assert solver.passes == ["scan", "quota"] and solver.threshold == 0.0
    np.testing.assert_array_equal(np.concatenate(masks), ref_mask(s.numpy(), 1000))


@pytest.mark.parametrize("lo,hi", [(300, 700), (0, -1), (MAX_FINITE_KEY + 1, MAX_FINITE_KEY), (500, 500)])
def test_chunk_run_scan_matches_plain_numpy(lo, hi):
    """The block-streamed scan of one chunk against one plain numpy computation of each field."""
    from cpi_ray.regions.topk import HIST_BINS, ChunkRun, ScanRequest

    rng = np.random.default_rng(5)
    keys = rng.integers(0, 1000, 4003).astype(np.int32)
    keys[rng.random(4003) < 0.2] = 0
    run = ChunkRun(ScanRequest("scan", lo=lo, hi=hi, with_hist=True), cap=10**6, idx=0)
    for a in range(0, keys.size, 1000):
        run.add(torch.from_numpy(keys[a : a + 1000]))
    r = run.result()
    above = keys > hi
    inside = (keys >= lo) & (keys <= hi)
    assert r.n_above == above.sum() and r.n_cand == inside.sum()
    np.testing.assert_array_equal(r.above_bits, np.packbits(above, bitorder="big"))
    assert r.min_above == (keys[above].min() if above.any() else MAX_FINITE_KEY + 1)
    np.testing.assert_array_equal(r.cand_idx, np.flatnonzero(inside))
    np.testing.assert_array_equal(r.cand_keys, keys[inside])
    np.testing.assert_array_equal(r.hist, np.bincount(keys >> HIST_SHIFT, minlength=HIST_BINS))
    assert r.n_zero == (keys == 0).sum()
    # over the cap: counts only
    run = ChunkRun(ScanRequest("scan", lo=lo, hi=hi), cap=max(int(inside.sum()) - 1, 0), idx=0)
    for a in range(0, keys.size, 1000):
        run.add(keys[a : a + 1000])
    r = run.result()
    assert r.n_cand == inside.sum() and (r.cand_idx is None) == (inside.sum() > 0)


def test_chunk_run_hist_and_quota_match_plain_numpy():
    from cpi_ray.regions.topk import ChunkRun, ScanRequest

    rng = np.random.default_rng(6)
    prefix = float_to_key(1.0) >> HIST_SHIFT
    keys = ((prefix << HIST_SHIFT) + rng.integers(-40000, 40000, 5000)).astype(np.int32)
    run = ChunkRun(ScanRequest("hist", prefix=prefix), cap=0, idx=0, unit_len=3)
    for a in range(0, keys.size, 1024):
        run.add(keys[a : a + 1024])
    inb = keys[(keys >> HIST_SHIFT) == prefix]
    np.testing.assert_array_equal(
        run.result(), 3 * np.bincount(inb & ((1 << HIST_SHIFT) - 1), minlength=1 << HIST_SHIFT)
    )
    value = int(np.sort(keys)[2500])
    want = keys > value
    want[np.flatnonzero(keys == value)[:1]] = True
    run = ChunkRun(ScanRequest("quota", value=value, quotas={4: 1}), cap=0, idx=4)
    for a in range(0, keys.size, 1024):
        run.add(keys[a : a + 1024])
    np.testing.assert_array_equal(run.result(), np.packbits(want, bitorder="big"))


def test_chunk_run_refuses_a_partial_block_before_the_end():
    from cpi_ray.regions.topk import ChunkRun, ScanRequest

    run = ChunkRun(ScanRequest("scan", lo=0, hi=5), cap=10, idx=0)
    run.add(np.zeros(7, np.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        run.add(np.zeros(8, np.int32))


@pytest.mark.parametrize("budget", [10, 1 << 20])
def test_solver_sink_gets_the_final_bits(budget):
    """With a sink the solver holds no bits: the last bits each chunk sent, plus `extra`, are the
    mask of the in-memory run (here across fallback passes: a flood of ties at the threshold)."""
    from cpi_ray.regions.topk import ChunkMeta, ChunkRun, TopKSolver

    g = torch.Generator().manual_seed(8)
    s = torch.rand(3000, generator=g)
    s[500:2500] = 0.25
    chunks = split(keys_of(s), [700, 1600, 2200])
    k = 1400
    metas, off = [], 0
    for i, c in enumerate(chunks):
        metas.append(ChunkMeta(i, c.size, 1, off))
        off += c.size
    got: dict[int, np.ndarray] = {}
    solver = TopKSolver(metas, k, 3000, budget, sink=lambda i, bits: got.__setitem__(i, bits))
    req = solver.start(keys_of(s)[::97], np.ones(31, dtype=np.int64))
    while req is not None:
        for m, c in zip(metas, chunks):
            run = ChunkRun(req, solver.cap(m.idx), m.idx, 1)
            run.add(c)
            solver.add(m.idx, run.result())
        req = solver.end_pass()
    assert all(b is None for b in solver.above_bits.values())
    masks = []
    for m in metas:
        u = np.unpackbits(got[m.idx], count=m.units, bitorder="big").astype(bool)
        u[solver.extra.get(m.idx, [])] = True
        masks.append(u)
    np.testing.assert_array_equal(np.concatenate(masks), ref_mask(s.numpy(), k))
