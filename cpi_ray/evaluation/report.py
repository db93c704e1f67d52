"""The run report: `report/report.md`, `report/index.html` and PNG plots, built from what the
stages recorded (`eval/scores.json`, `groups/*.json`, `regions/stats.json`).

Plots: the Jaccard overlap heatmap with the groups marked, where the cores live (by layer and by
module type), per-task scores of every model, the seesaw chart (each model's per-task change
against that task's single-task expert), and the training loss of every SFT job (from each model's
`metrics.jsonl`). The HTML references the PNGs by relative path, so it
reads in a browser straight from disk.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Optional

from cpi_ray.evaluation.harness import HARNESS_NAME, harness_rows
from cpi_ray.evaluation.stats import fmt_mean_se
from cpi_ray.io.atomic import atomic_dir
from cpi_ray.regions.grouping import overlap_summary
from cpi_ray.run.layout import RunLayout
from cpi_ray.run.progress import METRICS_FILE, read_metrics

REPORT_DIR = "report"


def _load(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def expert_scores(scores: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, float]:
    """Each task's single-task expert score: its own probe on its own eval split."""
    return {t: scores[f"probe:{t}"][t] for t in tasks if f"probe:{t}" in scores}


def seesaw(scores: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per model (not the probes), per task: score minus the task's expert score."""
    experts = expert_scores(scores, tasks)
    return {
        m: {t: s[t] - experts[t] for t in tasks if t in experts and t in s}
        for m, s in scores.items()
        if not m.startswith("probe:")
    }


def summarize(scores: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for m, s in scores.items():
        vals = [s[t] for t in tasks if t in s and not math.isnan(s[t])]
        out[m] = {
            "avg": sum(vals) / len(vals) if vals else float("nan"),
            "worst": min(vals) if vals else float("nan"),
        }
    return out


def constant_label(c: dict) -> str:
    """How a task's constant-answer reference came about: its answer and how many rows have it."""
    rows = c.get("rows")
    if rows == 1:
        return f"{c['answer'][:30]!r}; every answer differs"
    return f"{c['answer'][:30]!r}" + ("" if rows is None else f", the answer of {rows} rows")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def scores_table(
    scores: dict[str, dict[str, float]],
    tasks: list[str],
    stderr: Optional[dict[str, dict[str, float]]] = None,
    n_eval: Optional[dict[str, int]] = None,
) -> tuple[list[str], list[list[str]]]:
    """Per model: each task's score (± its standard error over the eval rows when known), the
    average and the worst task; the header names each task's number of eval rows when known."""
    summ = summarize(scores, tasks)
    header = [
        "model",
        *(f"{t} (n={n_eval[t]})" if n_eval and t in n_eval else t for t in tasks),
        "avg",
        "worst",
    ]
    rows = [
        [
            m,
            *(
                fmt_mean_se(s.get(t, float("nan")), (stderr or {}).get(m, {}).get(t, float("nan")))
                for t in tasks
            ),
            f"{summ[m]['avg']:.1f}",
            f"{summ[m]['worst']:.1f}",
        ]
        for m, s in scores.items()
    ]
    return header, rows


def forgetting_rows(scores: dict[str, dict[str, float]], budget: Optional[dict]) -> list[list[str]]:
    """Sequential baselines (A's probe then B): A's score before and after B, the drop, and how
    much of B's single-task gain over the base the run kept."""
    rows = []
    for mode, plan in ((budget or {}).get("modes") or {}).items():
        model = f"baseline:{mode}"
        if not plan["start"].startswith("probe:") or model not in scores:
            continue
        a, b = plan["start"].split(":", 1)[1], plan["stages"][-1]["tasks"][0]
        before, after = scores.get(f"probe:{a}", {}).get(a), scores[model].get(a)
        b_after, b_expert = scores[model].get(b), scores.get(f"probe:{b}", {}).get(b)
        b_base = scores.get("base", {}).get(b)
        if None in (before, after, b_after):
            continue
        kept = "n/a"
        if b_expert is not None and b_base is not None and b_expert != b_base:
            kept = f"{100 * (b_after - b_base) / (b_expert - b_base):.0f}%"
        frozen = ", ".join(t for st in plan["stages"] for t in st["frozen"]) or "-"
        rows.append(
            [
                mode,
                f"{a} → {b}",
                frozen,
                f"{before:.1f}",
                f"{after:.1f}",
                f"{after - before:+.1f}",
                f"{b_after:.1f}",
                kept,
            ]
        )
    return rows


FORGETTING_HEADER = [
    "mode",
    "order",
    "frozen core",
    "A after A",
    "A after B",
    "A's drop",
    "B after B",
    "B's gain kept",
]


# ---------------------------------------------------------------------------------- plots


def _plt():
    # Only the plots need matplotlib (about a second to import), on a backend chosen first.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def plot_overlap(names: list[str], matrix: list[list[float]], groups: list[list[str]], out: Path) -> None:
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.0 + 0.8 * n))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=8
            )
    # Outline each group's block (tasks of a group are contiguous once rows follow group order).
    pos = {t: i for i, t in enumerate(names)}
    for g in groups:
        idx = sorted(pos[t] for t in g if t in pos)
        if idx and idx == list(range(idx[0], idx[-1] + 1)):
            ax.add_patch(
                plt.Rectangle(
                    (idx[0] - 0.5, idx[0] - 0.5), len(idx), len(idx), fill=False, edgecolor="red", linewidth=2
                )
            )
    fig.colorbar(im, ax=ax, label="Jaccard overlap of cores")
    ax.set_title("Core overlap (red: task groups)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_core_locations(stats: dict[str, dict], out: Path) -> bool:
    plt = _plt()
    tasks = [t for t, s in stats.items() if isinstance(s, dict) and s.get("per_layer")]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    keys = sorted({k for t in tasks for k in stats[t]["per_layer"]}, key=_layer_key)
    for t in tasks:
        by_layer = stats[t]["per_layer"]
        axes[0].plot(range(len(keys)), [by_layer.get(k, 0) for k in keys], marker=".", label=t)
    axes[0].set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
    axes[0].set_ylabel("core elements")
    axes[0].set_title("cores by layer")
    axes[0].legend(fontsize=8)
    modules = sorted({m for t in tasks for m in stats[t].get("per_module", {})})
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        bm = stats[t].get("per_module", {})
        axes[1].bar(
            [j + i * width for j in range(len(modules))], [bm.get(m, 0) for m in modules], width, label=t
        )
    axes[1].set_xticks(
        [j + 0.4 - width / 2 for j in range(len(modules))], modules, rotation=45, ha="right", fontsize=8
    )
    axes[1].set_title("cores by module type")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _layer_key(k: str):
    return (0, int(k)) if str(k).isdigit() else (1, str(k))


def _grouped_bars(
    values: dict[str, dict[str, float]],
    tasks: list[str],
    out: Path,
    ylabel: str,
    title: str,
    zero_line: bool = False,
) -> None:
    """One group of bars per task, one bar per model."""
    plt = _plt()
    models = list(values)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 0.4 * len(models)), 4))
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        ax.bar(
            [j + i * width for j in range(len(tasks))],
            [values[m].get(t, float("nan")) for t in tasks],
            width,
            label=m,
        )
    if zero_line:
        ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_scores(scores: dict[str, dict[str, float]], tasks: list[str], out: Path) -> None:
    _grouped_bars(scores, tasks, out, "score (0-100)", "per-task scores")


