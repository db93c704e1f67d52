"""The quality benchmark's aggregation over seeds, without training: means and standard errors
against statistics' own, avg and worst taken per seed first, paired verdicts, the results file."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seed(full, cpi, fused):
    return {
        "scores": {
            "base": {"a": 1.0, "b": 2.0},
            "probe:a": {"a": 40.0, "b": 0.0},
            "probe:b": {"a": 0.0, "b": 30.0},
            "baseline:full_mtl": full,
            "fused": fused,
            "delta@5,mixed": cpi,
        },
        "stderr": {},
    }


def test_aggregate_over_seeds_and_results_file(tmp_path):
    bq = _bench()
    per_seed = {
        "0": _seed({"a": 20.0, "b": 10.0}, {"a": 30.0, "b": 12.0}, {"a": 5.0, "b": 5.0}),
        "1": _seed({"a": 22.0, "b": 14.0}, {"a": 28.0, "b": 20.0}, {"a": 6.0, "b": 4.0}),
        "2": _seed({"a": 18.0, "b": 12.0}, {"a": 31.0, "b": 17.0}, {"a": 4.0, "b": 6.0}),
    }
    rows = bq.model_rows("delta@5,mixed", [], ["a", "b"])
    agg = bq.aggregate(per_seed, ["a", "b"], rows)
    cpi = agg["models"]["delta@5,mixed"]
    assert math.isclose(cpi["a"][0], statistics.mean([30, 28, 31]))
    assert math.isclose(cpi["a"][1], statistics.stdev([30, 28, 31]) / math.sqrt(3))
    # worst per seed first (12, 20, 17), then averaged: not the worst of the means.
    assert math.isclose(cpi["worst"][0], statistics.mean([12, 20, 17]))
    diffs = [21 - 15, 24 - 18, 24 - 15]  # avg of CPI-FT minus avg of full_mtl, per seed
    v = agg["versus"]["delta@5,mixed"]["full_mtl"]["avg"]
    assert math.isclose(v["diff"], statistics.mean(diffs)) and v["verdict"] == "win"
    assert "baseline:multistage" not in agg["models"] and list(agg["models"])[:1] == ["base"]
    assert list(agg["versus"]) == ["delta@5,mixed"]  # a fused model is not a CPI-FT result
    # a cell measured on some seeds only: its own mean and n, paired over those seeds
    per_seed["1"]["scores"]["fisher@20,mixed"] = {"a": 30.0, "b": 14.0}
    per_seed["2"]["scores"]["fisher@20,mixed"] = {"a": 20.0, "b": 12.0}
    # keyed by int seed, as the benchmark's own call passes them
    by_int = {int(s): v for s, v in per_seed.items()}
    part = bq.aggregate(by_int, ["a", "b"], bq.model_rows("delta@5,mixed", ["fisher@20,mixed"], ["a", "b"]))
    e = part["models"]["fisher@20,mixed"]
    assert e["n_seeds"] == 2 and e["label"].endswith("(seeds 1, 2 only)")
    assert math.isclose(e["avg"][0], statistics.mean([22, 16]))
    pv = part["versus"]["fisher@20,mixed"]["full_mtl"]
    assert pv["n_seeds"] == 2 and math.isclose(pv["avg"]["diff"], statistics.mean([22 - 18, 16 - 15]))
    assert part["models"]["delta@5,mixed"]["n_seeds"] == 3
    doc = {
        "setting": "balanced",
        "config": "x/quality-cpu.yaml",
        "seeds": [0, 1, 2],
        "tasks": ["a", "b"],
        "n_eval": {"a": 80, "b": 80},
        "aggregate": agg,
        "budgets": {
            "0": {
                "cpi_rows": 26,
                "cpi": {"probe_rows": {"a": 5, "b": 5}},
                "modes": {"full_mtl": {"rows": 26}},
            }
        },
        "groupings": {
            "0": {
                "delta@5,mixed": {
                    "groups": [["a"], ["b"]],
                    "jaccard": [0.02, 0.03],
                    "chance": 0.0256,
                    "consolidate_rows": [{"a": 8, "b": 8}],
                }
            }
        },
        "commands": ["python benchmarks/bench_quality.py --seeds 0 1 2"],
    }
    md = bq.write_results(tmp_path, doc)
    text = md.read_text()
    assert md.name == "quality-quality-cpu-balanced.md"
    assert "| CPI-FT delta@5,mixed | 29.7 ± 0.9 | 16.3 ± 2.3 |" in text
    assert "(win)" in text and "0.8–1.2x" in text and "| 26 (10 + 16) | a:8 b:8 |" in text
    assert json.loads((tmp_path / "quality-quality-cpu-balanced.json").read_text())["seeds"] == [0, 1, 2]


def test_one_seed_decides_nothing():
    bq = _bench()
    per_seed = {"0": _seed({"a": 20.0, "b": 10.0}, {"a": 30.0, "b": 12.0}, {"a": 5.0, "b": 5.0})}
    agg = bq.aggregate(per_seed, ["a", "b"], bq.model_rows("delta@5,mixed", [], ["a", "b"]))
    assert agg["versus"]["delta@5,mixed"]["full_mtl"]["avg"]["verdict"] == "n/a"
    assert math.isnan(agg["models"]["fused"]["avg"][1])


def test_cell_names_and_overrides():
    bq = _bench()
    cell = ("delta_fisher", 5.0, 0.3, "group", ("fuse.omega=0.3",))
    assert bq.cell_name(*cell, run_tau=0.1) == "delta_fisher@5,tau=0.3,group,fuse.omega=0.3"
    assert bq.cell_overrides(cell) == [
        "regions.score=delta_fisher",
        "regions.p=5",
        "groups.tau=0.3",
        "consolidate.data=group",
        "fuse.omega=0.3",
    ]
    same = {"regions": "r", "groups": [["a", "b"]], "data": "mixed"}
    assert bq.same_training(same, {**same, "data": "group"})  # one group: the same mix
    two = {"regions": "r", "groups": [["a"], ["b"]], "data": "mixed"}
    assert not bq.same_training(two, {**two, "data": "group"})


def test_interference_is_full_mtl_minus_each_tasks_own_expert():
    bq = _bench()
    per_seed = {
        "0": _seed({"a": 20.0, "b": 40.0}, {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0}),
        "1": _seed({"a": 26.0, "b": 36.0}, {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0}),
    }
    per_seed["0"]["stderr"] = {"baseline:full_mtl": {"a": 3.0}, "probe:a": {"a": 4.0}}
    per_seed["1"]["stderr"] = {"baseline:full_mtl": {"a": 0.0}, "probe:a": {"a": 0.0}}
    out = bq.interference(per_seed, ["a", "b"])
    # a: its expert scores 40 on it (both seeds); b: 30.
    assert math.isclose(out["a"]["diff"], statistics.mean([20 - 40, 26 - 40]))
    assert math.isclose(out["a"]["se"], statistics.stdev([-20, -14]) / math.sqrt(2))
    assert out["a"]["verdict"] == "loss" and out["b"]["verdict"] == "win"
    assert math.isclose(out["a"]["eval_se"], 5.0 / 2)  # sqrt(3² + 4²) over 2 seeds
    assert math.isnan(out["b"]["eval_se"])  # no eval error recorded for b
    assert "a" not in bq.interference({"0": {"scores": {"probe:a": {"a": 1.0}}}}, ["a"])


def test_a_cells_fused_model_is_not_compared_with_the_baselines():
    bq = _bench()
    seed = _seed({"a": 20.0, "b": 10.0}, {"a": 30.0, "b": 12.0}, {"a": 5.0, "b": 5.0})
    seed["scores"].update(
        {"fisher@20,mixed": {"a": 1.0, "b": 2.0}, "fisher@20,mixed fused": {"a": 3.0, "b": 4.0}}
    )
    rows = bq.model_rows("delta@5,mixed", ["fisher@20,mixed"], ["a", "b"])
    agg = bq.aggregate({"0": seed}, ["a", "b"], rows)
    assert "fisher@20,mixed fused" in agg["models"]
    assert sorted(agg["versus"]) == ["delta@5,mixed", "fisher@20,mixed"]


def test_eval_row_error_of_an_average_difference():
    bq = _bench()
    seed = _seed({"a": 20.0, "b": 10.0}, {"a": 30.0, "b": 12.0}, {"a": 5.0, "b": 5.0})
    seed["stderr"] = {"baseline:full_mtl": {"a": 3.0, "b": 4.0}, "delta@5,mixed": {"a": 0.0, "b": 12.0}}
    # sqrt(9 + 16 + 0 + 144) / 2 tasks / 1 seed
    assert math.isclose(
        bq.eval_error_of_average({"0": seed}, ["a", "b"], "delta@5,mixed", "baseline:full_mtl"), 6.5
    )
    agg = bq.aggregate({"0": seed}, ["a", "b"], bq.model_rows("delta@5,mixed", [], ["a", "b"]))
    assert math.isclose(agg["versus"]["delta@5,mixed"]["full_mtl"]["avg"]["eval_se"], 6.5)
    two = {"0": seed, "1": seed}  # the mean of two seeds halves the variance: error / sqrt(2)
    assert math.isclose(
        bq.eval_error_of_average(two, ["a", "b"], "delta@5,mixed", "baseline:full_mtl"), 6.5 / math.sqrt(2)
    )


def test_probes_from_each_seeds_own_run(tmp_path):
    """`--probes-from '.../seed-{seed}'`: each seed's run starts from the same seed's probes of
    the other setting, linked (not copied); a run that has probes keeps its own."""
    import os

    bq = _bench()
    for s in (0, 1):
        d = tmp_path / "balanced" / f"seed-{s}" / "probes" / "task"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_text(f"seed {s}")
    template = str(tmp_path / "balanced" / "seed-{seed}")
    for s in (0, 1):
        run = tmp_path / "imbalanced" / f"seed-{s}"
        bq.seed_probes(run, bq.probes_source(template, s))
        linked = run / "probes" / "task" / "model.safetensors"
        src = tmp_path / "balanced" / f"seed-{s}" / "probes" / "task" / "model.safetensors"
        assert linked.read_text() == f"seed {s}" and os.stat(linked).st_ino == os.stat(src).st_ino
    bq.seed_probes(tmp_path / "imbalanced" / "seed-0", bq.probes_source(template, 1))
    assert (
        tmp_path / "imbalanced" / "seed-0" / "probes" / "task" / "model.safetensors"
    ).read_text() == "seed 0"


def test_seed_time_counts_each_stage_and_cell_once(tmp_path):
    """A seed's time is its run's stage records plus each cell's time, whatever number of
    invocations made them: a cell's linked probes (their record included) are not counted again,
    and a torn record counts nothing."""
    bq = _bench()
    run = tmp_path / "seed-0"

    def record(folder: Path, stage: str, wall: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        rec = {"stage": stage, "fingerprint": "f", "outputs": [], "wall_time_s": wall}
        (folder / "stage.json").write_text(json.dumps(rec))

    record(run / "probes", "probe", 100.0)
    record(run / "baselines", "baselines", 200.0)
    record(run / "eval", "evaluate", 30.5)
    (run / "regions").mkdir()
    (run / "regions" / "stage.json").write_text('{"stage": "regions", "wall')
    record(run / "cells" / "c1" / "probes", "probe", 100.0)
    record(run / "cells" / "c1" / "consolidate", "consolidate", 40.0)
    (run / "cells.json").write_text(json.dumps({"wall_s": {"c1": 45.0, "c2": 12.5}}))
    assert bq.seed_compute_s(run) == 100.0 + 200.0 + 30.5 + 45.0 + 12.5
    assert bq.seed_compute_s(tmp_path / "absent") == 0.0
    # The first invocation reads the run; later ones add their own work, so a stage that reran
    # to add a baseline mode (its record now holding that run only) loses nothing.
    assert bq.seed_time(None, run, 999.0) == bq.seed_compute_s(run)
    record(run / "baselines", "baselines", 20.0)
    assert bq.seed_compute_s(run) == 100.0 + 20.0 + 30.5 + 45.0 + 12.5  # the 200 s are gone
    assert bq.seed_time(388.0, run, 20.0 + 7.5) == 415.5


def test_a_scored_cell_keeps_its_final_model_only(tmp_path):
    """After scoring, a cell's fused model and each consolidation stage's model go; its final
    model, records, masks and logs stay (its grouping was read before)."""
    bq = _bench()
    cell = tmp_path / "cells" / "fisher@20,mixed"
    keep = ["final/model.safetensors", "consolidate/stage.json", "consolidate/masks/a.mask", "logs/x.log"]
    drop = ["fused/model.safetensors", "fused/stage.json", "consolidate/stage-1/model.safetensors"]
    drop += ["consolidate/stage-2/consolidate.json", "consolidate/stage-3/model.safetensors"]
    for rel in keep + drop:
        (cell / rel).parent.mkdir(parents=True, exist_ok=True)
        (cell / rel).write_text(rel)
    bq.drop_intermediate_models(cell)
    assert all((cell / rel).read_text() == rel for rel in keep)
    assert not any((cell / rel).exists() for rel in drop)
    assert not (cell / "fused").exists() and sorted(p.name for p in (cell / "consolidate").iterdir()) == [
        "masks",
        "stage.json",
    ]
    bq.drop_intermediate_models(tmp_path / "cells" / "absent")  # nothing there: nothing to do
