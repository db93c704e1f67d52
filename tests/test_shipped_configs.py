"""Every config under jobs/configs/ passes `cpi-ray check` and scores its own answers.

The model is the tiny stand-in and each hub dataset a small local stand-in laid out as on the hub
(a README declaring its configurations and splits) whose rows have the real dataset's fields and
shapes, so a config that names a field, configuration, split or format its dataset does not have
fails here instead of on a cluster after hours of probes. Local files and reasoning-gym tasks
are the real ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cpi_ray.config.load import load_config
from cpi_ray.data.scorers import get_scorer
from cpi_ray.data.tasks import answer_text, load_rows
from cpi_ray.pipeline.check import LEARNED_OPEN, check_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def _gsm8k(i: int) -> dict:
    return {
        "question": f"Natalia sold {i} clips in April and half as many in May. How many in all?",
        "answer": f"In May she sold {i}/2 = <<{i}/2={i / 2:g}>>{i / 2:g} clips.\n#### {i + i / 2:g}",
    }


def _code_alpaca(i: int) -> dict:
    return {
        "instruction": f"Write a function that adds {i} to a number.",
        "input": "" if i % 2 else f"x = {i}",
        "output": f"def add(x):\n    return x + {i}",
    }


def _dolly(i: int) -> dict:
    return {
        "instruction": f"Who wrote book number {i}?",
        "context": "" if i % 3 else f"Book {i} was written by Ada.",
        "response": "Ada.",
        "category": "closed_qa" if i % 3 == 0 else "open_qa",
    }


def _ultrachat(i: int) -> dict:
    return {
        "prompt": f"Tell me about {i}.",
        "prompt_id": f"{i:064x}",
        "messages": [
            {"content": f"Tell me about {i}.", "role": "user"},
            {"content": f"{i} is a number.", "role": "assistant"},
            {"content": "And twice that?", "role": "user"},
            {"content": f"That is {2 * i}.", "role": "assistant"},
        ],
    }


# hub id -> (its configurations, its splits, a row of it)
STAND_INS = {
    "openai/gsm8k": (["main", "socratic"], ["train", "test"], _gsm8k),
    "sahil2801/CodeAlpaca-20k": (["default"], ["train"], _code_alpaca),
    "databricks/databricks-dolly-15k": (["default"], ["train"], _dolly),
    "HuggingFaceH4/ultrachat_200k": (
        ["default"],
        ["train_sft", "test_sft", "train_gen", "test_gen"],
        _ultrachat,
    ),
}


def _stand_in_repo(root: Path, hub_id: str, n: int) -> Path:
    configs, splits, make_row = STAND_INS[hub_id]
    repo = root / hub_id.replace("/", "__")
    if repo.exists():
        return repo
    lines = ["---", "configs:"]
    for c in configs:
        lines += [f"- config_name: {c}", "  data_files:"]
        for s in splits:
            path = Path("data") / c / f"{s}.jsonl"
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text("".join(json.dumps(make_row(i)) + "\n" for i in range(n)))
            lines.append(f"  - {{split: {s}, path: {path}}}")
    (repo / "README.md").write_text("\n".join([*lines, "---", ""]))
    return repo


def _overrides(path: Path, tmp_path: Path) -> list[str]:
    raw = load_config(path)
    sets = [
        "model.source=tiny",
        f"model.cache_dir={tmp_path / 'models'}",
        f"storage.path={tmp_path / 'runs'}",
    ]
    for i, t in enumerate(raw.tasks):
        if t.hub_id is None:
            continue
        assert t.hub_id in STAND_INS, f"{path.name}: task {t.name}: add a stand-in for {t.hub_id}"
        n = t.eval_size + t.val_size + 12
        sets.append(f"tasks.{i}.hub_id={_stand_in_repo(tmp_path / 'hub', t.hub_id, n)}")
    return sets


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_checks_and_scores_its_answers(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name their local files relative to the repository
    cfg = load_config(path, _overrides(path, tmp_path))
    report = check_config(cfg, tmp_path / "runs" / cfg.storage.run_name)
    assert [t.name for t in report.tasks] == [t.name for t in cfg.tasks]
    for task, checked in zip(cfg.tasks, report.tasks):
        assert checked.train > 0 and checked.eval == task.eval_size
        assert LEARNED_OPEN in checked.example  # the answer is learned, and marked
        assert not re.search(r"\[\{'|\{'role'", checked.example)  # no Python repr of chat data
        row = load_rows(task)[0]
        score = get_scorer(task)
        assert score(answer_text(task, row), row) == 1.0, task.name
        assert score("", row) < 1.0, task.name


def test_llama7b_reads_each_dataset_in_its_format(tmp_path, monkeypatch):
    """The 7B config's tasks as a user of those datasets expects them formatted: GSM8K's worked
    solution scored on its final number, the optional input/context fields dropped when empty,
    UltraChat's conversation with both assistant turns learned."""
    from cpi_ray.data.formatting import IGNORE_INDEX, encode_example, format_prompt
    from cpi_ray.models.tiny import build_tiny_tokenizer

    monkeypatch.chdir(REPO)
    path = REPO / "jobs" / "configs" / "llama7b.yaml"
    cfg = load_config(path, _overrides(path, tmp_path))
    tok = build_tiny_tokenizer()
    math = cfg.task("math")
    assert get_scorer(math)("so the total is 6", _gsm8k(4)) == 1.0
    code = cfg.task("code")
    assert format_prompt(tok, code, _code_alpaca(1)) == (
        "<|user|>Write a function that adds 1 to a number.</s><|assistant|>"
    )
    assert "\n\nx = 2</s>" in format_prompt(tok, code, _code_alpaca(2))
    chat = cfg.task("chat")
    ex = encode_example(tok, chat, _ultrachat(3), cfg.data.max_seq_len)
    learned = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    assert learned == "3 is a number.</s>That is 6.</s>"
