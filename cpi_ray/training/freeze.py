"""Element-exact freezing under DeepSpeed ZeRO-3.

`requires_grad` is per tensor, so a frozen *set of elements* is enforced on each rank's own
partition: rank r owns flat elements [r·part, (r+1)·part) of every (padded) parameter and reads
only that slice of the mask and of the reference weights.

Two things per optimizer step:
- before it, the frozen elements' gradients are zeroed in the local gradient partition, so the
  gradient norm (clipping) and Adam's moments never see them;
- after it, their fp32 master values are written back, because AdamW's decoupled weight decay
  (and any momentum left from before) still moves an element whose gradient is zero. The working
  copy (bf16 partition, and the gathered full tensor of persistent small parameters) is written
  back too, since DeepSpeed copied the updated master into it during the step.

The reference values come from the checkpoint the stage started from, never from the engine, so a
stage resumed from a DeepSpeed checkpoint restores exactly the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from cpi_ray.io.masks import MaskFile
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.training.zero3 import local_range

# Imported where used: deepspeed (only after the worker has set DS_ACCELERATOR).

# Below this density a frozen set is kept as indices (8 B each), above it as a bool mask
# (1 B per element of the partition), whichever is smaller.
_INDEX_DENSITY = 1 / 8


@dataclass
class _Frozen:
    name: str
    param: torch.nn.Parameter
    sel: torch.Tensor  # int64 indices or bool mask over the local partition (padded size)
    values: torch.Tensor  # fp32 reference values of the selected elements, in `sel` order
    # Persistent (small, always gathered) parameters: the same over the full flat tensor.
    full_sel: Optional[torch.Tensor] = None
    full_values: Optional[torch.Tensor] = None
    direct_grad: Optional[bool] = None  # decided on first use (needs the initialized engine)
    direct_master: Optional[bool] = None


def _compact(mask: torch.Tensor) -> torch.Tensor:
    n = int(mask.sum())
    return mask.nonzero().squeeze(1) if n < _INDEX_DENSITY * mask.numel() else mask


class ElementFreezer:
    """Holds the local slice of a frozen set and enforces it around each optimizer step.

    `params` are the model's (name, ZeRO-3 parameter) pairs; `mask` is a mask file (or None for an
    empty set) keyed by checkpoint tensor names; `reference` is the checkpoint whose values the
    frozen elements must keep."""

    def __init__(
        self,
        params: list[tuple[str, torch.nn.Parameter]],
        mask: Optional[MaskFile],
        reference: CheckpointReader,
    ):
        self.entries: list[_Frozen] = []
        self.local_frozen = 0
        if mask is None:
            return
        for name, p in params:
            if name not in mask:
                continue
            if mask.numels[name] != p.ds_numel:
                raise ValueError(
                    f"{mask.path}: mask of {name!r} has {mask.numels[name]} elements,"
                    f" the parameter {p.ds_numel}"
                )
            if not p.requires_grad:
                continue  # nothing can move it
            start, stop, part = local_range(p)
            local = torch.zeros(part, dtype=torch.bool)
            local[: stop - start] = mask.flat(name, start, stop)
            ref = torch.zeros(part, dtype=torch.float32)
            ref[: stop - start] = reference.read_flat(name, start, stop)
            full = mask.flat(name) if getattr(p, "ds_persist", False) else None
            self._add(name, p, local, ref, full, lambda name=name: reference.read_flat(name))

    def __len__(self) -> int:
        return self.local_frozen

    @torch.no_grad()
    def hold(self, selection: list[tuple[str, torch.nn.Parameter, torch.Tensor]], gather) -> None:
        """Replace the frozen set by `selection`, (name, parameter, bool mask over this rank's
        valid elements of it), held from now on at their current fp32 master values (a set that
        changes during training, as Evolving Parameter Isolation's does). `gather` stacks every
        rank's tensor in rank order (`isolation.RankOps.gather`): the full mask and values of a
        persistent parameter are put together from all partitions. Collective."""
        from deepspeed.utils import safe_get_local_fp32_param

        self.entries, self.local_frozen = [], 0
        for name, p, valid_mask in selection:
            start, stop, part = local_range(p)
            local = torch.zeros(part, dtype=torch.bool, device=valid_mask.device)
            local[: stop - start] = valid_mask
            master = safe_get_local_fp32_param(p).detach().reshape(-1).float()
            full = values = None
            if getattr(p, "ds_persist", False):
                # Every rank takes part in the gathers, frozen elements or not.
                full = gather(local.to(torch.uint8)).reshape(-1)[: p.ds_numel].bool()
                values = gather(master).reshape(-1)[: p.ds_numel]
            self._add(name, p, local, master, full, lambda values=values: values)

    def _add(self, name: str, p, local: torch.Tensor, values: torch.Tensor, full, full_values) -> None:
        """Hold the elements of `local` (bool over this rank's padded partition of `p`) at
        `values` (fp32, the same length) and, for a persistent parameter, the elements of `full`
        (bool over the whole flat tensor, else None) at `full_values()`, read only if any is set."""
        dev = p.ds_tensor.device
        entry = None
        if local.any():
            sel = _compact(local)
            # Selected where the values are (an offloaded master stays on the host), then moved.
            entry = _Frozen(name, p, sel.to(dev), values[sel.to(values.device)].to(dev))
            self.local_frozen += int(local.sum())
        if full is not None and full.any():
            fsel = _compact(full)
            fvals = full_values().to(torch.float32)
            if entry is None:
                entry = _Frozen(name, p, torch.zeros(0, dtype=torch.long), torch.zeros(0))
            entry.full_sel, entry.full_values = fsel.to(dev), fvals[fsel.to(fvals.device)].to(dev)
        if entry is not None:
            self.entries.append(entry)

    def _direct(self, getter, p) -> bool:
        """Whether `getter(p)` returns a view of DeepSpeed's own storage (no offload copy, no NVMe
        swap): then frozen elements are written in place, O(frozen) instead of O(partition)."""
        opt = getattr(p, "_z3_optimizer", None)
        if opt is None or getattr(opt, "swap_optimizer", False):
            return False
        a, b = getter(p), getter(p)
        return a is not None and a.data_ptr() == b.data_ptr()

    @staticmethod
    def _put(flat: torch.Tensor, sel: torch.Tensor, values: Optional[torch.Tensor]) -> None:
        if sel.device != flat.device:  # e.g. GPU partitions, CPU-offloaded master
            sel = sel.to(flat.device)
            values = None if values is None else values.to(flat.device)
        if values is None:
            if sel.dtype == torch.bool:
                flat.masked_fill_(sel, 0)
            else:
                flat.index_fill_(0, sel, 0)
        elif sel.dtype == torch.bool:
            flat.masked_scatter_(sel, values.to(flat.dtype))
        else:
            flat.index_copy_(0, sel, values.to(flat.dtype))

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Call after the last backward of an accumulation window, before `engine.step()`."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for e in self.entries:
            if e.sel.numel() == 0:
                continue
            if e.direct_grad is None:
                e.direct_grad = self._direct(safe_get_local_grad, e.param)
            g = safe_get_local_grad(e.param)
            if g is None:
                continue
            if e.direct_grad:
                self._put(g.view(-1), e.sel, None)
            else:
                g = g.clone()
                self._put(g.view(-1), e.sel, None)
                safe_set_local_grad(e.param, g)

    @torch.no_grad()
    def restore(self) -> None:
        """Call right after `engine.step()` at an accumulation boundary (and after loading a
        checkpoint): writes the reference values back into master and working copies."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        for e in self.entries:
            p = e.param
            if e.sel.numel():
                if e.direct_master is None:
                    e.direct_master = self._direct(safe_get_local_fp32_param, p)
                master = safe_get_local_fp32_param(p)
                aliased = e.direct_master and master.data_ptr() == p.ds_tensor.data_ptr()
                if e.direct_master:
                    self._put(master.view(-1), e.sel, e.values)
                else:
                    master = master.clone()
                    self._put(master.view(-1), e.sel, e.values)
                    safe_set_local_fp32_param(p, master)
                if not aliased:
                    # The working partition is a separate (e.g. bf16) copy of the master.
                    self._put(p.ds_tensor.data.view(-1), e.sel, e.values)
            if e.full_sel is not None and p.ds_status == ZeroParamStatus.AVAILABLE:
                # A persistent parameter stays gathered across steps: DeepSpeed re-gathered it
                # from the updated partitions at the end of the step.
                self._put(p.data.view(-1), e.full_sel, e.full_values)

    def local_stats(self) -> dict[str, int]:
        return {"frozen_local": self.local_frozen, "tensors_local": len(self.entries)}


def check_freezable(ds_config: dict) -> None:
    """Element freezing needs ZeRO-3's local partition API and one partition per parameter."""
    zero = ds_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        raise ValueError(
            "element freezing needs DeepSpeed ZeRO stage 3 (consolidate.zero_stage: 3)"
            " when the frozen set is not empty"
        )
    if int(zero.get("zero_hpz_partition_size", 1)) > 1 or zero.get("mics_shard_size", -1) > 0:
        raise ValueError(
            "element freezing does not support ZeRO++ hpZ or MiCS partitioning "
            "(their secondary partitions would keep updated values)"
        )
