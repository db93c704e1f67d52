"""The one SFT engine: every training job of the pipeline (a task's probe, a consolidation stage,
a baseline stage) is this worker loop on DeepSpeed, launched by `fit_sft`.

One job: load the start model (partitioned under ZeRO-3, `zero_stage` of the job's config), train
`steps` optimizer steps on the encoded rows the driver put in the object store, with the job's
LR schedule (`sft.make_scheduler`), optimizer grouping (`sft.param_groups`) and an optional frozen
element set (`freeze.ElementFreezer`, empty for probes), resumable from DeepSpeed checkpoints
reported to Ray Train every `checkpoint_every` steps; or, with `epi`, a frozen set re-selected
during training (`epi.EvolvingIsolation`, checkpointed with the engine); then, when asked, the
diagonal Fisher at the final weights (`fisher.engine_fisher`). Outputs, all written by rank 0
after collective gathers: the HF model (atomically, with `metrics.jsonl` and the side files the
caller names), the Fisher beside it, and the job's record last, so an output without its record
is redone.
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
import torch.distributed as dist

from cpi_ray.config.schema import (
    ConsolidateConfig,
    DataConfig,
    EpiConfig,
    ModelConfig,
    PipelineConfig,
    ProbeConfig,
)
from cpi_ray.data.batching import collate, iterate_batches
from cpi_ray.io.atomic import write_json
from cpi_ray.io.masks import MaskFile
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.io.sizes import parse_size
from cpi_ray.run.progress import METRICS_FILE, TrainLog
from cpi_ray.run.runtime import quiet_train_reports
from cpi_ray.training import zero3
from cpi_ray.training.epi import EvolvingIsolation
from cpi_ray.training.fisher import engine_fisher
from cpi_ray.training.freeze import ElementFreezer, check_freezable
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

# Imported where used: ray (stage modules import this one before Ray is up), deepspeed (after DS_ACCELERATOR).

log = logging.getLogger("cpi_ray")

_CKPT_TAG = "engine"
TRAIN_CONFIGS = {"probe": ProbeConfig, "consolidate": ConsolidateConfig}


def fit_sft(
    cfg: PipelineConfig,
    kind: str,
    *,
    name: str,
    start_dir: Path,
    out_dir: Path,
    examples: list[dict],
    pad_id: int,
    storage: Path,
    fingerprint: str,
    record: dict,
    record_name: str,
    job: str,
    metrics_path: Path,
    tracking: Optional[dict] = None,
    mask_path: Optional[Path] = None,
    side_files: Optional[dict[str, Path]] = None,
    train: bool = True,
    fisher_batches: int = 0,
    fisher_dir: Optional[Path] = None,
    fault: Optional[dict] = None,
    callbacks: Optional[list] = None,
    val_examples: Optional[list[dict]] = None,
    epi: Optional[EpiConfig] = None,
) -> dict:
    """Run one SFT job of `kind` (`probe` or `consolidate`: the config section with its recipe
    and resources) as the Ray Train run `name`, and return the record it wrote to
    `out_dir/record_name` (`record` plus the training figures). `train=False` skips training and
    export: the job only computes the Fisher of the model in `start_dir`; the Fisher over
    `fisher_batches` batches goes to `fisher_dir`. `mask_path`: elements
    held bitwise at their `start_dir` values; `side_files`: copied into the output model; `epi`:
    train with Evolving Parameter Isolation (frozen set re-selected every `epi.interval` steps)."""
    # Ray is imported where used: the stage modules import this one before the driver needs Ray.
    import ray

    return fit_job(
        sft_loop,
        {
            "kind": kind,
            "train_config": getattr(cfg, kind).model_dump(),
            "data": cfg.data.model_dump(),
            "model": cfg.model.model_dump(),
            "start_dir": str(start_dir),
            "out_dir": str(out_dir),
            "mask_path": str(mask_path) if mask_path else None,
            "side_files": {k: str(v) for k, v in (side_files or {}).items()},
            "examples": ray.put(examples),
            "val_examples": ray.put(val_examples) if val_examples else None,
            "pad_id": pad_id,
            "record": {**record, "fingerprint": fingerprint},
            "record_name": record_name,
            "train": train,
            "fisher_batches": fisher_batches,
            "fisher_dir": str(fisher_dir) if fisher_dir else None,
            "job": job,
            "metrics_path": str(metrics_path),
            "tracking": tracking,
            "fault": fault,
            "epi": epi.model_dump() if epi is not None else None,
        },
        cfg,
        kind,
        name=name,
        storage=storage,
        out_dir=out_dir,
        fingerprint=fingerprint,
        record=record_name,
        callbacks=callbacks,
    )


def sft_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of an SFT job (see the module's docstring)."""
    # Ray Train is imported where used (see the module's marker).
    import ray
    import ray.train

    # Only the sections the worker needs: task paths in the full config may be relative to the
    # driver's working directory, which a worker does not share.
    kind = config["kind"]
    tc = TRAIN_CONFIGS[kind].model_validate(config["train_config"])
    data = DataConfig.model_validate(config["data"])
    model_cfg = ModelConfig.model_validate(config["model"])
    quiet_train_reports()
    zero3.set_accelerator_env(tc.use_gpu)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = zero3.worker_device(tc.use_gpu)
    zero3.init_distributed(tc.use_gpu)
    torch.manual_seed(tc.seed)
    start_dir, out_dir = Path(config["start_dir"]), Path(config["out_dir"])

    mask = MaskFile(config["mask_path"]) if config["mask_path"] else None
    frozen_total = mask.count() if mask is not None else 0
    try:
        engine, scheduler, params, freezer = build_engine(
            tc, start_dir, world, section=kind, mask=mask, trust_remote_code=model_cfg.trust_remote_code
        )
    finally:
        if mask is not None:
            mask.close()

    isolation = None
    if config.get("epi"):
        isolation = EvolvingIsolation(params, EpiConfig.model_validate(config["epi"]), freezer)
    micro = tc.batch_size // tc.grad_accum
    examples = ray.get(config["examples"])
    record = dict(config["record"])
    if config["train"]:
        figures = _train(
            engine, scheduler, freezer, examples, tc, data, config, rank, world, device, micro, isolation
        )
        record.update(figures)
        record.update(frozen_elements=frozen_total, start=str(start_dir))
        if isolation is not None:
            record["epi"] = isolation.summary()

    if config["fisher_batches"]:
        t1 = time.time()
        batches = iterate_batches(
            examples,
            micro,
            config["pad_id"],
            seed=tc.seed + 1,
            packing=data.packing,
            rank=rank,
            world_size=world,
            max_seq_len=data.max_seq_len,
        )
        fisher = engine_fisher(engine, params, batches, config["fisher_batches"], device)
        record["fisher"] = {"batches": config["fisher_batches"], "time_s": round(time.time() - t1, 2)}
        log.info(
            "%s: Fisher over %d batches in %.1fs", config["job"], config["fisher_batches"], time.time() - t1
        )

    shard = parse_size(model_cfg.max_shard_size)
    if config["train"]:
        extra = None
        if rank == 0:
            extra = {METRICS_FILE: Path(config["metrics_path"]).read_bytes()}
            extra.update({n: Path(p).read_bytes() for n, p in config["side_files"].items()})
        zero3.export_hf_model(engine.module, out_dir, start_dir, shard, extra_files=extra)
    if config["fisher_batches"]:
        zero3.export_tensors(zero3.gathered_partitions(params, fisher), config["fisher_dir"], shard)
    if rank == 0:
        # Written last: an output without it (or with another fingerprint) is redone.
        write_json(out_dir / config["record_name"], record)


