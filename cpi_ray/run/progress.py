"""What a training job shows while it runs and keeps afterwards.

Rank 0 of every SFT job (a probe, a consolidation stage, a baseline stage) appends one JSON line
per optimizer step to a live `metrics.jsonl` (step, loss, lr, grad norm, tokens, tokens/s,
elapsed) and logs a line every few steps:

    probe word_sorting step 12/40 loss 1.8312 lr 8.1e-05 312 tok/s eta 3m10s

The live file is copied into the job's model directory when it is written, so the curve stays
with the model; the report draws it. The same metrics go to the trackers of `logging.report_to`
(TensorBoard by default; MLflow, Weights & Biases).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.run.layout import RunLayout

# Imported where used: tensorboardX (slow to import, used if configured), mlflow, wandb (optional extras).

log = logging.getLogger("cpi_ray")

METRICS_FILE = "metrics.jsonl"


def tracking_spec(cfg: PipelineConfig, layout: RunLayout) -> dict:
    """What a training worker needs to open the run's trackers (plain data: it travels to Ray)."""
    return {
        "report_to": list(cfg.logging.report_to),
        "dir": str(layout.tensorboard),
        "project": cfg.logging.project,
        "group": layout.root.name,
        "every": cfg.logging.every_steps,
    }


class _TensorBoard:
    def __init__(self, spec: dict, job: str):
        # tensorboardX ships with ray[tune]; TensorBoard itself reads its event files.
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(spec["dir"]) / re.sub(r"[^\w.-]+", "-", job)))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, spec: dict, job: str):
        import mlflow

        mlflow.set_experiment(spec["project"])
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=job, tags={"cpi_ray.run": spec["group"]})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, spec: dict, job: str):
        import wandb

        self.run = wandb.init(project=spec["project"], group=spec["group"], name=job)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def format_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics file; [] when there is none. A torn last line (a killed writer)
    is dropped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def last_step(path: str | Path) -> int:
    """The last step a live metrics file records (0 before the first): how far its job is."""
    rows = read_metrics(path)
    return int(rows[-1]["step"]) if rows else 0


class TrainLog:
    """Rank 0's per-step record, console line and trackers for one job; a no-op on other ranks.

    `start`: the step the job resumes at; the live file keeps the lines up to it and drops the
    later ones, which the resumed job writes again. `tracking`: `tracking_spec`'s dict."""

    def __init__(
        self,
        path: Optional[str | Path],
        job: str,
        total_steps: int,
        start: int = 0,
        rank: int = 0,
        every: Optional[int] = None,
        tracking: Optional[dict] = None,
    ):
        self.path = Path(path) if path and rank == 0 else None
        self.job, self.total, self.start = job, total_steps, start
        self.every = every or (tracking or {}).get("every") or max(1, total_steps // 10)
        self.active = rank == 0
        self.t0 = time.time()
        self.tokens = 0
        if self.path is not None:
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= start]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.trackers = (
            [TRACKERS[name](tracking, job) for name in tracking["report_to"]]
            if tracking and self.active
            else []
        )

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: Optional[float],
        tokens: int,
        **extra: Any,
    ) -> dict:
        """Record 1-based optimizer step `step`, which processed `tokens` input tokens over all
        ranks. Returns the metrics (what the job also reports to Ray Train)."""
        elapsed = time.time() - self.t0
        self.tokens += tokens
        done = step - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done > 0 else math.nan
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": round(rate, 2),
            "elapsed_s": round(elapsed, 3),
            "time": round(time.time(), 3),
            **extra,
        }
        if not self.active:
            return row
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        numbers = {
            k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")
        }
        for tracker in self.trackers:
            tracker.log(numbers, step)
        if step % self.every == 0 or step == self.total or done == 1:
            log.info(
                "%s step %d/%d loss %.4f lr %.2e %.0f tok/s eta %s",
                self.job,
                step,
                self.total,
                loss,
                lr,
                rate,
                format_duration(eta) if eta == eta else "?",
            )
        return row

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def concat_metrics(parts: Iterable[tuple[dict, str | Path]]) -> str:
    """Several jobs' metrics as one file's text, each line tagged with its job's `tags` (a
    baseline's stages in order: {"stage": 1}, {"stage": 2}, ...)."""
    out = []
    for tags, path in parts:
        out += [json.dumps({**r, **tags}) + "\n" for r in read_metrics(path)]
    return "".join(out)
