"""Evaluation: scoring with a known outcome, batched greedy generation against a plain greedy
loop, and the evaluate stage through Ray (models that exist, skipped ones, reruns)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.evaluation.evaluate import (
    EvaluateStage,
    constant_answer,
    format_table,
    score_model,
    score_rows,
)
from cpi_ray.io.atomic import read_json, write_json
from cpi_ray.models.tiny import build_tiny_tokenizer
from cpi_ray.run.stage import RunContext


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tasks, **evaluate):
    return PipelineConfig(
        model={"source": "tiny"}, tasks=tasks, evaluate={"max_new_tokens": 5, "batch_size": 3, **evaluate}
    )


# ---------------------------------------------------------------------------------- scoring


def test_score_rows_known_scores(tmp_path, monkeypatch):
    (tmp_path / "half_scorer.py").write_text(
        textwrap.dedent("""
        def half(prediction, row):
            return 0.5 if prediction.startswith(row["a"]) else 0.0
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rev = [{"question": f"reverse: {w}", "answer": w[::-1]} for w in ("abc", "xyz", "hello", "ok")]
    num = [{"q": f"n{i}", "a": str(i)} for i in range(3)]
    cfg = _cfg(
        [
            {
                "name": "rev",
                "path": _write(tmp_path / "rev.jsonl", rev),
                "eval_size": 2,
                "system_prompt": "S",
            },
            {
                "name": "num",
                "path": _write(tmp_path / "num.jsonl", num),
                "eval_size": 1,
                "prompt_field": "q",
                "answer_field": "a",
                "scorer": "half_scorer:half",
                "max_new_tokens": 9,
            },
        ]
    )
    seen = {}

    def fake_generate(prompts, max_new_tokens):
        # Wrong on "xyz" (uppercase; exact match is case-sensitive), right elsewhere; for "nI"
        # it answers "I" for even I and "x" otherwise.
        seen[len(prompts)] = (prompts, max_new_tokens)
        out = []
        for p in prompts:
            q = p.split("<|user|>")[1].split("</s>")[0]
            if q.startswith("reverse: "):
                w = q[len("reverse: ") :]
                out.append(" ZYX " if w == "xyz" else f" {w[::-1]}\n")
            else:
                out.append(q[1:] if int(q[1:]) % 2 == 0 else "x")
        return out

    res = score_rows({"rev": rev, "num": num}, cfg, build_tiny_tokenizer(), fake_generate)
    assert res["rev"]["row_scores"] == [1.0, 0.0, 1.0, 1.0]
    assert res["rev"]["score"] == pytest.approx(75.0)
    assert res["num"]["row_scores"] == [0.5, 0.0, 0.5]
    assert res["num"]["score"] == pytest.approx(100 / 3)
    prompts, budget = seen[4]
    assert prompts[0] == "<|system|>S</s><|user|>reverse: abc</s><|assistant|>"
    assert budget == 5  # evaluate.max_new_tokens
    assert seen[3][1] == 9  # the task's own budget

    # The constant-answer reference: num's answers 0, 1, 2 tie, one is chosen and scored by
    # num's own scorer (0.5 on the one row it matches); rev's four distinct words likewise.
    const = constant_answer(cfg, {"rev": rev, "num": num})
    assert const["num"]["answer"] in {"0", "1", "2"}
    assert const["num"]["score"] == pytest.approx(100 * 0.5 / 3)
    assert const["rev"]["score"] == pytest.approx(25.0)
    num3 = [*num, {"q": "n9", "a": "1"}]  # "1" is now the commonest answer: 2 of 4 rows
    assert constant_answer(cfg, {"num": num3})["num"] == {
        "answer": "1",
        "rows": 2,
        "score": pytest.approx(25.0),
    }
    assert const["rev"]["rows"] == 1


# ---------------------------------------------------------------------------------- real model


