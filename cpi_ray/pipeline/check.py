"""`cpi-ray check`: what can be checked before Ray starts, in seconds, with one line per problem.

The tokenizer, every task's rows (format, fields, types), its splits against `eval_size` and
`val_size`, the rows that do not fit `data.max_seq_len`, and whether the run directory can be
written. The same checks run at the start of every `cpi-ray run`, so a bad row stops the run
before a cluster spends anything on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.evaluation.harness import harness_missing, unknown_tasks
from cpi_ray.pipeline.plan import DiskSpaceError, PlanError, build_plan, check_free_space, format_gib

# Imported where used: cpi_ray.models, cpi_ray.data, ray (slow to import; the CLI imports this module).

LEARNED_OPEN, LEARNED_CLOSE = "[[", "]]"


class CheckError(ValueError):
    """One problem, in one line that names the task, file, row or field."""


@dataclass
class TaskCheck:
    name: str
    source: str
    rows: int
    train: int
    val: int
    eval: int
    dropped: int  # training rows whose answer does not fit max_seq_len
    example: str  # the first training row as the model sees it, learned tokens marked


@dataclass
class CheckReport:
    tokenizer: str
    chat_template: bool
    run_dir: str
    tasks: list[TaskCheck] = field(default_factory=list)
    disk: Optional[str] = None

    def render(self) -> str:
        lines = [
            f"tokenizer: {self.tokenizer} "
            f"({'chat template' if self.chat_template else 'no chat template: plain prompts'})"
        ]
        for t in self.tasks:
            lines.append(
                f"task {t.name} ({t.source}): {t.rows} rows -> train {t.train}, "
                f"val {t.val}, eval {t.eval}; {t.dropped} training rows too long"
            )
            lines.append(f"  example, learned tokens in {LEARNED_OPEN} {LEARNED_CLOSE}:")
            lines += ["    " + line for line in t.example.splitlines() or [""]]
        lines.append(f"run directory: {self.run_dir} (writable)")
        if self.disk:
            lines.append(self.disk)
        return "\n".join(lines)


def unwritable(run_dir: str | os.PathLike) -> Optional[str]:
    """Why `run_dir` cannot be written, or None; checked before any work, creating nothing."""
    p = Path(run_dir)
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def under_job_submission() -> bool:
    # Set by Ray's job supervisor for the entrypoint of `ray job submit`.
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_storage(cfg: PipelineConfig, run_dir: Path) -> None:
    if (
        under_job_submission()
        and not cfg.storage.remote
        and not Path(os.path.expanduser(cfg.storage.path)).is_absolute()
    ):
        raise CheckError(
            f"storage.path: {cfg.storage.path!r} is relative; under `ray job submit` it would "
            "land in the job's temporary working directory, which Ray deletes: give an absolute "
            "path every node shares, or an s3:// / gs:// URI"
        )
    if cfg.storage.remote:
        return  # the bucket is checked by the run's store before any stage
    problem = unwritable(run_dir)
    if problem:
        raise CheckError(f"storage: cannot write the run directory {run_dir}: {problem}")


def load_check_tokenizer(cfg: PipelineConfig) -> tuple[Any, str]:
    """The base model's tokenizer without its weights where that is possible: a hub model's
    tokenizer files only; the tiny and demo models are materialized (the run needs them anyway)."""
    from cpi_ray.models.loading import load_tokenizer, resolve_base_model

    source = cfg.model.source
    if source in ("tiny", "demo") or Path(source).expanduser().is_dir():
        where, _ = resolve_base_model(cfg)
    else:
        where = source
    try:
        return load_tokenizer(where, cfg.model.trust_remote_code), str(where)
    except Exception as e:  # noqa: BLE001 - the reason, in one line
        raise CheckError(
            f"model.source: cannot load the tokenizer of {where}: {type(e).__name__}: {e}"
        ) from e


def marked_example(tokenizer: Any, example: dict) -> str:
    """The decoded sequence with each run of learned (labelled) tokens between markers."""
    from cpi_ray.data.formatting import IGNORE_INDEX

    out, run, learned = [], [], False
    for tok_id, label in zip(example["input_ids"], example["labels"]):
        if (label != IGNORE_INDEX) != learned and run:
            text = tokenizer.decode(run)
            out.append(f"{LEARNED_OPEN}{text}{LEARNED_CLOSE}" if learned else text)
            run = []
        learned = label != IGNORE_INDEX
        run.append(tok_id)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{LEARNED_OPEN}{text}{LEARNED_CLOSE}" if learned else text)
    return "".join(out)


def check_task(cfg: PipelineConfig, task_name: str, tokenizer: Any) -> TaskCheck:
    from cpi_ray.data.formatting import AnswerTooLongError, encode_example
    from cpi_ray.data.tasks import load_rows, split_rows

    task = cfg.task(task_name)
    source = task.path or (
        f"hub {task.hub_id}" if task.hub_id else f"reasoning-gym {task.reasoning_gym.name}"
    )
    try:
        rows = load_rows(task)
        splits = split_rows(rows, task, cfg.data.split_seed)
        dropped, first = 0, None
        for row in splits.train:
            try:
                ex = encode_example(tokenizer, task, row, cfg.data.max_seq_len)
            except AnswerTooLongError:
                dropped += 1
                continue
            first = first or ex
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e)
        raise CheckError(
            msg if msg.startswith(f"task {task.name!r}") else f"task {task.name!r} ({source}): {msg}"
        ) from e
    if first is None:
        raise CheckError(
            f"task {task.name!r} ({source}): no training row fits in data.max_seq_len={cfg.data.max_seq_len}"
        )
    return TaskCheck(
        task.name,
        source,
        len(rows),
        len(splits.train),
        len(splits.val),
        len(splits.eval),
        dropped,
        marked_example(tokenizer, first),
    )


def require_chat_template(cfg: PipelineConfig, chat: bool, where: str) -> None:
    if not chat and cfg.data.require_chat_template:
        raise CheckError(
            f"data.require_chat_template: the tokenizer of {where} has no chat "
            "template (set the field to false to format prompts as plain text)"
        )


def check_config(cfg: PipelineConfig, run_dir: Path) -> CheckReport:
    """Every check above, in the order a run meets them; raises CheckError at the first problem."""
    from cpi_ray.data.formatting import has_chat_template

    check_storage(cfg, run_dir)
    tokenizer, where = load_check_tokenizer(cfg)
    chat = has_chat_template(tokenizer)
    require_chat_template(cfg, chat, where)
    report = CheckReport(where, chat, str(run_dir))
    for t in cfg.tasks:
        report.tasks.append(check_task(cfg, t.name, tokenizer))
    if cfg.evaluate.harness_tasks:
        check_harness(cfg)
    check_trackers(cfg)
    report.disk = check_disk(cfg, run_dir)
    return report


def check_disk(cfg: PipelineConfig, run_dir: Path) -> Optional[str]:
    """Room on the run directory's disk for every selected stage (cpi-ray plan's estimate, less
    what the run already holds); the runner checks again before each stage that has work."""
    if not cfg.storage.check_free_space:
        return None
    try:
        plan = build_plan(cfg)
    except PlanError:
        return "disk: checked before each stage (the model's size is known once it is downloaded)"
    try:
        needed, free = check_free_space(plan, run_dir, list(cfg.stages))
    except DiskSpaceError as e:
        raise CheckError(str(e)) from None
    return f"disk: about {format_gib(needed)} to write, {format_gib(free)} free"


def check_trackers(cfg: PipelineConfig) -> None:
    """Each tracker of `logging.report_to` must be importable (the workers open them)."""
    modules = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
    for name in cfg.logging.report_to:
        if importlib.util.find_spec(modules[name]) is None:
            extra = f" (pip install 'cpi-ray[{name}]')" if name != "tensorboard" else ""
            raise CheckError(f"logging.report_to: {name} needs the {modules[name]} package{extra}")


def check_harness(cfg: PipelineConfig) -> None:
    missing = harness_missing()
    if missing:
        raise CheckError(missing)
    unknown = unknown_tasks(cfg)
    if unknown:
        where = cfg.evaluate.harness_include_path
        raise CheckError(
            f"evaluate.harness_tasks: lm-eval knows no task {', '.join(unknown)}"
            + (f" (its own nor in {where})" if where else "")
        )


def report_json(report: CheckReport) -> str:
    return json.dumps(asdict(report), indent=2)


def _sees(path: str, token: str) -> Optional[str]:
    """On one node: None if `path` holds `token` and the directory is writable there, else why."""
    p = Path(path)
    try:
        if p.read_text() != token:
            return f"{socket.gethostname()}: {p} holds other content"
        probe = p.with_name(p.name + "." + socket.gethostname())
        probe.write_text(token)
        probe.unlink()
    except OSError as e:
        return f"{socket.gethostname()}: {e.strerror or e} ({p})"
    return None


def check_shared_storage(run_dir: Path, visit=None) -> None:
    """With several alive Ray nodes, every node must see the run directory the driver writes
    (stages on one node read what stages on another wrote). `visit(node_id, fn, *args)` runs
    `fn` on that node; by default a Ray task pinned to it."""
    import ray

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    visit = visit or _visit_node
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = run_dir / f".storage-check-{token[:8]}"
    marker.write_text(token)
    try:
        problems = [p for p in (visit(n, _sees, str(marker), token) for n in nodes) if p]
    finally:
        marker.unlink(missing_ok=True)
    if problems:
        raise CheckError(
            f"storage: the run directory {run_dir} is not shared by every node of "
            f"the Ray cluster ({'; '.join(problems)}); give storage.path (or "
            "storage.local_path with a bucket) on a mount every node shares"
        )


def _visit_node(node_id: str, fn, *args):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(fn).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    return ray.get(task.remote(*args), timeout=120)
