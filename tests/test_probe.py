"""The probe stage through real Ray Train on the tiny model, and the stage protocol's resume."""

import json
from pathlib import Path

import pytest
import torch

from cpi_ray.config.load import load_config
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe_cfg(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return load_config(
        ROOT / "jobs" / "configs" / "smoke.yaml",
        [
            f"storage.path={store}",
            "stages=[probe]",
            "tasks=["
            + ",".join(
                f"{{name: {n}, path: {ROOT / 'jobs' / 'data' / (n + '.jsonl')}, eval_size: 8}}"
                for n in ("reverse", "upper")
            )
            + "]",
            "probe.steps=4",
            "probe.batch_size=8",
            "probe.grad_accum=2",
        ],
    )


@pytest.mark.slow
def test_probe_trains_each_task_and_rerun_skips(ray_session, probe_cfg, tmp_path):
    run_dir = tmp_path / "run"
    result = run_pipeline(probe_cfg, run_dir)
    assert [o.status for o in result.outcomes] == ["ran"]

    from transformers import AutoModelForCausalLM

    from cpi_ray.models.loading import resolve_base_model

    base_dir, _ = resolve_base_model(probe_cfg)
    base = CheckpointReader(base_dir)
    changed = {}
    for task in ("reverse", "upper"):
        out = run_dir / "probes" / task
        model = AutoModelForCausalLM.from_pretrained(out)  # loadable as a plain HF model
        rec = json.loads((out / "probe.json").read_text())
        assert rec["steps"] == 4 and rec["task"] == task
        probe = CheckpointReader(out)
        assert probe.names() == base.names()
        diff = {n for n in base.names() if not torch.equal(probe.read(n), base.read(n))}
        assert len(diff) > len(base.names()) // 2, "training should move most tensors"
        assert torch.equal(model.state_dict()["model.norm.weight"], probe.read("model.norm.weight"))
        changed[task] = probe.read("model.layers.0.mlp.up_proj.weight").clone()
    # Two tasks, two different models.
    assert not torch.equal(changed["reverse"], changed["upper"])

    record = json.loads((run_dir / "probes" / "stage.json").read_text())
    assert {Path(o["path"]).parts[1] for o in record["outputs"]} == {"reverse", "upper"}
    mtime = (run_dir / "probes" / "reverse" / "probe.json").stat().st_mtime_ns

    again = run_pipeline(probe_cfg, run_dir)
    assert [o.status for o in again.outcomes] == ["skipped (up to date)"]
    assert (run_dir / "probes" / "reverse" / "probe.json").stat().st_mtime_ns == mtime

    # A changed probe recipe redoes the stage; a changed eval_size of one task retrains only it.
    cfg2 = probe_cfg.model_copy(deep=True)
    cfg2.tasks[1].eval_size = 9
    third = run_pipeline(cfg2, run_dir)
    assert [o.status for o in third.outcomes] == ["ran"]
    assert (run_dir / "probes" / "reverse" / "probe.json").stat().st_mtime_ns == mtime
    assert (run_dir / "probes" / "upper" / "probe.json").stat().st_mtime_ns != mtime

    # A Fisher-based score adds each probe's Fisher beside it, without training it again.
    weights = {t: CheckpointReader(run_dir / "probes" / t) for t in ("reverse", "upper")}
    before = {t: {n: r.read(n).clone() for n in r.names()} for t, r in weights.items()}
    records = {t: json.loads((run_dir / "probes" / t / "probe.json").read_text()) for t in weights}
    cfg3 = cfg2.model_copy(deep=True)
    cfg3.regions.score = "delta_fisher"
    assert [o.status for o in run_pipeline(cfg3, run_dir).outcomes] == ["ran"]
    for task in ("reverse", "upper"):
        out = run_dir / "probes" / task
        probe = CheckpointReader(out)
        assert all(torch.equal(probe.read(n), before[task][n]) for n in probe.names())
        rec = json.loads((out / "probe.json").read_text())
        assert rec.pop("fisher")["batches"] == cfg3.probe.fisher_batches
        assert rec == records[task]  # the training record (and its timing) is the first run's
        fisher = CheckpointReader(out / "fisher")  # sharded safetensors with an index
        assert (out / "fisher" / "model.safetensors.index.json").is_file() or len(
            list((out / "fisher").glob("*.safetensors"))
        ) == 1
        assert set(fisher.names()) <= set(probe.names()) and "model.norm.weight" in fisher.names()
        for n in fisher.names():
            f = fisher.read(n)
            assert f.dtype == torch.float32 and f.shape == probe.read(n).shape, n
            assert torch.isfinite(f).all() and (f >= 0).all(), n
        assert fisher.read("model.layers.0.mlp.up_proj.weight").sum() > 0
    assert [o.status for o in run_pipeline(cfg3, run_dir).outcomes] == ["skipped (up to date)"]


class _Touch:
    """A minimal stage writing one file, to test the protocol without training anything."""

    def __new__(cls, payload: bytes):
        from cpi_ray.run.stage import Stage

        class Writer(Stage):
            name = "probe"
            folder = "probes"
            runs = 0

            def config_slice(self, cfg):
                return {"payload": payload.hex()}

            def run(self, ctx):
                Writer.runs += 1
                out = ctx.path("probes", "x.bin")
                out.write_bytes(payload)
                return [out]

        return Writer()


def test_stage_record_verifies_outputs(tmp_path, probe_cfg, caplog):
    from cpi_ray.run.stage import RunContext

    ctx = RunContext(cfg=probe_cfg, run_dir=tmp_path, base_model_dir=tmp_path, base_model_id="b")
    stage = _Touch(b"abcdef")
    rec, ran = stage.execute(ctx)
    assert ran and rec["outputs"][0]["bytes"] == 6 and len(rec["outputs"][0]["sha256"]) == 64
    assert stage.execute(ctx)[1] is False
    # Same size, different content: the checksum catches it and the stage is redone.
    (tmp_path / "probes" / "x.bin").write_bytes(b"abcdeX")
    with caplog.at_level("WARNING", logger="cpi_ray"):
        assert stage.execute(ctx)[1] is True
    assert "fails its sha256 check" in caplog.text
    assert (tmp_path / "probes" / "x.bin").read_bytes() == b"abcdef"
    # A changed config slice redoes it too.
    assert _Touch(b"other").execute(ctx)[1] is True


@pytest.mark.slow
def test_probe_worker_killed_resumes_from_checkpoint(ray_session, probe_cfg, tmp_path):
    """A probe worker killed (SIGKILL) after step 3 of 4: Ray Train restarts the worker group, the
    probe resumes from the step-3 DeepSpeed checkpoint (ZeRO-3 partitions of weights and AdamW
    state, schedule, data position) and
    ends bitwise equal to a probe that was never interrupted."""
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.run.stage import RunContext
    from cpi_ray.training.probe import ProbeStage

    cfg = probe_cfg.model_copy(deep=True)
    cfg.tasks = cfg.tasks[:1]
    cfg.probe.checkpoint_every = 1
    cfg.probe.zero_stage = 3  # the partitioned checkpoint (the config's probes run ZeRO-0)
    task = cfg.tasks[0].name
    base_dir, base_id = resolve_base_model(cfg)
    marker = tmp_path / "killed"
    outs = {}
    for name, fault in (
        ("clean", None),
        ("faulty", {"task": task, "step": 3, "rank": 0, "marker": str(marker)}),
    ):
        ctx = RunContext(cfg=cfg, run_dir=tmp_path / name, base_model_dir=base_dir, base_model_id=base_id)
        rec, ran = ProbeStage(fault=fault).execute(ctx)
        assert ran
        outs[name] = ctx.path("probes", task)
    assert marker.exists(), "the fault was not injected"
    rec = json.loads((outs["faulty"] / "probe.json").read_text())
    assert rec["resumed_at_step"] == 3 and rec["steps"] == 4
    assert json.loads((outs["clean"] / "probe.json").read_text())["resumed_at_step"] == 0
    clean, faulty = CheckpointReader(outs["clean"]), CheckpointReader(outs["faulty"])
    assert clean.names() == faulty.names()
    for n in clean.names():
        assert torch.equal(clean.read(n), faulty.read(n)), n
