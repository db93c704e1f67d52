"""Evolving Parameter Isolation (EPI, arXiv 2604.14010) on the SFT engine: every `epi.interval`
optimizer steps each rank folds the step's per-element importance of its own ZeRO-3 partition into
a moving average, the averages are normalised per tensor, and the frozen set becomes the exact
top `epi.ratio` percent of the whole model (`isolation.topk_masks`, across ranks): elements that
leave the set train again, elements that enter it are held from that step on at the values they
have (`ElementFreezer.hold`).

The statistics live in the partition: fp32 average plus a bool mask per element a rank owns,
5 bytes x P / ranks. A DeepSpeed checkpoint of the job carries them (one safetensors file per
rank), so a resumed job continues with the same averages and the same frozen set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cpi_ray.config.schema import EpiConfig
from cpi_ray.training.freeze import ElementFreezer
from cpi_ray.training.isolation import RankOps, ema_update, importance, layer_scales, topk_masks
from cpi_ray.training.zero3 import local_range

# Imported where used: deepspeed (only after the worker has set its accelerator).

STATE_FILE = "epi-rank-{rank}.safetensors"


class EvolvingIsolation:
    """One rank's EPI state for the parameters `params` of an engine, enforcing its frozen set
    through `freezer`."""

    def __init__(
        self, params: list[tuple[str, torch.nn.Parameter]], settings: EpiConfig, freezer: ElementFreezer
    ):
        self.settings, self.freezer = settings, freezer
        self.ops = RankOps.current()
        self.params = [(n, p) for n, p in params if p.requires_grad]
        self.valid, self.ema, self.masks = {}, {}, {}
        for n, p in self.params:
            start, stop, _ = local_range(p)
            self.valid[n] = v = stop - start
            self.ema[n] = torch.zeros(v, dtype=torch.float32, device=p.ds_tensor.device)
            self.masks[n] = torch.zeros(v, dtype=torch.bool, device=p.ds_tensor.device)
        self.numel = sum(p.ds_numel for _, p in self.params)
        self.k = round(settings.ratio / 100 * self.numel)
        self.updates = 0

    def due(self, step: int) -> bool:
        """Whether the optimizer step with 0-based index `step` starts with a mask update."""
        return (step + 1) % self.settings.interval == 0

    @torch.no_grad()
    def update(self) -> dict[str, int]:
        """At an accumulation boundary, before the optimizer step: fold this step's gradients into
        the averages and re-select the frozen set (collective). Returns the set's size and how many
        elements entered and left it, over all ranks."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        s = self.settings
        for n, p in self.params:
            v = self.valid[n]
            g = safe_get_local_grad(p)
            if g is not None:
                w = None
                if s.score == "taylor":  # g² needs no weights
                    w = safe_get_local_fp32_param(p).reshape(-1)[:v].to(g.device)
                x = importance(g.reshape(-1)[:v], w, s.score)
                ema_update(self.ema[n], x.to(self.ema[n].device), s.beta)
            else:  # no gradient reached it this step: its average decays
                self.ema[n].mul_(s.beta)
        ema = [self.ema[n] for n, _ in self.params]
        scales = layer_scales(ema, [p.ds_numel for _, p in self.params], self.ops)
        masks = topk_masks(ema, self.k, self.ops, scales)
        counts = torch.zeros(3, dtype=torch.int64, device=masks[0].device if masks else "cpu")
        for (n, _), new in zip(self.params, masks):
            old = self.masks[n]
            counts += torch.stack([new.sum(), (new & ~old).sum(), (old & ~new).sum()])
            self.masks[n] = new
        counts = self.ops.sum(counts)
        self.updates += 1
        self._hold()
        return {"frozen": int(counts[0]), "entered": int(counts[1]), "left": int(counts[2])}

    def _hold(self) -> None:
        self.freezer.hold([(n, p, self.masks[n]) for n, p in self.params], self.ops.gather)

    def save(self, directory: str | Path) -> None:
        """This rank's averages and frozen set into a checkpoint directory."""
        tensors = {}
        for n, _ in self.params:
            tensors[f"ema.{n}"] = self.ema[n].cpu()
            tensors[f"mask.{n}"] = self.masks[n].to(torch.uint8).cpu()
        path = Path(directory) / STATE_FILE.format(rank=self.ops.rank)
        save_file(tensors, str(path), metadata={"updates": str(self.updates), "world": str(self.ops.world)})

    def load(self, directory: str | Path) -> None:
        """Back to the state `save` wrote into `directory` (after the engine loaded the same
        checkpoint: the frozen elements' master values there are the ones held)."""
        path = Path(directory) / STATE_FILE.format(rank=self.ops.rank)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if int(meta["world"]) != self.ops.world:
            raise ValueError(f"{path}: EPI state of {meta['world']} ranks, this job has {self.ops.world}")
        tensors = load_file(str(path))
        for n, _ in self.params:
            self.ema[n].copy_(tensors[f"ema.{n}"])
            self.masks[n].copy_(tensors[f"mask.{n}"].bool())
        self.updates = int(meta["updates"])
        if self.updates:
            self._hold()

    def summary(self) -> dict:
        s = self.settings
        return {
            **s.model_dump(),
            "updates": self.updates,
            "k": self.k,
            "elements": self.numel,
            "state_bytes_per_rank": EpiConfig.STATE_BYTES * sum(self.valid.values()),
        }
