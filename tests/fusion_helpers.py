"""Builders shared by the fusion tests: a tiny base, perturbed task models, masks, a context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.masks import pack_mask, write_mask_file
from cpi_ray.io.safetensors_io import CheckpointReader, save_model_dir
from cpi_ray.models.tiny import save_tiny_model
from cpi_ray.run.stage import RunContext

TASKS = ["a", "b", "c"]


def load_state(d: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(d) as r:
        return {n: r.read(n).clone() for n in r.names()}


def make_run(
    root: Path,
    tasks=TASKS,
    scale: float = 0.05,
    core_p: float = 0.1,
    dtype: Optional[torch.dtype] = None,
    identical: bool = False,
    groups: Optional[list[list[str]]] = None,
    seed: int = 0,
    base_dir: Optional[Path] = None,
    **fuse,
) -> RunContext:
    """Base + one perturbed probe per task + random overlapping masks under `root`."""
    if base_dir is None:
        base_dir = root / "base"
        if not base_dir.exists():
            save_tiny_model(base_dir)
    if dtype is not None:
        st = {k: v.to(dtype) for k, v in load_state(base_dir).items()}
        cast = root / "base_cast"
        save_model_dir(st, cast, 100_000, copy_from=base_dir)
        base_dir = cast
    run = root / "run"
    base = load_state(base_dir)
    g = torch.Generator().manual_seed(seed)
    names = sorted(base)
    for i, t in enumerate(tasks):
        st = {}
        for n in names:
            x = base[n]
            if identical:
                st[n] = x.clone()
            else:
                noise = torch.randn(x.shape, generator=g) * scale * (1 + i)
                st[n] = (x.float() + noise).to(x.dtype)
        save_model_dir(st, run / "probes" / t, 100_000, copy_from=base_dir)
        packed, numels = {}, {}
        # every other tensor has a core region; the last tensor has none in any task
        for j, n in enumerate(names[:-1]):
            if (j + i) % 2 == 0:
                m = torch.rand(base[n].shape, generator=g) < core_p
                packed[n] = pack_mask(m)
                numels[n] = base[n].numel()
        write_mask_file(run / "regions" / f"{t}.mask.safetensors", packed, numels)
    (run / "groups").mkdir(parents=True, exist_ok=True)
    (run / "groups" / "groups.json").write_text(json.dumps(groups or [[t] for t in tasks]))
    cfg = PipelineConfig.model_validate(
        {
            "tasks": [{"name": t, "reasoning_gym": {"name": "spell_backward"}} for t in tasks],
            "model": {"max_shard_size": "100kB"},
            "fuse": {"num_actors": 2, **fuse},
        }
    )
    return RunContext(cfg=cfg, run_dir=run, base_model_dir=base_dir, base_model_id="tiny")


def with_fuse(ctx: RunContext, **fuse) -> RunContext:
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.fuse = cfg.fuse.model_copy(update=fuse)
    return RunContext(
        cfg=cfg, run_dir=ctx.run_dir, base_model_dir=ctx.base_model_dir, base_model_id=ctx.base_model_id
    )
