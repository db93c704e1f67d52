"""Tasks: loading and its errors, splits, chat formatting, answer-only labels, scorers."""

from __future__ import annotations

import json
import logging
import textwrap

import pytest

from cpi_ray.config.schema import TaskConfig
from cpi_ray.data.formatting import (
    IGNORE_INDEX,
    AnswerTooLongError,
    encode_example,
    encode_rows,
    format_prompt,
)
from cpi_ray.data.scorers import get_scorer
from cpi_ray.data.tasks import (
    answer_text,
    load_rows,
    render_template,
    split_rows,
    task_identity,
    to_json_safe,
)
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
    task = _task(
        _jsonl(tmp_path / "n.jsonl", rows), prompt_field="q.text", answer_field="meta.sol", eval_size=1
    )
    assert load_rows(task) == rows


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [
                {"question": "a", "answer": "b"},
                {"question": "c", "answer": "d"},
                {"question": "e", "solution": "f"},
            ],
            r"task 'bad': row 2 has no answer field 'answer'",
        ),
        (
            [{"question": "a", "answer": "b"}, {"question": "  ", "answer": "d"}],
            r"task 'bad': row 1 has an empty prompt field 'question'",
        ),
        ([{"question": "a", "answer": ""}], r"task 'bad': row 0 has an empty answer field 'answer'"),
    ],
)
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
    task = TaskConfig(
        name="sb", reasoning_gym={"name": "spell_backward", "size": 6, "seed": 3}, scorer="reasoning_gym"
    )
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

    assert to_json_safe({"a": (1, 2), 3: {np.int64(4)}, "f": np.float32(0.5), "n": float("nan")}) == {
        "a": [1, 2],
        "3": [4],
        "f": 0.5,
        "n": "nan",
    }


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
    assert (
        format_prompt(tok, _task(p, system_prompt="Be brief."), ROW)
        == "<|system|>Be brief.</s><|user|>reverse: abc</s><|assistant|>"
    )


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
    assert format_prompt(t, _task(p, system_prompt="S"), ROW) == "<|user|>S\n\nreverse: abc</s><|assistant|>"


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
    (tmp_path / "my_scorers.py").write_text(
        textwrap.dedent("""
        def prefix(prediction, row):
            return sum(a == b for a, b in zip(prediction, row["answer"])) / len(row["answer"])
        def broken(prediction, row):
            return 2
    """)
    )
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
    ca = get_scorer(
        _task(p, scorer="cpi_ray.data.scorers:char_accuracy", prompt_field="query", answer_field="response")
    )
    assert ca("cba", rows[0]) == 1.0
    assert ca("cba", {"query": "q", "response": "cba"}) == 1.0  # no "answer" column at all


# ---------------------------------------------------------------------------------- task formats

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "reverse: abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "thanks"},  # after the last answer: nothing to learn
    ]
}


def _learned_spans(tok, ex):
    """The decoded runs of labelled tokens, in order."""
    spans, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def test_messages_learn_every_assistant_turn_and_score_the_last(tok, tmp_path):
    task = _task(_jsonl(tmp_path / "c.jsonl", [CHAT]), format="messages")
    assert load_rows(task) == [CHAT]
    assert answer_text(task, CHAT) == "cba"
    prompt = format_prompt(tok, task, CHAT)
    assert prompt == (
        "<|system|>Be brief.</s><|user|>hi</s><|assistant|>yo</s><|user|>reverse: abc</s><|assistant|>"
    )
    ex = encode_example(tok, task, CHAT, max_seq_len=256)
    assert _learned_spans(tok, ex) == ["yo</s>", "cba</s>"]
    # the whole sequence is the template's rendering of the conversation up to the answer
    assert tok.decode(ex["input_ids"]) == prompt + "cba</s>"
    # a task system prompt does not replace the row's own
    with_sys = _task(tmp_path / "c.jsonl", format="messages", system_prompt="other")
    assert format_prompt(tok, with_sys, CHAT).startswith("<|system|>Be brief.</s>")


def test_messages_without_chat_template_keep_earlier_turns_as_context(tmp_path):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    task = _task(_jsonl(tmp_path / "c.jsonl", [CHAT]), format="messages")
    assert format_prompt(plain, task, CHAT) == "Be brief.\n\nhi\nyo\nreverse: abc\n"
    assert _learned_spans(plain, encode_example(plain, task, CHAT, 256)) == ["cba</s>"]


