"""Bit-packed masks: 1 bit per parameter, `numpy.packbits` (big bit order) of the C-order
flattened mask, one uint8 tensor of ceil(numel/8) bytes per model tensor, stored in safetensors.

Region masks, the frozen sets of consolidation stages and anything else that marks elements of a
model share this format, and this module is its only reader and writer.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from safetensors import safe_open

from cpi_ray.io.safetensors_io import CheckpointReader, write_shard


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape) -> uint8 tensor of ceil(numel/8) bytes."""
    flat = mask.reshape(-1).to(torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="big"))


def unpack_mask(packed: torch.Tensor, numel: int, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Elements [start, stop) of the flattened mask as a bool tensor, unpacking only the bytes
    that cover the range."""
    stop = numel if stop is None else stop
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"range [{start}, {stop}) outside a mask of {numel} elements")
    b0, b1 = start // 8, (stop + 7) // 8
    bits = np.unpackbits(packed[b0:b1].numpy(), bitorder="big")
    lo = start - 8 * b0
    return torch.from_numpy(bits[lo : lo + (stop - start)].astype(bool))


def popcount(packed: torch.Tensor) -> int:
    return int(np.unpackbits(packed.numpy()).sum(dtype=np.int64))


def write_mask_file(
    path: str | os.PathLike,
    packed: Mapping[str, torch.Tensor],
    numels: Mapping[str, int],
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write one mask file atomically. `numels` is kept in the metadata so that a reader knows
    how many bits of the last byte are padding."""
    for name, t in packed.items():
        if t.dtype != torch.uint8 or t.numel() != (numels[name] + 7) // 8:
            raise ValueError(f"mask for {name!r} is not {(numels[name] + 7) // 8} packed bytes")
    meta = {f"numel:{k}": str(numels[k]) for k in packed}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, dict(packed), metadata=meta)


class MaskWriter:
    """A mask file written in place, range by range, in any order: its layout (one packed tensor
    per name, in the order given) is fixed when it is opened, so that the bits of a large model
    never need to be held in memory together. The data goes to a temporary file beside `path`;
    `commit` writes the final metadata into space reserved in the header and renames the file
    into place, `abort` removes it."""

    _SLACK = 1024  # header room for metadata known only at commit (counts, thresholds)

    def __init__(
        self, path: str | os.PathLike, numels: Mapping[str, int], metadata: Optional[Mapping] = None
    ):
        self.path = Path(path)
        self.numels = dict(numels)
        self.offsets: dict[str, int] = {}
        off = 0
        for name, n in self.numels.items():
            self.offsets[name] = off
            off += (n + 7) // 8
        self._data_len = off
        self._meta = {"format": "pt", **{f"numel:{k}": str(v) for k, v in self.numels.items()}}
        self._meta.update({k: str(v) for k, v in (metadata or {}).items()})
        head = self._header(self._meta)
        self._head_len = (len(head) + self._SLACK + 7) // 8 * 8  # data 8-byte aligned, as safetensors pads
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, 8 + self._head_len + self._data_len)  # zeros, sparse until written
            self._write_header(self._meta)
        except BaseException:
            self.abort()
            raise

    def _header(self, meta: Mapping[str, str]) -> bytes:
        h: dict = {"__metadata__": dict(meta)}
        for name, n in self.numels.items():
            a = self.offsets[name]
            h[name] = {"dtype": "U8", "shape": [(n + 7) // 8], "data_offsets": [a, a + (n + 7) // 8]}
        return json.dumps(h, separators=(",", ":")).encode()

    def _write_header(self, meta: Mapping[str, str]) -> None:
        head = self._header(meta)
        if len(head) > self._head_len:
            raise ValueError(f"{self.path}: mask metadata too long for its header ({len(head)} bytes)")
        os.pwrite(self._fd, struct.pack("<Q", self._head_len) + head.ljust(self._head_len, b" "), 0)

    def _pos(self, name: str, byte_start: int, nbytes: int) -> int:
        size = (self.numels[name] + 7) // 8
        if not 0 <= byte_start <= byte_start + nbytes <= size:
            raise ValueError(f"bytes [{byte_start}, {byte_start + nbytes}) outside the mask of {name!r}")
        return 8 + self._head_len + self.offsets[name] + byte_start

    def write(self, name: str, byte_start: int, packed: np.ndarray) -> None:
        """Packed bytes of `name` from byte `byte_start` on (element 8 * byte_start)."""
        data = np.ascontiguousarray(packed, dtype=np.uint8)
        pos = self._pos(name, byte_start, data.size)
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n

    def read(self, name: str, byte_start: int, nbytes: int) -> np.ndarray:
        pos = self._pos(name, byte_start, nbytes)
        out = np.empty(nbytes, dtype=np.uint8)
        got = os.preadv(self._fd, [out], pos) if nbytes else 0
        if got != nbytes:
            raise OSError(f"{self.tmp}: short read")
        return out

    def commit(self, metadata: Optional[Mapping] = None) -> Path:
        meta = dict(self._meta)
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        try:
            self._write_header(meta)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


class MaskFile:
    """Read access to a mask file: per tensor, packed bytes or any unpacked element range."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = CheckpointReader(self.path)
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        self.numels = {k[len("numel:") :]: int(v) for k, v in meta.items() if k.startswith("numel:")}
        self.metadata = {k: v for k, v in meta.items() if not k.startswith("numel:")}

    def names(self) -> list[str]:
        return list(self.numels)

    def __contains__(self, name: str) -> bool:
        return name in self.numels

    def packed(self, name: str) -> torch.Tensor:
        return self._reader.read(name)

    def flat(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        return unpack_mask(self.packed(name), self.numels[name], start, stop)

    def count(self) -> int:
        return sum(popcount(self.packed(n)) for n in self.names())

    def close(self) -> None:
        self._reader.close()
