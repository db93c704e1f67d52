from collections import Counter
from pathlib import Path

import pytest
import torch

from cpi_ray.config.load import load_config
from cpi_ray.training.baselines import cpi_budget, cpi_budget_rows, plan_modes, random_groups
from cpi_ray.training.consolidate import stage_data, stage_rows_per_task

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return load_config(
        ROOT / "jobs" / "configs" / "smoke.yaml",
        [
            "probe.steps=10",
            "probe.batch_size=8",
            "consolidate.steps=4",
            "consolidate.batch_size=4",
            "consolidate.num_workers=2",
            *overrides,
        ],
    )


def test_budgets_match_cpi_ft():
    cfg = _cfg(
        "baselines.modes=[full_mtl, multistage, sequential, sequential_cpi]",
        "baselines.sequential=[reverse, upper]",
        "baselines.multistage_grouping=cpi",
    )
    groups = [["digits"], ["reverse", "upper"]]
    # 3 probes x 10 steps x 8 rows + 2 groups x 4 steps x 4 rows x 2 workers
    assert cpi_budget_rows(cfg, 2) == 240 + 64
    plans = plan_modes(cfg, groups)
    assert plans["full_mtl"]["stages"] == [
        {
            "tasks": ["reverse", "upper", "digits"],
            "frozen": [],
            "steps": 38,
            "lr": cfg.consolidate.lr,
            "rows_per_task": {"digits": 102, "reverse": 101, "upper": 101},
        }
    ]
    assert plans["full_mtl"]["rows"] == 38 * 8 >= 304
    ms = plans["multistage"]["stages"]
    assert [s["tasks"] for s in ms] == groups and [s["steps"] for s in ms] == [13, 25]
    assert all(not s["frozen"] for s in ms)
    seq, cpi = plans["sequential"], plans["sequential_cpi"]
    assert seq["start"] == cpi["start"] == "probe:reverse"
    # B gets the probe's budget: 10 steps x 8 rows = 80 rows = 10 steps of 8 rows.
    assert seq["stages"][0]["steps"] == 10 and seq["stages"][0]["lr"] == cfg.probe.lr
    assert seq["stages"][0]["frozen"] == [] and cpi["stages"][0]["frozen"] == ["reverse"]


def test_sequential_epi_trains_b_from_a_with_epi_and_nothing_frozen_in_advance():
    cfg = _cfg(
        "baselines.modes=[sequential, sequential_epi]",
        "baselines.sequential=[reverse, upper]",
        "epi.ratio=3",
    )
    plans = plan_modes(cfg, None)
    seq, epi = plans["sequential"], plans["sequential_epi"]
    assert epi["start"] == seq["start"] == "probe:reverse"
    (st,) = epi["stages"]
    assert st["epi"] == cfg.epi.model_dump() and st["epi"]["ratio"] == 3
    assert {k: v for k, v in st.items() if k != "epi"} == seq["stages"][0]
    assert "epi" not in seq["stages"][0]


def test_dpi_trains_cpi_fts_groups_from_the_base_with_earlier_cores_frozen():
    cfg = _cfg("baselines.modes=[dpi]")
    groups = [["digits"], ["reverse"], ["upper"]]
    plan = plan_modes(cfg, groups)["dpi"]
    assert plan["start"] == "base"
    assert [(s["tasks"], s["frozen"], s["steps"]) for s in plan["stages"]] == [
        (["digits"], [], 4),
        (["reverse"], ["digits"], 4),
        (["upper"], ["digits", "reverse"], 4),
    ]
    # With the probes (shared with CPI-FT), DPI's rows are CPI-FT's.
    probes = sum(cpi_budget(cfg, groups)["probe_rows"].values())
    assert probes + plan["rows"] == cpi_budget_rows(cfg, len(groups))
    with pytest.raises(ValueError, match="needs the groups stage"):
        plan_modes(cfg, None)


def test_epi_is_full_mtl_with_its_isolation_settings():
    cfg = _cfg("baselines.modes=[full_mtl, epi]", "epi.ratio=2", "epi.interval=3")
    groups = [["digits"], ["reverse", "upper"]]
    plans = plan_modes(cfg, groups)
    (stage,) = plans["epi"]["stages"]
    assert plans["epi"]["rows"] == plans["full_mtl"]["rows"]
    assert {k: v for k, v in stage.items() if k != "epi"} == plans["full_mtl"]["stages"][0]
    assert stage["epi"] == {"ratio": 2.0, "interval": 3, "beta": 0.9, "score": "fisher"}
    # Element freezing needs ZeRO-3 partitions: refused at load, naming the fields.
    with pytest.raises(ValueError, match="epi freezes elements on ZeRO-3.*consolidate.zero_stage is 0"):
        _cfg("baselines.modes=[epi]", "consolidate.zero_stage=0", "consolidate.freeze=none")
    with pytest.raises(ValueError, match="epi.ratio"):
        _cfg("baselines.modes=[epi]", "epi.ratio=0")


