"""Quality benchmark: CPI-FT against its baselines over several seeds, printed like the paper's
Table 1 with mean ± standard error, and kept as a results file.

Runs the whole pipeline once per seed with the baseline modes asked for (same budget, data and
seeds for every mode), then scores further CPI-FT cells on the same probes. Printed and written
(`--results DIR`: `quality-<config>-<setting>.json` and `.md`, rewritten after every seed): per
task, for base, each single-task expert, every baseline, the fused model and each CPI-FT cell,
the mean ± standard error over seeds, the average and the worst task (each computed per seed,
then averaged), and each CPI-FT cell's paired difference to `full_mtl` and `multistage`, a tie
when within its standard error. One seed gives no error: its differences are marked n/a. Two
references say what a table can show: the score of answering each task's commonest gold answer
on every row, and per task, full multi-task SFT against the task's own expert (whether the other
tasks' data helped or hurt it: without interference there is nothing for isolation to remove).

Cells (`--scores`, `--ps`, `--taus`, `--data`, `--variants`): `score@p,data`, with `,tau=τ` when
τ is not the first and a variant's overrides after it (`--variants '' 'fuse.backbone=word_sorting'`
measures what a fuse knob does; `--score-fused` scores each cell's fused model as well). The first
cell is the pipeline's own run (its report holds it); every further cell runs regions, groups,
fuse and consolidate on the same probes in a run directory of its own (`<run dir>/cells/<cell>`,
the probes linked in) and scores CPI-FT's final model (which stays; its fused model and stages
go unless `--keep-models`), kept with the groups its cores formed in
`<run dir>/cells.json` so a rerun resumes; a cell whose cores, groups, variant and
training data equal an earlier one's takes its scores. The baselines keep the budget of the first
cell's groups.

Settings (`--setting`):
  balanced    the config's tasks with equal data and equal shares of every mix (default);
  imbalanced  the first task with ten times the rows of the others and ten times their share of
              every mixed batch (the case CPI-FT is meant to protect: the small tasks' cores);
  forgetting  bench_forgetting.py (sequential A then B, by core score and p).

    python benchmarks/bench_quality.py --config benchmarks/configs/quality-cpu.yaml \\
        --seeds 0 1 2 --data mixed group --results benchmarks/results
    python benchmarks/bench_quality.py --setting imbalanced --seeds 0 1 2 --set regions.p=5
    python benchmarks/bench_quality.py --setting imbalanced --seeds 0 1 2 --scores fisher --ps 20 \\
        --probes-from 'runs/bench-quality/balanced/seed-{seed}'
    python benchmarks/bench_quality.py --config jobs/configs/smoke.yaml --run-root runs/bq-smoke

Reruns resume: each seed's run directory keeps its completed stages, and a baseline mode added
later trains only itself. `--probes-from` links another run's probes in first; the probe stage
keeps those whose task, data and recipe match (their fingerprint) and trains the rest, so the
imbalanced setting reuses the balanced one's probes of the tasks it does not change.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpi_ray.config.load import load_config  # noqa: E402
from cpi_ray.config.stages import STAGES  # noqa: E402
from cpi_ray.evaluation.report import markdown_table, summarize  # noqa: E402
from cpi_ray.evaluation.stats import fmt_mean_se, mean_se, paired_difference, verdict  # noqa: E402
from cpi_ray.io.atomic import atomic_file, read_json, write_json  # noqa: E402
from cpi_ray.io.records import RECORD_NAME, load_record  # noqa: E402
from cpi_ray.run.layout import RunLayout  # noqa: E402
from cpi_ray.training.consolidate import STAGE_RECORD  # noqa: E402
from cpi_ray.tune.cache import link_tree  # noqa: E402

HERE = Path(__file__).resolve().parent
CELL_STAGES = ["probe", "regions", "groups", "fuse", "consolidate"]
CELLS_JSON = "cells.json"  # in a seed's run directory: every cell's scores, groups and time
BASELINE_LABELS = {
    "full_mtl": "full multi-task SFT",
    "full_mtl_light": "full multi-task SFT, CPI-FT's consolidation rows only",
    "full_mtl_balanced": "full multi-task SFT, tasks in equal shares",
    "multistage": "multi-stage SFT",
    "dpi": "DPI (CPI-FT's groups from the base, earlier cores frozen, no fusion)",
    "epi": "EPI (full multi-task SFT, frozen set re-selected from online importance)",
}
# The baselines each CPI-FT cell is tested against, where the run has them.
COMPARED = ("full_mtl", "multistage", "full_mtl_balanced")


def setting_overrides(cfg, setting: str) -> list[str]:
    """Config overrides that turn the config's tasks into the setting."""
    if setting == "balanced":
        return []
    first = cfg.tasks[0]
    over = [f"tasks.{first.name}.weight={10 * first.weight:g}"]
    if first.reasoning_gym is not None:
        # Ten times the training rows; the eval rows stay the same number.
        size = first.reasoning_gym.size - first.eval_size - first.val_size
        over.append(f"tasks.{first.name}.reasoning_gym.size={10 * size + first.eval_size + first.val_size}")
    else:
        print(
            f"imbalanced: task {first.name} keeps its rows (not a generator); its share of every mix is 10x"
        )
    return over


