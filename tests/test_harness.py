"""lm-evaluation-harness in the evaluate stage: lm-eval's own task YAMLs (a local folder, offline)
run on each scored model, results in `eval/harness.json` and the report, checked against the
model's own log-likelihoods."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.evaluation.harness import harness_rows, parse_results
from cpi_ray.io.atomic import read_json

CHOICES = ["yes", "no", "maybe"]


def _tasks_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"Is {i} even?", "label": i % 3}) + "\n" for i in range(7))
    )
    (root / "tiny_mc.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {data}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: {json.dumps(CHOICES)}
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
        """)
    )
    return root


def test_parse_results_and_table():
    out = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.05,
                "exact_match,flexible-extract": 0.3,
                "exact_match_stderr,flexible-extract": "N/A",
            }
        },
        "n-samples": {"gsm8k": {"original": 1319, "effective": 100}},
    }
    parsed = parse_results(out)
    assert parsed == {
        "gsm8k": {
            "metrics": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.3},
            "stderr": {"exact_match,strict-match": 0.05},
            "n": 100,
        }
    }
    header, rows = harness_rows({"models": {"base": parsed, "final": parsed}})
    assert header == [
        "model",
        "gsm8k exact_match,strict-match (n=100)",
        "gsm8k exact_match,flexible-extract (n=100)",
    ]
    assert rows[0] == ["base", "0.2500 ± 0.0500", "0.3000"]


def _choice_logprob(model, tok, context: str, choice: str) -> float:
    """Sum of log p(choice tokens | context), as lm-eval's loglikelihood defines it (the
    continuation after a space, tokenized with the context and split where the context ends)."""
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    cont = full[len(ctx_ids) :]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.slow
def test_harness_runs_on_each_scored_model(ray_session, tiny_model_dir, tmp_path):
    from cpi_ray.evaluation.evaluate import EvaluateStage
    from cpi_ray.models.loading import load_model, load_tokenizer
    from cpi_ray.pipeline.check import CheckError, check_harness
    from cpi_ray.run.stage import RunContext

    rows = tmp_path / "a.jsonl"
    rows.write_text("".join(json.dumps({"question": f"c{i}", "answer": str(i)}) + "\n" for i in range(8)))
    include = _tasks_dir(tmp_path / "lm_tasks")
    tasks = [{"name": "a", "path": str(rows), "eval_size": 2}]
    plain = PipelineConfig(
        model={"source": "tiny"}, tasks=tasks, evaluate={"max_new_tokens": 3, "models": ["base"]}
    )
    ctx = RunContext(cfg=plain, run_dir=tmp_path / "run", base_model_dir=tiny_model_dir, base_model_id="tiny")
    stage = EvaluateStage()
    stage.execute(ctx)
    cache = tmp_path / "run" / "eval" / "models" / "base.json"
    scored_at = cache.stat().st_mtime_ns
    assert not (tmp_path / "run" / "eval" / "harness.json").exists()

    cfg = plain.model_copy(deep=True)
    cfg.evaluate.harness_tasks = ["tiny_mc"]
    cfg.evaluate.harness_include_path = str(include)
    check_harness(cfg)
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", base_model_dir=tiny_model_dir, base_model_id="tiny")
    rec, ran = stage.execute(ctx)
    assert ran and cache.stat().st_mtime_ns == scored_at  # the task scores were kept
    doc = read_json(tmp_path / "run" / "eval" / "harness.json")
    assert doc["backend"] == "hf" and doc["tasks"] == ["tiny_mc"]
    got = doc["models"]["base"]["tiny_mc"]
    assert got["n"] == 7

    # acc = how often the gold choice has the highest log-likelihood, computed here directly
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    hits = []
    for line in (include / "mc.jsonl").read_text().splitlines():
        row = json.loads(line)
        lp = [_choice_logprob(model, tok, row["question"], c) for c in CHOICES]
        hits.append(float(max(range(len(CHOICES)), key=lp.__getitem__) == row["label"]))
    assert got["metrics"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert "lm-evaluation-harness" in (tmp_path / "run" / "report" / "report.md").read_text()

    cfg.evaluate.harness_tasks = ["tiny_mc", "no_such_task"]
    with pytest.raises(CheckError, match="lm-eval knows no task no_such_task"):
        check_harness(cfg)
