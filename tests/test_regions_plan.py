"""Work plan: scored tensors in global order, chunks that split tensors, structural checks."""

import numpy as np
import pytest
import torch

from cpi_ray.io.safetensors_io import CheckpointError, CheckpointReader, save_model_dir
from cpi_ray.regions.plan import check_compatible, plan_chunks, scored_tensors, select_tensors


@pytest.fixture
def ckpt(tmp_path):
    state = {
        "b.weight": torch.zeros(10, 6),
        "a.bias": torch.zeros(13),
        "c.idx": torch.zeros(4, dtype=torch.int64),
        "d.weight": torch.zeros(3, 5, 2, dtype=torch.bfloat16),
    }
    return save_model_dir(state, tmp_path / "m", max_shard_size=100), state


def test_select_tensors_filters():
    names = ["x.q_proj.weight", "x.k_proj.weight", "norm.weight"]
    assert select_tensors(names) == sorted(names)
    assert select_tensors(names, include=["proj"]) == ["x.k_proj.weight", "x.q_proj.weight"]
    assert select_tensors(names, include=["proj"], exclude=["^x.k"]) == ["x.q_proj.weight"]


def test_plan_covers_every_element_once(ckpt):
    path, state = ckpt
    r = CheckpointReader(path)
    assert len({i.file for i in r.tensors.values()}) > 1  # several shards
    ts = scored_tensors(r)
    assert [t.name for t in ts] == ["a.bias", "b.weight", "d.weight"]  # floats, sorted
    chunks = plan_chunks(r, ts, chunk_bytes=40)  # 10 fp32 / 20 bf16 elements at most
    by = {}
    for c in chunks:
        assert c.start % 8 == 0 and (c.stop - c.start) * (2 if "d." in c.name else 4) <= 40
        by.setdefault(c.name, []).append((c.start, c.stop))
    # split mid-tensor, in multiples of 8 elements except at the end of a tensor
    assert by["a.bias"] == [(0, 8), (8, 13)]
    assert by["b.weight"] == [(i, min(i + 8, 60)) for i in range(0, 60, 8)]
    assert by["d.weight"] == [(0, 16), (16, 30)]
    offs = [c.unit_offset for c in chunks]
    assert offs == sorted(offs) and offs[0] == 0
    assert sum(c.stop - c.start for c in chunks) == 13 + 60 + 30


def test_row_plan_keeps_whole_rows(ckpt):
    path, _ = ckpt
    r = CheckpointReader(path)
    ts = scored_tensors(r, granularity="row")
    assert [t.unit_len for t in ts] == [1, 6, 10]
    chunks = plan_chunks(r, ts, chunk_bytes=64)
    for c in chunks:
        assert (c.stop - c.start) % c.unit_len == 0 and c.start % 8 == 0
    assert [c.units for c in chunks if c.name == "b.weight"] == [8, 2]  # 8 rows at least


def test_check_compatible_names_tensor_and_file(ckpt, tmp_path):
    path, state = ckpt
    base = CheckpointReader(path)
    bad_shape = dict(state, **{"b.weight": torch.zeros(6, 10)})
    p = CheckpointReader(save_model_dir(bad_shape, tmp_path / "p1", 100))
    with pytest.raises(CheckpointError, match=r"p1/model-\d+-of-\d+\.safetensors.*'b.weight'.*shape"):
        check_compatible(base, p, base.names(), "probe 't'")
    bad_dtype = dict(state, **{"a.bias": torch.zeros(13, dtype=torch.float16)})
    p = CheckpointReader(save_model_dir(bad_dtype, tmp_path / "p2", 100))
    with pytest.raises(CheckpointError, match=r"'a.bias' has dtype"):
        check_compatible(base, p, base.names(), "probe 't'")
    missing = {k: v for k, v in state.items() if k != "c.idx"}
    p = CheckpointReader(save_model_dir(missing, tmp_path / "p3", 100))
    with pytest.raises(CheckpointError, match=r"p3.*'c.idx'.*missing"):
        check_compatible(base, p, base.names(), "probe 't'")
    extra = dict(state, **{"z.weight": torch.zeros(2)})
    p = CheckpointReader(save_model_dir(extra, tmp_path / "p4", 100))
    with pytest.raises(CheckpointError, match=r"'z.weight' is not in the base"):
        check_compatible(base, p, base.names(), "probe 't'")


def test_chunk_rows_cover_every_chunk_once_in_order(ckpt):
    from cpi_ray.regions.ray_ops import group_chunks

    path, _ = ckpt
    r = CheckpointReader(path)
    chunks = plan_chunks(r, scored_tensors(r), chunk_bytes=16)
    for actors in (1, 2, 5, 100):
        rows = group_chunks(chunks, actors)
        assert [i for a, b in rows for i in range(a, b)] == list(range(len(chunks)))
        assert all(a < b for a, b in rows)
        assert len(rows) <= max(1, actors * 4) + 1
    # a row stays within the element cap unless a single chunk is larger (its results are held
    # by the actor until the row is done)
    sizes = [c.stop - c.start for c in chunks]
    for cap in (1, 7, 20):
        rows = group_chunks(chunks, 1, max_elems=cap)
        assert [i for a, b in rows for i in range(a, b)] == list(range(len(chunks)))
        assert all(sum(sizes[a:b]) <= cap or b - a == 1 for a, b in rows)


