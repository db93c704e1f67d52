"""The Ray layer of the regions stage: a Ray Data UDF that runs one pass of the top-k protocol
(`cpi_ray.regions.topk`) over chunks of the base and every probe, and the driver helpers that
sample, run passes and collect their small results.

The UDF lives in this importable module (Ray Data actors must be able to import it) and opens
every checkpoint memory-mapped. It reads a chunk in blocks of a few MiB, each block of the base
once for all tasks, and unmaps the files after each block, so an actor's memory stays at a few
blocks whatever the model size.
"""

from __future__ import annotations

import math
import pickle
import time
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
    ChunkRun,
    ScanRequest,
    ScanResult,
    all_finite,
    keys_of,
    unit_keys,
)

DEFAULT_BLOCK_ELEMS = 1 << 20  # 4 MiB of float32 scores per block: small temporaries, warm caches
# Ray Data rows: a few per actor, so that per-row overhead is paid a few times per pass, not per
# chunk, while the last rows still balance the actors.
ROWS_PER_ACTOR = 4


class ChunkReader:
    """Score blocks of chunks, read from memory maps that are released after each block."""

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
        self._buf: Optional[torch.Tensor] = None  # one score block, reused for every task

    def release(self) -> None:
        # unmapping drops the pages from this process (they stay in the page cache)
        for r in (self.base, *self.probes.values(), *self.fishers.values()):
            r.close()

    def block_units(self, unit_len: int) -> int:
        return max(8, (self.block_elems // unit_len) // 8 * 8)

    def _out(self, n: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(max(n, self.block_elems), dtype=torch.float32)
        return self._buf[:n]

    def scores(
        self, task: str, name: str, start: int, stop: int, base: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Scores of elements [start, stop) of one tensor; the result may be the reader's own
        buffer, overwritten by the next call."""
        if base is None:
            base = self.base.read_flat(name, start, stop)
        probe = self.probes[task].read_flat(name, start, stop)
        fisher = self.fishers[task].read_flat(name, start, stop) if task in self.fishers else None
        s = compute_score(self.score, base, probe, fisher, out=self._out(stop - start))
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

    def _prefetch(self, tasks: Sequence[str], name: str, start: int, stop: int) -> None:
        # the kernel reads the next block while this one is scored (a cold cache reads the disk)
        for r in (
            self.base,
            *(self.probes[t] for t in tasks),
            *(self.fishers[t] for t in tasks if t in self.fishers),
        ):
            r.prefetch(name, start, stop)

    def task_blocks(
        self, tasks: Sequence[str], name: str, start: int, stop: int, unit_len: int
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(task, unit keys) of each block of elements [start, stop), every task's keys of a
        block before the next block, so that the base block is read once for all tasks. Keys
        are valid until the next item."""
        step = self.block_units(unit_len) * unit_len
        for a in range(start, stop, step):
            b = min(a + step, stop)
            if b < stop:
                self._prefetch(tasks, name, b, min(b + step, stop))
            try:
                base = self.base.read_flat(name, a, b)
                for t in tasks:
                    yield t, unit_keys(self.scores(t, name, a, b, base), unit_len)
                del base
            finally:
                self.release()

    def key_blocks(
        self, task: str, name: str, start: int, stop: int, unit_len: int
    ) -> Iterator[torch.Tensor]:
        for _, keys in self.task_blocks([task], name, start, stop, unit_len):
            yield keys


def group_chunks(chunks: Sequence[Chunk], num_actors: int) -> list[tuple[int, int]]:
    """Consecutive chunks in rows of about equal size, a few rows per actor: [first, last)
    positions in `chunks`."""
    total = sum(c.stop - c.start for c in chunks)
    target = max(1, math.ceil(total / max(1, num_actors * ROWS_PER_ACTOR)))
    rows, first, size = [], 0, 0
    for i, c in enumerate(chunks):
        size += c.stop - c.start
        if size >= target:
            rows.append((first, i + 1))
            first, size = i + 1, 0
    if first < len(chunks):
        rows.append((first, len(chunks)))
    return rows


class RegionsPass:
    """Ray Data UDF (`map_batches` with an actor pool): each input row names a run of consecutive
    chunks; for each chunk and each task with a request, the chunk's result, pickled into one
    small bytes value per output row (one row per chunk)."""

    def __init__(
        self,
        base_dir: str,
        probe_dirs: Mapping[str, str],
        requests: Mapping[str, dict],
        caps: Mapping[str, int],
        chunks: Sequence[dict],
        score: str = "delta",
        fisher_dirs: Optional[Mapping[str, str]] = None,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ):
        self.reader = ChunkReader(base_dir, probe_dirs, score, fisher_dirs, block_elems)
        self.requests = {t: ScanRequest(**r) for t, r in requests.items()}
        self.caps = dict(caps)
        self.chunks = list(chunks)

    def process(self, item: Mapping) -> dict:
        name, start, stop = str(item["name"]), int(item["start"]), int(item["stop"])
        unit_len, idx = int(item["unit_len"]), int(item["idx"])
        try:
            runs = {t: ChunkRun(req, self.caps[t], idx, unit_len) for t, req in self.requests.items()}
            for task, keys in self.reader.task_blocks(list(runs), name, start, stop, unit_len):
                runs[task].add(keys)
            out: dict[str, object] = {}
            for task, run in runs.items():
                r = run.result()
                if isinstance(r, ScanResult) and r.hist is not None:
                    nz = np.flatnonzero(r.hist)
                    r.hist = (nz.astype(np.int32), r.hist[nz])  # sparse on the wire
                out[task] = r
        except (CheckpointError, ValueError, KeyError, OSError) as e:
            return {"error": str(e)}  # reported by the driver as one clear error
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx, payloads, busy = [], [], []
        for first, last in zip(batch["first"], batch["last"]):
            for item in self.chunks[int(first) : int(last)]:
                t0 = time.perf_counter()
                idx.append(int(item["idx"]))
                payloads.append(pickle.dumps(self.process(item), protocol=pickle.HIGHEST_PROTOCOL))
                busy.append(time.perf_counter() - t0)
        return {
            "idx": np.asarray(idx, dtype=np.int64),
            "payload": np.array(payloads, dtype=object),
            "busy_s": np.asarray(busy, dtype=np.float64),  # time in the UDF, against the pass's wall time
        }


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
    timing: Optional[dict] = None,
) -> Iterator[tuple[int, dict]]:
    """One Ray Data pass over the chunks; yields (chunk idx, {task: result}) as rows stream in.
    Raises CheckpointError for a chunk whose data is bad. `timing`, when given, receives the
    seconds to the first result (actors starting) and the actors' summed seconds in the UDF."""
    t0 = time.perf_counter()
    rows = [{"first": a, "last": b} for a, b in group_chunks(chunks, num_actors)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(
        RegionsPass,
        fn_constructor_kwargs=dict(
            base_dir=str(base_dir),
            probe_dirs={t: str(d) for t, d in probe_dirs.items()},
            requests={t: asdict(r) for t, r in requests.items()},
            caps=dict(caps),
            chunks=[c.as_item() for c in chunks],
            score=score,
            fisher_dirs={t: str(d) for t, d in (fisher_dirs or {}).items()},
            block_elems=block_elems,
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=max(1, min(num_actors, len(rows)))),
        num_cpus=cpus_per_actor,
        **({"resources": dict(resources)} if resources else {}),
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
        if timing is not None:
            timing.setdefault("first_result_s", time.perf_counter() - t0)
            timing["udf_s"] = timing.get("udf_s", 0.0) + float(np.sum(batch["busy_s"]))
        for idx, payload in zip(batch["idx"], batch["payload"]):
            res = pickle.loads(payload)
            if "error" in res:
                raise CheckpointError(res["error"])
            yield int(idx), res


def _gather(r: CheckpointReader, c: Chunk, elems: torch.Tensor) -> torch.Tensor:
    return r.read_flat(c.name, c.start, c.stop)[elems]


def sample_keys(
    reader: ChunkReader,
    chunks: Sequence[Chunk],
    tasks: Sequence[str],
    target_units: int = 1 << 19,
    block: int = 64,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, a systematic sample of unit keys (and their weights) across all chunks: small
    blocks at evenly spaced positions, about `target_units` units in all, read by the driver.
    A chunk's sampled elements are gathered from each file in one indexing operation (the base's
    once for all tasks): per-block calls would cost far more than the reading."""
    total = sum(c.units for c in chunks)
    frac = min(1.0, target_units / max(total, 1))
    keys: dict[str, list] = {t: [] for t in tasks}
    weights: dict[str, list] = {t: [] for t in tasks}
    readers = [
        reader.base,
        *(reader.probes[t] for t in tasks),
        *(reader.fishers[t] for t in tasks if t in reader.fishers),
    ]
    for r in readers:
        r.random_access = True  # a cold cache reads the sampled pages, not the whole files
    try:
        for c in chunks:
            want = math.ceil(c.units * frac)
            b = max(1, min(block, want))
            nblk = max(1, want // b)
            starts = np.unique(np.linspace(0, max(c.units - b, 0), nblk).astype(np.int64))
            units = (starts[:, None] + np.arange(b)).reshape(-1)
            units = units[units < c.units]
            elems = torch.from_numpy((units[:, None] * c.unit_len + np.arange(c.unit_len)).reshape(-1))
            try:
                base = _gather(reader.base, c, elems)
                for t in tasks:
                    f = _gather(reader.fishers[t], c, elems) if t in reader.fishers else None
                    s = compute_score(reader.score, base, _gather(reader.probes[t], c, elems), f)
                    k = unit_keys(s, c.unit_len).numpy()
                    k = k[(k >= 0) & (k <= MAX_FINITE_KEY)]  # bad values are reported by the scan
                    keys[t].append(k)
                    weights[t].append(np.full(k.size, c.unit_len, dtype=np.int64))
            finally:
                reader.release()
    finally:
        for r in readers:
            r.random_access = False
    out = {}
    for t in tasks:
        if keys[t]:
            out[t] = (np.concatenate(keys[t]), np.concatenate(weights[t]))
        else:
            out[t] = (np.empty(0, np.int32), np.empty(0, np.int64))
    return out
