"""Tasks: loading and its errors, splits, chat formatting, answer-only labels, scorers."""

from __future__ import annotations

import json
import logging
import textwrap

import pytest

from cpi_ray.config.schema import TaskConfig
from cpi_ray.data.formatting import (
    IGNORE_INDEX, AnswerTooLongError, encode_example, encode_rows, format_prompt,
)
from cpi_ray.data.scorers import get_scorer
from cpi_ray.data.tasks import load_rows, split_rows, task_identity, to_json_safe
from cpi_ray.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task(path, **kw):
    return TaskConfig(name=kw.pop("name", "t"), path=str(path), **kw)


ROWS = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]


# ---------------------------------------------------------------------------------- loading


def test_load_jsonl_and_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = _jsonl(tmp_path / "t.jsonl", ROWS)
    p = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert load_rows(_task(j)) == ROWS
    assert load_rows(_task(p)) == ROWS


def test_dotted_fields_reach_into_nested_rows(tmp_path):
    rows = [{"q": {"text": f"x{i}"}, "meta": {"sol": i}} for i in range(3)]
    task = _task(_jsonl(tmp_path / "n.jsonl", rows), prompt_field="q.text",
                 answer_field="meta.sol", eval_size=1)
    assert load_rows(task) == rows


@pytest.mark.parametrize("rows, match", [
    ([{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"},
      {"question": "e", "solution": "f"}], r"task 'bad': row 2 has no answer field 'answer'"),
    ([{"question": "a", "answer": "b"}, {"question": "  ", "answer": "d"}],
     r"task 'bad': row 1 has an empty prompt field 'question'"),
    ([{"question": "a", "answer": ""}], r"task 'bad': row 0 has an empty answer field 'answer'"),
])
def test_bad_rows_name_task_row_and_field(tmp_path, rows, match):
    task = _task(_jsonl(tmp_path / "bad.jsonl", rows), name="bad")
    with pytest.raises(ValueError, match=match):
        load_rows(task)


def test_empty_and_unreadable_files_name_the_task(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"task 'e'.*empty"):
        load_rows(_task(empty, name="e"))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"question": "a"\n')
    with pytest.raises(ValueError, match=r"task 'b': cannot read"):
        load_rows(_task(broken, name="b"))


def test_reasoning_gym_rows_are_json_safe_and_scored_by_their_dataset():
    task = TaskConfig(name="sb", reasoning_gym={"name": "spell_backward", "size": 6, "seed": 3},
                      scorer="reasoning_gym")
    rows = load_rows(task)
    assert len(rows) == 6
    assert json.loads(json.dumps(rows)) == rows  # tuples in metadata became lists
    for r in rows:
        assert set(r) >= {"question", "answer", "metadata"}
        assert r["answer"] == r["metadata"]["word"][::-1]
    score = get_scorer(task)
    assert score(rows[0]["answer"], rows[0]) == 1.0
    assert score(" " + rows[0]["answer"].upper(), rows[0]) < 1.0  # rg itself does not strip
    assert score("", rows[0]) == 0.0


def test_to_json_safe():
    import numpy as np

    assert to_json_safe({"a": (1, 2), 3: {np.int64(4)}, "f": np.float32(0.5),
                         "n": float("nan")}) == {"a": [1, 2], "3": [4], "f": 0.5, "n": "nan"}


def test_task_identity_follows_file_content(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", ROWS)
    before = task_identity(_task(p))
    moved = _jsonl(tmp_path / "moved.jsonl", ROWS)
    assert task_identity(_task(moved)) == before
    _jsonl(p, ROWS[:-1])
    assert task_identity(_task(p)) != before


# ---------------------------------------------------------------------------------- splits


def _ids(rows):
    return [r["question"] for r in rows]


def test_splits_are_deterministic_disjoint_and_complete(tmp_path):
    task = _task(_jsonl(tmp_path / "x.jsonl", ROWS), eval_size=10, val_size=5)
    a, b = split_rows(ROWS, task, 7), split_rows(ROWS, task, 7)
    assert (a.train, a.val, a.eval) == (b.train, b.val, b.eval)
    assert (len(a.eval), len(a.val), len(a.train)) == (10, 5, 35)
    sets = [set(_ids(s)) for s in (a.train, a.val, a.eval)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set.union(*sets) == set(_ids(ROWS))
    assert _ids(a.eval) != _ids(ROWS[:10])  # really shuffled
    other = split_rows(ROWS, task, 8)
    assert set(_ids(other.eval)) != sets[2]


def test_train_size_caps_training_without_moving_held_out_rows(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", ROWS)
    full = split_rows(ROWS, _task(p, eval_size=10, val_size=5), 0)
    capped = split_rows(ROWS, _task(p, eval_size=10, val_size=5, train_size=8), 0)
    assert capped.eval == full.eval and capped.val == full.val
    assert capped.train == full.train[:8]


def test_split_needs_training_rows(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", ROWS[:5])
    with pytest.raises(ValueError, match=r"task 't': 5 rows leave none for training"):
        split_rows(ROWS[:5], _task(p, eval_size=4, val_size=1), 0)


# ---------------------------------------------------------------------------------- formatting


ROW = {"question": "reverse: abc", "answer": "cba"}


def test_chat_template_formatting(tok, tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [ROW])
    assert format_prompt(tok, _task(p), ROW) == "<|user|>reverse: abc</s><|assistant|>"
    assert (format_prompt(tok, _task(p, system_prompt="Be brief."), ROW)
            == "<|system|>Be brief.</s><|user|>reverse: abc</s><|assistant|>")


def test_plain_prompt_without_chat_template(tmp_path):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    p = _jsonl(tmp_path / "x.jsonl", [ROW])
    assert format_prompt(plain, _task(p), ROW) == "reverse: abc\n"
    assert format_prompt(plain, _task(p, system_prompt="S"), ROW) == "S\n\nreverse: abc\n"


def test_system_prompt_folds_into_user_turn_when_template_rejects_it(tmp_path):
    t = build_tiny_tokenizer()
    t.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + t.chat_template
    )
    p = _jsonl(tmp_path / "x.jsonl", [ROW])
    assert (format_prompt(t, _task(p, system_prompt="S"), ROW)
            == "<|user|>S\n\nreverse: abc</s><|assistant|>")


def test_labels_cover_exactly_answer_and_eos(tok, tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [ROW])
    task = _task(p, system_prompt="Be brief.")
    ex = encode_example(tok, task, ROW, max_seq_len=128)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    sup = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    k = sup[0]
    assert sup == list(range(k, len(ids)))  # one contiguous tail
    assert [labels[i] for i in sup] == ids[k:]
    assert tok.decode(ids[k:]) == "cba</s>"
    assert tok.decode(ids[:k]) == format_prompt(tok, task, ROW)


def test_truncation_drops_prompt_from_the_left(tok, tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [ROW])
    task = _task(p, system_prompt="A long system prompt that will not fit.")
    full = encode_example(tok, task, ROW, max_seq_len=512)
    cut = encode_example(tok, task, ROW, max_seq_len=12)
    assert len(cut["input_ids"]) == 12
    assert cut["input_ids"] == full["input_ids"][-12:]
    assert cut["labels"] == full["labels"][-12:]
    assert tok.decode([t for t, lab in zip(cut["input_ids"], cut["labels"]) if lab != -100]) == "cba</s>"


def test_answers_too_long_raise_or_are_dropped_with_a_count(tok, tmp_path, caplog):
    rows = [ROW, {"question": "q", "answer": "x" * 40}, {"question": "q", "answer": "y" * 50}]
    task = _task(_jsonl(tmp_path / "x.jsonl", rows))
    with pytest.raises(AnswerTooLongError, match="max_seq_len=32"):
        encode_example(tok, task, rows[1], max_seq_len=32)
    # 4 answer tokens + EOS + one prompt token fit exactly into 5 + 1
    assert len(encode_example(tok, task, ROW, max_seq_len=5)["input_ids"]) == 5
    with caplog.at_level(logging.WARNING, logger="cpi_ray"):
        kept = encode_rows(tok, task, rows, max_seq_len=32)
    assert len(kept) == 1
    assert "dropped 2 of 3 rows" in caplog.text
    with pytest.raises(ValueError, match="no row fits"):
        encode_rows(tok, task, rows[1:], max_seq_len=32)


# ---------------------------------------------------------------------------------- scorers


def test_exact_match_strips_and_is_case_sensitive(tmp_path):
    score = get_scorer(_task(_jsonl(tmp_path / "x.jsonl", [ROW])))
    assert score("cba", ROW) == 1.0
    assert score("  cba\n", ROW) == 1.0
    assert score("CBA", ROW) == 0.0
    assert score("cb", ROW) == 0.0
    assert score("cba", {"question": "q", "answer": 123}) == 0.0
    assert score("123", {"question": "q", "answer": 123}) == 1.0


def test_module_function_scorers(tmp_path, monkeypatch):
    p = _jsonl(tmp_path / "x.jsonl", [ROW])
    ci = get_scorer(_task(p, scorer="cpi_ray.data.scorers:exact_match_ignore_case"))
    assert ci(" CBA ", ROW) == 1.0 and ci("abc", ROW) == 0.0
    ca = get_scorer(_task(p, scorer="cpi_ray.data.scorers:char_accuracy"))
    assert ca("cba", ROW) == 1.0 and ca("cxa", ROW) == pytest.approx(2 / 3)
    assert ca("cbaaa", ROW) == pytest.approx(3 / 5) and ca("", ROW) == 0.0
    (tmp_path / "my_scorers.py").write_text(textwrap.dedent("""
        def prefix(prediction, row):
            return sum(a == b for a, b in zip(prediction, row["answer"])) / len(row["answer"])
        def broken(prediction, row):
            return 2
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_scorer(_task(p, scorer="my_scorers:prefix"))("cbx", ROW) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        get_scorer(_task(p, scorer="my_scorers:broken"))("cba", ROW)
    with pytest.raises(ValueError, match="cannot be imported"):
        get_scorer(_task(p, scorer="my_scorers:missing"))


def test_module_function_scorers_read_the_tasks_answer_field(tmp_path):
    """A task whose answer lives in another field (llama7b.yaml's `response`, `output`) is scored
    on that field, not on a missing or unrelated "answer" column."""
    rows = [{"query": "q", "response": "cba", "answer": "unrelated"}]
    p = _jsonl(tmp_path / "r.jsonl", rows)
    ca = get_scorer(_task(p, scorer="cpi_ray.data.scorers:char_accuracy", prompt_field="query",
                          answer_field="response"))
    assert ca("cba", rows[0]) == 1.0
    assert ca("cba", {"query": "q", "response": "cba"}) == 1.0  # no "answer" column at all
