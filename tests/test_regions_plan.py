"""Work plan: scored tensors in global order, chunks that split tensors, structural checks."""

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
