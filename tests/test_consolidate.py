"""Stage `consolidate` end to end on two Ray Train workers: groups in order, per-stage exports
with their frozen sets, the stage-by-stage invariant, `final/`, and a rerun that keeps it all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_freeze import assert_frozen_exact, random_mask_file

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.masks import MaskFile
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.run.stage import RunContext
from cpi_ray.training.consolidate import ConsolidateStage, check_frozen, stage_record

DATA = Path(__file__).resolve().parents[1] / "jobs" / "data"


@pytest.mark.slow
def test_consolidate_stage_prior_bf16(ray_session, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "fused")
    for i, t in enumerate(("reverse", "upper", "digits")):
        random_mask_file(tiny_model_dir, run / "regions" / f"{t}.mask.safetensors", 0.05, seed=i)
    (run / "groups").mkdir()
    (run / "groups" / "groups.json").write_text(json.dumps([["reverse", "upper"], ["digits"]]))
    cfg = PipelineConfig.model_validate(
        {
            "model": {"source": "tiny", "max_shard_size": "100kB"},
            "tasks": [
                {"name": t, "path": str(DATA / f"{t}.jsonl"), "eval_size": 8}
                for t in ("reverse", "upper", "digits")
            ],
            "data": {"max_seq_len": 64},
            # bf16 with no persistent parameters: the working copy is a separate bf16 partition.
            "consolidate": {
                "steps": 2,
                "batch_size": 4,
                "lr": 1e-2,
                "weight_decay": 0.1,
                "num_workers": 2,
                "precision": "bf16",
                "freeze": "prior",
                "data": "group",
                "replay": 0.25,
                "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
            },
        }
    )
    ctx = RunContext(
        cfg=cfg,
        run_dir=run,
        base_model_dir=tiny_model_dir,
        base_model_id="tiny",
        records={d: {"fingerprint": d} for d in ("fuse", "groups", "regions")},
    )
    stage = ConsolidateStage()
    rec, ran = stage.execute(ctx)
    assert ran
    s1, s2 = run / "consolidate" / "stage-1", run / "consolidate" / "stage-2"
    # Stage 1 (prior) freezes nothing; stage 2 freezes the cores of group 1.
    assert MaskFile(s1 / "frozen.mask.safetensors").count() == 0
    m2 = MaskFile(s2 / "frozen.mask.safetensors")
    union = [MaskFile(run / "regions" / f"{t}.mask.safetensors") for t in ("reverse", "upper")]
    for name in m2.names():
        assert (m2.flat(name) == (union[0].flat(name) | union[1].flat(name))).all()
    assert stage_record(s2)["frozen_tasks"] == ["reverse", "upper"]
    frozen, changed, free = assert_frozen_exact(s1, s2, s2 / "frozen.mask.safetensors")
    assert frozen == m2.count() > 0 and changed > 0.9 * free
    chk = check_frozen(s1, s2, s2 / "frozen.mask.safetensors", chunk=1000)
    assert (chk["frozen"], chk["frozen_moved"], chk["free_changed"]) == (frozen, 0, changed)
    # final/ is the last stage's weights, without the stage's own files.
    with CheckpointReader(s2) as a, CheckpointReader(run / "final") as b:
        for n in a.names():
            assert a.read_flat(n).view(-1).equal(b.read_flat(n).view(-1))
    assert not (run / "final" / "frozen.mask.safetensors").exists()
    # Each group's ZeRO-3 checkpoint goes once its model is written.
    assert not list(run.glob("_ray/consolidate-*"))
    assert stage.summary(ctx).count("stage ") == 2

    # A rerun with the same config keeps everything.
    assert stage.execute(ctx) == (rec, False)
