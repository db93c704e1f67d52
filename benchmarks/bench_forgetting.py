"""Forgetting by core score and core ratio: task A's SFT, then task B trained on top, plainly and
with A's core region frozen, for every `regions.score` x `regions.p` asked for.

Uses the pipeline's own stages on one run directory: `probe` (A's and B's single-task SFT, with
the Fisher when a score needs it), then per cell `regions` (A's core at that score and p) and
`baselines` in mode `sequential_cpi` (B trained from A's probe with A's core frozen, on the
consolidation engine), and once mode `sequential` (the same without freezing). Every model is
scored on A's and B's eval rows; results accumulate in `<run-root>/forgetting.json`, so a rerun
resumes at the first cell not yet measured.

    python benchmarks/bench_forgetting.py                              # quality.yaml, spell_backward -> letter_counting
    python benchmarks/bench_forgetting.py --scores delta_fisher --ps 5
    python benchmarks/bench_forgetting.py --config jobs/configs/smoke.yaml --pair reverse upper \\
        --run-root runs/bf-smoke

Printed: per cell, A after A, A after B, A's drop and its ratio to the plain drop, B after B and
the share of the plain run's gain on B that the frozen run kept.
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
from cpi_ray.evaluation.report import markdown_table  # noqa: E402
from cpi_ray.io.atomic import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def table(results: dict, a: str, b: str) -> str:
    models = results["models"]
    before_a, before_b = models[f"probe:{a}"][a], models[f"probe:{a}"][b]
    plain = models.get("plain")
    rows = [["base", "-", "-", f"{models['base'][a]:.1f}", "", "", f"{models['base'][b]:.1f}", ""],
            [f"expert {b}", "-", "-", "", "", "", f"{models[f'probe:{b}'][b]:.1f}", ""]]
    cells = [("plain", "none", "-")] + [(k, *k.split("@")) for k in models if "@" in k]
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
        rows.append([key if key == "plain" else "frozen A core", score, p, f"{before_a:.1f}",
                     f"{s[a]:.1f}", f"{drop:+.1f} {('(' + ratio + ' of plain)') if ratio else ''}".strip(),
                     f"{s[b]:.1f}", kept])
    return markdown_table(["run", "score", "p %", f"{a} after A", f"{a} after B", "A's drop",
                           f"{b} after B", "B's gain kept"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "quality.yaml"))
    ap.add_argument("--pair", nargs=2, default=["spell_backward", "letter_counting"], metavar=("A", "B"))
    ap.add_argument("--scores", nargs="+", default=["delta_fisher", "delta", "fisher"])
    ap.add_argument("--ps", type=float, nargs="+", default=[5, 1, 20])
    ap.add_argument("--run-root", default="runs/bench-forgetting")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from cpi_ray.data.tasks import load_splits
    from cpi_ray.evaluation.evaluate import score_model
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.pipeline.runner import connect_ray, run_pipeline

    a, b = args.pair
    # Its own embedded Ray unless told otherwise (--set ray.address=auto on a cluster).
    cfg = load_config(args.config, ["ray.address=local", f"baselines.sequential=[{a}, {b}]",
                                    *args.overrides])
    missing = {a, b} - {t.name for t in cfg.tasks}
    if missing:
        raise SystemExit(f"--pair: no task {sorted(missing)} in {args.config}")
    cfg.tasks = [t for t in cfg.tasks if t.name in (a, b)]
    connect_ray(cfg)
    root = Path(args.run_root).resolve()
    run_dir = root / "run"
    out = root / "forgetting.json"
    results = json.loads(out.read_text()) if out.is_file() else {"models": {}, "wall_s": {}}
    base_dir, _ = resolve_base_model(cfg)
    rows = {t.name: load_splits(t, cfg.data.split_seed).eval for t in cfg.tasks}

    def measure(key: str, model_dir: Path, t0: float) -> None:
        results["models"][key] = score_model(model_dir, rows, cfg, base_dir)
        results["wall_s"][key] = round(time.time() - t0, 1)
        write_json(out, results)
        print(f"{key}: " + ", ".join(f"{t}={v:.1f}" for t, v in results["models"][key].items())
              + f" ({results['wall_s'][key]:.0f}s)", flush=True)

    def cell_cfg(score: str, p: float, mode: str):
        c = cfg.model_copy(deep=True)
        c.regions.score, c.regions.p, c.baselines.modes = score, p, [mode]
        return c

    # The probes, with the Fisher if any cell needs it (computed once, kept for every cell).
    first = cell_cfg(args.scores[0], args.ps[0], "sequential")
    t0 = time.time()
    run_pipeline(first, run_dir, stages=["probe"])
    for key, d in (("base", base_dir), (f"probe:{a}", run_dir / "probes" / a),
                   (f"probe:{b}", run_dir / "probes" / b)):
        if key not in results["models"]:
            measure(key, d, t0)
            t0 = time.time()
    if "plain" not in results["models"]:
        t0 = time.time()
        run_pipeline(first, run_dir, stages=["probe", "baselines"])
        measure("plain", run_dir / "baselines" / "sequential", t0)
    for p in args.ps:
        for score in args.scores:
            key = f"{score}@{p:g}"
            if key in results["models"]:
                continue
            t0 = time.time()
            run_pipeline(cell_cfg(score, p, "sequential_cpi"), run_dir,
                         stages=["probe", "regions", "baselines"])
            measure(key, run_dir / "baselines" / "sequential_cpi", t0)
            print(table(results, a, b), flush=True)

    print(f"\nForgetting: {a} then {b}, eval rows {', '.join(f'{t} {len(r)}' for t, r in rows.items())}\n")
    print(table(results, a, b))
    print(f"\nwall time: {sum(results['wall_s'].values()) / 60:.1f} min "
          f"(plain and each cell: training plus scoring)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
