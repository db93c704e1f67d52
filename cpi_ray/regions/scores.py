"""Per-element core scores, computed in float32 from aligned slices of the base and a probe.

`delta` is the paper's |θi − θ0|; `fisher` and `delta_fisher` (|Δ|·√F) read a diagonal Fisher
checkpoint saved beside the probe, named like the model's tensors. numpy only: the regions actors
run without torch. Every op here is correctly rounded in float32 (numpy's sqrt is; torch's
vectorised float32 sqrt on CPU is off by an ulp at times), so a score is one value whatever reads
it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SCORES = ("delta", "fisher", "delta_fisher")


def needs_fisher(kind: str) -> bool:
    return kind in ("fisher", "delta_fisher")


def compute_score(
    kind: str,
    base: np.ndarray,
    probe: np.ndarray,
    fisher: Optional[np.ndarray] = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """A float32 array, never one of the inputs: `out` when given (a float32 buffer of the
    inputs' size, reused to spare an allocation per block), else a fresh one."""
    if kind == "delta":
        return _delta(base, probe, out)
    if fisher is None:
        raise ValueError(f"score {kind!r} needs the probe's Fisher tensors")
    if kind == "fisher":
        # abs: a stored -0.0 must not read as negative
        return np.abs(fisher, out=out, dtype=np.float32)
    if kind == "delta_fisher":
        d = _delta(base, probe, out)
        root = np.abs(fisher, dtype=np.float32)
        return np.multiply(d, np.sqrt(root, out=root), out=d)
    raise ValueError(f"unknown score {kind!r}; expected one of {', '.join(SCORES)}")


def _delta(base: np.ndarray, probe: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    d = np.subtract(probe, base, out=out, dtype=np.float32)
    return np.abs(d, out=d)
