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
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cpi_ray.config.schema import TaskConfig, template_fields

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


_SCALARS = (str, int, float, bool)
CHAT_ROLES = ("system", "user", "assistant")


def render_template(template: str, row: dict) -> str:
    """`prompt_template` filled from the row. Each placeholder owns the literal text just before
    it, so an empty or missing field drops with its label: `"{instruction}\\n\\n{input}"` with no
    input gives the instruction alone; text after the last placeholder is kept."""
    out: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if name is None:
            out.append(literal)
            continue
        try:
            value = get_field(row, name)
        except KeyError:
            value = None
        if value is not None and str(value).strip():
            out.append(literal + str(value))
    return "".join(out).strip()


def prompt_text(task: TaskConfig, row: dict) -> str:
    """The user turn of a prompt_answer / text prompt_completion row."""
    if task.prompt_template is not None:
        return render_template(task.prompt_template, row)
    return str(get_field(row, task.prompt_field))


def conversation(task: TaskConfig, row: dict) -> list[dict]:
    """The row as chat turns (`{"role", "content"}`) ending with the assistant turn that is
    scored: what every format is trained and evaluated through. Turns after the last assistant
    turn carry nothing to learn and are dropped; the task's `system_prompt` is the first turn
    unless the row has a system turn of its own."""
    if task.format == "messages":
        turns = [_turn(m) for m in get_field(row, task.messages_field)]
    elif task.format == "prompt_completion":
        turns = _as_turns(get_field(row, task.prompt_field), "user")
        turns += _as_turns(get_field(row, task.answer_field), "assistant")
    else:
        turns = [
            {"role": "user", "content": prompt_text(task, row)},
            {"role": "assistant", "content": str(get_field(row, task.answer_field))},
        ]
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    turns = turns[: last + 1]
    if task.system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": task.system_prompt})
    return turns


def _turn(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


def _as_turns(value: Any, role: str) -> list[dict]:
    # TRL's prompt-completion rows hold text ("standard") or chat turns ("conversational").
    if isinstance(value, list):
        return [_turn(m) for m in value]
    return [{"role": role, "content": str(value)}]


def answer_text(task: TaskConfig, row: dict) -> str:
    """The text the model is scored on: the last assistant turn. Surrounding whitespace is never
    part of what a model should learn or be scored on."""
    if task.format == "prompt_answer":  # the common case, without building the turns
        return str(get_field(row, task.answer_field)).strip()
    return conversation(task, row)[-1]["content"].strip()


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
    import reasoning_gym  # an optional extra (cpi-ray[demo])

    src = task.reasoning_gym
    ds = reasoning_gym.create_dataset(src.name, size=src.size, seed=src.seed, **src.options)
    return [to_json_safe(dict(ds[i])) for i in range(len(ds))]


def _load_local(task: TaskConfig) -> list[dict]:
    import datasets  # seconds to import; only file and hub tasks need it

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
    import datasets  # seconds to import; only file and hub tasks need it

    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(
                task.hub_id,
                name=task.hub_name,
                revision=task.hub_revision,
                data_files=task.hub_data_files,
                split=task.hub_split,
            )
    except Exception as e:  # datasets' own errors do not say which task failed
        what = ", ".join(
            f"{k}={v!r}"
            for k, v in (("name", task.hub_name), ("revision", task.hub_revision), ("split", task.hub_split))
            if v is not None
        )
        raise ValueError(f"task {task.name!r}: cannot load hub dataset {task.hub_id!r} ({what}): {e}") from e
    return [to_json_safe(r) for r in ds.to_list()]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars in worker logs; the previous setting is restored afterwards."""
    from datasets.utils import logging as dlog  # datasets: seconds to import, needed around loads only

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
    """ValueError naming the task, the row and the field for: no rows, a missing, null, empty or
    wrongly typed field of the task's format (a chat list where text is expected, a turn without
    role or content), a conversation with no assistant turn or no user turn before it."""
    if not rows:
        raise ValueError(f"task {task.name!r}: the dataset is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"task {task.name!r}: row {i} is not a mapping")
        where = f"task {task.name!r}: row {i}"
        if task.format == "messages":
            _check_turns(where, task.messages_field, _field(where, row, task.messages_field, "messages"))
        elif task.format == "prompt_completion":
            for field, kind in ((task.prompt_field, "prompt"), (task.answer_field, "completion")):
                value = _field(where, row, field, kind)
                if isinstance(value, list):
                    _check_turns(where, field, value, need_assistant=kind == "completion")
                else:
                    _check_text(where, field, kind, value)
        else:
            if task.prompt_template is None:
                _check_text(
                    where, task.prompt_field, "prompt", _field(where, row, task.prompt_field, "prompt")
                )
            else:
                _check_template(where, task.prompt_template, row)
            _check_text(where, task.answer_field, "answer", _field(where, row, task.answer_field, "answer"))
        turns = conversation(task, row)
        last = len(turns) - 1
        if not any(t["role"] == "user" for t in turns[:last]):
            raise ValueError(f"{where} has no user turn before its last assistant turn")
        if not turns[last]["content"].strip():
            raise ValueError(f"{where} has an empty last assistant turn")


def _field(where: str, row: dict, field: str, kind: str) -> Any:
    try:
        value = get_field(row, field)
    except KeyError:
        raise ValueError(
            f"{where} has no {kind} field {field!r} (fields: {', '.join(sorted(row))})"
        ) from None
    if value is None:  # datasets fills a key missing from some rows with null
        raise ValueError(f"{where} has no {kind} field {field!r} (missing or null)")
    return value


def _check_text(where: str, field: str, kind: str, value: Any) -> None:
    if not isinstance(value, _SCALARS):
        hint = " (chat turns: set the task's format to messages)" if isinstance(value, list) else ""
        raise ValueError(f"{where}: {kind} field {field!r} is a {type(value).__name__}, expected text{hint}")
    if not str(value).strip():
        raise ValueError(f"{where} has an empty {kind} field {field!r}")


def _check_template(where: str, template: str, row: dict) -> None:
    for name in template_fields(template):
        try:
            value = get_field(row, name)
        except KeyError:
            continue  # an absent field drops like an empty one
        if value is not None and not isinstance(value, _SCALARS):
            raise ValueError(
                f"{where}: prompt_template field {name!r} is a {type(value).__name__}, expected text"
            )
    if not render_template(template, row):
        raise ValueError(f"{where}: every field of prompt_template {template!r} is empty")


def _check_turns(where: str, field: str, turns: Any, need_assistant: bool = True) -> None:
    if not isinstance(turns, list):
        raise ValueError(
            f"{where}: field {field!r} is a {type(turns).__name__}, expected a list of chat turns"
        )
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {field}[{j}] is not a turn with role and content")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(
                f"{where}: {field}[{j}] has role {m['role']!r}, expected one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise ValueError(
                f"{where}: {field}[{j}].content is a {type(m['content']).__name__}, expected text"
            )
    if need_assistant and not any(m["role"] == "assistant" for m in turns):
        raise ValueError(f"{where}: field {field!r} has no assistant turn")


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
    val_idx = perm[task.eval_size : held]
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
    ident: dict[str, Any] = task.fingerprint_dump()
    if task.path is not None and Path(task.path).is_file():
        h = hashlib.sha256()
        with open(task.path, "rb") as f:
            while chunk := f.read(2**20):
                h.update(chunk)
        ident["file_sha256"] = h.hexdigest()
        del ident["path"]  # the content is what matters: a moved checkout keeps its results
    return ident
