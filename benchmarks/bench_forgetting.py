"""Forgetting by core score and core ratio: task A's SFT, then task B trained on top, plainly and
with A's core region frozen, for every `regions.score` x `regions.p` asked for.

Uses the pipeline's own stages on one run directory: `probe` (A's and B's single-task SFT, with
the Fisher when a score needs it), then per cell `regions` (A's core at that score and p) and
`baselines` in mode `sequential_cpi` (B trained from A's probe with A's core frozen, on the
consolidation engine), and once mode `sequential` (the same without freezing); with `--epi`, once
mode `sequential_epi` (B trained from A's probe with EPI, its frozen set chosen from B's online
importance). With two tasks the frozen-core cells are also DPI's mechanism: B trains with A's
core frozen, and there is nothing to fuse. Every model is
scored on A's and B's eval rows; results accumulate in `<run-root>/forgetting.json`, so a rerun
resumes at the first cell not yet measured.

    python benchmarks/bench_forgetting.py          # quality.yaml, spell_backward -> letter_counting
    python benchmarks/bench_forgetting.py --scores delta_fisher --ps 5
    python benchmarks/bench_forgetting.py --config jobs/configs/smoke.yaml --pair reverse upper \\
        --run-root runs/bf-smoke

Printed: per cell, A after A, A after B, A's drop and its ratio to the plain drop, B after B and
the share of the plain run's gain on B that the frozen run kept. With several `--seeds` (each in
`<run-root>/seed-<n>/`), a last table gives each figure as mean ± standard error over the seeds,
the ratios as ratios of the means, and each cell's paired difference to the plain run on A and
on B (a tie when within one standard error); `--results DIR` keeps it as
`forgetting-<config>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpi_ray.config.load import load_config  # noqa: E402
from cpi_ray.evaluation.report import constant_label, markdown_table  # noqa: E402
from cpi_ray.evaluation.stats import fmt_mean_se, mean_se  # noqa: E402
from cpi_ray.io.atomic import atomic_file, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


RUN_LABELS = {"plain": "plain", "epi": "EPI while B trains"}
# The runs every seed table shows beside the frozen-core cells (`score@p`).
RUNS = tuple(RUN_LABELS)


def table(results: dict, a: str, b: str) -> str:
    models = results["models"]
    before_a, before_b = models[f"probe:{a}"][a], models[f"probe:{a}"][b]
    plain = models.get("plain")
    rows = [
        ["base", "-", "-", f"{models['base'][a]:.1f}", "", "", f"{models['base'][b]:.1f}", ""],
        [f"expert {b}", "-", "-", "", "", "", f"{models[f'probe:{b}'][b]:.1f}", ""],
    ]
    cells = [("plain", "none", "-"), ("epi", "-", "-")] + [(k, *k.split("@")) for k in models if "@" in k]
    for key, score, p in cells:
        if key not in models:
            continue
        s = models[key]
        drop, gain = s[a] - before_a, s[b] - before_b
        ratio = kept = ""
        if plain is not None and key != "plain":
            plain_drop, plain_gain = plain[a] - before_a, plain[b] - before_b
            ratio = f"{drop / plain_drop:.2f}" if plain_drop < 0 else "n/a"
            kept = f"{100 * gain / plain_gain:.0f}%" if plain_gain > 0 else "n/a"
        rows.append(
            [
                RUN_LABELS.get(key, "frozen A core"),
                score,
                p,
                f"{before_a:.1f}",
                f"{s[a]:.1f}",
                f"{drop:+.1f} {('(' + ratio + ' of plain)') if ratio else ''}".strip(),
                f"{s[b]:.1f}",
                kept,
            ]
        )
    return markdown_table(
        ["run", "score", "p %", f"{a} after A", f"{a} after B", "A's drop", f"{b} after B", "B's gain kept"],
        rows,
    )


def cell_figures(models: dict, a: str, b: str, key: str) -> dict[str, float]:
    """One run's figures for a cell: A after B, A's drop from its expert, B after B, B's gain over
    A's expert, and the paired differences to the plain run of the same seed."""
    before_a, before_b = models[f"probe:{a}"][a], models[f"probe:{a}"][b]
    s, plain = models[key], models["plain"]
    return {
        "a_after": s[a],
        "drop": s[a] - before_a,
        "b_after": s[b],
        "gain": s[b] - before_b,
        "a_vs_plain": s[a] - plain[a],
        "b_vs_plain": s[b] - plain[b],
    }


