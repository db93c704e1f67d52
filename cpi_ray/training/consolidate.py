"""Stage `consolidate`: groups G1..GK in order, each a Ray Train `TorchTrainer` running DeepSpeed
ZeRO-3 with a frozen set F_k held element-exactly (see `cpi_ray.training.freeze`), on a mix of
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
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from cpi_ray.config.schema import ConsolidateConfig, DataConfig, ModelConfig, PipelineConfig
from cpi_ray.io.atomic import atomic_dir
from cpi_ray.io.masks import MaskFile, write_mask_file
from cpi_ray.io.records import finished_item, load_record
from cpi_ray.io.safetensors_io import INDEX_NAME, CheckpointReader
from cpi_ray.regions.grouping import read_groups
from cpi_ray.run.progress import METRICS_FILE, TrainLog, tracking_spec
from cpi_ray.run.runtime import quiet_train_reports
from cpi_ray.run.stage import RunContext, Stage, stable_hash
from cpi_ray.training.launch import fit_job
from cpi_ray.training.sft import (
    accumulate_loss,
    apply_memory_options,
    kill_once,
    make_scheduler,
    param_groups,
    should_report,
    sum_over_ranks,
    token_loss_sum,
)

log = logging.getLogger("cpi_ray")

STAGE_RECORD = "consolidate.json"
FROZEN_MASK = "frozen.mask.safetensors"
_CKPT_TAG = "zero3"


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


# ---------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one consolidation stage under DeepSpeed ZeRO-3."""
    import ray
    import ray.train

    from cpi_ray.training import zero3

    # Only the sections the worker needs: task paths in the full config may be relative to the
    # driver's working directory, which a worker does not share.
    tc = ConsolidateConfig.model_validate(config["consolidate"])
    data = DataConfig.model_validate(config["data"])
    model_cfg = ModelConfig.model_validate(config["model"])
    quiet_train_reports()
    zero3.set_accelerator_env(tc.use_gpu)
    import deepspeed

    from cpi_ray.data.batching import iterate_batches
    from cpi_ray.io.sizes import parse_size
    from cpi_ray.training.freeze import ElementFreezer, check_freezable

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = zero3.worker_device(tc.use_gpu)
    zero3.init_distributed(tc.use_gpu)
    torch.manual_seed(tc.seed)
    start_dir, out_dir = config["start_dir"], config["out_dir"]

    ds_config = zero3.build_ds_config(tc, world, tc.use_gpu)
    mask = MaskFile(config["mask_path"])
    frozen_total = mask.count()
    if frozen_total:
        check_freezable(ds_config)
    dtype = zero3.PRECISION_DTYPES[tc.precision]
    model, _hf_ds = zero3.load_zero3_model(start_dir, ds_config, dtype, model_cfg.trust_remote_code)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    apply_memory_options(model, tc)
    params = zero3.named_parameters(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups((p for _, p in params), tc.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: make_scheduler(opt, tc),
    )

    with CheckpointReader(start_dir) as reader:
        if tc.precision != "fp32":
            zero3.load_fp32_master(params, reader)
        freezer = ElementFreezer(params, mask if frozen_total else None, reader)
    mask.close()

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=_CKPT_TAG)
        start = int(client["step"])
        freezer.restore()
    log.info(
        "consolidate rank %d/%d: %d frozen elements in this partition (%d in all), starting at step %d",
        rank,
        world,
        len(freezer),
        frozen_total,
        start,
    )

    micro = tc.batch_size // tc.grad_accum
    examples = ray.get(config["examples"])
    batches = iterate_batches(
        examples,
        micro,
        config["pad_id"],
        seed=tc.seed,
        packing=data.packing,
        rank=rank,
        world_size=world,
        max_seq_len=data.max_seq_len,
    )
    # A resumed run skips what the finished steps consumed, so it sees the same data.
    for _ in range(start * tc.grad_accum):
        next(batches)

    fault = config.get("fault")
    val_batches = None
    if config.get("val_examples") is not None:
        val_batches = _val_batches(ray.get(config["val_examples"]), micro, config["pad_id"], rank, world)

    def backward(loss: torch.Tensor) -> None:
        # The gradient is already the token mean of the whole accumulated batch.
        engine.backward(loss, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary():
            freezer.zero_grads()
        engine.step()

    engine.train()
    train_log = TrainLog(
        config["metrics_path"], config["job"], tc.steps, start, rank, tracking=config["tracking"]
    )
    t0 = time.time()
    step_times: list[float] = []
    loss = float("nan")
    val_loss = None
    for step in range(start, tc.steps):
        ts = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step applies
        # DeepSpeed keeps precision itself (bf16 weights with fp32 masters): no autocast.
        loss, tokens = accumulate_loss(engine, batches, tc, device, backward=backward, amp=False)
        freezer.restore()
        step_times.append(time.perf_counter() - ts)
        metrics = train_log.step(
            step + 1, loss, lr, float(engine.get_global_grad_norm() or 0.0), sum_over_ranks(tokens, device)
        )
        checkpoint = bool(
            tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps
        )
        if checkpoint or should_report(step + 1, tc.steps):
            if val_batches is not None:
                metrics["val_loss"] = val_loss = _val_loss(engine, val_batches, device)
            if checkpoint:
                _report_checkpoint(engine, metrics, step + 1)
            else:
                ray.train.report(metrics)
        if fault and step + 1 == fault["step"] and rank == fault["rank"]:
            kill_once(fault)
    train_log.close()

    record = {
        "fingerprint": config["fingerprint"],
        "stage": config["stage"],
        "tasks": config["tasks"],
        "frozen_tasks": config["frozen_tasks"],
        "freeze": tc.freeze,
        "frozen_elements": frozen_total,
        "steps": tc.steps,
        "final_loss": loss,
        "val_loss": val_loss,
        "resumed_at_step": start,
        "train_rows": len(examples),
        "rows_per_task": config.get("rows_per_task"),
        "world_size": world,
        "step_time_s": (sum(step_times) / len(step_times)) if step_times else None,
        "train_time_s": round(time.time() - t0, 2),
        "start": str(start_dir),
    }
    extra = None
    if rank == 0:
        extra = {
            FROZEN_MASK: Path(config["mask_path"]).read_bytes(),
            STAGE_RECORD: json.dumps(record, indent=2) + "\n",
            METRICS_FILE: Path(config["metrics_path"]).read_bytes(),
        }
    zero3.export_hf_model(
        engine.module, out_dir, start_dir, parse_size(model_cfg.max_shard_size), extra_files=extra
    )


def _val_batches(
    rows: list[dict], micro: int, pad_id: int, rank: int, world: int
) -> list[tuple[dict, float]]:
    """This rank's share of the validation rows as (batch, weight) pairs. Every rank gets the
    same number of batches (a ZeRO-3 forward is collective); a rank out of rows runs a
    zero-weight batch."""
    from cpi_ray.data.batching import _collate

    mine = rows[rank::world]
    per_rank = -(-len(rows) // world)  # ceil
    n = -(-per_rank // micro)
    out = []
    for j in range(n):
        part = mine[j * micro : (j + 1) * micro]
        weight = 1.0 if part else 0.0
        part = part or rows[:1]
        out.append((_collate([(r["input_ids"], r["labels"]) for r in part], pad_id, 1), weight))
    return out


def _val_loss(engine, batches: list[tuple[dict, float]], device) -> float:
    """Token-mean loss over every rank's validation rows (what ASHA compares between trials)."""
    import torch.distributed as dist

    engine.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for b, weight in batches:
            b = {k: v.to(device) for k, v in b.items()}
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            acc[0] += weight * float(token_loss_sum(logits, b["labels"]))
            acc[1] += weight * int((b["labels"][:, 1:] != -100).sum())
    engine.train()
    if dist.is_initialized():
        acc = acc.to(device)
        dist.all_reduce(acc)
    return float(acc[0] / acc[1].clamp(min=1))


def _report_checkpoint(engine, metrics: dict, step: int) -> None:
    """Every rank saves its ZeRO-3 partitions; Ray Train merges the ranks' directories into one
    checkpoint in storage."""
    import ray.train

    d = tempfile.mkdtemp(prefix="cpi-z3-")
    try:
        engine.save_checkpoint(d, tag=_CKPT_TAG, client_state={"step": step})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


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
) -> dict:
    """Train one group with a TorchTrainer and return its record (read back from `out_dir`).
    `job` names it on the console; `metrics_path` is where its live per-step metrics go, and
    `tracking` (`tracking_spec`) to which trackers.
    `rows_per_task`: how many of `examples` came from each task, kept in the record.
    `callbacks`: Ray Train callbacks (a Tune search passes TuneReportCallback); `val_examples`:
    encoded validation rows whose loss each metrics report carries as `val_loss`."""
    import ray

    tc = cfg.consolidate
    if tc.zero_stage != 3:
        # Loading, export and element freezing all work on ZeRO-3 partitions.
        raise ValueError(
            f"consolidate.zero_stage is {tc.zero_stage}: the consolidation engine "
            "runs DeepSpeed ZeRO-3 only (set it to 3; offload etc. go through "
            "consolidate.deepspeed)"
        )
    return fit_job(
        train_loop_per_worker,
        {
            "consolidate": tc.model_dump(),
            "data": cfg.data.model_dump(),
            "model": cfg.model.model_dump(),
            "stage": stage,
            "tasks": tasks,
            "frozen_tasks": frozen,
            "start_dir": str(start_dir),
            "out_dir": str(out_dir),
            "mask_path": str(mask_path),
            "examples": ray.put(examples),
            "pad_id": pad_id,
            "fingerprint": fingerprint,
            "job": job,
            "metrics_path": str(metrics_path),
            "tracking": tracking,
            "fault": fault,
            "rows_per_task": rows_per_task,
            "val_examples": ray.put(val_examples) if val_examples else None,
        },
        cfg,
        "consolidate",
        name=f"consolidate-{stage}-{fingerprint}",
        storage=storage,
        out_dir=out_dir,
        fingerprint=fingerprint,
        record=STAGE_RECORD,
        callbacks=callbacks,
    )


def stage_record(out: Path) -> Optional[dict]:
    return load_record(out / STAGE_RECORD)


def stage_data(
    cfg: PipelineConfig, groups: list[list[str]], k: int, n: int
) -> list[tuple[list[str], int, int]]:
    """Stage k's n training rows as parts (tasks, rows, mixing seed), each part mixed by the
    tasks' weights. `consolidate.data` mixed: one part, every task; group: the group's tasks,
    and a `replay` share from the tasks of earlier groups."""
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
    from cpi_ray.data.batching import mix_counts

    weights = {t.name: t.weight for t in cfg.tasks}
    out: dict[str, int] = {}
    for tasks, rows, _ in stage_data(cfg, groups, k, n):
        for t, c in mix_counts(tasks, weights, rows).items():
            out[t] = out.get(t, 0) + c
    return out


def group_examples(cfg: PipelineConfig, tokenizer, groups: list[list[str]], k: int, n: int) -> list[dict]:
    """n encoded training rows for stage k, as `stage_data` plans them."""
    from cpi_ray.data.batching import build_train_examples, mix_examples

    parts = stage_data(cfg, groups, k, n)
    per_task = build_train_examples(
        cfg, tokenizer, list(dict.fromkeys(t for tasks, _, _ in parts for t in tasks))
    )
    weights = {t: cfg.task(t).weight for t in per_task}
    rows: list[dict] = []
    for tasks, count, seed in parts:
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
    `texts` files."""
    with atomic_dir(dst) as tmp:
        for p in src.iterdir():
            if p.is_file() and p.name not in skip and not p.name.startswith("."):
                shutil.copy2(p, tmp / p.name)
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
        from cpi_ray.data.tasks import task_identity

        return {
            "consolidate": cfg.consolidate.recipe_dump(),
            "data": cfg.data.model_dump(),
            "tasks": [task_identity(t) for t in cfg.tasks],
            "max_shard_size": cfg.model.max_shard_size,
        }

    def run(self, ctx: RunContext) -> list[Path]:
        from cpi_ray.models.loading import load_tokenizer

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
