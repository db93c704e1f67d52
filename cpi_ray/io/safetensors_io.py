"""Sharded safetensors checkpoints, read lazily and written atomically.

The reader parses each shard's header itself so that any flat element range of any tensor can be
read from a memory map without loading the tensor (or the shard) whole: the regions and fusion
stages stream chunks of at most a few MiB whatever the model size. The writer produces the layout
Hugging Face expects (`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch
from safetensors.torch import save_file

from cpi_ray.io.atomic import atomic_dir, atomic_file
from cpi_ray.io.raw import CheckpointError, Source

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offset: int  # absolute byte offset of the tensor's first byte in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def read_header(file: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, byte offset of the data section) of one safetensors file."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file}: corrupt safetensors header (length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: shard file is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for s in shape:
            numel *= s
        if b - a != numel * DTYPES[dtype].itemsize or not 0 <= a <= b:
            raise CheckpointError(f"{file}: tensor {name!r} has inconsistent byte offsets")
        if b > data_len:
            raise CheckpointError(f"{file}: truncated shard: tensor {name!r} ends at byte {b} of {data_len}")
    return header, data_start


class CheckpointReader:
    """Lazy view of a (possibly sharded) safetensors checkpoint directory or single file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        # scattered small reads: maps opened while set read only the pages touched, without the
        # kernel's readahead around each (which on a cold cache would read most of the file)
        self.random_access = False
        files = self._shard_files()
        for file in files:
            header, start = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                a, b = meta["data_offsets"]
                self.tensors[name] = TensorInfo(
                    name, file, DTYPES[meta["dtype"]], tuple(meta["shape"]), start + a, b - a
                )
        if self._index is not None:
            missing = [n for n in self._index if n not in self.tensors]
            if missing:
                raise CheckpointError(
                    f"{self.path / INDEX_NAME}: names tensors not found in their shards: {missing[:5]}"
                )

    def _shard_files(self) -> list[Path]:
        self._index: Optional[dict[str, str]] = None
        if self.path.is_file():
            return [self.path]
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            self._index = weight_map
            files = sorted(set(weight_map.values()))
            for f in files:
                if Path(f).name != f:
                    raise CheckpointError(f"{index}: shard name {f!r} is not a plain file name")
                if not (self.path / f).is_file():
                    raise CheckpointError(f"{index}: names shard {f!r}, which is missing")
            return [self.path / f for f in files]
        single = self.path / SINGLE_NAME
        if single.is_file():
            return [single]
        if self.path.is_dir() and any(self.path.glob("*.bin")):
            raise CheckpointError(
                f"{self.path}: only pickle (.bin) weights found; convert them to safetensors"
            )
        raise CheckpointError(f"{self.path}: no safetensors checkpoint found")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing") from None

    def source(self, name: str) -> Source:
        """Where the tensor's bytes are, for readers without torch (`cpi_ray.io.raw`)."""
        info = self.info(name)
        return Source(str(info.file), info.data_offset, DTYPE_NAMES[info.dtype])

    def _map(self, file: Path) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            with open(file, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if self.random_access and hasattr(mmap, "MADV_RANDOM"):
                m.madvise(mmap.MADV_RANDOM)
            self._maps[file] = m
        return m

    def read_flat(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Elements [start, stop) of the C-order flattened tensor, as a read-only view of the map.

        The result aliases the memory map: callers that keep it past the reader's life, or write
        to it, must `.clone()` it.
        """
        info = self.info(name)
        stop = info.numel if stop is None else stop
        if not 0 <= start <= stop <= info.numel:
            raise ValueError(f"range [{start}, {stop}) outside {name!r} of {info.numel} elements")
        if start == stop:
            return torch.empty(0, dtype=info.dtype)
        isz = info.itemsize
        buf = memoryview(self._map(info.file))[info.data_offset + start * isz : info.data_offset + stop * isz]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
            return torch.frombuffer(buf, dtype=info.dtype)

    def prefetch(self, name: str, start: int = 0, stop: Optional[int] = None) -> None:
        """Ask the kernel to start reading elements [start, stop) into the page cache, without
        waiting (a hint: a no-op where the platform has no posix_fadvise)."""
        info = self.info(name)
        stop = info.numel if stop is None else stop
        if not hasattr(os, "posix_fadvise") or stop <= start:
            return
        fd = os.open(info.file, os.O_RDONLY)
        try:
            isz = info.itemsize
            os.posix_fadvise(fd, info.data_offset + start * isz, (stop - start) * isz, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_flat(name).view(info.shape)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the map goes when it does
        self._maps.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- writing


def shard_filename(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a tensor larger
    than that gets a shard of its own), the way `save_pretrained` does."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards if shards[0] else []


def write_shard(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict[str, str]] = None
) -> None:
    """Write one safetensors file atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"format": "pt", **(metadata or {})},
        )
        os.chmod(tmp, 0o644)  # readable by the other users of a shared cluster volume
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_index(out_dir: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> None:
    with atomic_file(Path(out_dir) / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}, f, indent=2)
        f.write("\n")


def save_sharded(
    state: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    max_shard_size: int,
) -> dict[str, str]:
    """Write tensors as HF sharded safetensors into an existing directory; returns the weight
    map. Tensors are consumed in order and each shard is written as soon as it is full, so an
    iterator keeps at most one shard in memory."""
    out_dir = Path(out_dir)
    items = state.items() if isinstance(state, Mapping) else state
    pending: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        part = out_dir / f"part-{len(written):05d}.safetensors"
        write_shard(part, pending[-1])
        written.append(part)
        pending[-1] = {}

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if pending[-1] and used + nbytes > max_shard_size:
            flush()
            used = 0
        pending[-1][name] = t.detach().cpu()
        used += nbytes
        total += nbytes
    if pending[-1] or not written:
        flush()
    n = len(written)
    for i, part in enumerate(written):
        final = shard_filename(i, n)
        for name in _names_in(part):
            weight_map[name] = final
        os.replace(part, out_dir / final)
    write_index(out_dir, weight_map, total)
    return weight_map


def _names_in(file: Path) -> list[str]:
    header, _ = read_header(file)
    return [k for k in header if k != "__metadata__"]


def save_model_dir(
    state: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    max_shard_size: int,
    extra_files: Optional[Mapping[str, str | bytes]] = None,
    copy_from: Optional[str | os.PathLike] = None,
) -> Path:
    """Atomically create an HF model directory: weights, plus non-weight files (config,
    tokenizer...) copied from `copy_from` and/or given in `extra_files` (name -> content)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_sharded(state, tmp, max_shard_size)
        if copy_from is not None:
            copy_model_side_files(copy_from, tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return out_dir


# `.py`: a model of `trust_remote_code` needs its modeling/tokenization code beside its weights.
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")


def copy_model_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy config, generation config, tokenizer and model code files, never weights or
    indexes."""
    src, dst = Path(src), Path(dst)
    for p in src.iterdir():
        if (
            p.is_file()
            and p.suffix in SIDE_FILE_SUFFIXES
            and p.name != INDEX_NAME
            and p.name != "stage.json"
            and not p.name.startswith(".")
        ):
            shutil.copy2(p, dst / p.name)