@pytest.mark.parametrize("unit_len_row", [False, True])
def test_sample_gathers_the_same_units_as_block_reads(tmp_path, unit_len_row):
    """The driver's sample (one gather per chunk and file) against plain reads of each sampled
    block, for two tasks sharing the base."""
    import math

    from cpi_ray.regions.ray_ops import checkpoint_sources, sample_keys
    from cpi_ray.regions.topk import keys_of, unit_keys
    from cpi_ray.regions.worker import ChunkReader

    g = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(40, 24, generator=g), "b.bias": torch.randn(333, generator=g)}
    probes = {t: {n: v + torch.randn(v.shape, generator=g) for n, v in base.items()} for t in "xy"}
    save_model_dir(base, tmp_path / "base", 10_000)
    for t, st in probes.items():
        save_model_dir(st, tmp_path / t, 4_000)
    r = CheckpointReader(tmp_path / "base")
    tensors = scored_tensors(r, granularity="row" if unit_len_row else "element")
    chunks = plan_chunks(r, tensors, chunk_bytes=512)
    base_src, probe_src, _ = checkpoint_sources(
        r, {t: CheckpointReader(tmp_path / t) for t in "xy"}, {}, [x.name for x in tensors]
    )
    reader = ChunkReader(base_src, probe_src)
    got = sample_keys(reader, chunks, ["x", "y"], target_units=200, block=4)
    total = sum(c.units for c in chunks)
    for t in "xy":
        want, want_w = [], []
        for c in chunks:
            want_units = math.ceil(c.units * min(1.0, 200 / total))
            b = max(1, min(4, want_units))
            for u in np.unique(np.linspace(0, max(c.units - b, 0), max(1, want_units // b)).astype(np.int64)):
                a, z = c.start + int(u) * c.unit_len, c.start + min(int(u) + b, c.units) * c.unit_len
                s = (probes[t][c.name].reshape(-1)[a:z] - base[c.name].reshape(-1)[a:z]).abs()
                want.append(unit_keys(s.numpy(), c.unit_len) if c.unit_len > 1 else keys_of(s.numpy()))
                want_w.append(np.full(len(want[-1]), c.unit_len))
        np.testing.assert_array_equal(got[t][0], np.concatenate(want))
        np.testing.assert_array_equal(got[t][1], np.concatenate(want_w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("score", ["delta", "fisher", "delta_fisher"])
def test_chunk_reader_scores_equal_torch(tmp_path, dtype, score):
    """The actors' reader (numpy, pread, no torch) gives the bits torch gives, for every stored
    float dtype and score, streamed in blocks or gathered for the sample."""
    from cpi_ray.regions.ray_ops import checkpoint_sources
    from cpi_ray.regions.worker import ChunkReader

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(37, 11, generator=g).to(dtype), "v": torch.randn(300, generator=g).to(dtype)}
    probe = {n: (t.float() + torch.randn(t.shape, generator=g) * 0.1).to(dtype) for n, t in base.items()}
    fisher = {n: (torch.randn(t.shape, generator=g) ** 2).to(dtype) for n, t in base.items()}
    fisher["v"][3] = -0.0  # a stored -0.0 reads as 0
    for name, state in [("base", base), ("probe", probe), ("fisher", fisher)]:
        save_model_dir(state, tmp_path / name, 2_000)
    r = CheckpointReader(tmp_path / "base")
    fishers = {"t": CheckpointReader(tmp_path / "fisher")} if score != "delta" else {}
    base_src, probe_src, fisher_src = checkpoint_sources(
        r, {"t": CheckpointReader(tmp_path / "probe")}, fishers, ["w", "v"]
    )
    reader = ChunkReader(base_src, probe_src, score, fisher_src, block_elems=64)
    for n in ["w", "v"]:
        d = (probe[n].float() - base[n].float()).abs().reshape(-1)
        f = fisher[n].float().abs().reshape(-1)
        # √F correctly rounded to float32 (via float64: exact for float32 inputs)
        want = {"delta": d, "fisher": f, "delta_fisher": d * f.double().sqrt().float()}[score].numpy()
        got = np.concatenate([k.copy() for _, k in reader.task_blocks(["t"], n, 0, want.size, 1)])
        np.testing.assert_array_equal(got, want.view(np.int32))
        elems = np.array([0, 5, 6, want.size - 1])
        base_vals = reader.gather_base(n, 0, want.size, elems)
        np.testing.assert_array_equal(reader.sample("t", n, 0, want.size, elems, base_vals), want[elems])
    reader.close()