def cell_name(score: str, p: float, tau: float, data: str, variant: tuple[str, ...], run_tau: float) -> str:
    """`score@p,data`, with `,tau=τ` when the cell's τ is not the run's (the first τ) and the
    variant's overrides after it."""
    return (
        f"{score}@{p:g}"
        + ("" if tau == run_tau else f",tau={tau:g}")
        + f",{data}"
        + "".join(f",{o}" for o in variant)
    )


def cell_overrides(cell: tuple) -> list[str]:
    score, p, tau, data, variant = cell
    return [
        f"regions.score={score}",
        f"regions.p={p:g}",
        f"groups.tau={tau:g}",
        f"consolidate.data={data}",
        *variant,
    ]


def probes_source(template: str, seed: int) -> Path:
    """The run whose probes seed `seed`'s run: `{seed}` in the template is that seed, so each
    seed of one setting starts from the same seed of another (a probe's fingerprint holds its
    seed, so another seed's probes would all be retrained)."""
    return Path(template.replace("{seed}", str(seed))).expanduser().resolve()


def seed_probes(run_dir: Path, source: Path) -> None:
    """Link `source`'s probes into a new run (every probe write is atomic, so the two runs never
    share a changed file); the probe stage keeps the ones whose fingerprint matches this run's
    config and retrains the others."""
    if (run_dir / "probes").exists() or not (source / "probes").is_dir():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    link_tree(source / "probes", run_dir / "probes")
    print(f"probes linked from {source} into {run_dir}; any that do not match its config are retrained")


def grouping(run_dir: Path) -> dict:
    """How the run's cores grouped the tasks: the groups, τ, the range of the pairwise Jaccard
    and the chance level, and the rows each consolidation stage drew from each task."""
    layout = RunLayout(run_dir)
    overlap = read_json(layout.overlap_json)
    jac, n = overlap["jaccard"], len(overlap["tasks"])
    pairs = [jac[a][b] for a in range(n) for b in range(a + 1, n)]
    groups = read_json(layout.groups_json)
    rows = []
    for k in range(1, len(groups) + 1):
        rec = layout.stage(k) / STAGE_RECORD
        rows.append(read_json(rec).get("rows_per_task") if rec.is_file() else None)
    return {
        "groups": groups,
        "tau": overlap["tau"],
        "tau_mode": overlap.get("tau_mode", "absolute"),
        "jaccard": [min(pairs), max(pairs)] if pairs else None,
        "chance": overlap.get("chance"),
        "regions": read_json(layout.folder("regions") / RECORD_NAME)["fingerprint"],
        "consolidate_rows": rows,
    }


def drop_intermediate_models(cell_dir: Path) -> None:
    """A scored cell keeps its final model, records and logs; its fused model and the model after
    each consolidation stage go (a few GB a cell). A scored cell is never rerun, so nothing
    reads them again."""
    layout = RunLayout(cell_dir)
    k = 1
    while layout.stage(k).is_dir():
        shutil.rmtree(layout.stage(k))
        k += 1
    shutil.rmtree(layout.fused, ignore_errors=True)


def same_training(a: dict, b: dict) -> bool:
    """Two cells train the same model: the same cores, groups and variant, and the same rows
    (with one group holding every task, `mixed` and `group` data are the same mix)."""
    if (
        a.get("regions") != b.get("regions")
        or a["groups"] != b["groups"]
        or a.get("variant", []) != b.get("variant", [])
    ):
        return False
    return a.get("data") == b.get("data") or len(a["groups"]) == 1