def _plain_greedy(model, tok, prompt, n):
    """Token-by-token argmax on one unpadded prompt: an independent reference for generation."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_score_model_on_the_tiny_model_matches_plain_greedy(tiny_model_dir, tmp_path):
    from cpi_ray.data.formatting import format_prompt
    from cpi_ray.models.loading import load_model, load_tokenizer

    words = ["a", "reverse: abc", "upper: hello there", "xy", "copy: 12345", "q"]
    rows = [{"question": w, "answer": "placeholder"} for w in words]
    cfg = _cfg(
        [{"name": "t", "path": _write(tmp_path / "t.jsonl", rows), "eval_size": 1}],
        max_new_tokens=6,
        batch_size=4,
    )  # two batches, mixed prompt lengths
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    task = cfg.task("t")
    expected = [_plain_greedy(model, tok, format_prompt(tok, task, r), 6) for r in rows]
    # Rows 0, 2, 4 carry the model's own greedy output as answer, the others something else:
    # exact match must score exactly half.
    for i, r in enumerate(rows):
        r["answer"] = expected[i] if i % 2 == 0 else expected[i] + "#"
    assert all(rows[i]["answer"] for i in (0, 2, 4)), "need non-empty generations"
    assert score_model(tiny_model_dir, {"t": rows}, cfg) == {"t": pytest.approx(50.0)}


# ---------------------------------------------------------------------------------- stage


def _fake_record(ctx, folder, stage, fp):
    write_json(ctx.path(folder, "stage.json"), {"stage": stage, "fingerprint": fp, "outputs": []})


def test_evaluate_stage_scores_existing_models_and_reruns_when_more_exist(
    ray_session, tiny_model_dir, tmp_path
):
    from cpi_ray.data.tasks import load_splits

    rows = [{"question": f"copy: {i}", "answer": str(i)} for i in range(12)]
    cfg = _cfg(
        [
            {"name": "a", "path": _write(tmp_path / "a.jsonl", rows), "eval_size": 3},
            {"name": "b", "path": _write(tmp_path / "b.jsonl", rows), "eval_size": 2},
        ],
        max_new_tokens=3,
        num_workers=2,
    )
    run_dir = tmp_path / "run"
    ctx = RunContext(cfg=cfg, run_dir=run_dir, base_model_dir=tiny_model_dir, base_model_id="tiny")
    stage = EvaluateStage()
    with pytest.raises(RuntimeError, match="needs stage 'probe'"):
        stage.execute(ctx)

    # Probe ran for task a only (a copy of the base: its scores must equal the base's).
    shutil.copytree(tiny_model_dir, run_dir / "probes" / "a")
    _fake_record(ctx, "probes", "probe", "p1")
    assert stage.dependencies(ctx) == ("probe",)
    rec, ran = stage.execute(ctx)
    assert ran
    data = read_json(run_dir / "eval" / "scores.json")
    assert data["tasks"] == ["a", "b"]
    assert list(data["scores"]) == ["base", "probe:a"]
    assert data["n_eval"] == {"a": 3, "b": 2}
    assert set(data["skipped"]) == {"probe:b", "fused", "final"}
    assert data["scores"]["probe:a"] == data["scores"]["base"]
    preds = [json.loads(x) for x in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * (3 + 2)
    eval_a = load_splits(cfg.task("a"), cfg.data.split_seed).eval
    assert [p["answer"] for p in preds if p["model"] == "base" and p["task"] == "a"] == [
        r["answer"] for r in eval_a
    ]
    for m, per in data["scores"].items():
        for t in data["tasks"]:
            row_scores = [p["score"] for p in preds if p["model"] == m and p["task"] == t]
            assert per[t] == pytest.approx(100 * sum(row_scores) / len(row_scores))

    # Every scored model but the base gets a model card with its scores and n.
    card = (run_dir / "probes" / "a" / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny\nlibrary_name: transformers\n")
    assert "A probe: a short SFT of the base model on task `a` alone" in card
    assert (
        f"| a | file a.jsonl | prompt_answer | {data['scores']['probe:a']['a']:.1f} | "
        f"{data['stderr']['probe:a']['a']:.1f} | 3 |"
    ) in card
    assert "## Settings" in card and "steps:" in card
    assert not (tiny_model_dir / "README.md").exists()

    table = stage.summary(ctx)
    assert table.splitlines()[1].split() == ["model", "a", "b", "avg", "worst"]
    assert "skipped fused: stage fuse has not run" in table

    # Nothing changed: skipped. A fused model appears: evaluate runs again and includes it,
    # scoring only the new model (the others' weights are unchanged, their scores kept).
    assert stage.execute(ctx)[1] is False
    cache = run_dir / "eval" / "models"
    kept = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert set(kept) == {"base.json", "probe--a.json"}
    shutil.copytree(tiny_model_dir, run_dir / "fused")
    _fake_record(ctx, "fused", "fuse", "f1")
    assert stage.dependencies(ctx) == ("probe", "fuse")
    assert stage.completed(ctx) is None
    rec, ran = stage.execute(ctx)
    after = read_json(run_dir / "eval" / "scores.json")
    assert ran and list(after["scores"]) == ["base", "probe:a", "fused"]
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir() if f.name in kept} == kept
    assert after["scores"]["base"] == data["scores"]["base"] == after["scores"]["fused"]
    # A model whose weights change is scored again.
    from safetensors.torch import load_file, save_file

    shard = sorted((run_dir / "probes" / "a").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    _fake_record(ctx, "probes", "probe", "p2")
    stage.execute(ctx)
    assert (cache / "probe--a.json").stat().st_mtime_ns != kept["probe--a.json"]
    assert (cache / "base.json").stat().st_mtime_ns == kept["base.json"]


def test_format_table():
    text = format_table(
        {
            "tasks": ["x", "y"],
            "scores": {"base": {"x": 10.0, "y": 30.0}, "probe:x": {"x": 80.0, "y": 5.0}},
            "n_eval": {"x": 4, "y": 4},
            "skipped": {},
            "constant_answer": {"x": {"answer": "1", "score": 43.75}, "y": {"answer": "a", "score": 0.0}},
        }
    )
    lines = text.splitlines()
    assert lines[3].split() == ["base", "10.0", "30.0", "20.0", "10.0"]
    assert lines[4].split() == ["probe:x", "80.0", "5.0", "42.5", "5.0"]
    assert lines[5] == "the commonest gold answer on every row: x=43.8, y=0.0"
