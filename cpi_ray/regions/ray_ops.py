"""The Ray layer of the regions stage: a Ray Data UDF that runs one pass of the top-k protocol
(`cpi_ray.regions.topk`) over chunks of the base and every probe, and the driver helpers that
sample, run passes and collect their small results.

The UDF lives in this importable module (Ray Data actors must be able to import it) and opens
every checkpoint memory-mapped. It reads a chunk in blocks of a few MiB and unmaps the files
after each block, so an actor's memory stays at a few blocks whatever the model size.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import ray.data
import torch
from ray.data import ActorPoolStrategy

from cpi_ray.io.safetensors_io import CheckpointError, CheckpointReader
from cpi_ray.regions.plan import Chunk
from cpi_ray.regions.scores import compute_score
from cpi_ray.regions.topk import (
    MAX_FINITE_KEY,
    ScanRequest,
    ScanResult,
    all_finite,
    keys_of,
    run_request,
    unit_keys,
)

DEFAULT_BLOCK_ELEMS = 1 << 22  # 16 MiB of float32 scores per block


class ChunkReader:
    """Score blocks of one chunk for one task, read from memory maps that are released after
    each block."""

    def __init__(
        self,
        base_dir: str,
        probe_dirs: Mapping[str, str],
        score: str = "delta",
        fisher_dirs: Optional[Mapping[str, str]] = None,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ):
        self.base = CheckpointReader(base_dir)
        self.probes = {t: CheckpointReader(d) for t, d in probe_dirs.items()}
        self.fishers = {t: CheckpointReader(d) for t, d in (fisher_dirs or {}).items()}
        self.score = score
        self.block_elems = int(block_elems)

    def release(self) -> None:
        # unmapping drops the pages from this process (they stay in the page cache)
        for r in (self.base, *self.probes.values(), *self.fishers.values()):
            r.close()

    def block_units(self, unit_len: int) -> int:
        return max(8, (self.block_elems // unit_len) // 8 * 8)

    def scores(self, task: str, name: str, start: int, stop: int) -> torch.Tensor:
        base = self.base.read_flat(name, start, stop)
        probe = self.probes[task].read_flat(name, start, stop)
        fisher = self.fishers[task].read_flat(name, start, stop) if task in self.fishers else None
        s = compute_score(self.score, base, probe, fisher)
        del base, probe, fisher
        if not all_finite(keys_of(s)):
            bad = int((~torch.isfinite(s)).nonzero()[0, 0]) + start
            files = [
                f"probe file {self.probes[task].info(name).file}",
                f"base file {self.base.info(name).file}",
            ]
            if task in self.fishers:
                files.append(f"Fisher file {self.fishers[task].info(name).file}")
            raise CheckpointError(
                f"task {task!r}: NaN or Inf {self.score} score in tensor {name!r} at flat "
                f"element {bad} ({', '.join(files)})"
            )
        return s

    def key_blocks(
        self, task: str, name: str, start: int, stop: int, unit_len: int
    ) -> Iterator[torch.Tensor]:
        step = self.block_units(unit_len) * unit_len
        for a in range(start, stop, step):
            b = min(a + step, stop)
            try:
                keys = unit_keys(self.scores(task, name, a, b), unit_len)
            finally:
                self.release()
            yield keys


class RegionsPass:
    """Ray Data UDF (`map_batches` with an actor pool): for each chunk row of the batch and each
    task with a request, the chunk's result, pickled into one small bytes value per row."""

    def __init__(
        self,
        base_dir: str,
        probe_dirs: Mapping[str, str],
        requests: Mapping[str, dict],
        caps: Mapping[str, int],
        score: str = "delta",
        fisher_dirs: Optional[Mapping[str, str]] = None,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ):
        self.reader = ChunkReader(base_dir, probe_dirs, score, fisher_dirs, block_elems)
        self.requests = {t: ScanRequest(**r) for t, r in requests.items()}
        self.caps = dict(caps)

    def process(self, item: Mapping) -> dict:
        out: dict[str, object] = {}
        name, start, stop = str(item["name"]), int(item["start"]), int(item["stop"])
        unit_len, idx = int(item["unit_len"]), int(item["idx"])
        try:
            for task, req in self.requests.items():
                blocks = self.reader.key_blocks(task, name, start, stop, unit_len)
                r = run_request(req, blocks, unit_len, self.caps[task], idx)
                if isinstance(r, ScanResult) and r.hist is not None:
                    nz = np.flatnonzero(r.hist)
                    r.hist = (nz.astype(np.int32), r.hist[nz])  # sparse on the wire
                out[task] = r
        except (CheckpointError, ValueError, KeyError, OSError) as e:
            return {"error": str(e)}  # reported by the driver as one clear error
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["idx"])
        payloads = []
        for j in range(n):
            payloads.append(
                pickle.dumps(self.process({k: batch[k][j] for k in batch}), protocol=pickle.HIGHEST_PROTOCOL)
            )
        return {"idx": np.asarray(batch["idx"], dtype=np.int64), "payload": np.array(payloads, dtype=object)}


