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
    omegas: Optional[tuple[float, ...]]  # fold weights; None for multislerp
    weights: Optional[tuple[float, ...]]  # multislerp weights, aligned with `fold`
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
            x = self._read("scan", src, a, b, cdt)
            bad = ~np.isfinite(x)
            if bad.any():
                i = a + int(np.argmax(bad))
                raise FuseError(
                    f"{src.file}: tensor {job.name!r} has a non-finite value ({x[i - a]}) at flat index {i}"
                )

    # ------------------------------------------------------------------ one tensor

    def _chunk_len(self, job: TensorJob) -> int:
        if self.s.chunk_elems:
            return max(S.BLOCK, self.s.chunk_elems // S.BLOCK * S.BLOCK)
        n_models = len(job.models)
        # per element: fold inputs (compute + float64 copy), raw read, base, out, tmp, masks
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
        n = job.numel
        chunk = self._chunk_len(job)
        fold = list(job.fold)
        nf = len(fold)
        ntask = len(job.masks)
        packed = [None if m is None else self._mask_bits(m, n) for m in job.masks]
        packed = [p if p is not None and p.any() else None for p in packed]
        has_core = any(p is not None for p in packed)
        needs_base = has_core and self.s.policy != "mean" and 0 not in fold

        def read_fold(a: int, b: int) -> list[np.ndarray]:
            return [self._read(f"x{k}", job.models[i], a, b, cdt) for k, i in enumerate(fold)]

        def core_union(a: int, b: int) -> tuple[Optional[list], Optional[np.ndarray]]:
            if not has_core:
                return None, None
            owned = [None if p is None else self._unpack(p, a, b) for p in packed]
            union = np.zeros(b - a, dtype=bool)
            for o in owned:
                if o is not None:
                    union |= o
            return owned, union

        # pass 1: Gram partials over the non-core elements, block by block
        nblocks = (n + S.BLOCK - 1) // S.BLOCK
        partials = np.empty((nblocks, nf * (nf + 1) // 2), dtype=np.float64)
        single = n <= chunk
        xs = None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            xs = read_fold(a, b)
            _, union = core_union(a, b)
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
            for i in fold:
                self._find_nonfinite(job, i, cdt, chunk)
        if self.s.method == "multislerp":
            coeffs = S.multislerp_coefficients(gram, job.weights, self.s.eps)
        else:
            coeffs = S.fold_coefficients(gram, job.omegas, self.s.eps)

        # pass 2: apply the coefficients, overwrite the core elements, write
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            if not single:
                xs = read_fold(a, b)
            out = S.combine(
                xs, coeffs, out=self.bufs.get("out", b - a, cdt), tmp=self.bufs.get("tmp", b - a, cdt)
            )
            owned, union = core_union(a, b)
            if union is not None and union.any():
                by_model = {i: xs[k] for k, i in enumerate(fold)}
                base = by_model.get(0)
                if needs_base:
                    base = self._read("base", job.models[0], a, b, cdt)
                    bad = ~np.isfinite(base)
                    if bad.any():
                        i = a + int(np.argmax(bad))
                        raise FuseError(
                            f"{job.models[0].file}: tensor {job.name!r} has a "
                            f"non-finite value ({base[i - a]}) at flat index {i}"
                        )
                vals = [by_model[t + 1] for t in range(ntask)]
                core, anyo = S.resolve_core(
                    vals,
                    owned,
                    self.s.policy,
                    base=base,
                    ranks=self.s.ranks,
                    out=self.bufs.get("core", b - a, cdt),
                )
                np.copyto(out, core, where=anyo)
            f.write(self._encode(out, job.out_dtype))

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
