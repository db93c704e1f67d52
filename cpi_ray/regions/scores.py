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
    kind: str,
    base: torch.Tensor,
    probe: torch.Tensor,
    fisher: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A float32 tensor, never a view of the inputs (which may alias memory maps): `out` when
    given (a float32 buffer of the inputs' size, reused to spare an allocation per block), else
    a fresh one."""
    if kind == "delta":
        return _delta(base, probe, out)
    if fisher is None:
        raise ValueError(f"score {kind!r} needs the probe's Fisher tensors")
    if kind == "fisher":
        f = fisher.to(torch.float32)
        # abs: a stored -0.0 must not read as negative
        return torch.abs(f, out=out) if out is not None else f.abs()
    if kind == "delta_fisher":
        d = _delta(base, probe, out)
        return d.mul_(fisher.to(torch.float32).abs().sqrt_())
    raise ValueError(f"unknown score {kind!r}; expected one of {', '.join(SCORES)}")


def _delta(base: torch.Tensor, probe: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    a, b = probe.to(torch.float32), base.to(torch.float32)
    d = torch.sub(a, b, out=out) if out is not None else torch.sub(a, b)
    return d.abs_()