def densify(result: ScanResult, bins: int) -> ScanResult:
    if isinstance(result, ScanResult) and isinstance(result.hist, tuple):
        h = np.zeros(bins, dtype=np.int64)
        nz, c = result.hist
        h[nz] = c
        result.hist = h
    return result


def run_pass(
    chunks: Sequence[Chunk],
    base_dir: str,
    probe_dirs: Mapping[str, str],
    requests: Mapping[str, ScanRequest],
    caps: Mapping[str, int],
    score: str,
    fisher_dirs: Optional[Mapping[str, str]],
    num_actors: int,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    cpus_per_actor: float = 1.0,
    resources: Optional[Mapping[str, float]] = None,
) -> Iterator[tuple[int, dict]]:
    """One Ray Data pass over the chunks; yields (chunk idx, {task: result}) as rows stream in.
    Raises CheckpointError for a chunk whose data is bad."""
    items = [c.as_item() for c in chunks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        RegionsPass,
        fn_constructor_kwargs=dict(
            base_dir=str(base_dir),
            probe_dirs={t: str(d) for t, d in probe_dirs.items()},
            requests={t: asdict(r) for t, r in requests.items()},
            caps=dict(caps),
            score=score,
            fisher_dirs={t: str(d) for t, d in (fisher_dirs or {}).items()},
            block_elems=block_elems,
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=max(1, min(num_actors, len(items)))),
        num_cpus=cpus_per_actor,
        **({"resources": dict(resources)} if resources else {}),
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
        for idx, payload in zip(batch["idx"], batch["payload"]):
            res = pickle.loads(payload)
            if "error" in res:
                raise CheckpointError(res["error"])
            yield int(idx), res


def sample_keys(
    reader: ChunkReader, chunks: Sequence[Chunk], task: str, target_units: int = 1 << 19, block: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """A systematic sample of unit keys (and their weights) across all chunks: small blocks at
    evenly spaced positions, about `target_units` units in all, read by the driver."""
    total = sum(c.units for c in chunks)
    frac = min(1.0, target_units / max(total, 1))
    keys, weights = [], []
    for c in chunks:
        want = math.ceil(c.units * frac)
        b = max(1, min(block, want))
        nblk = max(1, want // b)
        starts = np.unique(np.linspace(0, max(c.units - b, 0), nblk).astype(np.int64))
        try:
            for u in starts:
                u1 = min(int(u) + b, c.units)
                a, z = c.start + int(u) * c.unit_len, c.start + u1 * c.unit_len
                f = reader.fishers[task].read_flat(c.name, a, z) if task in reader.fishers else None
                s = compute_score(
                    reader.score,
                    reader.base.read_flat(c.name, a, z),
                    reader.probes[task].read_flat(c.name, a, z),
                    f,
                )
                k = unit_keys(s, c.unit_len)
                k = k[(k >= 0) & (k <= MAX_FINITE_KEY)]  # bad values are reported by the scan
                keys.append(k.numpy().copy())
                weights.append(np.full(k.numel(), c.unit_len, dtype=np.int64))
                del f, s, k
        finally:
            reader.release()
    if not keys:
        return np.empty(0, np.int32), np.empty(0, np.int64)
    return np.concatenate(keys), np.concatenate(weights)
