"""The one launcher of every SFT job (a task's probe, a consolidation stage, a baseline stage): a
Ray Train `TorchTrainer` with the stage's workers and resources, restarts from the latest
checkpoint after a failure (`max_failures`), one checkpoint kept. After `fit`, the job's record
is read back from its output, and the run's checkpoints, which only served resumption, go."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.records import finished_item
from cpi_ray.run.runtime import worker_resources


def fit_job(
    loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    cfg: PipelineConfig,
    stage: Literal["probe", "consolidate"],
    *,
    name: str,
    storage: str | Path,
    out_dir: str | Path,
    fingerprint: str,
    record: str,
    callbacks: Optional[list] = None,
) -> dict:
    """Train `loop` on every worker of `stage`'s trainer under the Ray Train run `name` (a rerun
    with the same name resumes from its persisted checkpoint) and return the record (file name
    `record`) the job wrote into `out_dir` with `fingerprint`. `callbacks`: Ray Train callbacks
    (Tune's reporter)."""
    # Ray Train is imported where used: the CLI and the config checks start without it.
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = getattr(cfg, stage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=worker_resources(cfg, stage),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks) if callbacks else None,
        ),
    )
    trainer.fit()
    rec = finished_item(Path(out_dir), record, fingerprint)
    if rec is None:
        raise RuntimeError(f"{name}: training finished but {out_dir} was not written")
    shutil.rmtree(Path(storage) / name, ignore_errors=True)
    return rec
