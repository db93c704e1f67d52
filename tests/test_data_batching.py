"""Mixing proportions, padded and packed batches, rank sharding, and the trainers' entry point."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
import torch

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.data.batching import apportion, build_train_examples, iterate_batches, mix_examples
from cpi_ray.data.formatting import IGNORE_INDEX

PAD = 0
MARK = 1000  # example i starts with token MARK + i, so packed rows can be cut back into examples


def _examples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, a = rng.randint(1, 12), rng.randint(1, 10)
        ids = [MARK + i] + [rng.randint(10, 99) for _ in range(p + a)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (1 + p) + ids[1 + p :]})
    return out


def _rows(batch):
    """Unpadded (input_ids, labels) rows of a batch, checking the padding is consistent."""
    rows = []
    for ids, lab, mask in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
    ):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)
        assert ids[n:] == [PAD] * (len(ids) - n) and lab[n:] == [IGNORE_INDEX] * (len(ids) - n)
        rows.append((ids[:n], lab[:n]))
    return rows


def _segments(ids, labels):
    """Cut a (possibly packed) row at the marker tokens."""
    starts = [k for k, t in enumerate(ids) if t >= MARK] + [len(ids)]
    assert starts[0] == 0
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]


# ---------------------------------------------------------------------------------- mixing


def test_apportion_is_exact_and_proportional():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(400, [2, 1, 1]) == [200, 100, 100]
    assert sum(apportion(97, [0.3, 0.5, 0.2])) == 97
    with pytest.raises(ValueError):
        apportion(3, [0, 0])


def test_mix_follows_weights_whatever_the_task_sizes():
    per_task = {
        name: [{"task": name, "i": i} for i in range(size)]
        for name, size in (("a", 5), ("b", 300), ("c", 40))
    }
    mixed = mix_examples(per_task, {"a": 2, "b": 1, "c": 1}, 400, seed=3)
    counts = Counter(e["task"] for e in mixed)
    assert counts == {"a": 200, "b": 100, "c": 100}
    # A small task is cycled evenly; a large one is sampled without repeats.
    assert Counter(e["i"] for e in mixed if e["task"] == "a") == {i: 40 for i in range(5)}
    assert len({e["i"] for e in mixed if e["task"] == "b"}) == 100
    # Deterministic, independent of dict order, shuffled across tasks.
    again = mix_examples(dict(reversed(per_task.items())), {"c": 1, "b": 1, "a": 2}, 400, seed=3)
    assert again == mixed
    assert mix_examples(per_task, {"a": 2, "b": 1, "c": 1}, 400, seed=4) != mixed
    assert len({e["task"] for e in mixed[:20]}) > 1
    assert Counter(e["task"] for e in mix_examples(per_task, None, 300, 0)) == {"a": 100, "b": 100, "c": 100}


# ---------------------------------------------------------------------------------- padding


def test_padded_batches_cover_each_example_once_per_epoch_unchanged():
    bs, wb = 4, 8
    ex = _examples(bs * wb * 2)  # two windows per epoch
    it = iterate_batches(ex, bs, PAD, seed=0, window_batches=wb)
    seen = Counter()
    for batch in itertools.islice(it, 2 * wb * 2):  # two epochs
        assert batch["input_ids"].shape[0] == bs
        assert batch["input_ids"].dtype == torch.long
        rows = _rows(batch)
        assert batch["input_ids"].shape[1] == max(len(r[0]) for r in rows)
        for ids, lab in rows:
            i = ids[0] - MARK
            assert (ids, lab) == (ex[i]["input_ids"], ex[i]["labels"])
            seen[i] += 1
    assert seen == {i: 2 for i in range(len(ex))}


def _pad_fraction(it, steps):
    total = real = 0
    for batch in itertools.islice(it, steps):
        total += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return 1 - real / total


def test_length_grouping_reduces_padding():
    ex = _examples(512, seed=1)
    grouped = _pad_fraction(iterate_batches(ex, 8, PAD, 0, window_batches=16), 64)
    plain = _pad_fraction(iterate_batches(ex, 8, PAD, 0, window_batches=1), 64)
    assert grouped < plain / 2


def test_pad_to_multiple_of():
    batch = next(iterate_batches(_examples(16), 4, PAD, 0, pad_to_multiple_of=8))
    assert batch["input_ids"].shape[1] % 8 == 0


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_split_the_single_rank_global_batch(packing):
    ex = _examples(200, seed=2)
    kw = dict(pad_id=PAD, seed=5, packing=packing, max_seq_len=48)
    single = iterate_batches(ex, 6, **kw)
    ranks = [iterate_batches(ex, 2, rank=r, world_size=3, **kw) for r in range(3)]
    for _ in range(12):
        whole = sorted(map(str, _rows(next(single))))
        parts = [_rows(next(it)) for it in ranks]
        assert all(len(p) == 2 for p in parts)
        assert sorted(str(r) for p in parts for r in p) == whole


# ---------------------------------------------------------------------------------- packing


def test_packed_rows_hold_whole_examples_with_masked_boundaries():
    ex = _examples(300, seed=4)
    max_len = 64
    it = iterate_batches(ex, 4, PAD, seed=1, packing=True, max_seq_len=max_len, window_batches=4)
    seen = Counter()
    real = total = 0
    for batch in itertools.islice(it, 60):
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= max_len
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
        for ids, lab in _rows(batch):
            for seg_ids, seg_lab in _segments(ids, lab):
                i = seg_ids[0] - MARK
                assert seg_ids == ex[i]["input_ids"]  # never cut
                assert seg_lab[0] == IGNORE_INDEX  # no loss across a boundary
                assert seg_lab[1:] == ex[i]["labels"][1:]  # every supervised label kept
                seen[i] += 1
    assert len(seen) == len(ex)  # 60 batches span more than an epoch
    assert max(seen.values()) - min(seen.values()) <= 2
    assert 1 - real / total < 0.1  # packing wastes little


def test_packing_masks_a_supervised_first_token():
    ex = [{"input_ids": [MARK + i, 5, 6], "labels": [MARK + i, 5, 6]} for i in range(8)]
    batch = next(iterate_batches(ex, 2, PAD, 0, packing=True, max_seq_len=12))
    for ids, lab in _rows(batch):
        for _, seg_lab in _segments(ids, lab):
            assert seg_lab == [IGNORE_INDEX, 5, 6]


def test_argument_errors_raise_at_call_time():
    ex = _examples(4)
    with pytest.raises(ValueError, match="packing needs max_seq_len"):
        iterate_batches(ex, 2, PAD, 0, packing=True)
    with pytest.raises(ValueError, match="outside world_size"):
        iterate_batches(ex, 2, PAD, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="exceeds max_seq_len=4"):
        iterate_batches(ex, 2, PAD, 0, max_seq_len=4)
    with pytest.raises(ValueError, match="at least one example"):
        iterate_batches([], 2, PAD, 0)


# ---------------------------------------------------------------------------------- trainers


def test_build_train_examples_encodes_the_training_split(tmp_path):
    from cpi_ray.data.tasks import load_rows, split_rows
    from cpi_ray.models.tiny import build_tiny_tokenizer

    for name, rows in (
        ("rev", [{"question": f"reverse: w{i}", "answer": f"{i}w"} for i in range(30)]),
        ("up", [{"question": f"upper: x{i}", "answer": f"X{i}"} for i in range(20)]),
    ):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PipelineConfig(
        tasks=[
            {"name": "rev", "path": str(tmp_path / "rev.jsonl"), "eval_size": 5},
            {"name": "up", "path": str(tmp_path / "up.jsonl"), "eval_size": 4, "train_size": 10},
        ],
        data={"max_seq_len": 64, "split_seed": 1},
    )
    tok = build_tiny_tokenizer()
    out = build_train_examples(cfg, tok, ["rev", "up"])
    assert {k: len(v) for k, v in out.items()} == {"rev": 25, "up": 10}
    train = split_rows(load_rows(cfg.task("rev")), cfg.task("rev"), 1).train
    answers = [
        tok.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab != IGNORE_INDEX])
        for e in out["rev"]
    ]
    assert answers == [r["answer"] + "</s>" for r in train]
