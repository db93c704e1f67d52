"""Task groups: connected components of the graph linking tasks i != j with Sij >= tau, and the
order in which consolidation visits them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


def chance_jaccard(p: float) -> float:
    """Expected Jaccard of two independent random cores of p% of D elements each:
    |A∩B| = q²D, |A∪B| = (2q − q²)D with q = p/100, so J = q/(2 − q) = p/(200 − p)."""
    if not 0 < p <= 100:
        raise ValueError(f"core ratio p must be in (0, 100], got {p}")
    return p / (200.0 - p)


def link_threshold(tau: float, tau_mode: str, p: float) -> float:
    """The Jaccard at or above which two tasks are linked: tau itself (`absolute`), or tau times
    the chance level of p% cores (`chance`)."""
    if tau_mode == "absolute":
        return tau
    if tau_mode == "chance":
        return tau * chance_jaccard(p)
    raise ValueError(f"unknown tau_mode {tau_mode!r}")


def connected_components(names: Sequence[str], sim: np.ndarray, tau: float) -> list[list[str]]:
    """Components of the graph with an edge i-j (i != j) when sim[i, j] >= tau. Each group lists
    its tasks in the order of `names`; groups are ordered by their first task."""
    t = len(names)
    parent = list(range(t))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(t):
        for j in range(i + 1, t):
            if sim[i, j] >= tau:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[str]] = {}
    for i in range(t):
        comps.setdefault(find(i), []).append(names[i])
    return [comps[r] for r in sorted(comps)]


def order_groups(
    groups: list[list[str]], order: str, seed: int = 0, given: Optional[Sequence[Sequence[str]]] = None
) -> list[list[str]]:
    """`random`: a seeded shuffle of the components (the paper's main setting); `size`: larger
    groups first, ties in component order; `given`: the user's groups, verbatim (groups and
    order both given, e.g. for the given-grouping baseline)."""
    if order == "random":
        out = [list(g) for g in groups]
        random.Random(seed).shuffle(out)
        return out
    if order == "size":
        return [list(g) for g in sorted(groups, key=len, reverse=True)]  # sorted() is stable
    if order == "given":
        if not given:
            raise ValueError("groups.order 'given' needs groups.given")
        have = sorted(n for g in groups for n in g)
        want = sorted(n for g in given for n in g)
        if have != want:
            raise ValueError(f"groups.given lists {want}, the tasks are {have}")
        return [list(g) for g in given]
    raise ValueError(f"unknown group order {order!r}")


def read_groups(path: str | Path) -> list[list[str]]:
    """groups/groups.json: the ordered groups (lists of task names), bare or under a "groups"
    key. Every reader of the groups goes through here."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: groups file is missing (run the groups stage)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    groups = data.get("groups") if isinstance(data, dict) else data
    if not (
        isinstance(groups, list)
        and groups
        and all(isinstance(g, list) and g and all(isinstance(t, str) for t in g) for g in groups)
    ):
        raise ValueError(f"{path}: expected an ordered, non-empty list of non-empty task lists")
    return [list(g) for g in groups]


def overlap_summary(overlap: dict[str, Any]) -> Optional[str]:
    """One line: the range of the pairwise Jaccard against the chance level of the run's cores,
    and the threshold that linked them."""
    jac, n = overlap["jaccard"], len(overlap["tasks"])
    pairs = [jac[a][b] for a in range(n) for b in range(a + 1, n)]
    if not pairs or "chance" not in overlap:
        return None
    ch = overlap["chance"]
    return (
        f"pairwise Jaccard {min(pairs):.3f}-{max(pairs):.3f}, {min(pairs) / ch:.1f}-"
        f"{max(pairs) / ch:.1f}x chance ({ch:.4f} for p = {overlap['p']:g}%); linked at "
        f">= {overlap['threshold']:.4f} (tau {overlap['tau']:g}, {overlap['tau_mode']})"
    )
