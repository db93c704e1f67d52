"""What each regions actor runs: one pass of the top-k protocol (`cpi_ray.regions.topk`) over
chunks of the base and every probe, as a Ray Data UDF.

Torch-free on purpose, like the fusion actors: an actor needs numpy only, so it starts without
importing torch and its resident memory is its block buffers. The driver parses the checkpoints
and hands over where each tensor's bytes are (`cpi_ray.io.raw.Source`); a chunk is read in
blocks of a few MiB with `pread` into reused buffers, each block of the base once for all tasks,
the next block prefetched while this one is scored, so an actor's memory does not grow with the
model.
"""

from __future__ import annotations

import pickle
import time
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from cpi_ray.io.raw import NP_DTYPES, Buffers, CheckpointError, RawFiles, Source, gather_as, read_as
from cpi_ray.regions.scores import compute_score
from cpi_ray.regions.topk import ChunkRun, ScanRequest, ScanResult, all_finite, keys_of, unit_keys

DEFAULT_BLOCK_ELEMS = 1 << 20  # 4 MiB of float32 scores per block: small temporaries, warm caches

Sources = Mapping[str, Source]  # tensor name -> where its bytes are, for one checkpoint


class ChunkReader:
    """Score blocks of chunks: the base, each task's probe and (for Fisher-based scores) its
    Fisher checkpoint, each given as the `Source` of every tensor."""

    def __init__(
        self,
        base: Sources,
        probes: Mapping[str, Sources],
        score: str = "delta",
        fishers: Optional[Mapping[str, Sources]] = None,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ):
        self.base = dict(base)
        self.probes = {t: dict(s) for t, s in probes.items()}
        self.fishers = {t: dict(s) for t, s in (fishers or {}).items()}
        self.score = score
        self.block_elems = int(block_elems)
        self.files = RawFiles(CheckpointError)
        self.bufs = Buffers()

    def close(self) -> None:
        self.files.close()

    def block_units(self, unit_len: int) -> int:
        return max(8, (self.block_elems // unit_len) // 8 * 8)

    def _sources(self, task: str, name: str) -> list[Source]:
        """[probe, fisher?] of a task's tensor."""
        out = [self.probes[task][name]]
        if task in self.fishers:
            out.append(self.fishers[task][name])
        return out

    def _read(self, key: str, src: Source, start: int, stop: int) -> np.ndarray:
        return read_as(self.files, self.bufs, key, src, start, stop, np.float32)

    def scores(
        self, task: str, name: str, start: int, stop: int, base: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Scores of elements [start, stop) of one tensor, in the reader's own buffer
        (overwritten by the next call)."""
        if base is None:
            base = self._read("base", self.base[name], start, stop)
        srcs = self._sources(task, name)
        probe = self._read("probe", srcs[0], start, stop)
        fisher = self._read("fisher", srcs[1], start, stop) if len(srcs) > 1 else None
        s = compute_score(
            self.score, base, probe, fisher, out=self.bufs.get("score", stop - start, np.float32)
        )
        if not all_finite(keys_of(s)):
            bad = int(np.flatnonzero(~np.isfinite(s) | np.signbit(s))[0]) + start
            files = [f"probe file {srcs[0].file}", f"base file {self.base[name].file}"]
            if len(srcs) > 1:
                files.append(f"Fisher file {srcs[1].file}")
            raise CheckpointError(
                f"task {task!r}: NaN or Inf {self.score} score in tensor {name!r} at flat "
                f"element {bad} ({', '.join(files)})"
            )
        return s

    def sample(
        self, task: str, name: str, start: int, stop: int, elems: np.ndarray, base: np.ndarray
    ) -> np.ndarray:
        """Scores of scattered elements `elems` of [start, stop), given the base's values there
        (`gather`): what the driver's sample reads."""
        srcs = self._sources(task, name)
        probe = gather_as(srcs[0], start, stop, elems, np.float32)
        fisher = gather_as(srcs[1], start, stop, elems, np.float32) if len(srcs) > 1 else None
        return compute_score(self.score, base, probe, fisher)

    def gather_base(self, name: str, start: int, stop: int, elems: np.ndarray) -> np.ndarray:
        return gather_as(self.base[name], start, stop, elems, np.float32)

    def _prefetch(self, tasks: Sequence[str], name: str, start: int, stop: int) -> None:
        # the kernel reads the next block while this one is scored (a cold cache reads the disk)
        for src in [self.base[name], *(s for t in tasks for s in self._sources(t, name))]:
            isz = NP_DTYPES[src.dtype].itemsize
            self.files.prefetch(src.file, src.offset + start * isz, (stop - start) * isz)

    def task_blocks(
        self, tasks: Sequence[str], name: str, start: int, stop: int, unit_len: int
    ) -> Iterator[tuple[str, np.ndarray]]:
        """(task, unit keys) of each block of elements [start, stop), every task's keys of a
        block before the next block, so that the base block is read once for all tasks. Keys
        are valid until the next item."""
        step = self.block_units(unit_len) * unit_len
        for a in range(start, stop, step):
            b = min(a + step, stop)
            if b < stop:
                self._prefetch(tasks, name, b, min(b + step, stop))
            base = self._read("base", self.base[name], a, b)
            for t in tasks:
                yield t, unit_keys(self.scores(t, name, a, b, base), unit_len)


class RegionsPass:
    """Ray Data UDF (`map_batches` with an actor pool): each input row names a run of consecutive
    chunks; for each chunk and each task with a request, the chunk's result, pickled into one
    small bytes value per output row (one row per chunk)."""

    def __init__(
        self,
        base: Sources,
        probes: Mapping[str, Sources],
        requests: Mapping[str, dict],
        caps: Mapping[str, int],
        chunks: Sequence[dict],
        score: str = "delta",
        fishers: Optional[Mapping[str, Sources]] = None,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ):
        self.reader = ChunkReader(base, probes, score, fishers, block_elems)
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