def run_cells(
    make_cfg,
    run_dir: Path,
    cells: list[tuple],
    run_tau: float,
    scores: dict,
    stderr: dict,
    groupings: dict,
    score_fused: bool,
    keep_models: bool = False,
) -> float:
    """CPI-FT's final model for each further cell (score, p, τ, data, variant overrides) on the
    run's probes, scored on every task's eval rows, with the grouping its cores gave, added to
    `scores`, `stderr` and `groupings` (which hold the run's own cell); with `score_fused`, its
    fused model too (`<cell> fused`); without `keep_models`, only its final model stays.
    Results accumulate in `run_dir/cells.json`.
    `make_cfg(overrides)` is the seed's config with a cell's overrides. Returns the seconds spent
    on the cells measured in this call."""
    from cpi_ray.data.tasks import load_splits
    from cpi_ray.evaluation.evaluate import evaluate_model_dir
    from cpi_ray.models.loading import resolve_base_model
    from cpi_ray.pipeline.runner import run_pipeline

    out = run_dir / CELLS_JSON
    done = read_json(out) if out.is_file() else {}
    for k in ("scores", "stderr", "wall_s", "groups"):
        done.setdefault(k, {})
    scores.update(done["scores"])
    stderr.update(done["stderr"])
    groupings.update(done["groups"])
    spent = 0.0

    def measure(key: str, model_dir: Path, c) -> None:
        base_dir, _ = resolve_base_model(c)
        rows = {t.name: load_splits(t, c.data.split_seed).eval for t in c.tasks}
        result = evaluate_model_dir(model_dir, rows, c, base_dir)
        done["scores"][key] = {t: r["score"] for t, r in result.items()}
        done["stderr"][key] = {t: 100.0 * mean_se(r["row_scores"])[1] for t, r in result.items()}

    for cell in cells:
        key = cell_name(*cell, run_tau=run_tau)
        if key in done["scores"]:
            continue
        t0 = time.time()
        c = make_cfg(cell_overrides(cell))
        # Each cell in a run directory of its own on the same probes: the run's own stages stay
        # current for the next invocation, and each cell's final model stays there to look at.
        cell_dir = run_dir / "cells" / re.sub(r"[^\w@,=.+-]", "_", key)
        seed_probes(cell_dir, run_dir)
        run_pipeline(c, cell_dir, stages=CELL_STAGES[:3])
        g = {**grouping(cell_dir), "data": cell[3], "variant": list(cell[4])}
        twin = next((k for k, kg in groupings.items() if k in scores and same_training(kg, g)), None)
        if twin is None:
            run_pipeline(c, cell_dir, stages=CELL_STAGES[3:])  # probe..groups are done above
            g = {**grouping(cell_dir), "data": cell[3], "variant": list(cell[4])}
            measure(key, RunLayout(cell_dir).final, c)
            if score_fused:
                measure(f"{key} fused", RunLayout(cell_dir).fused, c)
        else:
            done["scores"][key], g["same_as"] = scores[twin], twin
            done["stderr"][key] = stderr.get(twin, {})
            g["consolidate_rows"] = groupings[twin].get("consolidate_rows")
        done["groups"][key] = g
        done["wall_s"][key] = round(time.time() - t0, 1)
        spent += done["wall_s"][key]
        write_json(out, done)
        if not keep_models:
            drop_intermediate_models(cell_dir)
        scores.update(done["scores"])
        stderr.update(done["stderr"])
        groupings[key] = g
        print(
            f"{key}: "
            + ", ".join(f"{t}={v:.1f}" for t, v in scores[key].items())
            + f"; {len(g['groups'])} group(s)"
            + (f", the same as {twin}'s" if twin else "")
            + f" ({done['wall_s'][key]:.0f}s)",
            flush=True,
        )
    return spent


def seed_compute_s(run_dir: Path) -> float:
    """Seconds of work behind a seed's figures as its run directory tells them: each stage's
    time from the run's own records, plus each cell's time from `cells.json` (a cell's probes are
    the run's, so they are counted once). A stage record holds its last run only: a stage that
    reran to add to its outputs (a baseline mode) no longer counts the ones it kept, so later
    invocations add their own work to this instead (`seed_time`)."""
    layout = RunLayout(run_dir)
    recs = (load_record(layout.folder(s) / RECORD_NAME) for s in STAGES)
    cells = run_dir / CELLS_JSON
    cell_s = read_json(cells).get("wall_s", {}) if cells.is_file() else {}
    return round(sum(r["wall_time_s"] for r in recs if r) + sum(cell_s.values()), 1)


