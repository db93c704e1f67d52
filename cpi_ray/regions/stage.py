"""Stages `regions` (exact global top-p% core of each task, on Ray Data) and `groups` (Jaccard
overlap of the cores and the ordered task groups), plus the readers later stages use."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.atomic import atomic_file, read_json, write_json
from cpi_ray.io.masks import MaskFile, MaskWriter
from cpi_ray.io.safetensors_io import CheckpointError, CheckpointReader
from cpi_ray.regions.grouping import (
    chance_jaccard,
    connected_components,
    link_threshold,
    order_groups,
    overlap_summary,
    read_groups,
)
from cpi_ray.regions.overlap import jaccard, mask_intersections
from cpi_ray.regions.plan import check_compatible, plan_chunks, scored_tensors
from cpi_ray.regions.ray_ops import checkpoint_sources, run_pass, sample_keys
from cpi_ray.regions.scores import needs_fisher
from cpi_ray.regions.topk import (
    HIST_SHIFT,
    LOW_MASK,
    ChunkMeta,
    ScanRequest,
    TopKSolver,
    core_size,
    key_to_float,
)
from cpi_ray.regions.worker import DEFAULT_BLOCK_ELEMS, ChunkReader
from cpi_ray.run.layout import GROUPS_JSON, MASK_SUFFIX, OVERLAP_JSON, REGION_STATS, RunLayout
from cpi_ray.run.runtime import connect_ray
from cpi_ray.run.stage import RunContext, Stage

log = logging.getLogger("cpi_ray")

HIST_FILE = "histograms.npz"


# --------------------------------------------------------------------------- paths and readers


def mask_path(run_dir: str | Path, task: str) -> Path:
    return RunLayout(Path(run_dir)).mask(task)


def load_mask(run_dir: str | Path, task: str) -> MaskFile:
    """The task's core mask. Tensors that were not scored are absent: they hold no core."""
    return MaskFile(mask_path(run_dir, task))


def load_region_stats(run_dir: str | Path) -> dict:
    return read_json(RunLayout(Path(run_dir)).region_stats)


def load_histogram(run_dir: str | Path, task: str) -> np.ndarray:
    """The task's score histogram: bin b counts the scored elements whose float32 score has bit
    pattern >> 15 == b, i.e. lies in [bin_floor(b), bin_floor(b + 1)). With it, k for any p maps
    to the one bin holding the new threshold (`threshold_bin`)."""
    with np.load(Path(run_dir) / "regions" / HIST_FILE) as z:
        return z[task]


def bin_floor(b: int) -> float:
    return key_to_float(int(b) << HIST_SHIFT)


