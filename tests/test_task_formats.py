"""Chat `messages`, prompt-completion and multi-field hub-style data through the real probe (Ray
Train) and evaluate stages on the tiny model."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from cpi_ray.config.load import load_config
from cpi_ray.pipeline.runner import run_pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _word(rng, n=4):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    chat, pc, alpaca = [], [], []
    for i in range(40):
        a, b = _word(rng), _word(rng, 3)
        chat.append(
            {
                "messages": [
                    {"role": "system", "content": "rev"},
                    {"role": "user", "content": a},
                    {"role": "assistant", "content": a[::-1]},
                    {"role": "user", "content": b},
                    {"role": "assistant", "content": b[::-1]},
                ]
            }
        )
        pc.append(
            {"prompt": f"up {a}", "completion": a.upper()}
            if i % 2
            else {
                "prompt": [{"role": "user", "content": f"up {a}"}],
                "completion": [{"role": "assistant", "content": a.upper()}],
            }
        )
        alpaca.append(
            {"instruction": "len", "input": a if i % 3 else "", "output": str(len(a)) if i % 3 else "0"}
        )
    repo = root / "alpaca-repo"
    _write(repo / "data" / "train.jsonl", alpaca)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: plain\n  data_files:\n"
        "  - {split: train, path: data/train.jsonl}\n---\n"
    )
    return {"chat": _write(root / "chat.jsonl", chat), "pc": _write(root / "pc.jsonl", pc), "alpaca": repo}


def test_three_formats_probe_and_evaluate(ray_session, tmp_path):
    from cpi_ray.data.tasks import answer_text, load_splits

    d = _data(tmp_path / "data")
    tasks = (
        f"[{{name: chat, path: {d['chat']}, format: messages, eval_size: 6}},"
        f" {{name: pc, path: {d['pc']}, format: prompt_completion, eval_size: 6}},"
        f" {{name: alpaca, hub_id: {d['alpaca']}, hub_name: plain, eval_size: 6,"
        " prompt_template: '{instruction}\\n\\n{input}', answer_field: output,"
        " scorer: numeric}]"
    )
    cfg = load_config(
        ROOT / "jobs" / "configs" / "smoke.yaml",
        [
            f"storage.path={tmp_path / 'store'}",
            f"model.cache_dir={tmp_path / 'models'}",
            f"tasks={tasks}",
            "stages=[probe,evaluate]",
            "probe.steps=3",
            "probe.batch_size=8",
            "evaluate.models=[base,probes]",
            "evaluate.max_new_tokens=6",
        ],
    )
    run_dir = tmp_path / "run"
    result = run_pipeline(cfg, run_dir)
    assert [o.status for o in result.outcomes] == ["ran", "ran"]
    for t in ("chat", "pc", "alpaca"):
        rec = json.loads((run_dir / "probes" / t / "probe.json").read_text())
        assert rec["steps"] == 3 and rec["task"] == t
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert scores["tasks"] == ["chat", "pc", "alpaca"]
    assert list(scores["scores"]) == ["base", "probe:chat", "probe:pc", "probe:alpaca"]
    assert scores["n_eval"] == {"chat": 6, "pc": 6, "alpaca": 6}
    preds = [json.loads(x) for x in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    for t in ("chat", "pc", "alpaca"):
        expected = [answer_text(cfg.task(t), r) for r in load_splits(cfg.task(t), 0).eval]
        assert [p["answer"] for p in preds if p["model"] == "base" and p["task"] == t] == expected
    # the scored answer of a conversation is its last assistant turn, reversed input of the
    # last user turn; of a prompt-completion row, its completion text
    chat_rows = load_splits(cfg.task("chat"), 0).eval
    assert expected and all(
        answer_text(cfg.task("chat"), r) == r["messages"][3]["content"][::-1] for r in chat_rows
    )