def seed_time(previous: float | None, run_dir: Path, spent_s: float) -> float:
    """A seed's time after an invocation that spent `spent_s` on it (the stages that ran and the
    cells it measured): added to the time the results file held, or, the first time, read from
    the run directory (`seed_compute_s`)."""
    if previous is None:
        return seed_compute_s(run_dir)
    return round(previous + spent_s, 1)


# ------------------------------------------------------------------------------ aggregation


def model_rows(first_cell: str, cells: list[str], tasks: list[str]) -> list[tuple[str, str]]:
    """(label, key) of every row of the table, in the paper's order."""
    return (
        [("base", "base"), ("commonest gold answer on every row", "constant")]
        + [(f"expert {t}", f"probe:{t}") for t in tasks]
        + [(label, f"baseline:{m}") for m, label in BASELINE_LABELS.items()]
        + [(f"CPI-FT {first_cell}, fused (before consolidation)", "fused")]
        + [(f"CPI-FT {first_cell}", first_cell)]
        + [row for c in cells for row in ((f"CPI-FT {c}, fused", f"{c} fused"), (f"CPI-FT {c}", c))]
    )


def aggregate(per_seed: dict[str, dict], tasks: list[str], rows: list[tuple[str, str]]) -> dict:
    """Per model: per task, average and worst, the mean and standard error over the seeds that
    measured it (average and worst computed within each seed first; a model measured on fewer
    seeds than the table says so in its label); per CPI-FT cell, the paired difference of its
    average and worst task to each compared baseline, over the seeds that measured both."""
    per_seed = {str(s): v for s, v in per_seed.items()}
    seeds = list(per_seed)
    out: dict = {"models": {}, "versus": {}}
    summaries = {s: summarize(per_seed[s]["scores"], tasks) for s in seeds}

    def measured(*keys: str) -> list[str]:
        return [s for s in seeds if all(k in per_seed[s]["scores"] for k in keys)]

    for label, key in rows:
        have = measured(key)
        if not have:
            continue
        if len(have) < len(seeds):
            label = f"{label} (seed{'s' if len(have) > 1 else ''} {', '.join(have)} only)"
        entry = {"label": label, "n_seeds": len(have), "seeds": have}
        for t in tasks:
            entry[t] = mean_se([per_seed[s]["scores"][key][t] for s in have])
        for stat in ("avg", "worst"):
            entry[stat] = mean_se([summaries[s][key][stat] for s in have])
        out["models"][key] = entry
    for _, key in rows:
        if "@" not in key or key.endswith(" fused") or key not in out["models"]:
            continue
        for base in COMPARED:
            bkey = f"baseline:{base}"
            have = measured(key, bkey)
            if not have:
                continue
            v = {}
            for stat in ("avg", "worst"):
                d, se = paired_difference(
                    [summaries[s][key][stat] for s in have], [summaries[s][bkey][stat] for s in have]
                )
                v[stat] = {"diff": d, "se": se, "verdict": verdict(d, se)}
            v["avg"]["eval_se"] = eval_error_of_average({s: per_seed[s] for s in have}, tasks, key, bkey)
            v["n_seeds"] = len(have)
            out["versus"].setdefault(key, {})[base] = v
    out["interference"] = interference(per_seed, tasks)
    return out


def eval_error_of_average(per_seed: dict[str, dict], tasks: list[str], a: str, b: str) -> float:
    """Standard error of the difference of two models' task averages, over seeds, from the eval
    rows alone (each task score's own error, the two models taken as independent): what one seed
    can say about a difference, seed-to-seed variation not included. NaN where unrecorded."""
    var = 0.0
    for d in per_seed.values():
        se = d.get("stderr", {})
        var += sum(se.get(m, {}).get(t, float("nan")) ** 2 for m in (a, b) for t in tasks)
    return math.sqrt(var) / (len(tasks) * len(per_seed))