def threshold_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest score, number of elements in the bins above it)."""
    return TopKSolver._bucket(hist, k)


def load_groups(run_dir: str | Path) -> list[list[str]]:
    return read_groups(RunLayout(Path(run_dir)).groups_json)


def load_overlap(run_dir: str | Path) -> dict:
    return read_json(RunLayout(Path(run_dir)).overlap_json)


# --------------------------------------------------------------------------- where cores live

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    m = _LAYER_RE.search(name)
    return f"layer.{int(m.group(1))}" if m else "other"


def module_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        return parts[-2]
    return parts[-1]


# --------------------------------------------------------------------------- stage: regions


class RegionsStage(Stage):
    name = "regions"
    depends = ("probe",)
    version = 1

    def __init__(self, histograms: Optional[dict[str, np.ndarray]] = None):
        # Stored score histograms of an earlier regions run over the same probes (a Tune
        # search): the same masks and fingerprint, found by one scan of the k-th score's bin.
        self.histograms = histograms

    def config_slice(self, cfg: PipelineConfig) -> dict:
        r = cfg.regions
        # chunking, actors and the candidate budget change the work, never the masks
        out = {
            "p": r.p,
            "score": r.score,
            "granularity": r.granularity,
            "include": list(r.include),
            "exclude": list(r.exclude),
            "tasks": [t.name for t in cfg.tasks],
        }
        if r.score == "delta_fisher" or r.granularity == "row":
            # Scores computed with numpy since: a correctly rounded float32 sqrt (torch's
            # vectorised one is off by an ulp at times) and numpy's float64 row sums can move
            # the last bit of these keys; element |Δ| and Fisher keys are the same bits as before.
            out["keys"] = "numpy"
        return out

    def run(self, ctx: RunContext) -> list[Path]:
        out_dir = ctx.layout.folder("regions")
        out_dir.mkdir(parents=True, exist_ok=True)
        tasks = ctx.task_names()
        for t in tasks:  # no stale mask may outlive a failed rerun
            mask_path(ctx.run_dir, t).unlink(missing_ok=True)
        res = compute_regions(
            ctx.cfg,
            ctx.base_model_dir,
            {t: ctx.layout.probe(t) for t in tasks},
            out_dir,
            fisher_dirs=(
                {t: ctx.layout.fisher(t) for t in tasks} if needs_fisher(ctx.cfg.regions.score) else None
            ),
            histograms=self.histograms,
        )
        return res

    def summary(self, ctx: RunContext) -> Optional[str]:
        st = load_region_stats(ctx.run_dir)
        return "\n".join(
            f"{t}: k={s['k']} of D={s['D']} (p={s['p']}%), threshold {s['threshold']:.3e}"
            if s["threshold"] is not None
            else f"{t}: k={s['k']} of D={s['D']}"
            for t, s in st["tasks"].items()
        )


def compute_regions(
    cfg: PipelineConfig,
    base_dir: str | Path,
    probe_dirs: dict[str, Path],
    out_dir: str | Path,
    fisher_dirs: Optional[dict[str, Path]] = None,
    block_elems: Optional[int] = None,
    histograms: Optional[dict[str, np.ndarray]] = None,
) -> list[Path]:
    """Masks, stats and histograms of every task into `out_dir`; returns the written paths.
    Nothing is written unless every input is valid.

    `histograms`: each task's stored histogram from an earlier run over the same probes and
    scores (any p). The bin of the new k-th score is then known, so the selection skips the
    sample and the histogram and scans that one bin in a single pass (`refinement` in stats)."""
    rc = cfg.regions
    out_dir = Path(out_dir)
    t0 = time.time()
    base = CheckpointReader(base_dir)
    tensors = scored_tensors(base, rc.include, rc.exclude, rc.granularity)
    tasks = list(probe_dirs)
    probes = {t: CheckpointReader(probe_dirs[t]) for t in tasks}
    fishers = {t: CheckpointReader(fisher_dirs[t]) for t in tasks} if fisher_dirs else {}
    for t in tasks:  # structure first: a bad probe fails before any work
        check_compatible(base, probes[t], base.names(), f"probe {t!r}")
        if fishers:
            check_compatible(base, fishers[t], [x.name for x in tensors], f"Fisher of {t!r}")
    chunks = plan_chunks(base, tensors, rc.chunk_mib * 2**20)
    total = sum(x.numel for x in tensors)
    k = core_size(rc.p, total)
    metas = [ChunkMeta(c.idx, c.units, c.unit_len, c.unit_offset) for c in chunks]
    budget = rc.max_candidates
    # Each task's mask goes to its file chunk by chunk as the results stream in (the driver holds
    # no mask); a file is moved into place only when every task is done.
    streams = {}
    try:
        for t in tasks:
            streams[t] = MaskStream(
                out_dir / f"{t}{MASK_SUFFIX}",
                chunks,
                {x.name: x.numel for x in tensors},
                {
                    "task": t,
                    "p": repr(float(rc.p)),
                    "k": k,
                    "D": total,
                    "score": rc.score,
                    "granularity": rc.granularity,
                },
            )
        return _select_and_write(
            cfg,
            base,
            tensors,
            chunks,
            metas,
            streams,
            k,
            total,
            budget,
            probes,
            fishers,
            block_elems,
            histograms,
            out_dir,
            t0,
        )
    finally:
        for st in streams.values():
            st.writer.abort()  # a no-op for a committed file


def _select_and_write(
    cfg,
    base,
    tensors,
    chunks,
    metas,
    streams,
    k,
    total,
    budget,
    probes,
    fishers,
    block_elems,
    histograms,
    out_dir,
    t0,
) -> list[Path]:

    rc = cfg.regions
    tasks = list(probes)
    solvers = {t: TopKSolver(metas, k, total, budget, sink=streams[t].write_units) for t in tasks}
    base_src, probe_src, fisher_src = checkpoint_sources(base, probes, fishers, [x.name for x in tensors])
    reader = ChunkReader(base_src, probe_src, rc.score, fisher_src, block_elems or DEFAULT_BLOCK_ELEMS)
    requests = {}
    refined = []
    to_sample = []
    for t in tasks:
        h = None if histograms is None else histograms.get(t)
        if h is not None and not solvers[t].trivial and int(np.sum(h)) == total:
            solvers[t].hist = np.asarray(h, dtype=np.int64)
            b, _ = threshold_bin(solvers[t].hist, k)
            requests[t] = solvers[t]._set(
                ScanRequest("scan", lo=b << HIST_SHIFT, hi=(b << HIST_SHIFT) | LOW_MASK)
            )
            refined.append(t)
        elif solvers[t].trivial:
            requests[t] = solvers[t].start(np.empty(0, np.int32), np.empty(0, np.int64))
        else:
            to_sample.append(t)
    if to_sample:
        for t, (sk, sw) in sample_keys(reader, chunks, to_sample).items():
            requests[t] = solvers[t].start(sk, sw)
    t_plan = time.time() - t0
    connect_ray(cfg)  # a no-op inside the pipeline, which connected already
    npass = 0
    bytes_read = 0
    pass_timing: list[dict] = []
    while requests:
        npass += 1
        pass_timing.append({"start_s": time.time() - t0})
        bytes_read += _pass_bytes(base, chunks, requests, bool(fishers))
        caps = {t: solvers[t].cap(0) for t in requests}
        for idx, res in run_pass(
            chunks,
            reader,
            requests,
            caps,
            rc.num_actors,
            getattr(rc, "cpus_per_actor", 1.0),
            getattr(rc, "custom_resources", None),
            timing=pass_timing[-1],
        ):
            for t, r in res.items():
                solvers[t].add(idx, r)  # sparse histograms are summed as they come
        nxt = {}
        for t in requests:
            req = solvers[t].end_pass()
            if req is not None:
                nxt[t] = req
        requests = nxt
        pt = pass_timing[-1]
        pt["wall_s"] = time.time() - t0 - pt.pop("start_s")
        pass_timing[-1] = {k: round(v, 3) for k, v in pt.items()}
    t_select = time.time() - t0 - t_plan

    written: list[Path] = []
    stats: dict[str, dict] = {}
    per_tensor_all = {}
    for t in tasks:
        per_tensor = streams[t].finish(solvers[t].extra)
        count = sum(per_tensor.values())
        if rc.granularity == "element" and count != k:
            raise RuntimeError(f"task {t!r}: selected {count} elements, expected k={k}")
        per_tensor_all[t] = per_tensor
    for t in tasks:  # every mask is complete: move them into place
        thr = solvers[t].threshold
        per_tensor = per_tensor_all[t]
        count = sum(per_tensor.values())
        written.append(
            streams[t].writer.commit({"count": count, "threshold": "" if thr is None else repr(thr)})
        )
        layers, modules = Counter(), Counter()
        for n, c in per_tensor.items():
            layers[layer_of(n)] += c
            modules[module_of(n)] += c
        stats[t] = {
            "p": rc.p,
            "k": k,
            "D": total,
            "count": count,
            "score": rc.score,
            "granularity": rc.granularity,
            "threshold": thr,
            "threshold_key": solvers[t].threshold_key,
            "passes": solvers[t].passes,
            "per_layer": dict(sorted(layers.items())),
            "per_module": dict(sorted(modules.items())),
            "per_tensor": {n: c for n, c in per_tensor.items() if c},
        }
    hist_path = out_dir / HIST_FILE
    with atomic_file(hist_path, "wb") as f:
        np.savez_compressed(f, **{t: solvers[t].hist for t in tasks})
    written.append(hist_path)
    elapsed = time.time() - t0
    cores = _cores_used(rc)
    rate = bytes_read / max(elapsed, 1e-9)
    stats_path = out_dir / REGION_STATS
    write_json(
        stats_path,
        {
            "p": rc.p,
            "k": k,
            "D": total,
            "score": rc.score,
            "granularity": rc.granularity,
            "num_tensors": len(tensors),
            "num_chunks": len(chunks),
            "num_passes": npass,
            "refinement": {"from_histogram": refined},
            "histogram": {
                "file": HIST_FILE,
                "shift": HIST_SHIFT,
                "meaning": "bin b: elements whose float32 score bits >> shift == b",
            },
            "timing_s": {
                "plan_and_sample": round(t_plan, 3),
                "select": round(t_select, 3),
                "write": round(elapsed - t_plan - t_select, 3),
                "passes": pass_timing,
            },
            "throughput": {
                "bytes_read": bytes_read,
                "bytes_per_s": round(rate),
                "cores": cores,
                "bytes_per_s_per_core": round(rate / cores),
            },
            "tasks": stats,
        },
    )
    written.append(stats_path)
    log.info(
        "regions: k=%d of D=%d for %d tasks in %d pass(es), %.1fs; read %.2f GB at %.0f MB/s "
        "(%.0f MB/s per core, %g cores)",
        k,
        total,
        len(tasks),
        npass,
        elapsed,
        bytes_read / 1e9,
        rate / 1e6,
        rate / cores / 1e6,
        cores,
    )
    return written


def _pass_bytes(base: CheckpointReader, chunks, requests, with_fisher: bool) -> int:
    """Bytes one pass reads: each chunk of the base once, of each requested task's probe (and
    Fisher) once."""
    per = {}
    for c in chunks:
        per[c.name] = per.get(c.name, 0) + (c.stop - c.start) * base.info(c.name).itemsize
    data = sum(per.values())
    files = 1 + len(requests) + (len(requests) if with_fisher else 0)
    return data * files


def _cores_used(rc) -> float:
    """CPUs the pass actors hold (what bytes per core divides by)."""
    return max(1.0, rc.num_actors * float(getattr(rc, "cpus_per_actor", 1.0)))


class MaskStream:
    """A task's mask written into its file chunk by chunk: the solver's sink for the packed unit
    bits of each chunk (a later pass overwrites an earlier one's), then the ties or candidates
    it took (`finish`)."""

    def __init__(self, path: Path, chunks, numels: dict[str, int], metadata: dict):
        self.writer = MaskWriter(path, numels, metadata)
        self.chunks = {c.idx: c for c in chunks}
        self.counts: dict[int, int] = {}  # chunk idx -> elements set

    def write_units(self, idx: int, unit_bits: np.ndarray) -> None:
        c = self.chunks[idx]
        n_units = int(np.bitwise_count(unit_bits).sum(dtype=np.int64))
        if c.unit_len > 1:
            units = np.unpackbits(unit_bits, count=c.units, bitorder="big")
            unit_bits = np.packbits(np.repeat(units, c.unit_len), bitorder="big")
        self.writer.write(c.name, c.start // 8, unit_bits)  # chunks start on multiples of 8 elements
        self.counts[idx] = n_units * c.unit_len

    def finish(self, extra: dict[int, np.ndarray]) -> dict[str, int]:
        """Add the extra units (chunk idx -> local unit indices); returns elements set per
        tensor."""
        for idx, units in extra.items():
            c = self.chunks[idx]
            n = c.stop - c.start
            packed = self.writer.read(c.name, c.start // 8, (n + 7) // 8)
            m = np.unpackbits(packed, count=n, bitorder="big").astype(bool)
            m.reshape(-1, c.unit_len)[units] = True
            self.writer.write(c.name, c.start // 8, np.packbits(m, bitorder="big"))
            self.counts[idx] = self.counts.get(idx, 0) + len(units) * c.unit_len
        per_tensor = dict.fromkeys(self.writer.numels, 0)
        for idx, n in self.counts.items():
            per_tensor[self.chunks[idx].name] += n
        return per_tensor


# --------------------------------------------------------------------------- stage: groups


class GroupsStage(Stage):
    name = "groups"
    depends = ("regions",)
    version = 1

    def config_slice(self, cfg: PipelineConfig) -> dict:
        g = cfg.groups
        out = {
            "tau": g.tau,
            "order": g.order,
            "given": g.given,
            "seed": g.seed,
            "tasks": [t.name for t in cfg.tasks],
        }
        if g.tau_mode != "absolute":  # absent when absolute: runs recorded before it stay current
            out["tau_mode"] = g.tau_mode
        return out

    def run(self, ctx: RunContext) -> list[Path]:
        return compute_groups(
            ctx.cfg, ctx.layout.folder("regions"), ctx.layout.folder("groups"), ctx.task_names()
        )

    def summary(self, ctx: RunContext) -> Optional[str]:
        line = " -> ".join("{" + ", ".join(g) + "}" for g in load_groups(ctx.run_dir))
        try:
            ov = read_json(ctx.layout.overlap_json)
        except (FileNotFoundError, ValueError):
            return line
        detail = overlap_summary(ov)
        return f"{line}\n{detail}" if detail else line


def compute_groups(
    cfg: PipelineConfig, regions_dir: str | Path, out_dir: str | Path, tasks: list[str]
) -> list[Path]:
    g = cfg.groups
    out_dir = Path(out_dir)
    paths = [Path(regions_dir) / f"{t}{MASK_SUFFIX}" for t in tasks]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: mask is missing; rerun stage 'regions'")
    inter, _ = mask_intersections(paths, cfg.regions.chunk_mib * 2**20)
    sim = jaccard(inter)
    p = cfg.regions.p
    threshold = link_threshold(g.tau, g.tau_mode, p)
    comps = connected_components(tasks, sim, threshold)
    groups = order_groups(comps, g.order, g.seed, g.given)
    ov = out_dir / OVERLAP_JSON
    write_json(
        ov,
        {
            "tasks": tasks,
            "jaccard": sim.round(8).tolist(),
            "intersection": inter.tolist(),
            "core_sizes": np.diag(inter).tolist(),
            "tau": g.tau,
            "tau_mode": g.tau_mode,
            "p": p,
            "chance": chance_jaccard(p),
            "threshold": threshold,
            "components": comps,
        },
    )
    gp = out_dir / GROUPS_JSON
    write_json(gp, groups)
    return [ov, gp]