def plot_seesaw(deltas: dict[str, dict[str, float]], tasks: list[str], out: Path) -> bool:
    if not deltas or not any(deltas.values()):
        return False
    _grouped_bars(
        deltas,
        tasks,
        out,
        "score minus the task's expert",
        "seesaw: change against each task's single-task expert",
        zero_line=True,
    )
    return True


def training_curves(layout: RunLayout) -> dict[str, list[tuple[str, list[dict]]]]:
    """Per kind of SFT job (probes, consolidation, baselines): (label, metrics rows) for every
    model of the run that kept its `metrics.jsonl`. A consolidation's stages and a baseline's
    stages are laid end to end (`x`: steps since the job's start)."""
    out: dict[str, list[tuple[str, list[dict]]]] = {}
    probes = layout.folder("probe")
    if probes.is_dir():
        for d in sorted(p for p in probes.iterdir() if p.is_dir()):
            rows = read_metrics(d / METRICS_FILE)
            if rows:
                out.setdefault("probes", []).append((d.name, [{**r, "x": r["step"]} for r in rows]))
    offset = 0
    k = 1
    while layout.stage(k).is_dir():
        rows = read_metrics(layout.stage(k) / METRICS_FILE)
        if rows:
            out.setdefault("consolidation", []).append(
                (f"stage {k}", [{**r, "x": offset + r["step"]} for r in rows])
            )
            offset += rows[-1]["step"]
        k += 1
    baselines = layout.folder("baselines")
    if baselines.is_dir():
        for d in sorted(p for p in baselines.iterdir() if p.is_dir()):
            rows = read_metrics(d / METRICS_FILE)
            if rows:
                out.setdefault("baselines", []).append(
                    (d.name, [{**r, "x": i + 1} for i, r in enumerate(rows)])
                )
    return out


