"""The stage protocol: a stage checks its inputs against their records before it reads them, and
a stage that fails leaves no empty output folder behind."""

from pathlib import Path

import pytest

from cpi_ray.config.load import load_config
from cpi_ray.io.records import RECORD_NAME, load_record
from cpi_ray.run.stage import RunContext, Stage

ROOT = Path(__file__).resolve().parents[1]


class Regions(Stage):
    name = "regions"

    def config_slice(self, cfg):
        return {}

    def run(self, ctx):
        out = ctx.layout.mask("a")
        out.write_bytes(b"mask of a")
        return [out]


class Fuse(Stage):
    name = "fuse"
    depends = ("regions",)

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.read: list[bytes] = []

    def config_slice(self, cfg):
        return {}

    def run(self, ctx):
        self.read.append(ctx.layout.mask("a").read_bytes())
        if self.fail:
            raise ValueError("shapes do not match")
        out = ctx.layout.fused / "w.bin"
        out.write_bytes(b"fused")
        return [out]


def _ctx(run_dir):
    cfg = load_config(ROOT / "jobs" / "configs" / "smoke.yaml", [])
    return RunContext(cfg=cfg, run_dir=run_dir, base_model_dir=run_dir, base_model_id="b")


def test_a_replaced_input_stops_the_stage_before_it_reads(tmp_path):
    Regions().execute(_ctx(tmp_path))
    tmp_path.joinpath("regions", "a.mask.safetensors").write_bytes(b"mask of b")  # same size
    fuse = Fuse()
    # A fresh run selecting only fuse (`--stages fuse`) checks regions' outputs by sha256.
    with pytest.raises(RuntimeError, match=r"'fuse': its input regions/a.mask.safetensors fails its sha256"):
        fuse.execute(_ctx(tmp_path))
    assert fuse.read == [] and not (tmp_path / "fused").exists()
    assert load_record(tmp_path / "fused" / RECORD_NAME) is None


def test_inputs_are_hashed_once_per_run(tmp_path, monkeypatch):
    import cpi_ray.run.stage as stage_mod

    ctx = _ctx(tmp_path)
    Regions().execute(ctx)  # wrote its outputs: verified for this run
    calls = []
    real = stage_mod.record_problem
    monkeypatch.setattr(
        stage_mod, "record_problem", lambda *a, **k: calls.append(a[0]["stage"]) or real(*a, **k)
    )
    assert Fuse().execute(ctx)[1]
    assert calls == []  # nothing rehashed: regions was written in this run
    ctx2 = _ctx(tmp_path)
    assert not Regions().execute(ctx2)[1] and not Fuse().execute(ctx2)[1]
    assert calls == ["regions", "fuse"]  # each record once: regions' outputs are fuse's inputs


def test_a_failing_stage_leaves_no_empty_folder(tmp_path):
    ctx = _ctx(tmp_path)
    Regions().execute(ctx)
    with pytest.raises(ValueError, match="shapes"):
        Fuse(fail=True).execute(ctx)
    assert not (tmp_path / "fused").exists()


def test_finished_item_needs_its_fingerprint_and_the_files_beside_it(tmp_path):
    from cpi_ray.io.records import finished_item

    d = tmp_path / "item"
    d.mkdir()
    assert finished_item(d, "rec.json", "fp1") is None  # nothing written yet
    (d / "rec.json").write_text('{"fingerprint": "fp1", "steps": 3}')
    assert finished_item(d, "rec.json", "fp1") == {"fingerprint": "fp1", "steps": 3}
    assert finished_item(d, "rec.json", "fp2") is None  # written for another recipe
    assert finished_item(d, "rec.json", "fp1", requires=("index.json",)) is None
    (d / "index.json").write_text("{}")
    assert finished_item(d, "rec.json", "fp1", requires=("index.json",))["steps"] == 3
    (d / "rec.json").write_text('{"fingerprint": "fp1"')  # torn
    assert finished_item(d, "rec.json", "fp1") is None
