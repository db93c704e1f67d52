"""Merge and write one output shard, streaming: what each fusion actor runs.

Torch-free on purpose: an actor only needs numpy, so it starts fast and its resident memory is
its chunk buffers, not a framework. Inputs are read with `pread` into reused buffers (no memory
map, so pages already processed never count against the actor), and the shard is written
tensor by tensor behind a header computed up front, so memory does not grow with shard size.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cpi_ray.fusion import slerp as S
from cpi_ray.fusion import task_vectors as TV
from cpi_ray.io.raw import FLOAT_DTYPES, NP_DTYPES, Buffers, RawFiles, Source, f32_to_bf16, read_as
from cpi_ray.run.faults import kill_once


class FuseError(ValueError):
    """Bad fusion input; the message names the tensor and the file."""


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    numel: int
    out_dtype: str
    models: tuple[Source, ...]  # index 0: the base; 1..T: the task models in task order
    fold: tuple[int, ...]  # indices into `models` in fold order, the backbone first
    omegas: Optional[tuple[float, ...]]  # fold weights; None for the other methods
    weights: Optional[tuple[float, ...]]  # multislerp weights, aligned with `fold`; else None
    masks: tuple[Optional[Source], ...]  # per task: its packed mask bytes (U8), None = no core


@dataclass(frozen=True)
class ShardJob:
    filename: str
    tensors: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel * NP_DTYPES[t.out_dtype].itemsize for t in self.tensors)


@dataclass(frozen=True)
class FuseSettings:
    method: str = "fold"
    policy: str = "magnitude"
    scale: float = 1.0  # task_arithmetic, ties: the factor on the merged task vector
    density: float = 1.0  # ties: share of each task vector kept per tensor
    eps: float = S.DEFAULT_EPS
    ranks: tuple[int, ...] = ()  # per task, for policy `priority`: its group's position
    buffer_bytes: int = 64 * 2**20  # budget for one actor's chunk buffers
    chunk_elems: Optional[int] = None  # fixed chunk length (a multiple of BLOCK); tests only
    # Test hook: (shard file name, marker path): the actor dies (SIGKILL) in the middle of that
    # shard, once (the marker records that it happened).
    fault: Optional[tuple[str, str]] = None


def shard_header(job: ShardJob) -> bytes:
    """The safetensors header of a shard: tensors laid out back to back in job order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in job.tensors:
        n = t.numel * NP_DTYPES[t.out_dtype].itemsize
        header[t.name] = {"dtype": t.out_dtype, "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. VmHWM belongs to the current address space;
    ru_maxrss can carry a parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ShardFuser:
    """Fuses the tensors of one shard and writes it; one instance per actor, reused."""

    def __init__(self, settings: FuseSettings):
        self.s = settings
        self.files = RawFiles(FuseError)
        self.bufs = Buffers()

    def close(self) -> None:
        self.files.close()

    # ------------------------------------------------------------------ reading

    def _read(self, key: str, src: Source, start: int, stop: int, cdt: np.dtype) -> np.ndarray:
        """Elements [start, stop) of a float tensor as compute dtype `cdt`."""
        return read_as(self.files, self.bufs, key, src, start, stop, cdt)

    def _mask_bits(self, src: Source, numel: int) -> np.ndarray:
        """The whole packed mask of a tensor (numel/8 bytes: small next to the tensor)."""
        packed = np.empty((numel + 7) // 8, dtype=np.uint8)
        self.files.pread_into(src.file, src.offset, packed)
        return packed

    @staticmethod
    def _unpack(packed: np.ndarray, start: int, stop: int) -> np.ndarray:
        # The bit layout of cpi_ray.io.masks: numpy.packbits, big bit order, C order.
        # Chunks start on a multiple of BLOCK, hence on a byte boundary.
        bits = np.unpackbits(packed[start // 8 : (stop + 7) // 8], bitorder="big")
        return bits[: stop - start].view(bool)

    def _find_nonfinite(self, job: TensorJob, idx: int, cdt: np.dtype, chunk: int) -> None:
        src = job.models[idx]
        for a in range(0, job.numel, chunk):
            b = min(job.numel, a + chunk)
            self._check_finite(job, idx, self._read("scan", src, a, b, cdt), a)

    @staticmethod
    def _check_finite(job: TensorJob, idx: int, x: np.ndarray, start: int) -> None:
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.argmax(bad))
            raise FuseError(
                f"{job.models[idx].file}: tensor {job.name!r} has a non-finite value ({x[i]}) "
                f"at flat index {start + i}"
            )

    # ------------------------------------------------------------------ one tensor

    def _chunk_len(self, job: TensorJob) -> int:
        if self.s.chunk_elems:
            return max(S.BLOCK, self.s.chunk_elems // S.BLOCK * S.BLOCK)
        n_models = len(job.models)
        # per element: fold inputs (compute + float64 copy, or task deltas + keys), raw read, base,
        # out, tmp, masks
        per = 12 * n_models + 8 + 4 + 4 + 4 + 4 + 2 * len(job.masks) + 8
        return max(S.BLOCK, self.s.buffer_bytes // per // S.BLOCK * S.BLOCK)

    def _write_tensor(self, f, job: TensorJob) -> None:
        if job.out_dtype not in FLOAT_DTYPES:
            # integer/bool buffers are not merged: they are copied from the base
            raw = np.empty(job.numel, dtype=NP_DTYPES[job.out_dtype])
            self.files.pread_into(job.models[0].file, job.models[0].offset, raw)
            f.write(memoryview(raw).cast("B"))
            return
        cdt = np.dtype(np.float64 if job.out_dtype == "F64" else np.float32)
        packed = [None if m is None else self._mask_bits(m, job.numel) for m in job.masks]
        packed = [p if p is not None and p.any() else None for p in packed]
        if self.s.method in TV.METHODS:
            self._write_task_vectors(f, job, cdt, packed)
        else:
            self._write_spherical(f, job, cdt, packed)

    def _read_fold(self, job: TensorJob, a: int, b: int, cdt: np.dtype) -> list[np.ndarray]:
        return [self._read(f"x{k}", job.models[i], a, b, cdt) for k, i in enumerate(job.fold)]

    def _core_union(self, packed: list, a: int, b: int) -> tuple[Optional[list], Optional[np.ndarray]]:
        """Per task its core elements of [a, b) (None: no core), and their union (None: no cores)."""
        if all(p is None for p in packed):
            return None, None
        owned = [None if p is None else self._unpack(p, a, b) for p in packed]
        union = np.zeros(b - a, dtype=bool)
        for o in owned:
            if o is not None:
                union |= o
        return owned, union

    def _overwrite_cores(
        self,
        job: TensorJob,
        xs: list[np.ndarray],
        packed: list,
        a: int,
        b: int,
        cdt: np.dtype,
        out: np.ndarray,
    ) -> None:
        """Set the core elements of `out` (elements [a, b)) from the task models that own them."""
        owned, union = self._core_union(packed, a, b)
        if union is None or not union.any():
            return
        by_model = {i: xs[k] for k, i in enumerate(job.fold)}
        base = by_model.get(0)
        if base is None and self.s.policy != "mean":
            base = self._read("base", job.models[0], a, b, cdt)
            self._check_finite(job, 0, base, a)
        vals = [by_model[t + 1] for t in range(len(job.masks))]
        core, anyo = S.resolve_core(
            vals, owned, self.s.policy, base=base, ranks=self.s.ranks, out=self.bufs.get("core", b - a, cdt)
        )
        np.copyto(out, core, where=anyo)

    def _write_spherical(self, f, job: TensorJob, cdt: np.dtype, packed: list) -> None:
        n = job.numel
        chunk = self._chunk_len(job)
        nf = len(job.fold)

        # pass 1: Gram partials over the non-core elements, block by block
        nblocks = (n + S.BLOCK - 1) // S.BLOCK
        partials = np.empty((nblocks, nf * (nf + 1) // 2), dtype=np.float64)
        single = n <= chunk
        xs = None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            xs = self._read_fold(job, a, b, cdt)
            _, union = self._core_union(packed, a, b)
            x64 = []
            keep = None
            if union is not None and union.any():
                keep = self.bufs.get("keep", b - a, np.float64)
                np.logical_not(union, out=keep, casting="unsafe")
            for k, x in enumerate(xs):
                y = self.bufs.get(f"y{k}", b - a, np.float64)
                np.copyto(y, x)
                if keep is not None:
                    y *= keep  # NaN/Inf survive the 0 factor, so the check below sees them
                x64.append(y)
            partials[a // S.BLOCK : (b + S.BLOCK - 1) // S.BLOCK] = S.block_gram(x64)
        gram = S.gram_from_partials(partials, nf)
        if not np.all(np.isfinite(np.diag(gram))):
            for i in job.fold:
                self._find_nonfinite(job, i, cdt, chunk)
        if self.s.method == "multislerp":
            coeffs = S.multislerp_coefficients(gram, job.weights, self.s.eps)
        else:
            coeffs = S.fold_coefficients(gram, job.omegas, self.s.eps)

        # pass 2: apply the coefficients, overwrite the core elements, write
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            if not single:
                xs = self._read_fold(job, a, b, cdt)
            out = S.combine(
                xs, coeffs, out=self.bufs.get("out", b - a, cdt), tmp=self.bufs.get("tmp", b - a, cdt)
            )
            self._overwrite_cores(job, xs, packed, a, b, cdt, out)
            f.write(self._encode(out, job.out_dtype))

    def _write_task_vectors(self, f, job: TensorJob, cdt: np.dtype, packed: list) -> None:
        """task_arithmetic or ties; the fold is [base, task 1, ..., task n] (the plan checks)."""
        n = job.numel
        chunk = self._chunk_len(job)
        ntask = len(job.masks)
        trims = None
        if self.s.method == "ties" and self.s.density < 1:
            # two passes name each task's exact trim threshold over the non-core elements
            trims = [TV.TopKStream(self.s.density) for _ in range(ntask)]
            for top in (True, False):
                for a in range(0, n, chunk):
                    b = min(n, a + chunk)
                    xs = self._read_fold(job, a, b, cdt)
                    for k, x in enumerate(xs):
                        self._check_finite(job, job.fold[k], x, a)
                    for tr, keys in zip(trims, self._task_keys(xs, packed, a, b)):
                        if top:
                            tr.add_top(keys)
                        else:
                            tr.add_low(keys)
                for tr in trims:
                    if top:
                        tr.end_top()
                    else:
                        tr.end_low()
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            xs = self._read_fold(job, a, b, cdt)
            for k, x in enumerate(xs):
                self._check_finite(job, job.fold[k], x, a)
            out = self.bufs.get("out", b - a, cdt)
            if self.s.method == "task_arithmetic":
                TV.task_arithmetic(xs[0], xs[1:], self.s.scale, out=out, tmp=self.bufs.get("tmp", b - a, cdt))
            else:
                kept = None
                if trims is not None:
                    kept = [tr.select(keys) for tr, keys in zip(trims, self._task_keys(xs, packed, a, b))]
                deltas = [self.bufs.get(f"d{t}", b - a, cdt) for t in range(ntask)]
                TV.ties(xs[0], xs[1:], self.s.scale, kept=kept, out=out, deltas=deltas)
            self._overwrite_cores(job, xs, packed, a, b, cdt, out)
            f.write(self._encode(out, job.out_dtype))

    def _task_keys(self, xs: list[np.ndarray], packed: list, a: int, b: int) -> list[np.ndarray]:
        """Per task, the magnitude keys of its deltas in [a, b), -1 on core elements."""
        _, union = self._core_union(packed, a, b)
        decided = None if union is None else ~union
        return [
            TV.magnitude_keys(x, xs[0], decided, self.bufs.get(f"k{t}", b - a, np.int32))
            for t, x in enumerate(xs[1:])
        ]

    @staticmethod
    def _encode(x: np.ndarray, dtype: str) -> memoryview:
        if dtype == "BF16":
            return memoryview(f32_to_bf16(x)).cast("B")
        target = NP_DTYPES[dtype]
        if x.dtype != target:
            x = x.astype(target)
        return memoryview(x).cast("B")

    # ------------------------------------------------------------------ one shard

    def fuse_shard(self, job: ShardJob, out_dir: str) -> dict:
        t0 = time.perf_counter()
        final = Path(out_dir) / job.filename
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(shard_header(job))
                for i, t in enumerate(job.tensors):
                    self._write_tensor(f, t)
                    if i == 0 and self.s.fault and self.s.fault[0] == job.filename:
                        f.flush()
                        kill_once(self.s.fault[1])
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {
            "shard": job.filename,
            "bytes": final.stat().st_size,
            "tensors": len(job.tensors),
            "seconds": time.perf_counter() - t0,
            "peak_rss": peak_rss_bytes(),
        }
