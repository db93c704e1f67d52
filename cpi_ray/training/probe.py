"""Stage `probe`: a short full-parameter SFT of the base model on each task alone.

One Ray Train `TorchTrainer` per task, all submitted at once (each `fit` runs inside a
zero-CPU Ray task), so the probes run in parallel as far as the cluster's resources allow and
queue otherwise. Each probe lands atomically in `probes/<task>/` with a `probe.json` carrying its
own fingerprint, so a probe that finished is kept when another task's probe fails or the config
of another task changes.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.atomic import write_json
from cpi_ray.io.records import finished_item, load_record
from cpi_ray.run.progress import METRICS_FILE, TrainLog, last_step, tracking_spec
from cpi_ray.run.runtime import quiet_train_reports, train_env
from cpi_ray.run.stage import RunContext, Stage, stable_hash
from cpi_ray.training.launch import fit_job
from cpi_ray.training.sft import (
    accumulate_loss,
    apply_memory_options,
    clip_grad,
    kill_once,
    make_optimizer,
    make_scheduler,
    micro_batch_size,
    should_report,
    sum_over_ranks,
)

log = logging.getLogger("cpi_ray")

PROBE_RECORD = "probe.json"
FISHER_DIR = "fisher"  # beside the probe's weights, sharded safetensors named like them
_CKPT_STATE = "train_state.pt"
_CKPT_WEIGHTS = "model.safetensors"


def probe_fingerprint(cfg: PipelineConfig, task: str, base_id: str) -> str:
    return stable_hash(
        {
            "task": cfg.task(task).fingerprint_dump(),
            "data": cfg.data.model_dump(),
            "probe": cfg.probe.recipe_dump(exclude=frozenset({"fisher_batches"})),
            "dtype": cfg.model.dtype,
            "base": base_id,
        }
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: SFT on one task, checkpoints through `ray.train.report`,
    rank 0 writes the final HF model."""
    import ray.train
    import ray.train.torch

    from cpi_ray.data.batching import build_train_examples, iterate_batches
    from cpi_ray.models.loading import load_model, load_tokenizer, save_model

    cfg = PipelineConfig.model_validate(config["cfg"])
    tc = cfg.probe
    quiet_train_reports()
    task, base_dir, out_dir = config["task"], config["base_dir"], config["out_dir"]
    train = config["mode"] == "train"  # else: only the Fisher of an existing probe
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)
    device = ray.train.torch.get_device()

    tok = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    model = load_model(base_dir if train else out_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    examples = build_train_examples(cfg, tok, [task])[task]
    t0 = time.time()
    record = {} if train else (load_record(Path(out_dir) / PROBE_RECORD) or {})
    if train:
        model, loss, start = _train(
            model,
            examples,
            tok,
            cfg,
            rank,
            world,
            device,
            task,
            config["metrics_path"],
            config["tracking"],
            config.get("fault"),
        )
        record = {
            "task": task,
            "fingerprint": config["fingerprint"],
            "steps": tc.steps,
            "final_loss": loss,
            "train_rows": len(examples),
            "resumed_at_step": start,
            "train_time_s": round(time.time() - t0, 2),
        }
    raw = model.module if hasattr(model, "module") else model

    fisher = None
    if config["fisher_batches"]:
        from cpi_ray.models.loading import unique_state_dict
        from cpi_ray.training.fisher import diagonal_fisher

        t1 = time.time()
        params = dict(raw.named_parameters())
        names = [n for n, t in unique_state_dict(raw).items() if n in params and t.is_floating_point()]
        batches = iterate_batches(
            examples,
            micro_batch_size(tc),
            tok.pad_token_id,
            seed=tc.seed + 1,
            packing=cfg.data.packing,
            rank=rank,
            world_size=world,
            max_seq_len=cfg.data.max_seq_len,
        )
        fisher = diagonal_fisher(raw, batches, config["fisher_batches"], device, names, world)
        record["fisher"] = {"batches": config["fisher_batches"], "time_s": round(time.time() - t1, 2)}
        log.info(
            "probe %s: Fisher over %d batches in %.1fs (training took %.1fs)",
            task,
            config["fisher_batches"],
            time.time() - t1,
            record.get("train_time_s", 0.0),
        )

    if rank == 0:
        from cpi_ray.io.atomic import atomic_dir, atomic_file
        from cpi_ray.io.safetensors_io import save_sharded
        from cpi_ray.io.sizes import parse_size

        shard = parse_size(cfg.model.max_shard_size)
        if train:
            save_model(raw, tok, out_dir, shard)
            with atomic_file(Path(out_dir) / METRICS_FILE) as f:
                f.write(Path(config["metrics_path"]).read_bytes())
        if fisher is not None:
            with atomic_dir(Path(out_dir) / FISHER_DIR) as d:
                save_sharded(fisher, d, shard)
        # Written last: a probe directory without it (or with another fingerprint) is redone.
        write_json(Path(out_dir) / PROBE_RECORD, record)


def _train(
    model,
    examples,
    tok,
    cfg: PipelineConfig,
    rank: int,
    world: int,
    device,
    task: str,
    metrics_path: str,
    tracking: dict,
    fault: dict | None = None,
):
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, save_file

    from cpi_ray.data.batching import iterate_batches

    tc = cfg.probe
    start = 0
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, _CKPT_WEIGHTS)), strict=False)
            state = torch.load(os.path.join(d, _CKPT_STATE), weights_only=True)
        start = int(state["step"])
    apply_memory_options(model, tc)
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model, tc)
    sched = make_scheduler(opt, tc)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    batches = iterate_batches(
        examples,
        micro_batch_size(tc),
        tok.pad_token_id,
        seed=tc.seed,
        packing=cfg.data.packing,
        rank=rank,
        world_size=world,
        max_seq_len=cfg.data.max_seq_len,
    )
    # Skip what the resumed steps consumed, so that a resumed run sees the same data.
    for _ in range(start * tc.grad_accum):
        next(batches)

    model.train()
    train_log = TrainLog(metrics_path, f"probe {task}", tc.steps, start, rank, tracking=tracking)
    every = max(1, tc.steps // 4)
    loss = float("nan")
    for step in range(start, tc.steps):
        lr = sched.get_last_lr()[0]  # the rate this step applies
        loss, tokens = accumulate_loss(model, batches, tc, device)
        gnorm = clip_grad(model, tc)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics = train_log.step(step + 1, loss, lr, gnorm, sum_over_ranks(tokens, device))
        metrics["task"] = task
        if (step + 1) % every == 0 and step + 1 < tc.steps:
            _report_checkpoint(metrics, model, opt, sched, step + 1, rank, save_file)
        elif should_report(step + 1, tc.steps):
            ray.train.report(metrics)
        if fault and step + 1 == fault["step"] and rank == fault["rank"]:
            kill_once(fault)
    train_log.close()
    return model, loss, start


def _report_checkpoint(metrics, model, opt, sched, step, rank, save_file) -> None:
    import ray.train

    from cpi_ray.models.loading import unique_state_dict

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            raw = model.module if hasattr(model, "module") else model
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in unique_state_dict(raw).items()},
                os.path.join(d, _CKPT_WEIGHTS),
            )
            torch.save(
                {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                os.path.join(d, _CKPT_STATE),
            )
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)


