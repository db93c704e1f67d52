import json

from cpi_ray.evaluation.report import build_report, expert_scores, seesaw, summarize


def _write(p, obj):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))


def test_seesaw_and_summary_numbers():
    scores = {
        "base": {"a": 10.0, "b": 20.0},
        "probe:a": {"a": 50.0, "b": 5.0},
        "probe:b": {"a": 0.0, "b": 40.0},
        "final": {"a": 45.0, "b": 42.0},
    }
    assert expert_scores(scores, ["a", "b"]) == {"a": 50.0, "b": 40.0}
    d = seesaw(scores, ["a", "b"])
    assert d == {"base": {"a": -40.0, "b": -20.0}, "final": {"a": -5.0, "b": 2.0}}
    s = summarize(scores, ["a", "b"])
    assert s["final"] == {"avg": 43.5, "worst": 42.0} and s["probe:a"]["worst"] == 5.0


def _build_example_report(tmp_path):
    _write(
        tmp_path / "eval" / "scores.json",
        {
            "tasks": ["a", "b", "c"],
            "scores": {
                "base": {"a": 1, "b": 2, "c": 3},
                "probe:a": {"a": 60, "b": 1, "c": 2},
                "probe:b": {"a": 3, "b": 70, "c": 4},
                "probe:c": {"a": 1, "b": 1, "c": 30},
                "final": {"a": 55, "b": 66, "c": 31},
                "baseline:sequential": {"a": 20, "b": 68, "c": 2},
                "baseline:sequential_cpi": {"a": 50, "b": 35, "c": 2},
            },
            "constant_answer": {
                "a": {"answer": "1", "rows": 35, "score": 43.75},
                "b": {"answer": "xy", "rows": 1, "score": 2.0},
            },
        },
    )
    _write(
        tmp_path / "baselines" / "budget.json",
        {
            "cpi_rows": 10,
            "modes": {
                "sequential": {
                    "start": "probe:a",
                    "rows": 5,
                    "stages": [{"tasks": ["b"], "frozen": [], "steps": 1}],
                },
                "sequential_cpi": {
                    "start": "probe:a",
                    "rows": 5,
                    "stages": [{"tasks": ["b"], "frozen": ["a"], "steps": 1}],
                },
            },
        },
    )
    _write(
        tmp_path / "groups" / "overlap.json",
        {"tasks": ["a", "b", "c"], "jaccard": [[1, 0.3, 0], [0.3, 1, 0.05], [0, 0.05, 1]]},
    )
    _write(tmp_path / "groups" / "groups.json", {"groups": [["c"], ["a", "b"]]})
    _write(
        tmp_path / "regions" / "stats.json",
        {
            "tasks": {
                t: {
                    "k": 10,
                    "per_layer": {"0": 4, "1": 6, "embed": 0},
                    "per_module": {"q_proj": 3, "up_proj": 7},
                }
                for t in "abc"
            }
        },
    )
    return build_report(tmp_path, extra_sections=[("Notes", "| x |\n|---|\n| 1 |")])


def test_report_files(tmp_path):
    out = _build_example_report(tmp_path)
    for f in ("report.md", "index.html", "scores.png", "seesaw.png", "overlap.png", "cores.png"):
        assert (out / f).stat().st_size > 200, f
    md = (out / "report.md").read_text()
    assert "| final | 55.0 | 66.0 | 31.0 | 50.7 | 31.0 |" in md
    assert "| final | -5.0 | -4.0 | +1.0 |" in md
    assert "{c} → {a, b}" in md and "## Forgetting" in md and "## Notes" in md
    assert "on every row scores a 43.8 ('1', the answer of 35 rows), b 2.0 ('xy'; every answer differs)" in md
    # A's drop 60 -> 20; B's gain over base (2 -> 70) kept (68 - 2) / 68 = 97%.
    assert "| sequential | a → b | - | 60.0 | 20.0 | -40.0 | 68.0 | 97% |" in md
    assert "| sequential_cpi | a → b | a | 60.0 | 50.0 | -10.0 | 35.0 | 49% |" in md
    page = (out / "index.html").read_text()
    assert '<img src="overlap.png"' in page and "<td>final</td>" in page
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_table_shows_n_and_standard_errors():
    from cpi_ray.evaluation.report import scores_table

    header, rows = scores_table(
        {"final": {"a": 50.0, "b": 25.0}},
        ["a", "b"],
        stderr={"final": {"a": 7.1, "b": float("nan")}},
        n_eval={"a": 80, "b": 80},
    )
    assert header == ["model", "a (n=80)", "b (n=80)", "avg", "worst"]
    assert rows == [["final", "50.0 ± 7.1", "25.0", "37.5", "25.0"]]