def training_rows(curves: dict[str, list[tuple[str, list[dict]]]]) -> list[list[str]]:
    """One row per job: steps, first and last loss, mean tokens/s."""
    rows = []
    for kind, jobs in curves.items():
        for label, ms in jobs:
            rate = [m["tokens_per_s"] for m in ms if m.get("tokens_per_s")]
            rows.append(
                [
                    kind,
                    label,
                    str(len(ms)),
                    f"{ms[0]['loss']:.4f}",
                    f"{ms[-1]['loss']:.4f}",
                    f"{sum(rate) / len(rate):.0f}" if rate else "",
                ]
            )
    return rows


def plot_training_curves(curves: dict[str, list[tuple[str, list[dict]]]], out: Path) -> bool:
    if not curves:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (kind, jobs) in zip(axes[0], curves.items()):
        for label, ms in jobs:
            ax.plot([m["x"] for m in ms], [m["loss"] for m in ms], label=label, linewidth=1.2)
        ax.set_title(f"{kind}: training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per supervised token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------- report


def build_report(run_dir: str | Path, extra_sections: Optional[list[tuple[str, str]]] = None) -> Path:
    """Write `report/` from the run's records; returns its path. `extra_sections` are
    (title, markdown) pairs, e.g. the forgetting table of the baselines."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    scores_doc = _load(layout.eval_scores) or {}
    overlap = _load(layout.overlap_json)
    groups_doc = _load(layout.groups_json)
    stats = (_load(layout.region_stats) or {}).get("tasks")
    tasks: list[str] = scores_doc.get("tasks", [])
    scores: dict[str, dict[str, float]] = scores_doc.get("scores", {})
    groups = _groups_list(groups_doc)

    md: list[str] = ["# CPI-FT run report", "", f"Run directory: `{run_dir}`", ""]
    figures: list[tuple[str, str]] = []
    with atomic_dir(run_dir / REPORT_DIR) as out:
        if scores:
            header, rows = scores_table(scores, tasks, scores_doc.get("stderr"), scores_doc.get("n_eval"))
            md += [
                "## Per-task scores",
                "",
                "Scores 0-100 on held-out rows, ± the standard error "
                "over those rows (n per task in the header): a difference within it is noise.",
                "",
                markdown_table(header, rows),
                "",
            ]
            const = scores_doc.get("constant_answer") or {}
            if const:
                md += [
                    "Answering each task's commonest gold answer on every row scores "
                    + ", ".join(f"{t} {c['score']:.1f} ({constant_label(c)})" for t, c in const.items())
                    + ": a model near that level on a task may have learnt its format and nothing more.",
                    "",
                ]
            plot_scores(scores, tasks, out / "scores.png")
            figures.append(("Per-task scores", "scores.png"))
            deltas = seesaw(scores, tasks)
            if deltas and any(deltas.values()):
                md += [
                    "## Seesaw: change against each task's expert",
                    "",
                    markdown_table(
                        ["model", *tasks],
                        [[m, *(f"{d.get(t, float('nan')):+.1f}" for t in tasks)] for m, d in deltas.items()],
                    ),
                    "",
                ]
                if plot_seesaw(deltas, tasks, out / "seesaw.png"):
                    figures.append(("Seesaw", "seesaw.png"))
        if overlap:
            names, matrix = overlap["tasks"], overlap.get("jaccard", overlap.get("matrix"))
            order = [t for g in groups for t in g if t in names] + [
                t for t in names if not any(t in g for g in groups)
            ]
            idx = [names.index(t) for t in order]
            reordered = [[matrix[i][j] for j in idx] for i in idx]
            plot_overlap(order, reordered, groups, out / "overlap.png")
            figures.append(("Core overlap", "overlap.png"))
            md += [
                "## Core overlap (Jaccard) and groups",
                "",
                markdown_table(
                    ["", *names], [[a, *(f"{v:.3f}" for v in row)] for a, row in zip(names, matrix)]
                ),
                "",
                "Groups, in training order: " + " → ".join("{" + ", ".join(g) + "}" for g in groups),
                "",
            ]
            detail = overlap_summary(overlap)
            if detail:
                md += [detail[0].upper() + detail[1:] + ".", ""]
        if stats and plot_core_locations(stats, out / "cores.png"):
            figures.append(("Where the cores live", "cores.png"))
        curves = training_curves(layout)
        if curves:
            md += [
                "## Training",
                "",
                "Every SFT job's per-step metrics are in `metrics.jsonl` in its model directory.",
                "",
                markdown_table(
                    ["job", "model", "steps", "first loss", "last loss", "tokens/s"], training_rows(curves)
                ),
                "",
            ]
            if plot_training_curves(curves, out / "training.png"):
                figures.append(("Training loss", "training.png"))
        forgetting = forgetting_rows(scores, _load(layout.budget_json))
        if forgetting:
            md += [
                "## Forgetting (sequential training)",
                "",
                markdown_table(FORGETTING_HEADER, forgetting),
                "",
            ]
        harness = _load(layout.folder("evaluate") / HARNESS_NAME)
        if harness and harness.get("models"):
            header, rows = harness_rows(harness)
            md += [
                "## lm-evaluation-harness",
                "",
                f"`{', '.join(harness['tasks'])}` through lm-eval ({harness['backend']} backend"
                + (
                    f", {harness['limit']} rows per task: a quick look, not a comparable score"
                    if harness.get("limit")
                    else ""
                )
                + "), ± lm-eval's standard error.",
                "",
                markdown_table(header, rows),
                "",
            ]
        for title, body in extra_sections or []:
            md += [f"## {title}", "", body, ""]
        md += ["## Figures", ""] + [f"![{t}]({f})" for t, f in figures] if figures else []
        (out / "report.md").write_text("\n".join(md) + "\n")
        (out / "index.html").write_text(_html(md))
    return run_dir / REPORT_DIR


def _groups_list(doc: Any) -> list[list[str]]:
    if isinstance(doc, dict):
        doc = doc.get("groups", [])
    return [list(g) for g in doc or []]


def _html(md_lines: list[str]) -> str:
    """A small, dependency-free rendering of our own markdown (headings, tables, images, text)."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        head, *rows = table
        body.append(
            "<table><thead><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table>"
        )
        table.clear()

    for line in "\n".join(md_lines).splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush_table()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(
                f'<figure><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}">'
                f"<figcaption>{html.escape(alt)}</figcaption></figure>"
            )
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush_table()
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}figure{margin:1.5em 0}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>CPI-FT run report</title>"
        f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
