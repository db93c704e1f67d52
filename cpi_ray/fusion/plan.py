"""Driver side of the fusion: check the inputs against each other and cut the work into shards.

Everything that can be wrong with the inputs' structure (a missing tensor, a shape or dtype that
disagrees with the base, a mask of the wrong size) is caught here, before any actor starts, and
reported with the tensor and the file. Values (NaN/Inf) are checked by the actors as they stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from cpi_ray.config.schema import FuseConfig
from cpi_ray.fusion import slerp as S
from cpi_ray.fusion import task_vectors as TV
from cpi_ray.fusion.worker import FuseError, ShardJob, TensorJob
from cpi_ray.io.masks import MaskFile
from cpi_ray.io.raw import FLOAT_DTYPES, NP_DTYPES, Source
from cpi_ray.io.safetensors_io import DTYPE_NAMES, CheckpointReader, plan_shards, shard_filename


@dataclass
class FusePlan:
    shards: list[ShardJob]
    weight_map: dict[str, str]
    total_size: int
    fold_labels: list[str]  # the fold's models in order, backbone first


def omega_for(name: str, cfg: FuseConfig) -> Optional[float]:
    """The SLERP weight of a tensor: the first override whose regex matches, else `omega`."""
    for pat, w in cfg.omega_overrides.items():
        if re.search(pat, name):
            return float(w)
    return cfg.omega


def fold_order(tasks: Sequence[str], backbone: str) -> list[int]:
    """Indices into [base, *tasks] in fold order. From the base: base then every task; from a
    task: that task then the others (the base takes no part)."""
    if backbone == "base":
        return list(range(len(tasks) + 1))
    if backbone not in tasks:
        raise FuseError(f"fuse.backbone {backbone!r} is neither 'base' nor a task")
    b = tasks.index(backbone) + 1
    return [b] + [i + 1 for i in range(len(tasks)) if i + 1 != b]


def group_ranks(tasks: Sequence[str], groups: Sequence[Sequence[str]], where: str) -> tuple[int, ...]:
    rank = {}
    for g, members in enumerate(groups):
        for t in members:
            rank[t] = g
    missing = [t for t in tasks if t not in rank]
    if missing:
        raise FuseError(f"{where}: tasks {missing} are in no group (policy 'priority' needs one)")
    return tuple(rank[t] for t in tasks)


def _src(reader: CheckpointReader, name: str) -> Source:
    info = reader.tensors[name]
    return Source(str(info.file), info.data_offset, DTYPE_NAMES[info.dtype])


def build_plan(
    base_dir: str | Path,
    task_dirs: Mapping[str, str | Path],
    mask_paths: Mapping[str, Optional[str | Path]],
    cfg: FuseConfig,
    max_shard_size: int,
) -> FusePlan:
    """Validate base, task models and masks against each other; return the shard jobs."""
    tasks = list(task_dirs)
    base = CheckpointReader(base_dir)
    readers = [CheckpointReader(task_dirs[t]) for t in tasks]
    try:
        names = base.names()
        for t, r in zip(tasks, readers):
            extra = [n for n in r.names() if n not in base]
            if extra:
                raise FuseError(
                    f"{r.tensors[extra[0]].file}: tensor {extra[0]!r} of task {t!r} "
                    f"is not in the base model {base.path}"
                )
            for n in names:
                if n not in r:
                    raise FuseError(
                        f"{r.path}: tensor {n!r} is missing from task {t!r}'s model "
                        f"(the base {base.tensors[n].file} has it)"
                    )
                bi, ti = base.tensors[n], r.tensors[n]
                if ti.shape != bi.shape:
                    raise FuseError(
                        f"{ti.file}: tensor {n!r} has shape {list(ti.shape)}, the base "
                        f"{bi.file} has {list(bi.shape)}"
                    )
                bfl = DTYPE_NAMES[bi.dtype] in FLOAT_DTYPES
                if bfl != (DTYPE_NAMES[ti.dtype] in FLOAT_DTYPES):
                    raise FuseError(
                        f"{ti.file}: tensor {n!r} has dtype {ti.dtype}, the base {bi.file} has {bi.dtype}"
                    )
        masks: list[dict[str, Source]] = []
        for t in tasks:
            p = mask_paths.get(t)
            masks.append({} if p is None else _mask_sources(Path(p), t, base))

        order = fold_order(tasks, cfg.backbone)
        jobs: dict[str, TensorJob] = {}
        for n in names:
            bi = base.tensors[n]
            om = omega_for(n, cfg)
            nf = len(order)
            if cfg.method in TV.METHODS:
                omegas = weights = None
            elif cfg.method == "multislerp":
                omegas = None
                weights = (
                    tuple([1.0 / nf] * nf)
                    if om is None or nf == 1
                    else tuple([1.0 - om] + [om / (nf - 1)] * (nf - 1))
                )
            else:
                weights = None
                omegas = tuple(S.running_mean_omegas(nf) if om is None else [om] * (nf - 1))
            jobs[n] = TensorJob(
                name=n,
                shape=tuple(bi.shape),
                numel=bi.numel,
                out_dtype=DTYPE_NAMES[bi.dtype],
                models=tuple([_src(base, n)] + [_src(r, n) for r in readers]),
                fold=tuple(order),
                omegas=omegas,
                weights=weights,
                masks=tuple(m.get(n) for m in masks),
            )
        sizes = [(n, jobs[n].numel * NP_DTYPES[jobs[n].out_dtype].itemsize) for n in names]
        groups = plan_shards(sizes, max_shard_size)
        shards, weight_map = [], {}
        for i, g in enumerate(groups):
            fn = shard_filename(i, len(groups))
            shards.append(ShardJob(fn, tuple(jobs[n] for n in g)))
            weight_map.update({n: fn for n in g})
        labels = ["base", *tasks]
        return FusePlan(shards, weight_map, sum(s for _, s in sizes), [labels[i] for i in order])
    finally:
        base.close()
        for r in readers:
            r.close()


def _mask_sources(path: Path, task: str, base: CheckpointReader) -> dict[str, Source]:
    if not path.is_file():
        raise FuseError(f"{path}: mask file of task {task!r} is missing")
    mf = MaskFile(path)
    raw = CheckpointReader(path)  # for the byte offsets of the packed tensors
    try:
        out: dict[str, Source] = {}
        for n in mf.names():
            if n not in base:
                raise FuseError(f"{path}: mask of tensor {n!r}, which the base model lacks")
            numel = base.tensors[n].numel
            if mf.numels[n] != numel:
                raise FuseError(
                    f"{path}: mask of tensor {n!r} covers {mf.numels[n]} elements, the tensor has {numel}"
                )
            info = raw.info(n)
            if DTYPE_NAMES[info.dtype] != "U8" or info.numel != (numel + 7) // 8:
                raise FuseError(f"{path}: mask of tensor {n!r} is not {(numel + 7) // 8} packed bytes")
            out[n] = Source(str(info.file), info.data_offset, "U8")
        return out
    finally:
        mf.close()
        raw.close()
