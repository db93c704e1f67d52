import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpi_ray.io.atomic import atomic_dir
from cpi_ray.io.safetensors_io import INDEX_NAME, CheckpointError, CheckpointReader, plan_shards, save_sharded


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(10, 30, generator=g),
        "b.bias": torch.randn(7, generator=g),
        "c.weight": torch.randn(40, 20, generator=g).to(torch.bfloat16),
        "d.weight": torch.randn(3, 5, 2, generator=g),
    }


def test_sharded_roundtrip_byte_equal(tmp_path):
    state = _state()
    wm = save_sharded(state, tmp_path, max_shard_size=1500)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["weight_map"] == wm and len(set(wm.values())) >= 3
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    r = CheckpointReader(tmp_path)
    for k, v in state.items():
        got = r.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
        flat = v.reshape(-1)
        assert torch.equal(r.read_flat(k, 3, flat.numel() - 2), flat[3:-2])


def test_plan_shards_matches_writer_order():
    sizes = [("a", 600), ("b", 600), ("c", 2000), ("d", 10)]
    assert plan_shards(sizes, 1000) == [["a"], ["b"], ["c"], ["d"]]
    assert plan_shards(sizes, 1300) == [["a", "b"], ["c"], ["d"]]


def test_bad_checkpoints_are_named(tmp_path):
    save_sharded(_state(), tmp_path, max_shard_size=1500)
    shards = sorted(tmp_path.glob("*.safetensors"))
    # truncated shard
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) - 8])
    with pytest.raises(CheckpointError, match=shards[0].name):
        CheckpointReader(tmp_path)
    # corrupt header
    shards[0].write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointReader(tmp_path)
    # index naming a missing shard
    shards[1].unlink()
    shards[0].write_bytes(data)
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(tmp_path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("whole")
    assert (target / "x").read_text() == "whole"


def test_tiny_model_loads_with_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert len(list(tiny_model_dir.glob("model-*.safetensors"))) >= 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    r = CheckpointReader(tiny_model_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(r.read(k), v)


def test_model_side_files_carry_remote_code_never_weights(tmp_path):
    """A `trust_remote_code` model's modeling/tokenization code travels with every model the
    pipeline writes from it; weights, indexes and stage records never do."""
    from cpi_ray.io.safetensors_io import save_model_dir

    src = tmp_path / "src"
    src.mkdir()
    copied = ("config.json", "tokenizer.json", "modeling_x.py", "tokenization_x.py", "chat_template.jinja")
    for name in (*copied, INDEX_NAME, "stage.json", "model-00001.safetensors"):
        (src / name).write_text(name)
    out = save_model_dir({"w": torch.zeros(2)}, tmp_path / "out", 2**20, copy_from=src)
    for name in copied:
        assert (out / name).read_text() == name
    assert (out / "stage.json").exists() is False
    assert "model-00001.safetensors" not in {p.name for p in out.iterdir()}
    if (out / INDEX_NAME).exists():  # the writer's own index, not the copied one
        assert (out / INDEX_NAME).read_text() != INDEX_NAME


def test_mask_writer_fills_ranges_in_any_order(tmp_path):
    """A mask written range by range, out of order, reads back as `write_mask_file` would write
    it (MaskFile and safetensors' own reader), with metadata completed at commit."""
    import numpy as np
    from safetensors import safe_open

    from cpi_ray.io.masks import MaskFile, MaskWriter, pack_mask

    g = torch.Generator().manual_seed(0)
    numels = {"b.w": 1001, "a.w": 17, "c.w": 64}
    masks = {n: torch.rand(v, generator=g) < 0.3 for n, v in numels.items()}
    path = tmp_path / "t.mask.safetensors"
    w = MaskWriter(path, numels, {"task": "t"})
    assert not path.exists()
    for n in ["c.w", "b.w", "a.w"]:
        pk = pack_mask(masks[n]).numpy()
        w.write(n, 3, pk[3:])
        w.write(n, 0, pk[:3])
    np.testing.assert_array_equal(w.read("b.w", 0, 5), pack_mask(masks["b.w"]).numpy()[:5])
    with pytest.raises(ValueError, match="outside"):
        w.write("a.w", 2, np.zeros(2, np.uint8))
    w.commit({"count": 12, "threshold": "0.5"})
    m = MaskFile(path)
    assert m.metadata["task"] == "t" and m.metadata["count"] == "12" and m.numels == numels
    for n in numels:
        assert torch.equal(m.flat(n), masks[n])
    with safe_open(str(path), framework="pt") as f:
        for n in numels:
            assert torch.equal(f.get_tensor(n), pack_mask(masks[n]))
    w2 = MaskWriter(tmp_path / "u.mask.safetensors", numels)
    w2.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["t.mask.safetensors"]


def test_model_copy_links_the_weights_and_never_writes_through_them(tmp_path, monkeypatch):
    """final/ and a baseline's model share the last stage's weight files instead of storing them
    twice; the files the copy writes itself (records, loss curve) are its own, so writing them
    leaves the source as it was; where the filesystem cannot link, the files are copied."""
    import os

    from cpi_ray.io.atomic import atomic_file
    from cpi_ray.training.consolidate import copy_model_dir

    src = tmp_path / "stage-2"
    src.mkdir()
    for name in (
        "model-00001-of-00001.safetensors",
        "config.json",
        "metrics.jsonl",
        "mode.json",
        "frozen.mask",
    ):
        (src / name).write_text(f"source {name}")
    out = copy_model_dir(
        src,
        tmp_path / "final",
        skip=("frozen.mask",),
        extra={"mode.json": {"mode": "m"}},
        texts={"metrics.jsonl": "curve"},
    )
    weights = "model-00001-of-00001.safetensors"
    assert os.stat(out / weights).st_ino == os.stat(src / weights).st_ino
    assert (
        json.loads((out / "mode.json").read_text()) == {"mode": "m"}
        and (out / "metrics.jsonl").read_text() == "curve"
    )
    assert not (out / "frozen.mask").exists()
    with atomic_file(out / "config.json", "w") as f:  # how every later writer replaces a file
        f.write("card")
    for name in ("mode.json", "metrics.jsonl", "config.json", weights):
        assert (src / name).read_text() == f"source {name}"
    copy_model_dir(src, out)  # a rerun replaces the copy, the source intact
    assert (out / "mode.json").read_text() == "source mode.json" and (src / weights).exists()

    def no_links(*_):
        raise OSError("links not supported")

    monkeypatch.setattr(os, "link", no_links)
    copied = copy_model_dir(src, tmp_path / "copied")
    assert os.stat(copied / weights).st_ino != os.stat(src / weights).st_ino
    assert (copied / weights).read_text() == f"source {weights}"


def test_a_run_waits_for_the_shared_model_another_is_writing_and_reuses_it(tmp_path):
    """Two runs share the model cache: one that finds another materializing the base model
    waits for it, then uses its copy, never writing (or renaming over) its own."""
    from cpi_ray.config.load import load_config
    from cpi_ray.io.atomic import file_lock
    from cpi_ray.models.loading import resolve_base_model

    smoke = str(Path(__file__).resolve().parents[1] / "jobs/configs/smoke.yaml")
    made, ident = resolve_base_model(load_config(smoke, [f"model.cache_dir={tmp_path / 'other'}"]))
    cache = tmp_path / "shared"
    script = (
        "import logging\n"
        "from cpi_ray.config.load import load_config\n"
        "from cpi_ray.models.loading import resolve_base_model\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"cfg = load_config({smoke!r}, ['model.cache_dir={cache}'])\n"
        "print('resolving', flush=True)\n"
        "print('resolved', resolve_base_model(cfg)[0], flush=True)\n"
    )
    with file_lock(cache / f".{ident}.lock"):  # the other run is writing
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout.readline().strip() == "resolving"
        time.sleep(3)  # long enough to write the tiny model itself, were it not waiting
        assert proc.poll() is None
        with atomic_dir(cache / ident) as tmp:
            for f in made.iterdir():
                shutil.copy2(f, tmp / f.name)
        inodes = {f.name: f.stat().st_ino for f in (cache / ident).iterdir()}
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert f"resolved {cache / ident}" in out and "materializing" not in out, out
    assert {f.name: f.stat().st_ino for f in (cache / ident).iterdir()} == inodes
    assert sorted(p.name for p in cache.iterdir()) == [f".{ident}.lock", ident]
