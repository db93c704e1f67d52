"""Bit-packed masks: 1 bit per parameter, `numpy.packbits` (big bit order) of the C-order
flattened mask, one uint8 tensor of ceil(numel/8) bytes per model tensor, stored in safetensors.

Region masks, the frozen sets of consolidation stages and anything else that marks elements of a
model share this format, and this module is its only reader and writer.
"""

from __future__ import annotations

import os
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
