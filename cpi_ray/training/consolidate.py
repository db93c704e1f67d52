"""Stage `consolidate`: groups G1..GK in order, each an SFT job of the engine
(`cpi_ray.training.engine`, DeepSpeed ZeRO-3) with a frozen set F_k held element-exactly (see
`cpi_ray.training.freeze`), on a mix of
every task (`consolidate.data: mixed`) or of the group's own tasks plus an optional replay share
of earlier groups (`group`).

Stage k starts from `fused/` (k = 1) or from `consolidate/stage-<k-1>/` and exports
`consolidate/stage-<k>/`: an HF sharded safetensors model plus `frozen.mask.safetensors` (F_k in
the region-mask format) and `consolidate.json` (its fingerprint, metrics). `final/` is a copy of
the last stage. A rerun keeps every stage whose fingerprint still matches, so an interrupted run
resumes at the first unfinished group; inside a group, Ray Train's FailureConfig resumes from the
latest DeepSpeed checkpoint reported with `ray.train.report`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from cpi_ray.config.schema import EpiConfig, PipelineConfig
from cpi_ray.data.batching import build_train_examples, mix_counts, mix_examples, task_weights
from cpi_ray.data.tasks import task_identity
from cpi_ray.io.atomic import atomic_dir, link_or_copy
from cpi_ray.io.masks import MaskFile, write_mask_file
from cpi_ray.io.records import finished_item, load_record
from cpi_ray.io.safetensors_io import INDEX_NAME, CheckpointReader
from cpi_ray.models.loading import load_tokenizer
from cpi_ray.regions.grouping import read_groups
from cpi_ray.run.progress import METRICS_FILE, tracking_spec
from cpi_ray.run.stage import RunContext, Stage, stable_hash
from cpi_ray.training.engine import fit_sft

log = logging.getLogger("cpi_ray")

STAGE_RECORD = "consolidate.json"
FROZEN_MASK = "frozen.mask.safetensors"


# ---------------------------------------------------------------------------- frozen sets


def frozen_tasks(groups: list[list[str]], k: int, mode: str) -> list[str]:
    """Tasks whose cores are frozen in stage k (0-based index into `groups`)."""
    if mode == "none":
        return []
    if mode == "prior":
        return [t for g in groups[:k] for t in g]
    if mode == "others":
        return [t for i, g in enumerate(groups) if i != k for t in g]
    if mode == "all":
        return [t for g in groups for t in g]
    raise ValueError(f"unknown freeze mode {mode!r}")


def union_masks(
    mask_paths: list[Path], names_from: Path, out: Path, metadata: Optional[dict[str, str]] = None
) -> int:
    """OR the packed region masks into one mask file (tensor names and sizes of `names_from`;
    all zeros when `mask_paths` is empty). Returns the number of frozen elements."""
    ref = MaskFile(names_from)
    try:
        numels = dict(ref.numels)
    finally:
        ref.close()
    acc = {n: torch.zeros((numels[n] + 7) // 8, dtype=torch.uint8) for n in numels}
    for path in mask_paths:
        m = MaskFile(path)
        try:
            for n in m.names():
                if n not in acc or m.numels[n] != numels[n]:
                    raise ValueError(f"{path}: tensor {n!r} does not match {names_from}")
                acc[n] |= m.packed(n)
        finally:
            m.close()
    write_mask_file(out, acc, numels, metadata)
    m = MaskFile(out)
    try:
        return m.count()
    finally:
        m.close()


def check_frozen(start_dir: Path, out_dir: Path, mask_path: Path, chunk: int = 1 << 24) -> dict[str, Any]:
    """Compare a stage's export with the weights it started from, streaming `chunk` elements at a
    time: frozen elements must be bitwise equal. Returns counts and the tensors that broke it."""
    mask = MaskFile(mask_path)
    out = {"frozen": 0, "frozen_moved": 0, "free": 0, "free_changed": 0, "broken": []}
    try:
        with CheckpointReader(start_dir) as a, CheckpointReader(out_dir) as b:
            for name in a.names():
                n = a.info(name).numel
                f_all = name in mask
                for lo in range(0, n, chunk):
                    hi = min(n, lo + chunk)
                    x, y = a.read_flat(name, lo, hi), b.read_flat(name, lo, hi)
                    if x.dtype != y.dtype:
                        raise ValueError(f"{out_dir}: {name!r} is {y.dtype}, the start {x.dtype}")
                    # Compare bit patterns: -0.0 vs 0.0 or NaN payloads count as changes.
                    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
                    diff = x.view(ints[x.element_size()]) != y.view(ints[y.element_size()])
                    f = mask.flat(name, lo, hi) if f_all else torch.zeros(hi - lo, dtype=torch.bool)
                    moved = int((diff & f).sum())
                    if moved and name not in out["broken"]:
                        out["broken"].append(name)
                    out["frozen"] += int(f.sum())
                    out["frozen_moved"] += moved
                    out["free"] += int((~f).sum())
                    out["free_changed"] += int((diff & ~f).sum())
    finally:
        mask.close()
    return out


# ---------------------------------------------------------------------------- driver


def fit_group(
    cfg: PipelineConfig,
    *,
    stage: int,
    tasks: list[str],
    frozen: list[str],
    start_dir: Path,
    out_dir: Path,
    mask_path: Path,
    examples: list[dict],
    pad_id: int,
    storage: Path,
    fingerprint: str,
    job: str,
    metrics_path: Path,
    tracking: Optional[dict] = None,
    fault: Optional[dict] = None,
    callbacks: Optional[list] = None,
    val_examples: Optional[list[dict]] = None,
    rows_per_task: Optional[dict[str, int]] = None,
    epi: Optional[EpiConfig] = None,
) -> dict:
    """Train one group as an SFT job (`engine.fit_sft`) and return its record (read back from
    `out_dir`). `job` names it on the console; `metrics_path` is where its live per-step metrics
    go, and `tracking` (`tracking_spec`) to which trackers. `mask_path`: the frozen set, kept in
    the output as `frozen.mask.safetensors`. `rows_per_task`: how many of `examples` came from
    each task, kept in the record. `callbacks`: Ray Train callbacks (a Tune search passes
    TuneReportCallback); `val_examples`: encoded validation rows whose loss each metrics report
    carries as `val_loss`; `epi`: Evolving Parameter Isolation's frozen set instead of a fixed one."""
    if (frozen or epi is not None) and cfg.consolidate.zero_stage != 3:
        # The config refuses it for consolidate.freeze; a baseline sets its frozen tasks itself.
        raise ValueError(
            f"consolidate.zero_stage is {cfg.consolidate.zero_stage}: element freezing works on "
            "ZeRO-3 partitions only (set it to 3)"
        )
    return fit_sft(
        cfg,
        "consolidate",
        name=f"consolidate-{stage}-{fingerprint}",
        start_dir=start_dir,
        out_dir=out_dir,
        examples=examples,
        pad_id=pad_id,
        storage=storage,
        fingerprint=fingerprint,
        record={
            "stage": stage,
            "tasks": tasks,
            "frozen_tasks": frozen,
            "freeze": cfg.consolidate.freeze,
            "rows_per_task": rows_per_task,
        },
        record_name=STAGE_RECORD,
        job=job,
        metrics_path=metrics_path,
        tracking=tracking,
        mask_path=mask_path,
        side_files={FROZEN_MASK: mask_path},
        fault=fault,
        callbacks=callbacks,
        val_examples=val_examples,
        epi=epi,
    )