def test_light_mode_has_cpi_fts_consolidation_rows_and_plans_count_rows_per_task():
    cfg = _cfg("baselines.modes=[full_mtl, full_mtl_light]", "tasks.digits.weight=2")
    groups = [["digits"], ["reverse", "upper"]]
    plans = plan_modes(cfg, groups)
    light = plans["full_mtl_light"]
    # 2 groups x 4 steps: the rows CPI-FT spends after its probes.
    assert light["stages"][0]["steps"] == 8 and light["rows"] == 8 * 8
    for plan in plans.values():
        for st in plan["stages"]:
            rows = st["rows_per_task"]
            assert sum(rows.values()) == st["steps"] * 8
            assert abs(rows["digits"] - 2 * rows["reverse"]) <= 2  # weights 2:1:1


@pytest.mark.parametrize("data", ["mixed", "group"])
def test_consolidation_data_by_stage(data):
    """mixed: every stage draws from every task by weight; group: only the group's tasks, plus
    the replay share of earlier groups; the budget file shows the rows per task and stage."""
    over = [f"consolidate.data={data}", "tasks.upper.weight=3"]
    if data == "group":
        over.append("consolidate.replay=0.25")
    cfg = _cfg(*over)
    groups = [["digits"], ["reverse", "upper"]]
    n = 32
    r1, r2 = stage_rows_per_task(cfg, groups, 0, n), stage_rows_per_task(cfg, groups, 1, n)
    assert sum(r1.values()) == sum(r2.values()) == n
    if data == "mixed":
        assert r1 == r2 == {"digits": 7, "reverse": 6, "upper": 19}  # 32 at 1:1:3, largest remainder
        assert len(stage_data(cfg, groups, 1, n)) == 1
    else:
        assert r1 == {"digits": 32}  # nothing earlier to replay
        assert r2 == {"digits": 8, "reverse": 6, "upper": 18}  # 8 replayed, 24 at 1:3
    budget = cpi_budget(cfg, groups)
    assert budget["rows"] == cpi_budget_rows(cfg, 2)
    assert budget["consolidate"]["data"] == data and budget["consolidate"]["mix"] == "weights"
    assert [s["rows_per_task"] for s in budget["consolidate"]["stages"]] == [r1, r2]


@pytest.mark.parametrize("data", ["mixed", "group"])
def test_balanced_consolidation_gives_every_task_an_equal_share_whatever_its_weight(data):
    over = [f"consolidate.data={data}", "consolidate.mix=balanced", "tasks.upper.weight=3"]
    if data == "group":
        over.append("consolidate.replay=0.25")
    cfg = _cfg(*over)
    groups = [["digits"], ["reverse", "upper"]]
    r1, r2 = stage_rows_per_task(cfg, groups, 0, 32), stage_rows_per_task(cfg, groups, 1, 32)
    if data == "mixed":
        assert r1 == r2 == {"digits": 11, "reverse": 11, "upper": 10}  # 32 at 1:1:1
    else:
        assert r1 == {"digits": 32}
        assert r2 == {"digits": 8, "reverse": 12, "upper": 12}  # 8 replayed, 24 at 1:1
    # The knob enters the stage's fingerprint only when set: runs from before it keep theirs.
    default = _cfg(f"consolidate.data={data}", *over[2:])
    assert "mix" not in default.consolidate.recipe_dump()
    assert cfg.consolidate.recipe_dump() == {**default.consolidate.recipe_dump(), "mix": "balanced"}


def test_balanced_full_mtl_is_full_mtl_in_equal_shares():
    cfg = _cfg("baselines.modes=[full_mtl, full_mtl_balanced]", "tasks.digits.weight=10")
    plans = plan_modes(cfg, [["digits"], ["reverse", "upper"]])
    full, bal = plans["full_mtl"]["stages"][0], plans["full_mtl_balanced"]["stages"][0]
    assert plans["full_mtl"]["rows"] == plans["full_mtl_balanced"]["rows"] == 38 * 8
    assert bal["mix"] == "balanced" and "mix" not in full
    assert {k: v for k, v in bal.items() if k not in ("mix", "rows_per_task")} == {
        k: v for k, v in full.items() if k != "rows_per_task"
    }
    assert full["rows_per_task"] == {"digits": 254, "reverse": 25, "upper": 25}  # 304 at 10:1:1
    assert bal["rows_per_task"] == {"digits": 102, "reverse": 101, "upper": 101}