class ProbeStage(Stage):
    name = "probe"
    depends = ()

    def __init__(self, fault: dict | None = None):
        # Test hook: {"task": t, "step": s, "rank": r, "marker": path} kills rank r of task t's
        # trainer (SIGKILL) after step s, once.
        self.fault = fault

    def config_slice(self, cfg: PipelineConfig) -> dict:
        # The Fisher is part of the stage's output only when a core score reads it.
        return {
            "tasks": [t.fingerprint_dump() for t in cfg.tasks],
            "data": cfg.data.model_dump(),
            "probe": cfg.probe.recipe_dump(exclude=frozenset({"fisher_batches"})),
            "dtype": cfg.model.dtype,
            "fisher_batches": fisher_batches_needed(cfg),
        }

    @staticmethod
    def metrics_path(ctx: RunContext, task: str) -> Path:
        """Where task's probe trainer keeps its live metrics (copied into the probe when done)."""
        return ctx.layout.train_log(f"probe-{task}")

    def run(self, ctx: RunContext) -> list[Path]:
        import ray

        cfg = ctx.cfg
        fisher_batches = fisher_batches_needed(cfg)
        pending, outputs = [], []
        for task in ctx.task_names():
            out = ctx.layout.probe(task)
            fp = probe_fingerprint(cfg, task, ctx.base_model_id)
            outputs.append(out)
            rec = finished_item(out, PROBE_RECORD, fp)
            if rec is None:
                pending.append((task, fp, "train"))
            elif fisher_batches and (rec.get("fisher") or {}).get("batches") != fisher_batches:
                log.info("probe %s: trained, computing its Fisher (%s)", task, out)
                pending.append((task, fp, "fisher"))
            else:
                log.info("probe %s: already trained, kept (%s)", task, out)
        if not pending:
            return outputs

        # A fit lost with its node is started again under the same Ray Train run name, so the
        # trainer resumes from the checkpoint it had persisted (errors in training are not retried).
        fit = ray.remote(num_cpus=0, max_retries=2)(_fit_probe).options(runtime_env={"env_vars": train_env()})
        refs = {
            task: fit.remote(
                cfg.model_dump(),
                task,
                str(ctx.base_model_dir),
                str(ctx.layout.probe(task)),
                str(ctx.layout.ray_storage),
                fp,
                mode,
                fisher_batches,
                str(self.metrics_path(ctx, task)),
                tracking_spec(cfg, ctx.layout),
                self.fault if self.fault and self.fault["task"] == task else None,
            )
            for task, fp, mode in pending
        }
        log.info("probe: %d trainer(s) submitted (%s)", len(refs), ", ".join(refs))
        failures = {}
        from tqdm import tqdm

        # The bar counts the steps the trainers' live metrics record (tasks for a Fisher-only pass).
        training = [task for task, _, mode in pending if mode == "train"]
        total = cfg.probe.steps * len(training)
        with tqdm(total=total or len(refs), desc="probe", unit="step" if total else "task") as bar:
            remaining = {ref: task for task, ref in refs.items()}
            finished: set[str] = set()
            while remaining:
                ready, _ = ray.wait(list(remaining), num_returns=1, timeout=5.0)
                for ref in ready:
                    task = remaining.pop(ref)
                    finished.add(task)
                    try:
                        info = ray.get(ref)
                        fisher = info.get("fisher") or {}
                        log.info(
                            "probe %s: done, final loss %.4f, trained in %.1fs%s",
                            task,
                            info["final_loss"],
                            info["train_time_s"],
                            f", Fisher in {fisher['time_s']:.1f}s" if fisher else "",
                        )
                    except Exception as e:  # noqa: BLE001 - reported per task below
                        failures[task] = e
                if total:
                    steps = cfg.probe.steps
                    bar.n = sum(
                        steps if t in finished else min(steps, last_step(self.metrics_path(ctx, t)))
                        for t in training
                    )
                else:
                    bar.n = len(finished)
                bar.refresh()
        if failures:
            msg = "; ".join(f"{t}: {_short(e)}" for t, e in failures.items())
            raise RuntimeError(
                f"probe failed for task(s) {', '.join(failures)} (finished probes are kept): {msg}"
            )
        return outputs