def stage_record(out: Path) -> Optional[dict]:
    return load_record(out / STAGE_RECORD)


def stage_data(
    cfg: PipelineConfig, groups: list[list[str]], k: int, n: int
) -> list[tuple[list[str], int, int]]:
    """Stage k's n training rows as parts (tasks, rows, mixing seed), each part mixed as
    `consolidate.mix` says. `consolidate.data` mixed: one part, every task; group: the group's
    tasks, and a `replay` share from the tasks of earlier groups."""
    tc = cfg.consolidate
    if tc.data == "mixed":
        return [([t.name for t in cfg.tasks], n, tc.seed + k)]
    earlier = [t for g in groups[:k] for t in g]
    n_replay = int(round(tc.replay * n)) if earlier else 0
    parts = [(list(groups[k]), n - n_replay, tc.seed + k)]
    if n_replay:
        parts.append((earlier, n_replay, tc.seed + 1000 + k))
    return parts


def stage_rows_per_task(cfg: PipelineConfig, groups: list[list[str]], k: int, n: int) -> dict[str, int]:
    """Rows stage k draws from each task (what its record and the budget file show)."""
    out: dict[str, int] = {}
    for tasks, rows, _ in stage_data(cfg, groups, k, n):
        for t, c in mix_counts(tasks, task_weights(cfg, tasks, cfg.consolidate.mix), rows).items():
            out[t] = out.get(t, 0) + c
    return out