def test_mean_se_and_verdicts_match_independent_formulas():
    import math
    import statistics

    from cpi_ray.evaluation.stats import mean_se, paired_difference, verdict

    xs = [19.1, 23.4, 21.0]
    m, se = mean_se(xs)
    assert math.isclose(m, statistics.mean(xs))
    assert math.isclose(se, statistics.stdev(xs) / math.sqrt(3))
    # One row-level score list: 0/1 scores of 40 rows, 10 right -> 25 % ± sqrt(p(1-p)/(n-1)) x 100.
    m, se = mean_se([1.0] * 10 + [0.0] * 30)
    assert math.isclose(m, 0.25) and math.isclose(se, math.sqrt(0.25 * 0.75 * 40 / 39 / 40))
    assert math.isnan(mean_se([3.0])[1])
    d, se = paired_difference([20.0, 22.0, 24.0], [19.0, 23.0, 22.0])
    assert math.isclose(d, 2 / 3) and verdict(d, se) == "tie"
    assert verdict(*paired_difference([30.0, 31.0, 32.0], [20.0, 22.0, 21.0])) == "win"
    assert verdict(*paired_difference([10.0, 11.0, 12.0], [20.0, 22.0, 21.0])) == "loss"
    assert verdict(*paired_difference([10.0], [20.0])) == "n/a"


def _metrics(path, losses, stage=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "step": i + 1,
            "loss": x,
            "lr": 1e-4,
            "tokens": 100,
            "tokens_per_s": 50.0,
            **({"stage": stage} if stage else {}),
        }
        for i, x in enumerate(losses)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_training_curves_from_each_models_metrics(tmp_path):
    from cpi_ray.evaluation.report import training_curves
    from cpi_ray.run.layout import RunLayout

    layout = RunLayout(tmp_path)
    _metrics(layout.probe("a") / "metrics.jsonl", [3.0, 2.0, 1.5])
    _metrics(layout.probe("b") / "metrics.jsonl", [2.5, 2.4])
    _metrics(layout.stage(1) / "metrics.jsonl", [2.0, 1.8])
    _metrics(layout.stage(2) / "metrics.jsonl", [1.9, 1.7, 1.6])
    _metrics(layout.baseline("multistage") / "metrics.jsonl", [2.0, 1.5])
    text = (layout.baseline("multistage") / "metrics.jsonl").read_text()
    (layout.baseline("multistage") / "metrics.jsonl").write_text(
        text + text.replace('"loss": 2.0', '"loss": 1.4')
    )
    curves = training_curves(layout)
    assert [label for label, _ in curves["probes"]] == ["a", "b"]
    # Consolidation stages end to end: stage 2 starts after stage 1's two steps.
    assert [(label, [m["x"] for m in ms]) for label, ms in curves["consolidation"]] == [
        ("stage 1", [1, 2]),
        ("stage 2", [3, 4, 5]),
    ]
    ((label, ms),) = curves["baselines"]
    assert label == "multistage" and [m["x"] for m in ms] == [1, 2, 3, 4]
    assert [m["loss"] for m in ms] == [2.0, 1.5, 1.4, 1.5]

    out = _build_example_report(tmp_path)
    md = (out / "report.md").read_text()
    assert "| probes | a | 3 | 3.0000 | 1.5000 | 50 |" in md
    assert "| consolidation | stage 2 | 3 | 1.9000 | 1.6000 | 50 |" in md
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
