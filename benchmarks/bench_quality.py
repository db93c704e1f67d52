"""Quality benchmark: CPI-FT against its baselines, printed like the paper's Table 1.

Runs the whole pipeline once per seed with the baselines `full_mtl` and `multistage` (same budget,
data and seeds for every mode), then prints per-task scores of base, each single-task expert,
full multi-task SFT, multi-stage SFT and CPI-FT, with the average and the worst task.

Core score, ratio and overlap threshold as dimensions (`--scores`, `--ps`, `--taus`; a cell is
`score@p`, with `,tau=τ` when τ is not the first): the first cell is the pipeline's own
run (its report holds it); every further cell re-runs regions, groups, fuse and consolidate on
the same probes and scores CPI-FT's final model, kept with the groups its cores formed (and their
pairwise Jaccard range) in `<run dir>/cells.json` so a rerun resumes; a table of the cells ends
each seed; a cell whose cores and groups equal an earlier one's takes its scores. The baselines
keep the budget of the first cell's groups.

Settings (`--setting`):
  balanced    the config's tasks with equal data and equal shares of every mix (default);
  imbalanced  the first task with ten times the rows of the others and ten times their share of
              every mixed batch (the case CPI-FT is meant to protect: the small tasks' cores);
  forgetting  bench_forgetting.py (sequential A then B, by core score and p).

    python benchmarks/bench_quality.py                       # benchmarks/configs/quality.yaml
    python benchmarks/bench_quality.py --setting imbalanced --seeds 0 1 2 --set regions.p=5
    python benchmarks/bench_quality.py --setting imbalanced --scores delta delta_fisher --ps 5 \
        --probes-from runs/bench-quality/balanced/seed-0
    python benchmarks/bench_quality.py --setting imbalanced --scores delta delta_fisher fisher \
        --ps 5 --taus 0.1 0.3   # each cell again at tau = 0.3
    python benchmarks/bench_quality.py --config jobs/configs/smoke.yaml --run-root runs/bq-smoke

Reruns resume: each seed's run directory keeps its completed stages. `--probes-from` links
another run's probes in first; the probe stage keeps those whose task, data and recipe match
(their fingerprint) and trains the rest, so the imbalanced setting reuses the balanced one's
probes of the tasks it does not change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpi_ray.config.load import load_config  # noqa: E402
from cpi_ray.evaluation.report import markdown_table, summarize  # noqa: E402
from cpi_ray.io.atomic import read_json, write_json  # noqa: E402
from cpi_ray.tune.cache import link_tree  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = "[full_mtl, multistage]"
CELL_STAGES = ["probe", "regions", "groups", "fuse", "consolidate"]


def table1(scores: dict[str, dict[str, float]], tasks: list[str], first_cell: str) -> str:
    rows_spec = [("base", "base")] + [(f"expert {t}", f"probe:{t}") for t in tasks] + [
        ("full multi-task SFT", "baseline:full_mtl"), ("multi-stage SFT", "baseline:multistage"),
        (f"CPI-FT {first_cell}, fused (before consolidation)", "fused"),
        (f"CPI-FT {first_cell}", "final")] + [
        (f"CPI-FT {k}", k) for k in scores if "@" in k and k != first_cell]
    summ, rows = summarize(scores, tasks), []
    for label, key in rows_spec:
        if key not in scores:
            continue
        rows.append([label, *(f"{scores[key][t]:.1f}" for t in tasks), f"{summ[key]['avg']:.1f}",
                     f"{summ[key]['worst']:.1f}"])
    return markdown_table(["model", *tasks, "avg", "worst"], rows)


def mean_scores(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    models = [m for m in per_seed[0] if all(m in s for s in per_seed)]  # first seed's order
    return {m: {t: statistics.mean(s[m][t] for s in per_seed) for t in per_seed[0][m]}
            for m in models}


def setting_overrides(cfg, setting: str) -> list[str]:
    """Config overrides that turn the config's tasks into the setting."""
    if setting == "balanced":
        return []
    first = cfg.tasks[0]
    over = [f"tasks.{first.name}.weight={10 * first.weight:g}"]
    if first.reasoning_gym is not None:
        over.append(f"tasks.{first.name}.reasoning_gym.size={10 * first.reasoning_gym.size}")
    else:
        print(f"imbalanced: task {first.name} keeps its rows (not a generator); its share of "
              "every mix is 10x")
    return over


