"""Stage `fuse`: core transplant plus SLERP merge of the task models, by a pool of Ray actors.

The driver validates the inputs and plans the output shards; each actor is handed whole shards
(the largest first, the next to whichever actor frees up) and writes each one atomically into a
temporary directory; the driver then writes the index and the model's side files and renames the
directory into place. Output bits do not depend on the number of actors or the chunk size, so
neither is part of the stage's fingerprint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import ray
from ray.exceptions import RayTaskError
from tqdm import tqdm

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.fusion import task_vectors as TV
from cpi_ray.fusion.actors import FuseActor
from cpi_ray.fusion.plan import FusePlan, build_plan, group_ranks
from cpi_ray.fusion.worker import FuseError, FuseSettings
from cpi_ray.io.atomic import atomic_dir, read_json, write_json
from cpi_ray.io.safetensors_io import copy_model_side_files, write_index
from cpi_ray.io.sizes import parse_size
from cpi_ray.regions.grouping import read_groups
from cpi_ray.run.runtime import connect_ray, worker_resources
from cpi_ray.run.stage import RunContext, Stage

log = logging.getLogger("cpi_ray")

STATS_NAME = "fuse.json"  # timings, actors and per-shard figures of the last fusion


def run_fusion(
    base_dir: Path,
    task_dirs: dict[str, Path],
    mask_paths: dict[str, Optional[Path]],
    out_dir: Path,
    cfg: PipelineConfig,
    groups: Optional[list[list[str]]] = None,
    chunk_elems: Optional[int] = None,
    fault: Optional[tuple[str, str]] = None,
) -> dict:
    """Fuse into `out_dir` (an HF model directory, created atomically). Returns timings and
    per-shard stats. Ray must be initialized."""
    fc = cfg.fuse
    t0 = time.perf_counter()
    plan: FusePlan = build_plan(base_dir, task_dirs, mask_paths, fc, parse_size(cfg.model.max_shard_size))
    ranks: tuple[int, ...] = ()
    if fc.policy == "priority":
        if groups is None:
            raise FuseError("policy 'priority' needs the groups")
        ranks = group_ranks(list(task_dirs), groups, "groups")
    settings = FuseSettings(
        method=fc.method,
        policy=fc.policy,
        scale=fc.scale,
        density=fc.density,
        eps=fc.epsilon,
        ranks=ranks,
        buffer_bytes=fc.chunk_mib * 2**20,
        chunk_elems=chunk_elems,
        fault=fault,
    )
    res = worker_resources(cfg, "fuse")
    per_actor = res.pop("CPU")
    # more actors than the cluster has CPUs for would wait forever
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // per_actor))
    n_actors = max(1, min(fc.num_actors, len(plan.shards), cpus))
    if n_actors < fc.num_actors:
        log.info(
            "fuse: %d actor(s) instead of %d (%d shard(s), %d CPU(s)); a smaller "
            "model.max_shard_size gives more shards",
            n_actors,
            fc.num_actors,
            len(plan.shards),
            cpus,
        )
    t_plan = time.perf_counter() - t0
    stats: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        # A dead actor (node lost, OOM kill) is restarted and its shard redone from the start:
        # shards are pure functions of the inputs, so the retry writes the same bits.
        actors = [
            FuseActor.options(num_cpus=per_actor, resources=res, max_restarts=2, max_task_retries=2).remote(
                settings, str(tmp)
            )
            for _ in range(n_actors)
        ]
        try:
            # largest shards first, each to the next free actor
            todo = sorted(plan.shards, key=lambda s: -s.nbytes)
            running = {}
            free = list(actors)
            with tqdm(total=sum(s.nbytes for s in todo), desc="fuse", unit="B", unit_scale=True) as bar:
                while todo or running:
                    while todo and free:
                        a = free.pop()
                        shard = todo.pop(0)
                        running[a.fuse.remote(shard)] = (a, shard.nbytes)
                    done, _ = ray.wait(list(running), num_returns=1)
                    for ref in done:
                        a, nbytes = running.pop(ref)
                        stats.append(_get(ref))
                        free.append(a)
                        bar.update(nbytes)
            peaks = ray.get([a.peak_rss.remote() for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        for stale in tmp.glob(".*.tmp-*"):  # partial shards of actors that died mid-write
            stale.unlink()
        write_index(tmp, plan.weight_map, plan.total_size)
        copy_model_side_files(base_dir, tmp)
    return {
        "plan_s": t_plan,
        "total_s": time.perf_counter() - t0,
        "shards": stats,
        "actors": n_actors,
        "actor_peak_rss": peaks,
        "fold": plan.fold_labels,
    }


def _get(ref):
    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, FuseError):
            raise FuseError(str(cause)) from None
        raise


class FuseStage(Stage):
    name = "fuse"
    depends = ("regions", "groups")
    version = 1

    def __init__(self, chunk_elems: Optional[int] = None, fault: Optional[tuple[str, str]] = None):
        self.chunk_elems = chunk_elems  # fixed chunk length, for tests of the chunked path
        self.fault = fault  # (shard, marker): an actor dies mid-shard once, for fault tests

    def config_slice(self, cfg: PipelineConfig) -> dict:
        # actors and chunk size change how, not what: the output is bitwise the same; the SLERP
        # methods ignore the task-vector knobs, so runs fused before those existed stay current
        how = {"num_actors", "chunk_mib", "cpus_per_actor", "custom_resources"}
        if cfg.fuse.method not in TV.METHODS:
            how |= {"scale", "density"}
        return {
            "fuse": cfg.fuse.model_dump(exclude=how),
            "max_shard_size": cfg.model.max_shard_size,
            "tasks": [t.name for t in cfg.tasks],
        }

    def run(self, ctx: RunContext) -> list[Path]:
        tasks = ctx.task_names()
        task_dirs = {t: ctx.layout.probe(t) for t in tasks}
        mask_paths = {}
        for t in tasks:
            p = ctx.layout.mask(t)
            if not p.is_file():
                raise FuseError(f"{p}: mask file of task {t!r} is missing (run the regions stage)")
            mask_paths[t] = p
        groups = None
        if ctx.cfg.fuse.policy == "priority":
            groups = read_groups(ctx.layout.groups_json)

        connect_ray(ctx.cfg)  # a no-op inside the pipeline, which connected already
        out = ctx.layout.fused
        stats = run_fusion(
            ctx.base_model_dir, task_dirs, mask_paths, out, ctx.cfg, groups, self.chunk_elems, self.fault
        )
        # Kept beside the model: the runner's summary and later readers see them after the run.
        write_json(out / STATS_NAME, stats)
        return [out]

    def summary(self, ctx: RunContext) -> Optional[str]:
        try:
            s = read_json(ctx.path(self.folder, STATS_NAME))
        except (FileNotFoundError, ValueError):
            return None
        return (
            f"fused {len(s['shards'])} shard(s) with {s['actors']} actor(s) in "
            f"{s['total_s']:.1f} s (fold: {' -> '.join(s['fold'])})"
        )
