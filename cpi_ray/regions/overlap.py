"""Core overlap: |Ci ∩ Cj| and the Jaccard index Sij = |Ci ∩ Cj| / |Ci ∪ Cj|, from popcounts of
packed masks, streamed tensor by tensor and in byte ranges so that no whole mask set is held."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cpi_ray.io.masks import MaskFile


def _np(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def intersections(packed: Sequence) -> np.ndarray:
    """T x T matrix of popcount(a & b) over aligned packed byte arrays (diagonal: popcount)."""
    arrs = [_np(p) for p in packed]
    t = len(arrs)
    m = np.zeros((t, t), dtype=np.int64)
    for i in range(t):
        m[i, i] = int(np.bitwise_count(arrs[i]).sum(dtype=np.int64))
        for j in range(i + 1, t):
            m[i, j] = m[j, i] = int(np.bitwise_count(arrs[i] & arrs[j]).sum(dtype=np.int64))
    return m


def jaccard(inter: np.ndarray) -> np.ndarray:
    """Jaccard matrix from an intersection matrix whose diagonal holds the core sizes. Two empty
    cores share nothing: their S is 0 (and an empty core's self-overlap is 0 too)."""
    sizes = np.diag(inter).astype(np.int64)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return s


def mask_intersections(paths: Sequence, chunk_bytes: int = 64 * 2**20) -> tuple[np.ndarray, list[str]]:
    """Intersection matrix of mask files, reading each tensor's packed bytes in ranges of at most
    `chunk_bytes`. The files must cover the same tensors with the same sizes."""
    files = [MaskFile(p) for p in paths]
    try:
        names = files[0].names()
        for f in files[1:]:
            if sorted(f.names()) != sorted(names) or any(f.numels[n] != files[0].numels[n] for n in names):
                diff = sorted(set(f.names()) ^ set(names)) or [
                    n for n in names if f.numels.get(n) != files[0].numels[n]
                ]
                raise ValueError(
                    f"mask files {files[0].path} and {f.path} cover different tensors "
                    f"(first difference: {diff[0]!r})"
                )
        t = len(files)
        total = np.zeros((t, t), dtype=np.int64)
        for n in sorted(names):
            nbytes = (files[0].numels[n] + 7) // 8
            for a in range(0, nbytes, max(chunk_bytes, 1)):
                b = min(a + chunk_bytes, nbytes)
                total += intersections([f.packed(n)[a:b] for f in files])
            for f in files:
                f.close()  # unmap what was read (MaskFile reopens on demand)
        return total, sorted(names)
    finally:
        for f in files:
            f.close()