def test_template_that_rewrites_history_keeps_earlier_turns_as_context(tmp_path):
    t = build_tiny_tokenizer()
    # Like templates that drop earlier reasoning: an assistant turn renders differently once
    # another turn follows it, so a longer conversation does not extend a shorter one.
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|assistant|>' + m['content'][:1] + '</s>' }}{% else %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    task = _task(_jsonl(tmp_path / "c.jsonl", [CHAT]), format="messages")
    ex = encode_example(t, task, CHAT, 256)
    assert _learned_spans(t, ex) == ["cba</s>"]
    assert t.decode(ex["input_ids"]) == format_prompt(t, task, CHAT) + "cba</s>"


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "reverse: abc", "completion": "cba"},
        {
            "prompt": [{"role": "user", "content": "reverse: abc"}],
            "completion": [{"role": "assistant", "content": "cba"}],
        },
    ],
)
def test_prompt_completion_text_or_turns(tok, tmp_path, row):
    task = _task(_jsonl(tmp_path / "pc.jsonl", [row]), format="prompt_completion")
    assert (task.prompt_field, task.answer_field) == ("prompt", "completion")
    load_rows(task)
    assert format_prompt(tok, task, row) == "<|user|>reverse: abc</s><|assistant|>"
    assert answer_text(task, row) == "cba"
    assert _learned_spans(tok, encode_example(tok, task, row, 64)) == ["cba</s>"]


def test_prompt_template_drops_empty_fields_with_their_label(tok, tmp_path):
    rows = [
        {"instruction": "Sort", "input": "b a", "output": "a b"},
        {"instruction": "Greet", "input": "", "output": "hi"},
        {"instruction": "Greet", "output": "hi"},
    ]
    alpaca = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    task = _task(_jsonl(tmp_path / "a.jsonl", rows[:2]), prompt_template=alpaca, answer_field="output")
    assert task.prompt_field is None
    load_rows(task)
    assert render_template(alpaca, rows[0]) == ("### Instruction:\nSort\n\n### Input:\nb a\n\n### Response:")
    assert render_template(alpaca, rows[1]) == "### Instruction:\nGreet\n\n### Response:"
    assert render_template(alpaca, rows[2]) == render_template(alpaca, rows[1])
    assert render_template("{instruction}\n\n{input}", rows[1]) == "Greet"
    assert render_template("{input}\n\n{instruction}", rows[1]) == "Greet"
    assert format_prompt(tok, task, rows[1]) == (
        "<|user|>### Instruction:\nGreet\n\n### Response:</s><|assistant|>"
    )


@pytest.mark.parametrize(
    "task_kw, rows, match",
    [
        (
            {},
            [{"question": [{"role": "user", "content": "x"}], "answer": "a"}],
            r"task 'bad': row 0: prompt field 'question' is a list, expected text \(chat turns: set the "
            r"task's format to messages\)",
        ),
        (
            {},
            [{"question": "q", "answer": {"text": "a"}}],
            r"task 'bad': row 0: answer field 'answer' is a dict, expected text",
        ),
        (
            {"format": "messages"},
            [{"messages": "hello"}],
            r"task 'bad': row 0: field 'messages' is a str, expected a list of chat turns",
        ),
        (
            {"format": "messages"},
            [
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            ],
            r"task 'bad': row 1: messages\[1\] has role 'bot', expected one of system, user, assistant",
        ),
        (
            {"format": "messages"},
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}],
            r"task 'bad': row 0: messages\[1\].content is a NoneType, expected text",
        ),
        (
            {"format": "messages"},
            [{"messages": [{"role": "user", "content": "q"}]}],
            r"task 'bad': row 0: field 'messages' has no assistant turn",
        ),
        (
            {"format": "messages"},
            [{"messages": [{"role": "assistant", "content": "a"}]}],
            r"task 'bad': row 0 has no user turn before its last assistant turn",
        ),
        (
            {"format": "messages"},
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}],
            r"task 'bad': row 0 has an empty last assistant turn",
        ),
        (
            {"format": "prompt_completion"},
            [{"prompt": "q", "completion": [{"role": "user", "content": "a"}]}],
            r"task 'bad': row 0: field 'completion' has no assistant turn",
        ),
        (
            {"prompt_template": "{a} {b}"},
            [{"a": "", "b": None, "answer": "x"}],
            r"task 'bad': row 0: every field of prompt_template '\{a\} \{b\}' is empty",
        ),
        (
            {"prompt_template": "{a}"},
            [{"a": [1], "answer": "x"}],
            r"task 'bad': row 0: prompt_template field 'a' is a list, expected text",
        ),
    ],
)
def test_wrongly_typed_fields_name_task_row_field_and_type(tmp_path, task_kw, rows, match):
    task = _task(_jsonl(tmp_path / "bad.jsonl", rows), name="bad", **task_kw)
    with pytest.raises(ValueError, match=match):
        load_rows(task)


