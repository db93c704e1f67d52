"""The driver side of the regions stage's Ray layer: where the checkpoints' tensors are, the
driver's sample, and one Ray Data pass of `cpi_ray.regions.worker.RegionsPass` over the chunks,
its small results collected as they stream in.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import asdict
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import ray.data
from ray.data import ActorPoolStrategy

from cpi_ray.io.safetensors_io import CheckpointError, CheckpointReader
from cpi_ray.regions.plan import Chunk
from cpi_ray.regions.topk import MAX_FINITE_KEY, ScanRequest, unit_keys
from cpi_ray.regions.worker import ChunkReader, RegionsPass, Sources

# Ray Data rows: a few per actor, so that per-row overhead is paid a few times per pass, not per
# chunk, while the last rows still balance the actors.
ROWS_PER_ACTOR = 4
# An actor holds a row's results (one bit per element and task, pickled, then copied into the
# object store) until the row is done: rows of at most this many elements keep that to a few MiB
# per task whatever the model size.
MAX_ROW_ELEMS = 1 << 25


def checkpoint_sources(
    base: CheckpointReader,
    probes: Mapping[str, CheckpointReader],
    fishers: Mapping[str, CheckpointReader],
    names: Sequence[str],
) -> tuple[Sources, dict[str, Sources], dict[str, Sources]]:
    """Where each scored tensor's bytes are in the base, the probes and the Fisher checkpoints:
    what the torch-free readers (`ChunkReader`) are given."""

    def table(r: CheckpointReader) -> Sources:
        return {n: r.source(n) for n in names}

    return table(base), {t: table(r) for t, r in probes.items()}, {t: table(r) for t, r in fishers.items()}


def group_chunks(
    chunks: Sequence[Chunk], num_actors: int, max_elems: int = MAX_ROW_ELEMS
) -> list[tuple[int, int]]:
    """Consecutive chunks in rows of about equal size, a few rows per actor, and a row past
    `max_elems` elements only when one chunk is: [first, last) positions in `chunks`."""
    total = sum(c.stop - c.start for c in chunks)
    target = max(1, math.ceil(total / max(1, num_actors * ROWS_PER_ACTOR)))
    rows, first, size = [], 0, 0
    for i, c in enumerate(chunks):
        n = c.stop - c.start
        if size and size + n > max_elems:
            rows.append((first, i))
            first, size = i, 0
        size += n
        if size >= target:
            rows.append((first, i + 1))
            first, size = i + 1, 0
    if first < len(chunks):
        rows.append((first, len(chunks)))
    return rows


def run_pass(
    chunks: Sequence[Chunk],
    reader: ChunkReader,
    requests: Mapping[str, ScanRequest],
    caps: Mapping[str, int],
    num_actors: int,
    cpus_per_actor: float = 1.0,
    resources: Optional[Mapping[str, float]] = None,
    timing: Optional[dict] = None,
) -> Iterator[tuple[int, dict]]:
    """One Ray Data pass over the chunks, each actor reading what `reader` reads; yields (chunk
    idx, {task: result}) as rows stream in. Raises CheckpointError for a chunk whose data is
    bad. `timing`, when given, receives the seconds to the first result (actors starting) and
    the actors' summed seconds in the UDF."""
    t0 = time.perf_counter()
    rows = [{"first": a, "last": b} for a, b in group_chunks(chunks, num_actors)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(
        RegionsPass,
        fn_constructor_kwargs=dict(
            base=reader.base,
            probes={t: reader.probes[t] for t in requests},
            requests={t: asdict(r) for t, r in requests.items()},
            caps=dict(caps),
            chunks=[c.as_item() for c in chunks],
            score=reader.score,
            fishers={t: reader.fishers[t] for t in requests if t in reader.fishers},
            block_elems=reader.block_elems,
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
    for c in chunks:
        want = math.ceil(c.units * frac)
        b = max(1, min(block, want))
        nblk = max(1, want // b)
        starts = np.unique(np.linspace(0, max(c.units - b, 0), nblk).astype(np.int64))
        units = (starts[:, None] + np.arange(b)).reshape(-1)
        units = units[units < c.units]
        elems = (units[:, None] * c.unit_len + np.arange(c.unit_len)).reshape(-1)
        base = reader.gather_base(c.name, c.start, c.stop, elems)
        for t in tasks:
            k = unit_keys(reader.sample(t, c.name, c.start, c.stop, elems, base), c.unit_len)
            k = k[(k >= 0) & (k <= MAX_FINITE_KEY)]  # bad values are reported by the scan
            keys[t].append(k)
            weights[t].append(np.full(k.size, c.unit_len, dtype=np.int64))
    out = {}
    for t in tasks:
        if keys[t]:
            out[t] = (np.concatenate(keys[t]), np.concatenate(weights[t]))
        else:
            out[t] = (np.empty(0, np.int32), np.empty(0, np.int64))
    return out
