"""Task groups: connected components of the graph linking tasks i != j with Sij >= tau, and the
order in which consolidation visits them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


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


def order_groups(groups: list[list[str]], order: str, seed: int = 0,
                 given: Optional[Sequence[Sequence[str]]] = None) -> list[list[str]]:
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
    if not (isinstance(groups, list) and groups
            and all(isinstance(g, list) and g and all(isinstance(t, str) for t in g)
                    for g in groups)):
        raise ValueError(f"{path}: expected an ordered, non-empty list of non-empty task lists")
    return [list(g) for g in groups]