def interference(per_seed: dict[str, dict], tasks: list[str]) -> dict:
    """Per task, whether the other tasks' data helped or hurt it: full multi-task SFT's score on
    the task minus that of the task's own expert (its probe, trained on it alone), mean ± standard
    error over seeds, and the standard error of that mean from the eval rows alone (what one seed
    can say). A gain means there is no seesaw on that task for isolation to remove; a loss is the
    interference CPI-FT is built for."""
    out = {}
    for t in tasks:
        full, expert = [], []
        for d in per_seed.values():
            sc = d["scores"]
            if t not in sc.get("baseline:full_mtl", {}) or t not in sc.get(f"probe:{t}", {}):
                break
            full.append(sc["baseline:full_mtl"][t])
            expert.append(sc[f"probe:{t}"][t])
        else:
            if not full:
                continue
            diff, se = paired_difference(full, expert)
            out[t] = {
                "full_mtl": mean_se(full),
                "expert": mean_se(expert),
                "diff": diff,
                "se": se,
                "eval_se": eval_error_of_average(per_seed, [t], "baseline:full_mtl", f"probe:{t}"),
                "verdict": verdict(diff, se),
            }
    return out


def results_markdown(doc: dict) -> str:
    tasks, agg = doc["tasks"], doc["aggregate"]
    n = ", ".join(f"{t} {k}" for t, k in doc["n_eval"].items())
    lines = [
        f"# Quality benchmark: {doc['setting']} ({Path(doc['config']).name})",
        "",
        f"Seeds: {', '.join(map(str, doc['seeds']))} ({len(doc['seeds'])}); eval rows per "
        f"task: {n}. Scores 0-100, mean ± standard error over seeds (no error with one "
        "seed); avg and worst are computed per seed, then averaged.",
        "",
    ]
    header = ["model", *tasks, "avg", "worst"]
    body = []
    for e in agg["models"].values():
        body.append(
            [
                e["label"],
                *(fmt_mean_se(*e[t]) for t in tasks),
                fmt_mean_se(*e["avg"]),
                fmt_mean_se(*e["worst"]),
            ]
        )
    lines += [markdown_table(header, body), ""]
    if agg["versus"]:
        vs = []
        for key, per in agg["versus"].items():
            for base, v in per.items():
                n = v.get("n_seeds", len(doc["seeds"]))
                vs.append(
                    [
                        f"CPI-FT {key}",
                        base,
                        str(n),
                        *(
                            f"{v[s]['diff']:+.1f}"
                            + ("" if v[s]["se"] != v[s]["se"] else f" ± {v[s]['se']:.1f}")
                            + f" ({v[s]['verdict']})"
                            for s in ("avg", "worst")
                        ),
                        "—"
                        if math.isnan(v["avg"].get("eval_se", math.nan))
                        else f"{v['avg']['eval_se']:.1f}",
                    ]
                )
        lines += [
            "Paired differences over seeds (CPI-FT minus baseline); within one standard "
            "error is a tie, n/a with one seed. The last column is the standard error of the "
            "average's difference from the eval rows alone (seed-to-seed variation not included): "
            "a difference within it is noise even before seeds are counted.",
            "",
            markdown_table(["cell", "against", "seeds", "avg", "worst", "avg: eval-row error"], vs),
            "",
        ]
    if agg.get("interference"):
        rows = [
            [
                t,
                fmt_mean_se(*v["expert"]),
                fmt_mean_se(*v["full_mtl"]),
                f"{v['diff']:+.1f}"
                + ("" if math.isnan(v["se"]) else f" ± {v['se']:.1f}")
                + f" ({v['verdict']})",
                "—" if math.isnan(v["eval_se"]) else f"{v['eval_se']:.1f}",
            ]
            for t, v in agg["interference"].items()
        ]
        lines += [
            "## Interference: what the other tasks' data did to each task",
            "",
            "Full multi-task SFT minus the task's own expert (trained on that task alone), on "
            "that task. A gain means the tasks help each other at this budget and there is no "
            "seesaw for isolation to remove; a loss is the interference CPI-FT is built for. "
            "The last column is the standard error of the difference from the eval rows alone "
            "(seed-to-seed variation not included).",
            "",
            markdown_table(["task", "expert", "full multi-task SFT", "difference", "eval-row error"], rows),
            "",
        ]
    if doc.get("compute_s"):
        per = ", ".join(f"seed {k} {v / 3600:.1f} h" for k, v in sorted(doc["compute_s"].items()))
        lines += [
            f"Time behind each seed's figures (its stages and cells, over all invocations): {per}.",
            "",
        ]
    lines += ["## Budgets (training rows)", ""]
    for seed, b in doc["budgets"].items():
        modes = ", ".join(f"{m} {p['rows']}" for m, p in b["modes"].items())
        lines.append(f"- seed {seed}: CPI-FT {b['cpi_rows']} (probes and consolidation); {modes}")
    lines += [
        "",
        "The baselines train the first cell's rows; a further cell with more groups trains more "
        "consolidation stages, so more rows (its own count is in the groups table).",
    ]
    lines += ["", "## Groups per cell", ""]
    grows = []
    for seed, cells in doc["groupings"].items():
        probe_rows = sum(doc["budgets"].get(seed, {}).get("cpi", {}).get("probe_rows", {}).values())
        for key, g in cells.items():
            jac = "—" if not g.get("jaccard") else "{:.3f}–{:.3f}".format(*g["jaccard"])
            ch = g.get("chance")
            vs_chance = (
                "—"
                if not (g.get("jaccard") and ch)
                else "{:.1f}–{:.1f}x".format(g["jaccard"][0] / ch, g["jaccard"][1] / ch)
            )
            rows = g.get("consolidate_rows") or []
            consolidation = sum(sum(r.values()) for r in rows if r)
            grows.append(
                [
                    str(seed),
                    key,
                    " → ".join("{" + ", ".join(x) + "}" for x in g["groups"]),
                    jac,
                    vs_chance,
                    f"{probe_rows + consolidation} ({probe_rows} + {consolidation})"
                    if consolidation
                    else "—",
                    "; ".join(" ".join(f"{t}:{c}" for t, c in r.items()) for r in rows if r)
                    or ("same as " + g["same_as"] if g.get("same_as") else "—"),
                ]
            )
    lines += [
        markdown_table(
            [
                "seed",
                "cell",
                "groups (training order)",
                "Jaccard",
                "vs chance",
                "CPI-FT rows (probes + consolidation)",
                "rows per task, stage by stage",
            ],
            grows,
        ),
        "",
    ]
    lines += ["## Commands", "", "```", *doc["commands"], "```", ""]
    return "\n".join(lines)


