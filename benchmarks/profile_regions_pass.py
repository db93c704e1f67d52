"""CPU-time breakdown of one regions pass, op by op, in one thread (no Ray): what each actor does
per block of 2^20 elements for every task, on checkpoints built by `bench_regions.py --keep`.

    python benchmarks/profile_regions_pass.py WORKDIR [NUM_CHUNKS]

Thread CPU time, not wall time, so that other load on the machine changes the figures little.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import numpy as np

from cpi_ray.io.raw import Buffers, RawFiles, read_as
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.regions.plan import plan_chunks, scored_tensors
from cpi_ray.regions.scores import compute_score
from cpi_ray.regions.topk import all_finite, histogram_chunk, keys_of

BLOCK = 1 << 20
LO, HI = 0x3A000000, 0x3B000000  # an interval around a 1% threshold of the benchmark's scores


def main(root: Path, nchunks: int) -> None:
    spent: collections.Counter = collections.Counter()
    base = CheckpointReader(root / "base")
    probes = [CheckpointReader(p) for p in sorted((root / "probes").iterdir())]
    chunks = plan_chunks(base, scored_tensors(base), 64 * 2**20)[:nchunks]
    files, bufs = RawFiles(), Buffers()
    out = np.empty(BLOCK, dtype=np.float32)
    nbytes = 0
    t0 = time.thread_time()

    def tick(what: str) -> None:
        nonlocal t0
        t = time.thread_time()
        spent[what] += t - t0
        t0 = t

    for c in chunks:
        for a in range(c.start, c.stop, BLOCK):
            b = min(a + BLOCK, c.stop)
            x = read_as(files, bufs, "base", base.source(c.name), a, b, np.float32)
            for p in probes:
                y = read_as(files, bufs, "probe", p.source(c.name), a, b, np.float32)
                s = compute_score("delta", x, y, out=out[: b - a])
                tick("read (pread into reused buffers) + |delta|")
                k = keys_of(s)
                assert all_finite(k)
                tick("finite check")
                above = k > HI
                if np.count_nonzero(above):
                    int(k[above].min())
                np.packbits(above, bitorder="big")
                tick("above the interval: compare, count, pack, min")
                inside = k >= LO
                np.logical_xor(inside, above, out=inside)
                np.count_nonzero(inside)
                k[np.flatnonzero(inside)]
                tick("candidates in the interval")
                histogram_chunk(k)
                tick("histogram")
                k.size - np.count_nonzero(k)
                tick("zero count")
            nbytes += 4 * (b - a) * (1 + len(probes))
    total = sum(spent.values())
    print(f"{nbytes / 1e9:.2f} GB of files, {total:.2f} s CPU, {nbytes / total / 1e6:.0f} MB/s per core")
    for what, v in spent.most_common():
        print(f"  {what:48s} {v:6.2f} s {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
