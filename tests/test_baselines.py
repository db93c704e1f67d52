from pathlib import Path

from cpi_ray.config.load import load_config
from cpi_ray.training.baselines import cpi_budget_rows, plan_modes, random_groups

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return load_config(ROOT / "jobs" / "configs" / "smoke.yaml", [
        "probe.steps=10", "probe.batch_size=8", "consolidate.steps=4", "consolidate.batch_size=4",
        "consolidate.num_workers=2", *overrides])


def test_budgets_match_cpi_ft():
    cfg = _cfg("baselines.modes=[full_mtl, multistage, sequential, sequential_cpi]",
               "baselines.sequential=[reverse, upper]", "baselines.multistage_grouping=cpi")
    groups = [["digits"], ["reverse", "upper"]]
    # 3 probes x 10 steps x 8 rows + 2 groups x 4 steps x 4 rows x 2 workers
    assert cpi_budget_rows(cfg, 2) == 240 + 64
    plans = plan_modes(cfg, groups)
    assert plans["full_mtl"]["stages"] == [{"tasks": ["reverse", "upper", "digits"], "frozen": [],
                                            "steps": 38, "lr": cfg.consolidate.lr}]
    assert plans["full_mtl"]["rows"] == 38 * 8 >= 304
    ms = plans["multistage"]["stages"]
    assert [s["tasks"] for s in ms] == groups and [s["steps"] for s in ms] == [13, 25]
    assert all(not s["frozen"] for s in ms)
    seq, cpi = plans["sequential"], plans["sequential_cpi"]
    assert seq["start"] == cpi["start"] == "probe:reverse"
    # B gets the probe's budget: 10 steps x 8 rows = 80 rows = 10 steps of 8 rows.
    assert seq["stages"][0]["steps"] == 10 and seq["stages"][0]["lr"] == cfg.probe.lr
    assert seq["stages"][0]["frozen"] == [] and cpi["stages"][0]["frozen"] == ["reverse"]


def test_random_groups_partition_deterministically():
    g = random_groups(["a", "b", "c", "d", "e"], 2, seed=3)
    assert sorted(t for grp in g for t in grp) == ["a", "b", "c", "d", "e"]
    assert len(g) == 2 and g == random_groups(["a", "b", "c", "d", "e"], 2, seed=3)