@pytest.mark.parametrize("mix", ["weights", "balanced"])
def test_the_rows_drawn_are_the_rows_planned(mix):
    """What a consolidation stage and the full_mtl modes train on has, task by task, the counts
    their records and the budget file show."""
    from cpi_ray.data.batching import build_train_examples
    from cpi_ray.models.tiny import build_tiny_tokenizer
    from cpi_ray.training.baselines import _mixed_examples
    from cpi_ray.training.consolidate import group_examples

    cfg = _cfg(f"consolidate.mix={mix}", "tasks.upper.weight=3")
    tok = build_tiny_tokenizer()
    names = [t.name for t in cfg.tasks]
    owner = {
        tuple(e["input_ids"]): t for t, rows in build_train_examples(cfg, tok, names).items() for e in rows
    }

    def counts(rows):
        return dict(Counter(owner[tuple(e["input_ids"])] for e in rows))

    groups = [["digits"], ["reverse", "upper"]]
    assert counts(group_examples(cfg, tok, groups, 1, 32)) == stage_rows_per_task(cfg, groups, 1, 32)
    mode = "full_mtl_balanced" if mix == "balanced" else "full_mtl"
    (st,) = plan_modes(_cfg(f"baselines.modes=[{mode}]", "tasks.upper.weight=3"), groups)[mode]["stages"]
    n = sum(st["rows_per_task"].values())
    assert (
        counts(_mixed_examples(cfg, tok, st["tasks"], n, 0, st.get("mix", "weights"))) == st["rows_per_task"]
    )


def test_replay_needs_group_data():
    from cpi_ray.config.load import ConfigError

    with pytest.raises(ConfigError, match="consolidate.replay"):
        _cfg("consolidate.replay=0.5")


def test_random_groups_partition_deterministically():
    g = random_groups(["a", "b", "c", "d", "e"], 2, seed=3)
    assert sorted(t for grp in g for t in grp) == ["a", "b", "c", "d", "e"]
    assert len(g) == 2 and g == random_groups(["a", "b", "c", "d", "e"], 2, seed=3)