def build_engine(
    tc,
    start_dir: Path,
    world: int,
    *,
    section: str = "probe",
    mask: Optional[MaskFile] = None,
    trust_remote_code: bool = False,
):
    """The DeepSpeed engine of one SFT job on this rank (distributed already initialised):
    the model of `start_dir` (partitioned under ZeRO-3), the job's optimizer grouping and LR
    schedule, and the element freezer of `mask` (empty without one). Returns (engine, scheduler,
    [(name, parameter)], freezer)."""
    # DeepSpeed is imported where used (see the module's marker).
    import deepspeed

    hidden = json.loads((Path(start_dir) / "config.json").read_text()).get("hidden_size")
    ds_config = zero3.build_ds_config(tc, world, tc.use_gpu, section=section, hidden_size=hidden)
    frozen = mask is not None and mask.count() > 0
    if frozen:
        check_freezable(ds_config)
    dtype = zero3.PRECISION_DTYPES[tc.precision]
    model, hf_ds = zero3.load_engine_model(start_dir, ds_config, dtype, trust_remote_code)
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
    # transformers reads ZeRO-3's state from this object while it lives.
    engine.hf_ds_config = hf_ds
    with CheckpointReader(start_dir) as reader:
        if zero3.is_zero3(ds_config) and tc.precision != "fp32":
            zero3.load_fp32_master(params, reader)
        freezer = ElementFreezer(params, mask if frozen else None, reader)
    return engine, scheduler, params, freezer