def group_examples(cfg: PipelineConfig, tokenizer, groups: list[list[str]], k: int, n: int) -> list[dict]:
    """n encoded training rows for stage k, as `stage_data` plans them."""
    parts = stage_data(cfg, groups, k, n)
    per_task = build_train_examples(
        cfg, tokenizer, list(dict.fromkeys(t for tasks, _, _ in parts for t in tasks))
    )
    rows: list[dict] = []
    for tasks, count, seed in parts:
        weights = task_weights(cfg, tasks, cfg.consolidate.mix)
        rows += mix_examples({t: per_task[t] for t in tasks}, weights, count, seed=seed)
    return rows


def copy_model_dir(
    src: Path,
    dst: Path,
    skip: tuple[str, ...] = (),
    extra: Optional[dict[str, Any]] = None,
    texts: Optional[dict[str, str]] = None,
) -> Path:
    """Copy a model directory atomically, less the `skip` files, plus `extra` JSON files and
    `texts` files. The files are hard-linked where the filesystem allows (a model's weights are
    not stored twice); those written here are never links, so writing them cannot touch `src`."""
    written = {*(extra or {}), *(texts or {})}
    with atomic_dir(dst) as tmp:
        for p in src.iterdir():
            if p.is_file() and p.name not in skip and p.name not in written and not p.name.startswith("."):
                link_or_copy(p, tmp / p.name)
        for name, doc in (extra or {}).items():
            (tmp / name).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
    return dst


