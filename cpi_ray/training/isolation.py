"""The math of Evolving Parameter Isolation on sharded tensors: per-element importance, its moving
average, per-tensor normalisation and an exact global top-k over every rank's partitions.

Pure functions on tensors. The collectives are passed in (`RankOps`), so the same code runs on one
process and on the ranks of a ZeRO-3 job (torch.distributed).
A "partition" is a rank's flat slice of one tensor: rank r holds elements [r·part, (r+1)·part)
of the flattened tensor, as ZeRO-3 splits parameters, so ordering by (tensor, rank, local index)
is ordering by (tensor, flat index): the selection does not depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

_HALF_BITS = 16
_BINS = 1 << _HALF_BITS


@dataclass(frozen=True)
class RankOps:
    """This rank's place and the two collectives the selection needs: `sum` (all-reduce) and
    `gather` (every rank's tensor stacked along a new first dimension, in rank order)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "RankOps":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)


def importance(grad: torch.Tensor, weight: Optional[torch.Tensor], score: str) -> torch.Tensor:
    """Per-element importance of one step's gradient, in fp32: `fisher` g² (the empirical Fisher
    diagonal of that batch; `weight` unused), `taylor` |g·w| (the first-order change of the loss
    if the element were zeroed). Non-finite values count as 0."""
    g = grad.float()
    x = g.square() if score == "fisher" else (g * weight.float()).abs()
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def ema_update(ema: torch.Tensor, x: torch.Tensor, beta: float) -> None:
    """ema ← β·ema + (1 − β)·x, in place. Started at zero and never bias-corrected: the
    per-tensor normalisation divides every tensor by the same correction factor."""
    ema.mul_(beta).add_(x, alpha=1.0 - beta)


def layer_scales(local: Sequence[torch.Tensor], numels: Sequence[int], ops: RankOps) -> list[float]:
    """Per tensor, the factor that divides it by its mean over all ranks (0 for a tensor whose
    values are all zero), so that tensors of different gradient scale compete on equal terms.
    `local[i]`: this rank's valid elements of tensor i; `numels[i]`: the tensor's total size."""
    if not local:
        return []
    sums = ops.sum(torch.stack([t.sum(dtype=torch.float64) for t in local]))
    return [n / s if s > 0 else 0.0 for s, n in zip(sums.tolist(), numels)]


def sortable_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the non-negative fp32 values `x` (their bit patterns)."""
    return x.float().abs().contiguous().view(torch.int32).to(torch.int64)


def topk_masks(
    local: Sequence[torch.Tensor], k: int, ops: RankOps, scales: Optional[Sequence[float]] = None
) -> list[torch.Tensor]:
    """Bool masks over `local` (this rank's valid elements of each tensor, non-negative, each
    multiplied by its `scales` entry) selecting exactly the k largest values of all ranks'
    elements together; ties at the threshold go to the first elements in (tensor, flat index)
    order. Two histogram passes of 16 bits over the fp32 bit patterns find the k-th value
    exactly; the keys are made one tensor at a time, so the extra memory is one tensor's."""
    scales = [1.0] * len(local) if scales is None else scales

    def keys(i: int) -> torch.Tensor:
        return sortable_keys(local[i] * scales[i])

    device = local[0].device if local else torch.device("cpu")
    hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for i in range(len(local)):
        hist += torch.bincount(keys(i) >> _HALF_BITS, minlength=_BINS)
    hist = ops.sum(hist)
    total = int(hist.sum())
    if k <= 0 or k >= total:
        return [torch.full_like(t, k > 0, dtype=torch.bool) for t in local]
    hi, need = _bin_of_kth(hist, k)
    low_hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for i in range(len(local)):
        key = keys(i)
        low_hist += torch.bincount(key[(key >> _HALF_BITS) == hi] & (_BINS - 1), minlength=_BINS)
    low_hist = ops.sum(low_hist)
    lo, need = _bin_of_kth(low_hist, need)
    threshold = (hi << _HALF_BITS) | lo
    # `need` elements equal to the threshold, taken in (tensor, rank, local index) order.
    masks, ties = [], []
    for i in range(len(local)):
        key = keys(i)
        masks.append(key > threshold)
        ties.append((key == threshold).sum())
    order = ops.gather(torch.stack(ties) if ties else hist[:0]).t().reshape(-1).cpu()
    before = torch.cumsum(order, 0) - order
    for i, mask in enumerate(masks):
        j = i * ops.world + ops.rank
        take = max(0, min(int(order[j]), need - int(before[j])))
        if take:
            idx = (keys(i) == threshold).nonzero().squeeze(1)[:take]
            mask[idx] = True
    return masks


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element of a histogram, and how many elements of that
    bin the top k take (k minus the elements in higher bins)."""
    from_top = torch.cumsum(hist.flip(0), 0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
    b = hist.numel() - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0
    return b, k - above
