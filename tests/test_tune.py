"""Tune search: config checks (no Ray), and one 4-trial search on a tiny model through Ray Tune,
Ray Train and the stage cache, whose records the tests read: probes once, shared stages once per
fingerprint, ASHA stopping a trial, outputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from cpi_ray.config.load import ConfigError, load_config
from cpi_ray.run.stage import RECORD_NAME

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"

# The smoke config cut down: two tasks, short probes, one consolidation worker, 4 steps. tau 0
# links every task, so each trial trains one group; warm-up 0 so that a trial's lr acts from
# the first step.
SMALL = [
    "tasks=[{name: reverse, path: jobs/data/reverse.jsonl, eval_size: 8, val_size: 8,"
    " scorer: 'cpi_ray.data.scorers:char_accuracy'},"
    " {name: upper, path: jobs/data/upper.jsonl, eval_size: 8, val_size: 8,"
    " scorer: 'cpi_ray.data.scorers:char_accuracy'}]",
    "probe.steps=40",
    "regions.num_actors=1",
    "fuse.num_actors=1",
    "groups.tau=0",
    "consolidate.steps=4",
    "consolidate.batch_size=8",
    "consolidate.num_workers=1",
    "consolidate.warmup_ratio=0",
    "consolidate.schedule=constant",
    "evaluate.batch_size=16",
]


def _cfg(tmp_path: Path, *extra: str):
    cwd = os.getcwd()
    os.chdir(ROOT)  # task paths in the smoke config are relative to the repository
    try:
        return load_config(SMOKE, [*SMALL, f"model.cache_dir={tmp_path / 'models'}", *extra])
    finally:
        os.chdir(cwd)


def test_space_is_checked_before_any_work(tmp_path):
    from cpi_ray.tune.space import SpaceError, apply_knobs, check_space, param_space

    with pytest.raises(ConfigError, match="section one of"):
        _cfg(tmp_path, "tune.search_space={probe.lr: {choice: [0.1]}}")
    with pytest.raises(ConfigError, match="exactly one of"):
        _cfg(tmp_path, "tune.search_space={regions.p: {choice: [1], uniform: [1, 2]}}")
    with pytest.raises(ConfigError, match="grid needs choice/grid"):
        _cfg(tmp_path, "tune.search_alg=grid", "tune.search_space={regions.p: {uniform: [1, 5]}}")
    cfg = _cfg(tmp_path, "tune.search_space={regions.p: {grid: [1, 500]}}")
    with pytest.raises(SpaceError, match="regions.p"):  # 500% is out of p's range
        check_space(cfg)
    cfg = _cfg(tmp_path, "tune.search_space={regions.p: {grid: [1]}}", "tasks.upper.val_size=0")
    with pytest.raises(SpaceError, match="val_size"):
        check_space(cfg)

    cfg = _cfg(
        tmp_path,
        "tune.search_space={consolidate.lr: {loguniform: [1.0e-4, 1.0e-2]},"
        " groups.tau: {choice: [0.1, 0.3]}, consolidate.steps: {uniform: [2, 6]}}",
    )
    check_space(cfg)
    space = param_space(cfg.tune)
    assert "LogUniform" in type(space["consolidate.lr"].get_sampler()).__name__
    assert space["groups.tau"].categories == [0.1, 0.3]
    knobs = {"consolidate.lr": 3e-3, "groups.tau": 0.3, "consolidate.steps": 4.6}
    trial = apply_knobs(cfg, knobs)
    assert (trial.consolidate.lr, trial.groups.tau, trial.consolidate.steps) == (3e-3, 0.3, 5)
    assert trial.probe == cfg.probe and trial.regions == cfg.regions


def test_cli_exits_2_on_a_bad_space(tmp_path, capsys):
    from cpi_ray.cli import main

    rc = main(
        [
            "run",
            "--config",
            str(SMOKE),
            "--tune",
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "tune.search_space={regions.p: {grid: [5]}}",
        ]
    )
    assert rc == 2  # the smoke tasks hold no validation rows
    assert "val_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_objective():
    from cpi_ray.tune.search import normalized_scores, objective_of

    norm = normalized_scores({"a": 30.0, "b": 10.0}, {"a": 60.0, "b": 0.0})
    assert norm == {"a": 0.5, "b": 10.0}  # an expert at 0 counts as 1 point
    assert objective_of(norm, "mean_normalized") == 5.25
    assert objective_of(norm, "min_normalized") == 0.5


# ---------------------------------------------------------------------------- one real search


@pytest.fixture(scope="module")
def search(ray_session, tmp_path_factory):
    from cpi_ray.tune.search import run_tune

    tmp = tmp_path_factory.mktemp("tune")
    # 2 p values x 2 learning rates, run one at a time, lr varying fastest. lr 0.1 wrecks the
    # model in one step while 1e-4 barely moves it, so a 0.1 trial's validation loss is above
    # the median of those recorded before it at the first rung: ASHA (grace 1) stops it.
    cfg = _cfg(
        tmp,
        "tune.search_alg=grid",
        "tune.num_samples=1",
        "tune.grace_period=1",
        "tune.search_space={regions.p: {grid: [5, 20]}, consolidate.lr: {grid: [1.0e-4, 0.1]}}",
    )
    run_dir = tmp / "run"
    outcome = run_tune(cfg, run_dir)
    return cfg, run_dir, outcome


@pytest.mark.slow
def test_search_completes_with_outputs(search):
    from transformers import AutoModelForCausalLM

    from cpi_ray.config.load import load_config

    cfg, run_dir, outcome = search
    tune_dir = run_dir / "tune"
    trials = json.loads((tune_dir / "trials.json").read_text())
    assert len(trials) == 4
    assert sorted((t["knobs"]["regions.p"], t["knobs"]["consolidate.lr"]) for t in trials) == [
        (5, 1e-4),
        (5, 0.1),
        (20, 1e-4),
        (20, 0.1),
    ]
    finished = [t for t in trials if t["status"] == "finished"]
    assert finished and all(math.isfinite(t["objective"]) for t in finished)
    for t in finished:  # every task scored on validation rows, normalized by its expert
        assert set(t["normalized"]) == {"reverse", "upper"}
    assert (tune_dir / "trials.csv").read_text().count("\n") == 5
    best = outcome.best
    assert best["objective"] == max(t["objective"] for t in finished)
    best_cfg = load_config(tune_dir / "best.yaml")
    assert best_cfg.regions.p == best["knobs"]["regions.p"]
    assert best_cfg.consolidate.lr == best["knobs"]["consolidate.lr"]
    assert not best_cfg.tune.enabled
    model = AutoModelForCausalLM.from_pretrained(tune_dir / "best_model")
    assert model.config.hidden_size == 64
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Tune trials" in report and best["trial_id"] in report
    # The eval split is never scored: no evaluate stage ran anywhere in the search.
    assert not list(run_dir.rglob("eval/scores.json"))


@pytest.mark.slow
def test_asha_stops_a_trial_early(search):
    from cpi_ray.tune.search import max_iterations

    cfg, run_dir, outcome = search
    stopped = [t for t in outcome.trials if t["status"] == "stopped"]
    assert stopped, [(t["trial_id"], t["status"], t["iterations"]) for t in outcome.trials]
    for t in stopped:
        # stopped during consolidation: fewer results than its 4 steps and the final objective
        assert t["iterations"] < cfg.consolidate.steps + 1 <= max_iterations(cfg)
        assert t["knobs"]["consolidate.lr"] == 0.1
        assert t["objective"] is None
    for t in outcome.trials:
        if t["status"] == "finished":
            assert t["iterations"] == cfg.consolidate.steps + 1


@pytest.mark.slow
def test_shared_stages_run_once(search):
    cfg, run_dir, outcome = search
    tune_dir = run_dir / "tune"
    shared = json.loads((tune_dir / "shared.json").read_text())
    probe_fp = shared["probe"]["fingerprint"]
    assert shared["probe"]["status"] == "ran"
    trial_dirs = sorted((tune_dir / "trials").iterdir())
    assert len(trial_dirs) == 4
    for d in trial_dirs:
        # Each trial's probes are the driver's: the same record, the same files (hard links).
        rec = json.loads((d / "probes" / RECORD_NAME).read_text())
        assert rec == json.loads((run_dir / "probes" / RECORD_NAME).read_text())
        assert rec["fingerprint"] == probe_fp
        for out in rec["outputs"]:
            assert (d / out["path"]).stat().st_ino == (run_dir / out["path"]).stat().st_ino
    # Probe trainers ran in the driver alone, and their checkpoints went once the probes were
    # written: no probe Train run is left in the driver or in any trial.
    assert not list(run_dir.glob("_ray/probe-*"))
    assert not [r for d in trial_dirs for r in d.glob("_ray/probe-*")]

    for stage, folder in (("regions", "regions"), ("groups", "groups"), ("fuse", "fused")):
        recs = {d.name: json.loads((d / folder / RECORD_NAME).read_text()) for d in trial_dirs}
        fps = {r["fingerprint"] for r in recs.values()}
        # regions depends on p alone (2 values); groups and fuse on p through their inputs.
        assert len(fps) == 2, stage
        entries = sorted(p.name for p in (tune_dir / "cache" / stage).iterdir() if p.is_dir())
        assert sorted(fps) == entries
        for fp in fps:
            cached = json.loads((tune_dir / "cache" / stage / fp / RECORD_NAME).read_text())
            users = [n for n, r in recs.items() if r["fingerprint"] == fp]
            # Every trial with this fingerprint holds the one record the first run wrote.
            assert all(recs[n] == cached for n in users)
            how = [t["stages"][stage]["status"] for t in outcome.trials if t["trial_id"] in users]
            ran_in_trials = how.count("ran")
            # computed exactly once per fingerprint: in one trial, or (regions at the base p)
            # by the driver before any trial
            by_driver = stage == "regions" and fp == shared["regions"]["fingerprint"]
            assert ran_in_trials == (0 if by_driver else 1), (stage, how)
            assert how.count("cached") == len(users) - ran_in_trials
    # The other p's regions came from the base run's histograms: one scan, no sampling.
    other = [d for d in trial_dirs if json.loads((d / "regions" / "stats.json").read_text())["p"] == 20]
    stats = json.loads((other[0] / "regions" / "stats.json").read_text())
    assert stats["refinement"]["from_histogram"] == ["reverse", "upper"]
    assert stats["num_passes"] == 1


@pytest.mark.slow
def test_histogram_refinement_matches_a_fresh_selection(search, tmp_path):
    """The refined masks of p=20 are bitwise those of a plain regions run."""
    from cpi_ray.io.masks import MaskFile
    from cpi_ray.regions.stage import compute_regions
    from cpi_ray.tune.space import apply_knobs

    cfg, run_dir, outcome = search
    d = next(
        d
        for d in sorted((run_dir / "tune" / "trials").iterdir())
        if json.loads((d / "regions" / "stats.json").read_text())["p"] == 20
    )
    base_dir = next((run_dir.parent / "models").rglob("config.json")).parent
    cfg20 = apply_knobs(cfg, {"regions.p": 20})
    compute_regions(cfg20, base_dir, {t: run_dir / "probes" / t for t in ("reverse", "upper")}, tmp_path)
    for t in ("reverse", "upper"):
        a, b = MaskFile(d / "regions" / f"{t}.mask.safetensors"), MaskFile(tmp_path / f"{t}.mask.safetensors")
        assert sorted(a.names()) == sorted(b.names()) and a.count() == b.count() > 0
        for n in a.names():
            assert a.packed(n).equal(b.packed(n))
