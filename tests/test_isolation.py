"""Evolving Parameter Isolation's math (`training.isolation`) against in-memory references: the
exact top-k over partitions on one process and on two gloo ranks split as ZeRO-3 splits tensors,
the per-tensor normalisation, the importance and its moving average."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from cpi_ray.training.isolation import RankOps, ema_update, importance, layer_scales, topk_masks

SHAPES = [(7, 5), (33,), (4, 4, 3), (1,)]


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    """Non-negative values with many exact ties (a coarse grid) and a few zeros."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 9, s, generator=g).float() * 0.25).reshape(-1) for s in SHAPES]


def reference_masks(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top k of all values by a stable sort of the concatenation: ties go to the earlier element
    in (tensor, flat index) order."""
    flat = torch.cat(tensors)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    return list(torch.split(chosen, [t.numel() for t in tensors]))


def reference_scaled(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t * (t.numel() / float(t.sum(dtype=torch.float64))) if t.sum() > 0 else t * 0 for t in tensors]


@pytest.mark.parametrize("k", [0, 1, 9, 10, 11, 40, 75, 76])
def test_topk_on_one_rank_matches_a_stable_sort(k):
    ts = _tensors()
    got = topk_masks(ts, k, RankOps())
    ref = reference_masks(ts, k)
    assert sum(int(m.sum()) for m in got) == min(k, sum(t.numel() for t in ts))
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


def test_topk_picks_the_exact_kth_value_among_close_floats():
    # Values that share their upper 16 bits: the second histogram pass must split them.
    base = torch.tensor(1.0)
    vals = base + torch.arange(50, dtype=torch.float32) * torch.finfo(torch.float32).eps
    ts = [vals[torch.randperm(50, generator=torch.Generator().manual_seed(1))]]
    for k in (1, 17, 49):
        assert torch.equal(topk_masks(ts, k, RankOps())[0], reference_masks(ts, k)[0])


def test_layer_scales_divide_by_each_tensors_mean():
    ts = _tensors(3) + [torch.zeros(6)]
    scales = layer_scales(ts, [t.numel() for t in ts], RankOps())
    for t, s, r in zip(ts, scales, reference_scaled(ts)):
        torch.testing.assert_close(t * s, r)
    assert scales[-1] == 0.0


def test_importance_and_moving_average():
    g = torch.tensor([1.0, -2.0, float("nan"), 3.0])
    w = torch.tensor([2.0, 0.5, 1.0, -1.0])
    assert importance(g, w, "fisher").tolist() == [1.0, 4.0, 0.0, 9.0]
    assert importance(g, w, "taylor").tolist() == [2.0, 1.0, 0.0, 3.0]
    ema = torch.zeros(2)
    for x in ([1.0, 2.0], [3.0, 0.0]):
        ema_update(ema, torch.tensor(x), 0.5)
    assert ema.tolist() == [0.5 * 0.5 * 1.0 + 0.5 * 3.0, 0.5 * 0.5 * 2.0]


def _partition(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s valid elements of `t`, split as ZeRO-3 splits a flat parameter (padded to a
    multiple of the world size, contiguous slices)."""
    part = -(-t.numel() // world)
    return t[rank * part : (rank + 1) * part]


def _rank_worker(rank, world, init_file, k, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ops = RankOps.current()
    assert (ops.rank, ops.world) == (rank, world)
    ts = _tensors()
    local = [_partition(t, rank, world) for t in ts]
    scales = layer_scales(local, [t.numel() for t in ts], ops)
    masks = topk_masks(local, k, ops, scales)
    torch.save({"masks": masks, "scales": scales}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_topk_over_ranks_matches_one_process(tmp_path):
    """The masks of three ranks holding ZeRO-3-style slices (uneven, one of them empty for the
    smallest tensor), put back together, are the masks of the whole tensors in one process:
    exact, ties included. (The two-rank case runs in the engine's slow test.)"""
    k, world = 23, 3
    mp.spawn(
        _rank_worker, args=(world, str(tmp_path / "init"), k, str(tmp_path / "m")), nprocs=world, join=True
    )
    parts = [torch.load(f"{tmp_path / 'm'}.{r}", weights_only=True) for r in range(world)]
    got = [torch.cat([p["masks"][i] for p in parts]) for i in range(len(SHAPES))]
    ts = _tensors()
    ref = reference_masks(reference_scaled(ts), k)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    assert sum(int(g.sum()) for g in got) == k
    assert all(p["scales"] == parts[0]["scales"] for p in parts)
