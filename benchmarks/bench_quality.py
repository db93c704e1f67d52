"""Quality benchmark: CPI-FT against its baselines, printed like the paper's tables.

Runs the whole pipeline once per seed with every baseline mode on (same budget, data and seeds
for every mode), then prints
  Table 1: per-task scores of base, each single-task expert, full multi-task SFT, multi-stage SFT
           and CPI-FT, with the average and the worst task;
  Table 2: forgetting when task B is trained after task A, plainly and with A's core frozen.

Settings (`--setting`):
  balanced    the config's tasks with equal data and equal shares of every mix (default);
  imbalanced  the first task with ten times the rows of the others and ten times their share of
              every mixed batch (the case CPI-FT is meant to protect: the small tasks' cores);
  forgetting  see bench_forgetting.py, which also sweeps the core score and p.

    python benchmarks/bench_quality.py                       # benchmarks/configs/quality.yaml
    python benchmarks/bench_quality.py --setting imbalanced --seeds 0 1 2 --set regions.p=5
    python benchmarks/bench_quality.py --config jobs/configs/smoke.yaml --run-root runs/bq-smoke

Reruns resume: each seed's run directory keeps its completed stages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpi_ray.config.load import load_config  # noqa: E402
from cpi_ray.evaluation.report import FORGETTING_HEADER, forgetting_rows, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = "[full_mtl, multistage, sequential, sequential_cpi]"


def table1(scores: dict[str, dict[str, float]], tasks: list[str]) -> str:
    rows_spec = [("base", "base")] + [(f"expert {t}", f"probe:{t}") for t in tasks] + [
        ("full multi-task SFT", "baseline:full_mtl"), ("multi-stage SFT", "baseline:multistage"),
        ("CPI-FT (fused, before consolidation)", "fused"), ("CPI-FT", "final")]
    rows = []
    for label, key in rows_spec:
        if key not in scores:
            continue
        vals = [scores[key][t] for t in tasks]
        rows.append([label, *(f"{v:.1f}" for v in vals), f"{statistics.mean(vals):.1f}",
                     f"{min(vals):.1f}"])
    return markdown_table(["model", *tasks, "avg", "worst"], rows)


def mean_scores(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    models = set.intersection(*(set(s) for s in per_seed))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "quality.yaml"))
    ap.add_argument("--run-root", default="runs/bench-quality")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--setting", choices=["balanced", "imbalanced"], default="balanced")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from cpi_ray.pipeline.runner import connect_ray, run_pipeline

    per_seed, budgets, tasks = [], [], []
    setting = setting_overrides(load_config(args.config, args.overrides), args.setting)
    for seed in args.seeds:
        overrides = [f"baselines.modes={MODES}", f"probe.seed={seed}", f"consolidate.seed={seed}",
                     f"groups.seed={seed}", f"baselines.seed={seed}", *setting, *args.overrides]
        cfg = load_config(args.config, overrides)
        if cfg.baselines.sequential is None:
            names = [t.name for t in cfg.tasks]
            cfg = load_config(args.config, [*overrides, f"baselines.sequential=[{names[0]}, {names[1]}]"])
        connect_ray(cfg)
        run_dir = Path(args.run_root).resolve() / args.setting / f"seed-{seed}"
        run_pipeline(cfg, run_dir)
        doc = json.loads((run_dir / "eval" / "scores.json").read_text())
        per_seed.append(doc["scores"])
        tasks = doc["tasks"]
        budgets.append(json.loads((run_dir / "baselines" / "budget.json").read_text()))
        print(f"\nseed {seed}: report at {run_dir / 'report' / 'index.html'}")

    scores = mean_scores(per_seed)
    print(f"\nTable 1 ({args.setting}): per-task scores (0-100), mean over seeds {args.seeds}\n")
    print(table1(scores, tasks))
    print("\nTable 2: forgetting when B is trained after A\n")
    print(markdown_table(FORGETTING_HEADER, forgetting_rows(scores, budgets[0])))
    print("\nbudgets (training rows): CPI-FT", budgets[0]["cpi_rows"], "| " + ", ".join(
        f"{m} {p['rows']}" for m, p in budgets[0]["modes"].items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
