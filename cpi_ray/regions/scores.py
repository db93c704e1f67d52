"""Per-element core scores, computed in float32 from aligned slices of the base and a probe.

`delta` is the paper's |θi − θ0|; `fisher` and `delta_fisher` (|Δ|·√F) read a diagonal Fisher
checkpoint saved beside the probe, named like the model's tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

SCORES = ("delta", "fisher", "delta_fisher")


def needs_fisher(kind: str) -> bool:
    return kind in ("fisher", "delta_fisher")


def compute_score(
    kind: str, base: torch.Tensor, probe: torch.Tensor, fisher: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """A fresh float32 tensor (never a view of the inputs, which may alias memory maps)."""
    if kind == "delta":
        return torch.sub(probe.to(torch.float32), base.to(torch.float32)).abs_()
    if fisher is None:
        raise ValueError(f"score {kind!r} needs the probe's Fisher tensors")
    f = fisher.to(torch.float32).abs()  # abs: a stored -0.0 must not read as negative
    if kind == "fisher":
        return f
    if kind == "delta_fisher":
        d = torch.sub(probe.to(torch.float32), base.to(torch.float32)).abs_()
        return d.mul_(f.sqrt_())
    raise ValueError(f"unknown score {kind!r}; expected one of {', '.join(SCORES)}")
