"""Benchmark of the Tune search's reuse: a 4-trial search against 4 independent pipeline runs
with the same knobs, each doing what a trial does (probe, regions, groups, fuse, consolidate, and
scoring the experts and the final model on the validation rows).

The 4 trials are a grid of 2 p values x 2 consolidation learning rates (the config's p and lr,
and p x 2, lr / 3), unless the config has its own `tune.search_space`. The scheduler is FIFO, so
that every trial trains to the end and the ratio shows reuse alone (`--scheduler asha` to include
early stopping). Prints both wall times and their ratio (search / independent).

    python benchmarks/bench_tune.py                                   # demo config
    python benchmarks/bench_tune.py --config jobs/configs/smoke.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--val-size", type=int, default=16, help="validation rows for each task that has none in the config"
    )
    ap.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo")
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import ray

    from cpi_ray.config.load import load_config
    from cpi_ray.io.records import RECORD_NAME, load_record
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.pipeline.runner import run_pipeline
    from cpi_ray.run.layout import RunLayout
    from cpi_ray.run.runtime import connect_ray
    from cpi_ray.run.stage import RunContext
    from cpi_ray.tune.search import (
        _score_remote,
        expert_scores,
        normalized_scores,
        objective_of,
        run_tune,
        validation_rows,
    )
    from cpi_ray.tune.space import apply_knobs

    cfg = load_config(args.config, args.overrides)
    over = [f"tasks.{t.name}.val_size={args.val_size}" for t in cfg.tasks if t.val_size == 0]
    if not cfg.tune.search_space:
        p, lr = cfg.regions.p, cfg.consolidate.lr
        over.append(
            f"tune.search_space={{regions.p: {{grid: [{p}, {min(100.0, 2 * p)}]}},"
            f" consolidate.lr: {{grid: [{lr}, {lr / 3}]}}}}"
        )
        over += ["tune.search_alg=grid", "tune.num_samples=1"]
    over.append(f"tune.scheduler={args.scheduler}")
    cfg = load_config(args.config, [*args.overrides, *over])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"config {args.config}; runs in {work}")
    connect_ray(cfg)
    base_dir, base_id = resolve_base_model(cfg)  # materialized once, outside both timings

    knobs = (
        [
            {"regions.p": p, "consolidate.lr": lr}
            for p in cfg.tune.search_space["regions.p"].values()
            for lr in cfg.tune.search_space["consolidate.lr"].values()
        ]
        if set(cfg.tune.search_space) == {"regions.p", "consolidate.lr"}
        else None
    )

    t0 = time.time()
    outcome = run_tune(cfg, work / "search")
    t_search = time.time() - t0
    if knobs is None:  # the config's own space: repeat the knobs the trials got
        knobs = [t["knobs"] for t in outcome.trials]
    print(f"search: {len(outcome.trials)} trials in {t_search:.1f} s")
    print(outcome.render())

    t0 = time.time()
    objectives = []
    for i, k in enumerate(knobs):
        c = apply_knobs(cfg, k)
        run_dir = work / f"independent-{i}"
        t1 = time.time()
        run_pipeline(c, run_dir, ["probe", "regions", "groups", "fuse", "consolidate"])
        ctx = RunContext(cfg=c, run_dir=run_dir, base_model_dir=base_dir, base_model_id=base_id)
        ctx.records["probe"] = load_record(RunLayout(run_dir).folder("probe") / RECORD_NAME)
        experts = expert_scores(ctx, run_dir / "experts.json")
        scores = ray.get(
            _score_remote(c).remote(
                str(run_dir / "final"), validation_rows(c), c.model_dump(mode="json"), str(base_dir)
            )
        )
        objectives.append(objective_of(normalized_scores(scores, experts), c.tune.objective))
        print(f"independent run {i} {k}: {time.time() - t1:.1f} s, objective {objectives[-1]:.4f}")
    t_indep = time.time() - t0

    figures = {
        "config": args.config,
        "trials": len(knobs),
        "scheduler": args.scheduler,
        "search_s": round(t_search, 1),
        "independent_s": round(t_indep, 1),
        "ratio": round(t_search / t_indep, 3),
        "search_shared": {
            k: v.get("status") for k, v in outcome.shared.items() if isinstance(v, dict) and "status" in v
        },
        "trial_stages": [{s: v["status"] for s, v in t["stages"].items()} for t in outcome.trials],
    }
    print()
    print(
        f"{len(knobs)}-trial search: {t_search:.1f} s; {len(knobs)} independent runs: "
        f"{t_indep:.1f} s; ratio search/independent = {t_search / t_indep:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