class ConsolidateStage(Stage):
    name = "consolidate"
    # 2: fp32 runs train in fp32 (1 built them in bf16 on CPU); 3: the probes' LR schedule
    version = 3
    depends = ("fuse", "groups", "regions")

    def __init__(
        self,
        fault: Optional[dict] = None,
        callbacks: Optional[list] = None,
        val_examples: Optional[list[dict]] = None,
    ):
        # Test hook: {"stage": k, "step": s, "rank": r, "marker": path} kills rank r (SIGKILL)
        # after step s of stage k, once (the marker file records that it happened).
        self.fault = fault
        # Tune hooks: every group's trainer reports to the search, with a validation loss.
        self.callbacks = callbacks
        self.val_examples = val_examples

    def config_slice(self, cfg: PipelineConfig) -> dict:
        return {
            "consolidate": cfg.consolidate.recipe_dump(),
            "data": cfg.data.model_dump(),
            "tasks": [task_identity(t) for t in cfg.tasks],
            "max_shard_size": cfg.model.max_shard_size,
        }

    def run(self, ctx: RunContext) -> list[Path]:
        cfg, tc = ctx.cfg, ctx.cfg.consolidate
        groups = read_groups(ctx.layout.groups_json)
        region = {t: ctx.layout.mask(t) for g in groups for t in g}
        missing = [str(p) for p in region.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"consolidate: region masks missing: {missing}")
        stage_fp, _ = self.fingerprint(ctx)
        tok = load_tokenizer(ctx.layout.fused, cfg.model.trust_remote_code)
        n_rows = tc.steps * tc.batch_size * tc.num_workers
        start_dir, prev_fp = ctx.layout.fused, stage_fp
        outputs: list[Path] = []
        for k, tasks in enumerate(groups):
            out = ctx.layout.stage(k + 1)
            fp = stable_hash({"stage": stage_fp, "k": k, "groups": groups, "start": prev_fp})
            frozen = frozen_tasks(groups, k, tc.freeze)
            outputs.append(out)
            if finished_item(out, STAGE_RECORD, fp, requires=(INDEX_NAME,)):
                log.info("consolidate stage %d: already trained, kept (%s)", k + 1, out)
            else:
                mask_path = ctx.path("consolidate", "masks", f"frozen-{k + 1}.mask.safetensors")
                n_frozen = union_masks(
                    [region[t] for t in frozen],
                    region[groups[0][0]],
                    mask_path,
                    {"stage": str(k + 1), "freeze": tc.freeze, "tasks": ",".join(frozen)},
                )
                log.info(
                    "consolidate stage %d/%d: tasks %s, freeze %s (%s): %d elements",
                    k + 1,
                    len(groups),
                    tasks,
                    tc.freeze,
                    frozen or "-",
                    n_frozen,
                )
                examples = group_examples(cfg, tok, groups, k, n_rows)
                rows = stage_rows_per_task(cfg, groups, k, n_rows)
                log.info("consolidate stage %d: %s data, rows per task %s", k + 1, tc.data, rows)
                fault = self.fault if self.fault and self.fault.get("stage") == k + 1 else None
                rec = fit_group(
                    cfg,
                    stage=k + 1,
                    tasks=tasks,
                    frozen=frozen,
                    start_dir=start_dir,
                    out_dir=out,
                    mask_path=mask_path,
                    examples=examples,
                    pad_id=tok.pad_token_id,
                    storage=ctx.layout.ray_storage,
                    fingerprint=fp,
                    job=f"consolidate stage {k + 1}/{len(groups)}",
                    metrics_path=ctx.layout.train_log(f"consolidate-stage-{k + 1}"),
                    tracking=tracking_spec(cfg, ctx.layout),
                    fault=fault,
                    callbacks=self.callbacks,
                    val_examples=self.val_examples,
                    rows_per_task=rows,
                )
                log.info(
                    "consolidate stage %d: final loss %.4f, %.2fs/step",
                    k + 1,
                    rec["final_loss"],
                    rec["step_time_s"] or 0.0,
                )
                chk = check_frozen(start_dir, out, out / FROZEN_MASK)
                if chk["frozen_moved"]:
                    raise RuntimeError(
                        f"consolidate stage {k + 1}: {chk['frozen_moved']} frozen elements changed "
                        f"(tensors {chk['broken'][:5]}); the export in {out} is not trustworthy"
                    )
                log.info(
                    "consolidate stage %d: %d frozen elements bitwise unchanged, %d of %d others changed",
                    k + 1,
                    chk["frozen"],
                    chk["free_changed"],
                    chk["free"],
                )
            start_dir, prev_fp = out, fp
        # final/ is the last stage's model; each stage keeps its own record and loss curve.
        final = copy_model_dir(start_dir, ctx.layout.final, skip=(FROZEN_MASK, STAGE_RECORD, METRICS_FILE))
        shutil.rmtree(ctx.path("consolidate", "masks"), ignore_errors=True)
        return [*outputs, final]

    def summary(self, ctx: RunContext) -> Optional[str]:
        lines = []
        for d in sorted(ctx.path("consolidate").glob("stage-*"), key=lambda p: int(p.name[6:])):
            rec = stage_record(d)
            if rec:
                rows = rec.get("rows_per_task")
                data = (
                    f", {ctx.cfg.consolidate.data} data " + " ".join(f"{t}:{n}" for t, n in rows.items())
                    if rows
                    else ""
                )
                lines.append(
                    f"stage {rec['stage']}: group {','.join(rec['tasks'])}{data}, "
                    f"frozen {rec['frozen_elements']} ({rec['freeze']}), "
                    f"loss {rec['final_loss']:.4f}"
                )
        return "\n".join(lines) or None