def fisher_batches_needed(cfg: PipelineConfig) -> int:
    """Batches of the Fisher each probe must carry: only when a core score uses it."""
    from cpi_ray.regions.scores import needs_fisher

    return cfg.probe.fisher_batches if needs_fisher(cfg.regions.score) else 0


def _fit_probe(
    cfg_dump: dict,
    task: str,
    base_dir: str,
    out_dir: str,
    storage: str,
    fingerprint: str,
    mode: str,
    fisher_batches: int,
    metrics_path: str,
    tracking: dict,
    fault: dict | None = None,
) -> dict:
    cfg = PipelineConfig.model_validate(cfg_dump)
    return fit_job(
        train_loop_per_worker,
        {
            "cfg": cfg_dump,
            "task": task,
            "base_dir": base_dir,
            "out_dir": out_dir,
            "fingerprint": fingerprint,
            "mode": mode,
            "fisher_batches": fisher_batches,
            "metrics_path": metrics_path,
            "tracking": tracking,
            "fault": fault,
        },
        cfg,
        "probe",
        name=f"probe-{task}-{fingerprint}-{mode}",
        storage=storage,
        out_dir=out_dir,
        fingerprint=fingerprint,
        record=PROBE_RECORD,
    )


def _short(e: BaseException) -> str:
    """The line of a (remote, wrapped) exception that names the underlying error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [
        ln
        for ln in lines
        if re.search(r"\b\w*(Error|Exception)\b", ln)
        and not ln.startswith(("File ", "Traceback", "For further"))
    ]
    return (named or lines or [type(e).__name__])[-1][:500]