def cell_name(score: str, p: float, tau: float, run_tau: float) -> str:
    """`score@p`, with `,tau=τ` when the cell's τ is not the run's (the first τ)."""
    return f"{score}@{p:g}" + ("" if tau == run_tau else f",tau={tau:g}")


def seed_probes(run_dir: Path, source: Path) -> None:
    """Link `source`'s probes into a new run (every probe write is atomic, so the two runs never
    share a changed file); the probe stage keeps the ones whose fingerprint matches this run's
    config and retrains the others."""
    if (run_dir / "probes").exists() or not (source / "probes").is_dir():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    link_tree(source / "probes", run_dir / "probes")
    print(f"probes linked from {source}; those that do not match this config will be retrained")


def grouping(run_dir: Path) -> dict:
    """How the run's current cores grouped the tasks: the groups, τ and the range of the pairwise
    Jaccard (the next cell overwrites `groups/`, so each cell keeps its own copy)."""
    overlap = read_json(run_dir / "groups" / "overlap.json")
    jac, n = overlap["jaccard"], len(overlap["tasks"])
    pairs = [jac[a][b] for a in range(n) for b in range(a + 1, n)]
    return {"groups": read_json(run_dir / "groups" / "groups.json"), "tau": overlap["tau"],
            "jaccard": [min(pairs), max(pairs)] if pairs else None,
            "regions": read_json(run_dir / "regions" / "stage.json")["fingerprint"]}


def cells_table(scores: dict[str, dict[str, float]], groupings: dict[str, dict],
                tasks: list[str]) -> str:
    summ, rows = summarize(scores, tasks), []
    for key in (k for k in scores if "@" in k):
        g = groupings.get(key)  # cells scored before groupings were recorded have none
        jac = "—" if g is None or g["jaccard"] is None else "{:.3f}–{:.3f}".format(*g["jaccard"])
        rows.append([key, "—" if g is None else str(len(g["groups"])), jac,
                     f"{summ[key]['avg']:.1f}", f"{summ[key]['worst']:.1f}"])
    return markdown_table(["cell (score@p %)", "groups", "Jaccard (pairs)", "avg", "worst"], rows)


