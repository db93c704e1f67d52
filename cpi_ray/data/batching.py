"""Training batches: task mixing, length-grouped padding or packing, and sharding across ranks.

Every rank walks the same seeded, endless stream of example indices (a fresh permutation per
epoch) and keeps only its share of each global batch, so ranks agree on the data without talking
to each other, and over any `len(examples)` consecutive stream positions each example is used
exactly once: nothing is dropped at epoch ends.

Padding mode sorts a window of `window_batches` global batches by length, cuts it into global
batches and shuffles their order: rows of a batch have similar lengths (little padding), and the
batch lengths stay random over time. Packing mode fills rows of `max_seq_len` tokens with whole
examples (best-fit decreasing over a window); see `iterate_batches` for what packing trades.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from cpi_ray.data.formatting import IGNORE_INDEX, encode_rows
from cpi_ray.data.tasks import load_splits


def _rng(*parts: Any) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------- mixing


def apportion(n: int, weights: Sequence[float]) -> list[int]:
    """Split n into integer counts proportional to weights (largest remainder; ties to the
    earlier entry), summing exactly to n."""
    total = float(sum(weights))
    if n < 0 or not weights or total <= 0 or any(w < 0 for w in weights):
        raise ValueError("apportion needs n >= 0 and non-negative weights with a positive sum")
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def task_weights(cfg, tasks: Sequence[str], mix: str = "weights") -> dict[str, float]:
    """Each task's share in a mix of `tasks`: its configured `weight`, or with `mix` balanced
    an equal share."""
    return {t: 1.0 if mix == "balanced" else float(cfg.task(t).weight) for t in tasks}


def mix_counts(tasks: Sequence[str], weights: Optional[Mapping[str, float]], n: int) -> dict[str, int]:
    """How many of n mixed rows each task gets (`mix_examples`'s split): proportional to
    `weights` (equal when None), by task name."""
    names = sorted(tasks)
    w = [1.0 if weights is None else float(weights.get(t, 1.0)) for t in names]
    return dict(zip(names, apportion(n, w)))


def mix_examples(
    per_task: Mapping[str, list[dict]], weights: Optional[Mapping[str, float]], n: int, seed: int
) -> list[dict]:
    """n examples mixed from the tasks in proportion to `weights` (equal when None), whatever
    the tasks' sizes: a small task is cycled (a new permutation per pass), a large one sampled
    without replacement. Shuffled; deterministic in (per_task, weights, n, seed), independent of
    the mapping's order."""
    if not per_task:
        raise ValueError("mix_examples needs at least one task")
    mixed: list[dict] = []
    for name, count in mix_counts(per_task, weights, n).items():
        pool = per_task[name]
        if count and not pool:
            raise ValueError(f"task {name!r} has no training examples to mix")
        taken = 0
        for epoch in itertools.count():
            if taken >= count:
                break
            perm = _rng(seed, "mix", name, epoch).permutation(len(pool))
            for i in perm[: count - taken]:
                mixed.append(pool[i])
            taken = min(count, taken + len(pool))
    order = _rng(seed, "mix-order").permutation(len(mixed))
    return [mixed[i] for i in order]


# ---------------------------------------------------------------------------------- batches


def _index_stream(n: int, seed: int) -> Iterator[int]:
    for epoch in itertools.count():
        yield from _rng(seed, "epoch", epoch).permutation(n).tolist()


def _take(stream: Iterator[int], k: int) -> list[int]:
    return [next(stream) for _ in range(k)]


def collate(
    rows: list[tuple[list[int], list[int]]], pad_id: int, pad_to_multiple_of: int
) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[r, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[r, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _best_fit_decreasing(idx: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to <= capacity; each item goes to the fullest
    bin it fits in (ties: the earliest bin)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin id)
    for i in sorted(idx, key=lambda j: -lengths[j]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - lengths[i], b))
    return bins


def iterate_batches(
    examples: Sequence[dict],
    batch_size: int,
    pad_id: int,
    seed: int,
    packing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    max_seq_len: Optional[int] = None,
    window_batches: int = 16,
    pad_to_multiple_of: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches `{"input_ids", "labels", "attention_mask"}` (long tensors, right-padded
    with `pad_id` / IGNORE_INDEX / 0) of `batch_size` rows for `rank` of `world_size`.

    Every rank must call this with the same examples, seed and sizes; at each step the ranks
    together hold one global batch of `batch_size * world_size` rows, split so that their
    lengths are alike (rank r takes rows r, r+world_size, ... of the length-sorted global batch).

    packing=True: each row concatenates whole examples up to `max_seq_len` tokens. Positions run
    on across examples and attention is plain causal, so a later example can attend to earlier,
    unrelated ones in its row: nothing is reset, which keeps every attention implementation
    correct and fast, at the price of some cross-example context (the usual trade-off; block-
    diagonal attention would remove it but needs varlen kernels). The loss never crosses a
    boundary: the first token of each example is IGNORE_INDEX, so no example is trained to
    predict from the previous one's end. That token is never a target unpacked either (nothing
    precedes it), so packing loses no supervised label.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("iterate_batches needs at least one example")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or window_batches < 1 or pad_to_multiple_of < 1:
        raise ValueError("batch_size, window_batches and pad_to_multiple_of must be >= 1")
    lengths = [len(e["input_ids"]) for e in examples]
    if max_seq_len is not None and max(lengths) > max_seq_len:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds max_seq_len={max_seq_len}")
    if packing and max_seq_len is None:
        raise ValueError("packing needs max_seq_len")
    # Checks above run at call time; the generator below runs lazily.
    return _batches(
        examples,
        lengths,
        batch_size,
        pad_id,
        seed,
        packing,
        rank,
        world_size,
        max_seq_len,
        window_batches,
        pad_to_multiple_of,
    )


def _batches(
    examples: Sequence[dict],
    lengths: list[int],
    batch_size: int,
    pad_id: int,
    seed: int,
    packing: bool,
    rank: int,
    world_size: int,
    max_seq_len: Optional[int],
    window_batches: int,
    pad_to_multiple_of: int,
) -> Iterator[dict[str, torch.Tensor]]:
    n = len(examples)
    global_bs = batch_size * world_size
    stream = _index_stream(n, seed)
    order_rng = _rng(seed, "batch-order")

    if not packing:
        window = global_bs * window_batches
        while True:
            idx = sorted(_take(stream, window), key=lambda i: lengths[i])
            for b in order_rng.permutation(window_batches).tolist():
                rows = idx[b * global_bs : (b + 1) * global_bs][rank::world_size]
                yield collate(
                    [(examples[i]["input_ids"], examples[i]["labels"]) for i in rows],
                    pad_id,
                    pad_to_multiple_of,
                )

    assert max_seq_len is not None
    # Enough examples per window to fill about window_batches global batches of packed rows.
    per_row = max(1, max_seq_len // max(1, round(sum(lengths) / n)))
    window = global_bs * window_batches * per_row
    carry: list[list[int]] = []
    while True:
        bins = _best_fit_decreasing(_take(stream, window), lengths, max_seq_len)
        bins = carry + [bins[i] for i in order_rng.permutation(len(bins)).tolist()]
        full = len(bins) // global_bs * global_bs
        carry = bins[full:]
        for start in range(0, full, global_bs):
            group = bins[start : start + global_bs]
            # Like padding mode: ranks get rows of similar fill.
            group = sorted(group, key=lambda bn: -sum(lengths[i] for i in bn))[rank::world_size]
            yield collate([_pack(examples, bn) for bn in group], pad_id, pad_to_multiple_of)


def _pack(examples: Sequence[dict], members: list[int]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for i in members:
        ids.extend(examples[i]["input_ids"])
        lab = list(examples[i]["labels"])
        lab[0] = IGNORE_INDEX
        labels.extend(lab)
    return ids, labels


# ---------------------------------------------------------------------------------- trainers


def build_train_examples(cfg: Any, tokenizer: Any, task_names: Sequence[str]) -> dict[str, list[dict]]:
    """Encoded training split of each named task (`cfg` is a PipelineConfig). Deterministic, so
    every Ray worker that calls it builds the same examples."""
    out: dict[str, list[dict]] = {}
    for name in task_names:
        task = cfg.task(name)
        splits = load_splits(task, cfg.data.split_seed)
        out[name] = encode_rows(tokenizer, task, splits.train, cfg.data.max_seq_len)
    return out