def seeds_table(per_seed: dict[str, dict], a: str, b: str) -> tuple[list[str], list[list[str]], dict]:
    """Mean ± standard error over seeds of each cell's figures; the drop as a share of the plain
    run's drop and B's gain as a share of the plain run's gain (ratios of the means: a seed whose
    plain run gained nothing on B leaves the per-seed ratio undefined, not the mean's); and the
    paired difference to the plain run on A and on B (within one standard error: a tie)."""
    seeds = list(per_seed)
    keys = [
        k
        for k in per_seed[seeds[0]]["models"]
        if (k in RUNS or "@" in k) and all(k in per_seed[s]["models"] for s in seeds)
    ]
    agg = {}
    rows = []
    for key in keys:
        figs = [cell_figures(per_seed[s]["models"], a, b, key) for s in seeds]
        agg[key] = {f: mean_se([x[f] for x in figs]) for f in figs[0]}
    plain_drop = agg["plain"]["drop"][0] if "plain" in agg else float("nan")
    plain_gain = agg["plain"]["gain"][0] if "plain" in agg else float("nan")
    for key in keys:
        e = agg[key]
        ratio = e["drop"][0] / plain_drop if plain_drop < 0 else float("nan")
        kept = 100 * e["gain"][0] / plain_gain if plain_gain > 0 else float("nan")
        e["drop_ratio"], e["b_kept"] = ratio, kept
        rows.append(
            [
                RUN_LABELS.get(key, key),
                fmt_mean_se(*e["a_after"]),
                fmt_mean_se(*e["drop"]),
                "—" if key == "plain" or ratio != ratio else f"{ratio:.2f}",
                "—" if key == "plain" else _paired(e["a_vs_plain"]),
                fmt_mean_se(*e["b_after"]),
                "—" if key == "plain" or kept != kept else f"{kept:.0f}",
                "—" if key == "plain" else _paired(e["b_vs_plain"]),
            ]
        )
    header = [
        "run",
        f"{a} after B",
        "A's drop",
        "drop / plain drop",
        f"{a}: minus plain",
        f"{b} after B",
        "B's gain kept (%)",
        f"{b}: minus plain",
    ]
    return header, rows, agg


