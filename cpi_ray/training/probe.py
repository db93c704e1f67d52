"""Stage `probe`: a short full-parameter SFT of the base model on each task alone.

One Ray Train `TorchTrainer` per task, all submitted at once (each `fit` runs inside a
zero-CPU Ray task), so the probes run in parallel as far as the cluster's resources allow and
queue otherwise. Each probe lands atomically in `probes/<task>/` with a `probe.json` carrying its
own fingerprint, so a probe that finished is kept when another task's probe fails or the config
of another task changes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tqdm import tqdm

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.records import finished_item, load_record
from cpi_ray.regions.scores import needs_fisher
from cpi_ray.run.progress import last_step, tracking_spec
from cpi_ray.run.runtime import train_env
from cpi_ray.run.stage import RunContext, Stage, stable_hash
from cpi_ray.training.engine import fit_sft

log = logging.getLogger("cpi_ray")

PROBE_RECORD = "probe.json"


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


class ProbeStage(Stage):
    name = "probe"
    # 2: trained on the SFT engine (DeepSpeed) instead of a DDP loop of its own
    version = 2
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
        # Ray is imported where used: the CLI and the config checks load stage classes without it.
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
                str(ctx.layout.fisher(task)),
                self.fault if self.fault and self.fault["task"] == task else None,
            )
            for task, fp, mode in pending
        }
        log.info("probe: %d trainer(s) submitted (%s)", len(refs), ", ".join(refs))
        failures = {}
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
    fisher_dir: str,
    fault: dict | None = None,
) -> dict:
    """One task's probe on the SFT engine (inside a zero-CPU Ray task, so that the probes run in
    parallel): its training rows are encoded here, once, and reach the workers through the object
    store. `mode` fisher: only the Fisher of the probe already in `out_dir`."""
    # Imported here, in the Ray task: tokenizers and datasets are not needed by the driver.
    from cpi_ray.data.batching import build_train_examples
    from cpi_ray.models.loading import load_tokenizer

    cfg = PipelineConfig.model_validate(cfg_dump)
    tok = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    train = mode == "train"
    record = {"task": task} if train else (load_record(Path(out_dir) / PROBE_RECORD) or {"task": task})
    return fit_sft(
        cfg,
        "probe",
        name=f"probe-{task}-{fingerprint}-{mode}",
        start_dir=Path(base_dir if train else out_dir),
        out_dir=Path(out_dir),
        examples=build_train_examples(cfg, tok, [task])[task],
        pad_id=tok.pad_token_id,
        storage=Path(storage),
        fingerprint=fingerprint,
        record=record,
        record_name=PROBE_RECORD,
        job=f"probe {task}",
        metrics_path=Path(metrics_path),
        tracking=tracking,
        train=train,
        fisher_batches=fisher_batches,
        fisher_dir=Path(fisher_dir),
        fault=fault,
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