def train_step(
    engine, freezer: ElementFreezer, batches, tc, device, before_step=None
) -> tuple[float, int, Optional[float]]:
    """One optimizer step over `grad_accum` micro-batches with the frozen elements held. Returns
    the step's mean token loss, this rank's input tokens and the gradient norm before clipping.
    `before_step` runs once the step's gradients are complete, before the frozen ones are zeroed
    (a mask update reads them all)."""
    own_norm: list[float] = []

    def backward(loss: torch.Tensor) -> None:
        # The gradient is already the token mean of the whole accumulated batch.
        engine.backward(loss, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary():
            if before_step is not None:
                before_step()
            freezer.zero_grads()
            if not hasattr(engine.optimizer, "_global_grad_norm"):
                # A plain torch optimizer (ZeRO-0 in fp32): DeepSpeed clips without keeping the
                # norm, so it is taken here from the reduced gradients.
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                own_norm.append(float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0)
        engine.step()

    # DeepSpeed keeps precision itself (bf16 weights with fp32 masters): no autocast.
    loss, tokens = accumulate_loss(engine, batches, tc, device, backward=backward)
    freezer.restore()
    norm = engine.get_global_grad_norm()
    if norm is None and own_norm:
        norm = own_norm[-1]
    return loss, tokens, None if norm is None else float(norm)


def _train(
    engine, scheduler, freezer, examples, tc, data, config, rank, world, device, micro, isolation=None
) -> dict:
    """The job's optimizer steps, resumed from the latest checkpoint Ray Train hands back.
    Returns the training figures of the record."""
    # Ray Train is imported where used, like in `sft_loop`.
    import ray
    import ray.train

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=_CKPT_TAG)
            if isolation is not None:
                isolation.load(d)
        start = int(client["step"])
        freezer.restore()
    log.info(
        "%s rank %d/%d: %d frozen elements in this partition, starting at step %d",
        config["job"],
        rank,
        world,
        len(freezer),
        start,
    )
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
    val_batches = None
    if config.get("val_examples") is not None:
        val_batches = _val_batches(ray.get(config["val_examples"]), micro, config["pad_id"], rank, world)

    fault = config.get("fault")
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
        update: dict[str, int] = {}
        before = None
        if isolation is not None and isolation.due(step):
            before = _mask_update(isolation, update)
        loss, tokens, grad_norm = train_step(engine, freezer, batches, tc, device, before_step=before)
        step_times.append(time.perf_counter() - ts)
        metrics = train_log.step(
            step + 1,
            loss,
            lr,
            grad_norm,
            sum_over_ranks(tokens, device),
            **update,
        )
        checkpoint = bool(
            tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps
        )
        if checkpoint or should_report(step + 1, tc.steps):
            if val_batches is not None:
                metrics["val_loss"] = val_loss = _val_loss(engine, val_batches, device)
            if checkpoint:
                _report_checkpoint(engine, metrics, step + 1, isolation)
            else:
                ray.train.report(metrics)
        if fault and step + 1 == fault["step"] and rank == fault["rank"]:
            kill_once(fault)
    train_log.close()
    return {
        "steps": tc.steps,
        "final_loss": loss,
        "val_loss": val_loss,
        "resumed_at_step": start,
        "train_rows": len(examples),
        "world_size": world,
        "step_time_s": (sum(step_times) / len(step_times)) if step_times else None,
        "train_time_s": round(time.time() - t0, 2),
    }


def _mask_update(isolation, into: dict):
    """The step's EPI mask update, its figures (`epi_frozen`, `epi_entered`, `epi_left`) put
    `into` the step's metrics."""

    def update() -> None:
        into.update({f"epi_{k}": v for k, v in isolation.update().items()})

    return update


def _val_batches(
    rows: list[dict], micro: int, pad_id: int, rank: int, world: int
) -> list[tuple[dict, float]]:
    """This rank's share of the validation rows as (batch, weight) pairs. Every rank gets the
    same number of batches (a ZeRO-3 forward is collective); a rank out of rows runs a
    zero-weight batch."""
    mine = rows[rank::world]
    per_rank = -(-len(rows) // world)  # ceil
    n = -(-per_rank // micro)
    out = []
    for j in range(n):
        part = mine[j * micro : (j + 1) * micro]
        weight = 1.0 if part else 0.0
        part = part or rows[:1]
        out.append((collate([(r["input_ids"], r["labels"]) for r in part], pad_id, 1), weight))
    return out


def _val_loss(engine, batches: list[tuple[dict, float]], device) -> float:
    """Token-mean loss over every rank's validation rows (what ASHA compares between trials)."""
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


def _report_checkpoint(engine, metrics: dict, step: int, isolation=None) -> None:
    """Every rank saves its DeepSpeed state (its ZeRO partitions, and its EPI state); Ray Train
    merges the ranks' directories into one checkpoint in storage."""
    # Ray Train is imported where used, like in `sft_loop`.
    import ray.train

    d = tempfile.mkdtemp(prefix="cpi-ds-")
    try:
        engine.save_checkpoint(d, tag=_CKPT_TAG, client_state={"step": step})
        if isolation is not None:
            isolation.save(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