def _paired(m_se: tuple[float, float]) -> str:
    """A paired difference over seeds, called a tie when within one standard error."""
    m, se = m_se
    verdict = "n/a" if se != se else ("tie" if abs(m) <= se else ("better" if m > 0 else "worse"))
    return f"{fmt_mean_se(m, se)} ({verdict})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "quality.yaml"))
    ap.add_argument("--pair", nargs=2, default=["spell_backward", "letter_counting"], metavar=("A", "B"))
    ap.add_argument("--scores", nargs="+", default=["delta_fisher", "delta", "fisher"])
    ap.add_argument("--ps", type=float, nargs="+", default=[5, 1, 20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--run-root", default="runs/bench-forgetting")
    ap.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="write forgetting-<config>.json and .md here after every seed",
    )
    ap.add_argument(
        "--epi", action="store_true", help="also train B from A's probe with EPI (mode sequential_epi)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    a, b = args.pair
    root = Path(args.run_root).expanduser().resolve()
    per_seed = {}
    for seed in args.seeds:
        # One seed's runs keep the layout of a single-seed run when only seed 0 is asked for.
        seed_root = root if args.seeds == [0] else root / f"seed-{seed}"
        per_seed[str(seed)] = run_seed(args, seed, seed_root)
        header, rows, agg = seeds_table(per_seed, a, b)
        if args.results is not None:
            write_results(args, per_seed, header, rows, agg)
    print(f"\nForgetting, {a} then {b}, over seeds {', '.join(per_seed)}: mean ± standard error\n")
    print(markdown_table(header, rows))
    return 0


def write_results(args, per_seed: dict, header: list[str], rows: list[list[str]], agg: dict) -> None:
    import shlex

    stem = f"forgetting-{Path(args.config).stem}"
    args.results.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_forgetting.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    write_json(
        args.results / f"{stem}.json",
        {
            "config": args.config,
            "pair": args.pair,
            "seeds": list(per_seed),
            "per_seed": per_seed,
            "aggregate": agg,
            "command": command,
        },
    )
    a, b = args.pair
    from cpi_ray.evaluation.evaluate import constant_answer

    const = constant_answer(load_config(args.config, args.overrides))
    with atomic_file(args.results / f"{stem}.md", "w") as f:
        f.write(
            f"# Forgetting: {a} then {b} ({Path(args.config).name})\n\n"
            f"Seeds: {', '.join(per_seed)}. Mean ± standard error over seeds; A's drop is "
            "from A's expert; B's gain kept is the share of the plain run's gain on B. "
            "Answering the commonest gold answer on every row scores "
            + ", ".join(f"{t} {const[t]['score']:.1f} ({constant_label(const[t])})" for t in (a, b))
            + ".\n\n"
            + markdown_table(header, rows)
            + f"\n\n```\n{command}\n```\n"
        )


def run_seed(args, seed: int, root: Path) -> dict:
    from cpi_ray.data.tasks import load_splits
    from cpi_ray.evaluation.evaluate import score_model
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.pipeline.runner import run_pipeline
    from cpi_ray.run.runtime import connect_ray

    a, b = args.pair
    # Its own embedded Ray unless told otherwise (--set ray.address=auto on a cluster).
    cfg = load_config(
        args.config,
        [
            "ray.address=local",
            f"baselines.sequential=[{a}, {b}]",
            f"probe.seed={seed}",
            f"consolidate.seed={seed}",
            f"baselines.seed={seed}",
            *args.overrides,
        ],
    )
    missing = {a, b} - {t.name for t in cfg.tasks}
    if missing:
        raise SystemExit(f"--pair: no task {sorted(missing)} in {args.config}")
    cfg.tasks = [t for t in cfg.tasks if t.name in (a, b)]
    connect_ray(cfg)
    run_dir = root / "run"
    out = root / "forgetting.json"
    results = json.loads(out.read_text()) if out.is_file() else {"models": {}, "wall_s": {}}
    base_dir, _ = resolve_base_model(cfg)
    rows = {t.name: load_splits(t, cfg.data.split_seed).eval for t in cfg.tasks}

    def measure(key: str, model_dir: Path, t0: float) -> None:
        results["models"][key] = score_model(model_dir, rows, cfg, base_dir)
        results["wall_s"][key] = round(time.time() - t0, 1)
        write_json(out, results)
        print(
            f"{key}: "
            + ", ".join(f"{t}={v:.1f}" for t, v in results["models"][key].items())
            + f" ({results['wall_s'][key]:.0f}s)",
            flush=True,
        )

    def cell_cfg(score: str, p: float, mode: str):
        c = cfg.model_copy(deep=True)
        c.regions.score, c.regions.p, c.baselines.modes = score, p, [mode]
        return c

    # The probes, with the Fisher if any cell needs it (computed once, kept for every cell).
    first = cell_cfg(args.scores[0], args.ps[0], "sequential")
    t0 = time.time()
    run_pipeline(first, run_dir, stages=["probe"])
    for key, d in (
        ("base", base_dir),
        (f"probe:{a}", run_dir / "probes" / a),
        (f"probe:{b}", run_dir / "probes" / b),
    ):
        if key not in results["models"]:
            measure(key, d, t0)
            t0 = time.time()
    if "plain" not in results["models"]:
        t0 = time.time()
        run_pipeline(first, run_dir, stages=["probe", "baselines"])
        measure("plain", run_dir / "baselines" / "sequential", t0)
    if args.epi and "epi" not in results["models"]:
        t0 = time.time()
        run_pipeline(
            cell_cfg(args.scores[0], args.ps[0], "sequential_epi"), run_dir, stages=["probe", "baselines"]
        )
        measure("epi", run_dir / "baselines" / "sequential_epi", t0)
    for p in args.ps:
        for score in args.scores:
            key = f"{score}@{p:g}"
            if key in results["models"]:
                continue
            t0 = time.time()
            run_pipeline(
                cell_cfg(score, p, "sequential_cpi"), run_dir, stages=["probe", "regions", "baselines"]
            )
            measure(key, run_dir / "baselines" / "sequential_cpi", t0)
            print(table(results, a, b), flush=True)

    print(
        f"\nForgetting (seed {seed}): {a} then {b}, eval rows "
        f"{', '.join(f'{t} {len(r)}' for t, r in rows.items())}\n"
    )
    print(table(results, a, b))
    print(
        f"\nwall time: {sum(results['wall_s'].values()) / 60:.1f} min "
        f"(plain and each cell: training plus scoring)"
    )
    return results


if __name__ == "__main__":
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The pipeline's own progress lines (stages, groups, rows per task), as the job prints them.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    sys.exit(main())