def run_cells(cfg, run_dir: Path, cells: list[tuple[str, float, float]], scores: dict,
              groupings: dict) -> None:
    """CPI-FT's final model for each further (score, p, τ) on the run's probes, scored on every
    task's eval rows, with the grouping its cores gave, added to `scores` and `groupings`
    (which hold the run's own cell); results accumulate in `run_dir/cells.json`. A cell whose
    cores and groups equal an earlier cell's (a τ that changes nothing) takes its scores."""
    from cpi_ray.data.tasks import load_splits
    from cpi_ray.evaluation.evaluate import score_model
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.pipeline.runner import run_pipeline

    out = run_dir / "cells.json"
    done = read_json(out) if out.is_file() else {"scores": {}, "wall_s": {}}
    done.setdefault("groups", {})
    scores.update(done["scores"])
    groupings.update(done["groups"])
    base_dir, _ = resolve_base_model(cfg)
    rows = {t.name: load_splits(t, cfg.data.split_seed).eval for t in cfg.tasks}
    for score, p, tau in cells:
        key = cell_name(score, p, tau, cfg.groups.tau)
        if key in done["scores"]:
            continue
        t0 = time.time()
        c = cfg.model_copy(deep=True)
        c.regions.score, c.regions.p, c.groups.tau = score, p, tau
        run_pipeline(c, run_dir, stages=CELL_STAGES[:3])
        g = grouping(run_dir)
        twin = next((k for k, kg in groupings.items() if k in scores
                     and kg.get("regions") == g["regions"] and kg["groups"] == g["groups"]), None)
        if twin is None:
            run_pipeline(c, run_dir, stages=CELL_STAGES[3:])  # probe..groups are done above
            done["scores"][key] = score_model(run_dir / "final", rows, c, base_dir)
        else:
            done["scores"][key], g["same_as"] = scores[twin], twin
        done["groups"][key] = g
        done["wall_s"][key] = round(time.time() - t0, 1)
        write_json(out, done)
        scores[key], groupings[key] = done["scores"][key], g
        print(f"{key}: " + ", ".join(f"{t}={v:.1f}" for t, v in scores[key].items())
              + f"; {len(g['groups'])} group(s)"
              + (f", the same as {twin}'s" if twin else "")
              + f" ({done['wall_s'][key]:.0f}s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "quality.yaml"))
    ap.add_argument("--run-root", default="runs/bench-quality")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--setting", choices=["balanced", "imbalanced"], default="balanced")
    ap.add_argument("--scores", nargs="+", choices=["delta", "fisher", "delta_fisher"],
                    help="core scores to compare (default: the config's regions.score)")
    ap.add_argument("--ps", type=float, nargs="+", help="core ratios in %% (default: regions.p)")
    ap.add_argument("--taus", type=float, nargs="+",
                    help="overlap thresholds τ (default: groups.tau); the first is the run's")
    ap.add_argument("--probes-from", type=Path, metavar="RUN_DIR",
                    help="start from another run's probes (kept where their fingerprint matches)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from cpi_ray.pipeline.runner import connect_ray, run_pipeline

    per_seed, budgets, tasks, walls = [], [], [], []
    base_cfg = load_config(args.config, args.overrides)
    setting = setting_overrides(base_cfg, args.setting)
    cells = [(s, p, tau) for tau in (args.taus or [base_cfg.groups.tau])
             for p in (args.ps or [base_cfg.regions.p])
             for s in (args.scores or [base_cfg.regions.score])]
    first = cell_name(*cells[0], run_tau=cells[0][2])
    for seed in args.seeds:
        t0 = time.time()
        overrides = [f"baselines.modes={MODES}", f"probe.seed={seed}", f"consolidate.seed={seed}",
                     f"groups.seed={seed}", f"baselines.seed={seed}", *setting, *args.overrides,
                     f"regions.score={cells[0][0]}", f"regions.p={cells[0][1]:g}",
                     f"groups.tau={cells[0][2]:g}"]
        cfg = load_config(args.config, overrides)
        connect_ray(cfg)
        run_dir = Path(args.run_root).resolve() / args.setting / f"seed-{seed}"
        if args.probes_from is not None:
            seed_probes(run_dir, args.probes_from.resolve())
        run_pipeline(cfg, run_dir)
        doc = read_json(run_dir / "eval" / "scores.json")
        print(f"\nseed {seed}: report at {run_dir / 'report' / 'index.html'}")
        scores = dict(doc["scores"])
        scores[first], groupings = scores["final"], {first: grouping(run_dir)}
        run_cells(cfg, run_dir, cells[1:], scores, groupings)
        print(f"\nseed {seed}: CPI-FT by core score and ratio (τ = {cfg.groups.tau:g})\n")
        print(cells_table(scores, groupings, doc["tasks"]))
        per_seed.append(scores)
        tasks = doc["tasks"]
        budgets.append(read_json(run_dir / "baselines" / "budget.json"))
        walls.append(time.time() - t0)

    scores = mean_scores(per_seed)
    print(f"\nTable 1 ({args.setting}): per-task scores (0-100), mean over seeds {args.seeds}\n")
    print(table1(scores, tasks, first))
    print("\nbudgets (training rows): CPI-FT", budgets[0]["cpi_rows"], "| " + ", ".join(
        f"{m} {p['rows']}" for m, p in budgets[0]["modes"].items()))
    print(f"wall time of this invocation: {sum(walls) / 60:.1f} min (stages kept from an earlier "
          "run take no time)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
