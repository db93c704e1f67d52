"""Tensor bytes of safetensors files, read without a framework.

What the streaming actors (fusion, regions) run on: numpy only, so an actor starts without
importing torch and its resident memory is its buffers. Slices are read with `pread` into reused
buffers, never memory-mapped, so pages already processed never count against the process. The
driver, which parses the headers (`cpi_ray.io.safetensors_io`), hands each tensor's place over as
a `Source`.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

# safetensors dtype names -> numpy storage dtype (bfloat16 is stored as raw uint16 bits)
NP_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it claims to be; the message names file and tensor."""


@dataclass(frozen=True)
class Source:
    """Where one tensor's bytes are: file, absolute offset of its first byte, dtype name."""

    file: str
    offset: int
    dtype: str


def bf16_to_f32(raw: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    u = out.view(np.uint32)
    np.copyto(u, raw, casting="unsafe")
    u <<= 16
    return out


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, as torch rounds. Inputs are
    finite (callers reject NaN/Inf)."""
    u = x.view(np.uint32).astype(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype(np.uint16)


class RawFiles:
    """Open file descriptors, read with pread into caller-owned buffers. `error` is the
    exception class raised for a missing or truncated file (each stage reports its own)."""

    def __init__(self, error: type[Exception] = ValueError) -> None:
        self._fds: dict[str, int] = {}
        self.error = error

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise self.error(f"{path}: file is missing") from None
            self._fds[path] = fd
        return fd

    def pread_into(self, path: str, offset: int, buf: np.ndarray) -> None:
        mv = memoryview(buf).cast("B")
        fd = self.fd(path)
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise self.error(f"{path}: file ends before byte {offset + len(mv)} (truncated?)")
            done += n

    def prefetch(self, path: str, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading a byte range into the page cache, without waiting
        (a hint: a no-op where the platform has no posix_fadvise)."""
        if nbytes > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd(path), offset, nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Buffers:
    """Named scratch arrays, grown once and reused for every chunk of every tensor."""

    def __init__(self) -> None:
        self._b: dict[tuple[str, str], np.ndarray] = {}

    def get(self, key: str, n: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        k = (key, dtype.str)
        b = self._b.get(k)
        if b is None or b.shape[0] < n:
            b = np.empty(n, dtype=dtype)
            self._b[k] = b
        return b[:n]


def read_as(
    files: RawFiles, bufs: Buffers, key: str, src: Source, start: int, stop: int, dtype
) -> np.ndarray:
    """Elements [start, stop) of a float tensor as `dtype` (float32 or float64), in the buffer
    named `key` (valid until that buffer is next used)."""
    n = stop - start
    sdt, cdt = NP_DTYPES[src.dtype], np.dtype(dtype)
    off = src.offset + start * sdt.itemsize
    if sdt == cdt:
        out = bufs.get(key, n, cdt)
        files.pread_into(src.file, off, out)
        return out
    raw = bufs.get("raw", n, sdt)
    files.pread_into(src.file, off, raw)
    out = bufs.get(key, n, cdt)
    if src.dtype == "BF16":
        tmp = out if cdt == np.float32 else bufs.get("bf16tmp", n, np.float32)
        bf16_to_f32(raw, out=tmp)
        if tmp is not out:
            np.copyto(out, tmp)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


def gather_as(src: Source, start: int, stop: int, elems: np.ndarray, dtype) -> np.ndarray:
    """Scattered elements `elems` (indices into [start, stop)) of a float tensor as `dtype`:
    the file is mapped for the call, read at the pages touched only (no readahead around them,
    which on a cold cache would read most of the file), and unmapped again."""
    sdt = NP_DTYPES[src.dtype]
    with open(src.file, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if hasattr(mmap, "MADV_RANDOM"):
            m.madvise(mmap.MADV_RANDOM)
        view = np.frombuffer(m, dtype=sdt, count=stop - start, offset=src.offset + start * sdt.itemsize)
        raw = view[elems]
        del view
    finally:
        m.close()
    if src.dtype == "BF16":
        return bf16_to_f32(raw).astype(dtype, copy=False)
    return raw.astype(dtype, copy=False)
