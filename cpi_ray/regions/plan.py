"""The work plan of the regions stage: which tensors are scored, in which global order, and the
chunks (file, tensor, element range) that the Ray Data passes stream.

The global flat order, used for the top-k tie-break, is the concatenation of the scored tensors
in sorted name order, each C-order flattened. It depends on neither the sharding nor the chunk
size, so a mask is the same whichever way the checkpoint was saved or read.

A *unit* is what the top-k ranks: one element (granularity `element`) or one row, i.e. one slice
along dim 0 (granularity `row`; a 1-d tensor has rows of one element). Chunks hold whole units,
and a multiple of 8 of them unless at the end of a tensor, so that each chunk's packed mask bytes
land on byte boundaries of the tensor's packed mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cpi_ray.io.safetensors_io import CheckpointError, CheckpointReader

# torch floating dtypes the scorer understands (everything it casts to fp32 without loss of order)
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class ScoredTensor:
    name: str
    shape: tuple[int, ...]
    numel: int
    unit_len: int  # elements per unit (1 for element granularity)
    unit_offset: int  # global index of the tensor's first unit
    elem_offset: int  # global index of the tensor's first element

    @property
    def units(self) -> int:
        return self.numel // self.unit_len


@dataclass(frozen=True)
class Chunk:
    idx: int  # position in the plan (= global order)
    name: str
    file: str  # the base shard holding the tensor (probes resolve their own shard by name)
    start: int  # element range [start, stop) of the flattened tensor
    stop: int
    unit_len: int
    unit_offset: int  # global index of the chunk's first unit

    @property
    def units(self) -> int:
        return (self.stop - self.start) // self.unit_len

    def as_item(self) -> dict:
        return {
            "idx": self.idx,
            "name": self.name,
            "file": self.file,
            "start": self.start,
            "stop": self.stop,
            "unit_len": self.unit_len,
            "unit_offset": self.unit_offset,
        }


def is_float(dtype) -> bool:
    return str(dtype).replace("torch.", "") in _FLOAT_NAMES


def select_tensors(
    names: Iterable[str], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[str]:
    """Sorted names kept by the filters: kept when some include pattern matches (or there are
    none) and no exclude pattern does. Patterns are regexes searched anywhere in the name."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    out = []
    for n in names:
        if inc and not any(p.search(n) for p in inc):
            continue
        if any(p.search(n) for p in exc):
            continue
        out.append(n)
    return sorted(out)


def scored_tensors(
    base: CheckpointReader,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    granularity: str = "element",
) -> list[ScoredTensor]:
    """The floating-point tensors of the base that pass the filters, in global order."""
    if granularity not in ("element", "row"):
        raise ValueError(f"granularity must be 'element' or 'row', not {granularity!r}")
    floats = [n for n, t in base.tensors.items() if is_float(t.dtype)]
    names = select_tensors(floats, include, exclude)
    if not names:
        raise CheckpointError(
            f"{base.path}: no floating-point tensor left to score after the include/exclude "
            f"filters (include={list(include)}, exclude={list(exclude)})"
        )
    out: list[ScoredTensor] = []
    u = e = 0
    for n in names:
        info = base.tensors[n]
        numel = info.numel
        unit_len = 1
        if granularity == "row" and len(info.shape) >= 2 and info.shape[0] > 0:
            unit_len = numel // info.shape[0]
        unit_len = max(unit_len, 1)
        out.append(ScoredTensor(n, tuple(info.shape), numel, unit_len, u, e))
        u += numel // unit_len if numel else 0
        e += numel
    return out


def plan_chunks(base: CheckpointReader, tensors: Sequence[ScoredTensor], chunk_bytes: int) -> list[Chunk]:
    """Split every scored tensor into chunks of at most `chunk_bytes` of base data (never less
    than 8 units, so a single huge row still makes progress)."""
    chunks: list[Chunk] = []
    for t in tensors:
        if t.numel == 0:
            continue
        info = base.tensors[t.name]
        per_chunk = max(chunk_bytes // max(info.itemsize, 1), 1)
        units_per_chunk = max((per_chunk // t.unit_len) // 8 * 8, 8)
        for u0 in range(0, t.units, units_per_chunk):
            u1 = min(u0 + units_per_chunk, t.units)
            chunks.append(
                Chunk(
                    len(chunks),
                    t.name,
                    Path(info.file).name,
                    u0 * t.unit_len,
                    u1 * t.unit_len,
                    t.unit_len,
                    t.unit_offset + u0,
                )
            )
    return chunks


def check_compatible(
    base: CheckpointReader, other: CheckpointReader, names: Iterable[str], label: str
) -> None:
    """Raise CheckpointError naming tensor and file when `other` (a probe or score checkpoint)
    does not have the base's tensors with the same shapes and dtypes."""
    for n in names:
        b = base.tensors[n]
        o = other.tensors.get(n)
        if o is None:
            raise CheckpointError(
                f"{label} {other.path}: tensor {n!r} (in base file {b.file.name}) is missing"
            )
        if tuple(o.shape) != tuple(b.shape):
            raise CheckpointError(
                f"{label} {o.file}: tensor {n!r} has shape {list(o.shape)}, "
                f"the base ({b.file.name}) has {list(b.shape)}"
            )
        if o.dtype != b.dtype:
            raise CheckpointError(
                f"{label} {o.file}: tensor {n!r} has dtype {o.dtype}, the base ({b.file.name}) has {b.dtype}"
            )
    extra = sorted(set(other.tensors) - set(base.tensors))
    if extra:
        o = other.tensors[extra[0]]
        raise CheckpointError(
            f"{label} {o.file}: tensor {extra[0]!r} is not in the base"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