def test_hub_source_takes_config_name_split_and_data_files(tmp_path):
    """A dataset repository laid out as on the hub (a README declaring configurations), loaded by
    `datasets.load_dataset` through the task's hub fields."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(
        textwrap.dedent("""\
        ---
        configs:
        - config_name: main
          data_files:
          - {split: train, path: data/main-*.jsonl}
          - {split: test, path: data/main-test.jsonl}
        - config_name: socratic
          data_files:
          - {split: train, path: data/soc-*.jsonl}
        ---
        """)
    )
    _jsonl(repo / "data" / "main-0.jsonl", [{"question": "1+1", "answer": "so #### 2"}])
    _jsonl(repo / "data" / "main-test.jsonl", [{"question": "2+2", "answer": "#### 4"}])
    _jsonl(repo / "data" / "soc-0.jsonl", [{"question": "3+3", "answer": "#### 6"}])
    hub = dict(name="g", hub_id=str(repo), scorer="numeric")
    assert load_rows(TaskConfig(**hub, hub_name="main"))[0]["question"] == "1+1"
    assert load_rows(TaskConfig(**hub, hub_name="main", hub_split="test"))[0]["question"] == "2+2"
    assert load_rows(TaskConfig(**hub, hub_name="socratic"))[0]["question"] == "3+3"
    assert load_rows(TaskConfig(**hub, hub_data_files="data/soc-*.jsonl"))[0]["question"] == "3+3"
    with pytest.raises(ValueError, match=r"task 'g': cannot load hub dataset .*name='nope'"):
        load_rows(TaskConfig(**hub, hub_name="nope"))


def test_numeric_scorer_compares_final_numbers(tmp_path):
    row = {"question": "q", "answer": "She pays 3 * 24 = 72.\n#### 72"}
    score = get_scorer(_task(_jsonl(tmp_path / "n.jsonl", [row]), scorer="numeric"))
    assert score("72", row) == 1.0
    assert score("The total is 72.00 dollars", row) == 1.0
    assert score("3 * 24 = 72 so #### 72", row) == 1.0
    assert score("#### 72 ... 1", row) == 1.0  # the text after #### decides
    assert score("72 or 73", row) == 0.0  # the last number decides
    assert score("seventy-two", row) == 0.0
    big = {"question": "q", "answer": "#### 1,000"}
    assert score("$1000", big) == 1.0 and score("1,000.0", big) == 1.0 and score("-1000", big) == 0.0


def test_new_task_fields_at_defaults_keep_fingerprints(tmp_path):
    """Runs written before the formats existed resume: a prompt_answer task fingerprints as it
    did, a task that uses a new field does not."""
    task = _task(_jsonl(tmp_path / "t.jsonl", ROWS))
    assert not {
        "format",
        "messages_field",
        "prompt_template",
        "hub_name",
        "hub_revision",
        "hub_data_files",
    } & set(task_identity(task))
    assert task_identity(task)["prompt_field"] == "question"
    templated = _task(tmp_path / "t.jsonl", prompt_template="{question}")
    assert task_identity(templated)["prompt_template"] == "{question}"
    # The probe's fingerprint (probes are the costly stage) hashes the fields tasks had before.
    from cpi_ray.config.schema import PipelineConfig
    from cpi_ray.run.stage import stable_hash
    from cpi_ray.training.probe import probe_fingerprint

    cfg = PipelineConfig(tasks=[task.model_dump()])
    before = [
        "name",
        "path",
        "hub_id",
        "hub_split",
        "reasoning_gym",
        "prompt_field",
        "answer_field",
        "scorer",
        "system_prompt",
        "eval_size",
        "val_size",
        "train_size",
        "weight",
        "max_new_tokens",
    ]
    old_task = {k: task.model_dump()[k] for k in before}
    assert probe_fingerprint(cfg, "t", "base") == stable_hash(
        {
            "task": old_task,
            "data": cfg.data.model_dump(),
            # the probe's recipe fields (execution fields stay outside fingerprints)
            "probe": cfg.probe.model_dump(
                exclude={
                    "checkpoint_every",
                    "cpus_per_worker",
                    "custom_resources",
                    "fisher_batches",
                    "gradient_checkpointing",
                    "max_failures",
                    "zero_stage",
                }
            ),
            "dtype": cfg.model.dtype,
            "base": "base",
        }
    )