@pytest.mark.slow
def test_every_mode_trains_on_smoke_and_the_report_holds_its_scores(ray_session, tmp_path):
    """All four modes through the real stage (Ray Train + ZeRO-3) on the smoke config: each
    model is trained from its documented start, sequential_cpi keeps A's core bitwise, the run
    records equal budgets, and the report shows the numbers of eval/scores.json."""
    import json

    from cpi_ray.io.masks import MaskFile
    from cpi_ray.io.safetensors_io import CheckpointReader
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.pipeline.runner import run_pipeline
    from cpi_ray.regions.grouping import read_groups

    cfg = _cfg(
        "baselines.modes=[full_mtl, multistage, sequential, sequential_cpi]",
        "baselines.sequential=[reverse, upper]",
        "baselines.multistage_num_groups=2",
        f"storage.path={tmp_path}",
        "probe.steps=6",
        "consolidate.steps=3",
        "consolidate.num_workers=1",
        "evaluate.max_new_tokens=4",
        "stages=[probe, regions, groups, baselines, evaluate]",
    )
    run = tmp_path / "run"
    run_pipeline(cfg, run)
    base_dir, _ = resolve_base_model(cfg)

    def moved(a, b) -> tuple[int, int]:
        ra, rb = CheckpointReader(a), CheckpointReader(b)
        assert ra.names() == rb.names()
        diff = sum(int((ra.read(n) != rb.read(n)).sum()) for n in ra.names())
        return diff, sum(ra.info(n).numel for n in ra.names())

    starts = {
        "full_mtl": base_dir,
        "multistage": base_dir,
        "sequential": run / "probes" / "reverse",
        "sequential_cpi": run / "probes" / "reverse",
    }
    for mode, start in starts.items():
        diff, total = moved(start, run / "baselines" / mode)
        assert diff > total // 2, f"{mode}: trained model barely differs from its start"
    core = MaskFile(run / "regions" / "reverse.mask.safetensors")
    a = CheckpointReader(run / "probes" / "reverse")
    b = CheckpointReader(run / "baselines" / "sequential_cpi")
    plain = CheckpointReader(run / "baselines" / "sequential")
    kept = moved_core = 0
    for n in core.names():
        sel = core.flat(n)
        kept += int(torch.equal(a.read(n).reshape(-1)[sel], b.read(n).reshape(-1)[sel]))
        moved_core += int(not torch.equal(a.read(n).reshape(-1)[sel], plain.read(n).reshape(-1)[sel]))
    assert kept == len(core.names()) and moved_core > 0

    budget = json.loads((run / "baselines" / "budget.json").read_text())
    rows_per_step = cfg.consolidate.batch_size * cfg.consolidate.num_workers
    for mode in ("full_mtl", "multistage"):
        assert 0 <= budget["modes"][mode]["rows"] - budget["cpi_rows"] < rows_per_step * 2, mode
    probe_rows = cfg.probe.steps * cfg.probe.batch_size
    for mode in ("sequential", "sequential_cpi"):
        assert 0 <= budget["modes"][mode]["rows"] - probe_rows < rows_per_step, mode

    scores = json.loads((run / "eval" / "scores.json").read_text())
    md = (run / "report" / "report.md").read_text()
    for mode in starts:
        row, err = scores["scores"][f"baseline:{mode}"], scores["stderr"][f"baseline:{mode}"]
        cells = " | ".join(f"{row[t]:.1f} ± {err[t]:.1f}" for t in scores["tasks"])
        assert f"| baseline:{mode} | {cells} |" in md, mode
        # A mode's model records what it was trained from, so adding a mode keeps it.
        assert json.loads((run / "baselines" / mode / "baseline.json").read_text())["mode"] == mode
    assert "## Forgetting" in md and (run / "report" / "index.html").is_file()

    # A mode added later trains alone: the four finished ones stay as they are.
    weights = {
        m: [(f.name, f.stat().st_mtime_ns) for f in sorted((run / "baselines" / m).glob("*.safetensors"))]
        for m in starts
    }
    more = cfg.model_copy(deep=True)
    more.baselines.modes = [*cfg.baselines.modes, "full_mtl_light", "full_mtl_balanced", "dpi", "epi"]
    run_pipeline(more, run, stages=["baselines"])
    for m, files in weights.items():
        assert [
            (f.name, f.stat().st_mtime_ns) for f in sorted((run / "baselines" / m).glob("*.safetensors"))
        ] == files, m
    light = json.loads((run / "baselines" / "full_mtl_light" / "baseline.json").read_text())
    n_groups = len(json.loads((run / "groups" / "groups.json").read_text()))
    assert light["stages"][0]["steps"] == cfg.consolidate.steps * n_groups
    # The smoke tasks weigh the same, so equal shares are full_mtl's rows: the same model.
    bal_dir, full_dir = run / "baselines" / "full_mtl_balanced", run / "baselines" / "full_mtl"
    assert json.loads((bal_dir / "baseline.json").read_text())["stages"][0]["mix"] == "balanced"
    bal, full = CheckpointReader(bal_dir), CheckpointReader(full_dir)
    assert all(torch.equal(bal.read(n), full.read(n)) for n in full.names())
    # DPI: CPI-FT's groups in order from the base, each freezing the cores of those before it,
    # spending CPI-FT's rows with the probes it shares.
    groups = read_groups(run / "groups" / "groups.json")
    dpi = json.loads((run / "baselines" / "dpi" / "baseline.json").read_text())
    assert [st["tasks"] for st in dpi["stages"]] == groups
    assert [st["frozen"] for st in dpi["stages"]] == [
        [t for g in groups[:k] for t in g] for k in range(len(groups))
    ]
    diff, total = moved(base_dir, run / "baselines" / "dpi")
    assert diff > total // 2
    budget = json.loads((run / "baselines" / "budget.json").read_text())
    assert probe_rows * len(cfg.tasks) + budget["modes"]["dpi"]["rows"] == budget["cpi_rows"]
    # EPI: full_mtl's start, data and rows, with its frozen set re-selected every interval.
    epi = json.loads((run / "baselines" / "epi" / "baseline.json").read_text())
    assert epi["stages"][0]["epi"] == more.epi.model_dump()
    assert budget["modes"]["epi"]["rows"] == budget["modes"]["full_mtl"]["rows"]
    diff, total = moved(base_dir, run / "baselines" / "epi")
    assert diff > total // 2
    from cpi_ray.run.progress import METRICS_FILE, read_metrics

    steps = epi["stages"][0]["steps"]
    rows = read_metrics(run / "baselines" / "epi" / METRICS_FILE)
    updates = [r["step"] for r in rows if "epi_frozen" in r]
    assert updates == list(range(more.epi.interval, steps + 1, more.epi.interval))
    k = round(more.epi.ratio / 100 * total)
    assert {r["epi_frozen"] for r in rows if "epi_frozen" in r} == {k}
