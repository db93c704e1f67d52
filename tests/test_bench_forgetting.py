"""The forgetting benchmark's tables over seeds, without training: every run measured on every seed
(plain, EPI, frozen-core cells) gets its drop, its ratio to the plain drop and its paired
differences, computed here independently from the per-seed scores."""

import importlib.util
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_forgetting", ROOT / "benchmarks" / "bench_forgetting.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _models(plain_a, epi_a, frozen_a, b_after):
    return {
        "models": {
            "base": {"A": 5.0, "B": 0.0},
            "probe:A": {"A": 20.0, "B": 10.0},
            "probe:B": {"A": 0.0, "B": 40.0},
            "plain": {"A": plain_a, "B": b_after},
            "fisher@20": {"A": frozen_a, "B": b_after},
            "epi": {"A": epi_a, "B": b_after + 5},
        }
    }


def test_every_run_on_every_seed_gets_its_row():
    bench = _bench()
    per_seed = {"0": _models(2.0, 6.0, 19.0, 30.0), "1": _models(4.0, 4.0, 17.0, 34.0)}
    per_seed["2"] = {
        "models": {k: v for k, v in _models(3.0, 5.0, 18.0, 32.0)["models"].items() if k != "epi"}
    }
    header, rows, agg = bench.seeds_table(per_seed, "A", "B")
    # EPI is missing from seed 2: only runs measured on every seed are aggregated
    assert [r[0] for r in rows] == ["plain", "fisher@20"]
    header, rows, agg = bench.seeds_table({s: per_seed[s] for s in ("0", "1")}, "A", "B")
    assert [r[0] for r in rows] == ["plain", "fisher@20", "EPI while B trains"]
    drops = [6.0 - 20.0, 4.0 - 20.0]
    assert agg["epi"]["drop"][0] == statistics.mean(drops)
    assert abs(agg["epi"]["drop"][1] - statistics.stdev(drops) / 2**0.5) < 1e-12
    plain_drop = statistics.mean([2.0 - 20.0, 4.0 - 20.0])
    assert agg["epi"]["drop_ratio"] == statistics.mean(drops) / plain_drop
    # paired against the plain run of the same seed: +4 and 0
    assert agg["epi"]["a_vs_plain"][0] == 2.0
    # the one-seed table labels the EPI row too
    assert "EPI while B trains" in bench.table(per_seed["0"], "A", "B")