def write_results(results_dir: Path, doc: dict) -> Path:
    stem = f"quality-{Path(doc['config']).stem}-{doc['setting']}"
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / f"{stem}.json", doc)
    with atomic_file(results_dir / f"{stem}.md", "w") as f:
        f.write(results_markdown(doc))
    return results_dir / f"{stem}.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "quality.yaml"))
    ap.add_argument("--run-root", default="runs/bench-quality")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--setting", choices=["balanced", "imbalanced"], default="balanced")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["full_mtl", "multistage"],
        choices=list(BASELINE_LABELS),
        help="baseline modes trained on every seed",
    )
    ap.add_argument(
        "--scores",
        nargs="+",
        choices=["delta", "fisher", "delta_fisher"],
        help="core scores to compare (default: the config's regions.score)",
    )
    ap.add_argument("--ps", type=float, nargs="+", help="core ratios in %% (default: regions.p)")
    ap.add_argument(
        "--taus",
        type=float,
        nargs="+",
        help="overlap thresholds τ (default: groups.tau); the first is the run's",
    )
    ap.add_argument(
        "--data",
        nargs="+",
        choices=["mixed", "group"],
        help="consolidation data (default: consolidate.data); the first is the run's",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        metavar="KEY=VALUE[;KEY=VALUE]",
        help="further config overrides as a cell dimension, e.g. '' "
        "'fuse.backbone=word_sorting' 'fuse.omega=0.3;fuse.policy=mean' ('' = none)",
    )
    ap.add_argument(
        "--score-fused",
        action="store_true",
        help="score each further cell's fused model too (the fuse knobs act there)",
    )
    ap.add_argument(
        "--keep-models",
        action="store_true",
        help="keep each further cell's fused model and consolidation stages "
        "(by default a scored cell keeps only its final model)",
    )
    ap.add_argument(
        "--probes-from",
        metavar="RUN_DIR",
        help="start from another run's probes (kept where their fingerprint matches); "
        "{seed} in it is replaced by each seed, e.g. runs/bench-quality/balanced/seed-{seed}",
    )
    ap.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="write quality-<config>-<setting>.json and .md here after every seed",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from cpi_ray.evaluation.evaluate import constant_answer
    from cpi_ray.pipeline.runner import run_pipeline
    from cpi_ray.run.runtime import connect_ray

    # Its own embedded Ray unless told otherwise (--set ray.address=auto on a cluster).
    args.overrides = ["ray.address=local", *args.overrides]
    base_cfg = load_config(args.config, args.overrides)
    setting = setting_overrides(base_cfg, args.setting)
    variants = [tuple(o for o in v.split(";") if o) for v in args.variants]
    cells = [
        (s, p, tau, d, v)
        for v in variants
        for d in (args.data or [base_cfg.consolidate.data])
        for tau in (args.taus or [base_cfg.groups.tau])
        for p in (args.ps or [base_cfg.regions.p])
        for s in (args.scores or [base_cfg.regions.score])
    ]
    for cell in cells:  # a bad cell stops here, before any training
        load_config(args.config, [*args.overrides, *cell_overrides(cell)])
    run_tau = cells[0][2]
    names = [cell_name(*c, run_tau=run_tau) for c in cells]
    command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc = {
        "setting": args.setting,
        "config": args.config,
        "overrides": args.overrides,
        "seeds": [],
        "tasks": [],
        "n_eval": {},
        "per_seed": {},
        "budgets": {},
        "groupings": {},
        "compute_s": {},
        "commands": [command],
    }
    if args.results is not None:
        old = args.results / f"quality-{Path(args.config).stem}-{args.setting}.json"
        if old.is_file():  # seeds of earlier invocations stay in the file
            prev = read_json(old)
            for k in ("per_seed", "budgets", "groupings", "compute_s"):
                doc[k].update(prev.get(k, {}))
            doc["commands"] = list(dict.fromkeys([*prev.get("commands", []), command]))
    for seed in args.seeds:
        t0 = time.time()
        overrides = [
            f"baselines.modes=[{', '.join(args.modes)}]",
            f"probe.seed={seed}",
            f"consolidate.seed={seed}",
            f"groups.seed={seed}",
            f"baselines.seed={seed}",
            *setting,
            *args.overrides,
        ]
        cfg = load_config(args.config, [*overrides, *cell_overrides(cells[0])])
        connect_ray(cfg)
        run_dir = Path(args.run_root).expanduser().resolve() / args.setting / f"seed-{seed}"
        layout = RunLayout(run_dir)
        if args.probes_from is not None:
            seed_probes(run_dir, probes_source(args.probes_from, seed))
        ran_s = sum(o.wall_s for o in run_pipeline(cfg, run_dir).outcomes if o.status == "ran")
        ev = read_json(layout.eval_scores)
        print(f"\nseed {seed}: report at {layout.report / 'index.html'}")
        scores, stderr = dict(ev["scores"]), dict(ev.get("stderr", {}))
        scores["constant"] = {t: c["score"] for t, c in constant_answer(cfg).items()}
        scores[names[0]], stderr[names[0]] = scores.pop("final"), stderr.pop("final", {})
        groupings = {names[0]: {**grouping(run_dir), "data": cells[0][3], "variant": list(cells[0][4])}}
        cells_s = run_cells(
            lambda extra, o=overrides: load_config(args.config, [*o, *extra]),
            run_dir,
            cells[1:],
            run_tau,
            scores,
            stderr,
            groupings,
            args.score_fused,
            args.keep_models,
        )
        doc["tasks"], doc["n_eval"] = ev["tasks"], ev["n_eval"]
        doc["per_seed"][str(seed)] = {"scores": scores, "stderr": stderr}
        doc["budgets"][str(seed)] = read_json(layout.budget_json)
        doc["groupings"][str(seed)] = groupings
        doc["compute_s"][str(seed)] = seed_time(doc["compute_s"].get(str(seed)), run_dir, ran_s + cells_s)
        doc["seeds"] = sorted(int(s) for s in doc["per_seed"])
        # Every cell measured on these seeds, this invocation's and earlier ones' (cells.json).
        measured = dict.fromkeys(k for g in doc["groupings"].values() for k in g if k != names[0])
        rows = model_rows(names[0], list(measured), doc["tasks"])
        doc["aggregate"] = aggregate({s: doc["per_seed"][str(s)] for s in doc["seeds"]}, doc["tasks"], rows)
        print(
            f"\nseed {seed} done in {(time.time() - t0) / 60:.1f} min "
            f"({doc['compute_s'][str(seed)] / 60:.1f} min of stages and cells in all)"
        )
        if args.results is not None:
            print(f"results: {write_results(args.results, doc)}")

    print()
    print(results_markdown(doc))
    return 0


if __name__ == "__main__":
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The pipeline's own progress lines (stages, groups, rows per task), as the job prints them.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    sys.exit(main())
