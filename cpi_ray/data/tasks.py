"""Task rows: loading from a local file, a hub dataset or a reasoning-gym generator, validation,
and deterministic train/val/eval splits.

Rows are plain JSON-safe dicts so that they travel to Ray workers, into `eval/` files and into
fingerprints unchanged. A reasoning-gym row keeps `question`, `answer` and `metadata`, which is
what that dataset's `score_answer(answer, entry)` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cpi_ray.config.schema import TaskConfig

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskSplits:
    train: list[dict]
    val: list[dict]
    eval: list[dict]


# ---------------------------------------------------------------------------------- field access


def get_field(row: dict, field: str) -> Any:
    """`row[field]`, where a dotted name reaches into nested dicts (e.g. `metadata.answer_cot`)
    unless the row has that dotted key itself. Raises KeyError when absent."""
    if field in row:
        return row[field]
    cur: Any = row
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(field)
        cur = cur[part]
    return cur


def prompt_text(task: TaskConfig, row: dict) -> str:
    return str(get_field(row, task.prompt_field))


def answer_text(task: TaskConfig, row: dict) -> str:
    # Surrounding whitespace is never part of what a model should learn or be scored on.
    return str(get_field(row, task.answer_field)).strip()


# ---------------------------------------------------------------------------------- loading


def load_rows(task: TaskConfig) -> list[dict]:
    """All rows of the task's source, validated (see `validate_rows`)."""
    if task.reasoning_gym is not None:
        rows = _load_reasoning_gym(task)
    elif task.path is not None:
        rows = _load_local(task)
    elif task.hub_id is not None:
        rows = _load_hub(task)
    else:  # the schema guarantees one source; this guards hand-built configs
        raise ValueError(f"task {task.name!r} has no source")
    validate_rows(task, rows)
    return rows


def _load_reasoning_gym(task: TaskConfig) -> list[dict]:
    import reasoning_gym

    src = task.reasoning_gym
    ds = reasoning_gym.create_dataset(src.name, size=src.size, seed=src.seed, **src.options)
    return [to_json_safe(dict(ds[i])) for i in range(len(ds))]


def _load_local(task: TaskConfig) -> list[dict]:
    import datasets

    path = Path(task.path)
    if not path.is_file():
        raise ValueError(f"task {task.name!r}: file {task.path!r} does not exist")
    fmt = _LOCAL_FORMATS.get(path.suffix)
    if fmt is None:
        raise ValueError(f"task {task.name!r}: {task.path!r} must be .jsonl, .json or .parquet")
    if fmt == "json" and not path.read_bytes().strip():
        raise ValueError(f"task {task.name!r}: the dataset is empty ({task.path})")
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # datasets' own errors do not say which task's file failed
        cause = e.__cause__ or e
        raise ValueError(f"task {task.name!r}: cannot read {task.path}: {cause}") from e
    return [to_json_safe(r) for r in ds.to_list()]


def _load_hub(task: TaskConfig) -> list[dict]:
    import datasets

    with _quiet_datasets():
        ds = datasets.load_dataset(task.hub_id, split=task.hub_split)
    return [to_json_safe(r) for r in ds.to_list()]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars in worker logs; the previous setting is restored afterwards."""
    from datasets.utils import logging as dlog

    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlog.enable_progress_bar()


def to_json_safe(obj: Any) -> Any:
    """Tuples and sets become lists, numpy scalars/arrays Python values, keys strings; anything
    else unknown becomes its `str`. Needed because reasoning-gym metadata holds tuples."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_json_safe(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json_safe(obj.item())
    return str(obj)


def validate_rows(task: TaskConfig, rows: list[dict]) -> None:
    """ValueError naming the task, the row and the field for: no rows, a row without the prompt
    or answer field, an empty prompt or answer."""
    if not rows:
        raise ValueError(f"task {task.name!r}: the dataset is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"task {task.name!r}: row {i} is not a mapping")
        for field, kind in ((task.prompt_field, "prompt"), (task.answer_field, "answer")):
            try:
                value = get_field(row, field)
            except KeyError:
                raise ValueError(
                    f"task {task.name!r}: row {i} has no {kind} field {field!r}"
                    f" (fields: {', '.join(sorted(row))})"
                ) from None
            if value is None:  # datasets fills a key missing from some rows with null
                raise ValueError(
                    f"task {task.name!r}: row {i} has no {kind} field {field!r} (missing or null)"
                )
            if not str(value).strip():
                raise ValueError(f"task {task.name!r}: row {i} has an empty {kind} field {field!r}")


# ---------------------------------------------------------------------------------- splits


def _seed_for(task_name: str, split_seed: int) -> int:
    # Stable across processes (unlike hash()), and different per task so that tasks built from
    # the same file do not share held-out rows by construction.
    digest = hashlib.sha256(f"{split_seed}:{task_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_rows(rows: list[dict], task: TaskConfig, split_seed: int) -> TaskSplits:
    """Seeded permutation of the rows; the first `eval_size` are the eval split, the next
    `val_size` the validation split, the rest (capped at `train_size`) the training split.
    Held-out splits are taken first so that they do not move when `train_size` changes."""
    n = len(rows)
    held = task.eval_size + task.val_size
    if held >= n:
        raise ValueError(
            f"task {task.name!r}: {n} rows leave none for training after eval_size="
            f"{task.eval_size} and val_size={task.val_size}"
        )
    perm = np.random.default_rng(_seed_for(task.name, split_seed)).permutation(n)
    eval_idx = perm[: task.eval_size]
    val_idx = perm[task.eval_size: held]
    train_idx = perm[held:]
    if task.train_size is not None:
        train_idx = train_idx[: task.train_size]
    return TaskSplits(
        train=[rows[i] for i in train_idx],
        val=[rows[i] for i in val_idx],
        eval=[rows[i] for i in eval_idx],
    )


def load_splits(task: TaskConfig, split_seed: int) -> TaskSplits:
    return split_rows(load_rows(task), task, split_seed)


def task_identity(task: TaskConfig) -> dict:
    """What a stage fingerprint needs to know about a task: its config and, for a local file, the
    file's content hash (editing the file must redo the stages that read it)."""
    ident: dict[str, Any] = task.model_dump(mode="json")
    if task.path is not None and Path(task.path).is_file():
        h = hashlib.sha256()
        with open(task.path, "rb") as f:
            while chunk := f.read(2**20):
                h.update(chunk)
        ident["file_sha256"] = h.hexdigest()
        del ident["path"]  # the content is what matters: a moved checkout keeps its results
    return ident
