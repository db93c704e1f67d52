"""Overlap and grouping, no Ray: Jaccard against sets, components at the edges of tau, and tau
relative to the chance overlap of two p% cores."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpi_ray.io.masks import pack_mask, write_mask_file
from cpi_ray.regions.grouping import connected_components, order_groups
from cpi_ray.regions.overlap import intersections, jaccard, mask_intersections

DATA = Path(__file__).resolve().parents[1] / "jobs" / "data"


def set_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def test_jaccard_matches_sets(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"w1": (37, 11), "w2": (5,), "w3": (1000,)}
    masks = []
    for p in [0.1, 0.3, 0.3, 0.0]:
        masks.append({n: torch.rand(s, generator=g) < p for n, s in shapes.items()})
    masks.append(dict(masks[1]))  # identical to task 1
    paths = []
    for i, m in enumerate(masks):
        p = tmp_path / f"t{i}.mask.safetensors"
        write_mask_file(p, {n: pack_mask(v) for n, v in m.items()}, {n: v.numel() for n, v in m.items()})
        paths.append(p)
    sets = []
    for m in masks:
        s = set()
        for n in sorted(shapes):
            s |= {(n, int(i)) for i in m[n].reshape(-1).nonzero().view(-1)}
        sets.append(s)
    # tiny byte ranges: tensors are read in many pieces
    inter, names = mask_intersections(paths, chunk_bytes=3)
    assert names == sorted(shapes)
    sim = jaccard(inter)
    for i, j in itertools.product(range(5), repeat=2):
        assert inter[i, j] == len(sets[i] & sets[j])
        if i != j or sets[i]:
            assert sim[i, j] == pytest.approx(set_jaccard(sets[i], sets[j]), abs=1e-12)
    assert sim[1, 4] == 1.0 and sim[3, 3] == 0.0  # identical; empty core


def test_intersections_of_packed_arrays():
    a = pack_mask(torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool))
    b = pack_mask(torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool))
    m = intersections([a, b])
    assert m.tolist() == [[6, 4], [4, 5]]


NAMES = ["a", "b", "c", "d"]


def test_components_tau_edges():
    s = np.array([[1.0, 0.2, 0.0, 0.05], [0.2, 1.0, 0.1, 0.0], [0.0, 0.1, 1.0, 0.0], [0.05, 0.0, 0.0, 1.0]])
    assert connected_components(NAMES, s, 0.0) == [NAMES]  # tau 0 links everything
    assert connected_components(NAMES, s, 0.1) == [["a", "b", "c"], ["d"]]  # >= tau links
    assert connected_components(NAMES, s, 0.15) == [["a", "b"], ["c"], ["d"]]
    assert connected_components(NAMES, s, 1.0) == [[n] for n in NAMES]


def test_components_disjoint_and_identical_cores():
    disjoint = np.eye(4)
    assert connected_components(NAMES, disjoint, 0.1) == [[n] for n in NAMES]
    identical = np.ones((4, 4))
    assert connected_components(NAMES, identical, 1.0) == [NAMES]  # S = 1 reaches tau = 1
    # a chain links transitively even where the direct overlap is below tau
    chain = np.eye(4)
    chain[0, 1] = chain[1, 0] = chain[1, 2] = chain[2, 1] = 0.5
    assert connected_components(NAMES, chain, 0.5) == [["a", "b", "c"], ["d"]]


def test_order_groups():
    groups = [["a", "b"], ["c"], ["d"], ["e", "f", "g"]]
    r1 = order_groups(groups, "random", seed=1)
    assert r1 == order_groups(groups, "random", seed=1)
    assert sorted(map(tuple, r1)) == sorted(map(tuple, groups))
    assert any(order_groups(groups, "random", seed=s) != groups for s in range(5))
    assert order_groups(groups, "size") == [["e", "f", "g"], ["a", "b"], ["c"], ["d"]]
    given = [["g"], ["a", "b", "c", "d", "e", "f"]]
    assert order_groups(groups, "given", given=given) == given
    with pytest.raises(ValueError, match="given"):
        order_groups(groups, "given", given=[["a"]])


def test_chance_jaccard_matches_random_cores():
    """p/(200-p) is the Jaccard two independent random p% cores reach on average."""
    from cpi_ray.regions.grouping import chance_jaccard

    rng = np.random.default_rng(0)
    d = 200_000
    for p in (1.0, 5.0, 20.0):
        k = int(p * d / 100)
        js = []
        for _ in range(5):
            a = np.zeros(d, bool)
            b = np.zeros(d, bool)
            a[rng.choice(d, k, replace=False)] = True
            b[rng.choice(d, k, replace=False)] = True
            js.append((a & b).sum() / (a | b).sum())
        assert abs(np.mean(js) - chance_jaccard(p)) < 0.1 * chance_jaccard(p)
    assert chance_jaccard(100) == 1.0


def test_chance_threshold_keeps_its_grouping_across_p():
    """The same cores relative to chance link the same tasks at every p in chance mode, while one
    absolute tau links them at one p and not at another."""
    from cpi_ray.regions.grouping import chance_jaccard, link_threshold

    for p in (1.0, 5.0, 20.0):
        c = chance_jaccard(p)
        sim = np.array([[1.0, 3 * c, c], [3 * c, 1.0, c], [c, c, 1.0]])
        comps = connected_components(["a", "b", "c"], sim, link_threshold(2.0, "chance", p))
        assert comps == [["a", "b"], ["c"]]
        assert link_threshold(0.1, "absolute", p) == 0.1
    with pytest.raises(ValueError):
        link_threshold(1.0, "relative", 5.0)


def test_groups_stage_records_threshold_and_chance(tmp_path):
    """compute_groups links at tau x chance in chance mode and records both in overlap.json."""
    from cpi_ray.config.schema import PipelineConfig
    from cpi_ray.io.masks import write_mask_file
    from cpi_ray.regions.grouping import chance_jaccard, overlap_summary
    from cpi_ray.regions.stage import compute_groups

    d = 4000
    rng = np.random.default_rng(1)
    k = d // 20  # 5 % cores
    shared = rng.choice(d, k, replace=False)
    cores = {
        "a": shared,
        "b": np.concatenate([shared[: k // 4], rng.choice(d, k, replace=False)])[:k],
        "c": rng.choice(d, k, replace=False),
    }
    reg = tmp_path / "regions"
    for t, idx in cores.items():
        m = np.zeros(d, bool)
        m[idx] = True
        write_mask_file(reg / f"{t}.mask.safetensors", {"w": pack_mask(torch.from_numpy(m))}, {"w": d})
    cfg = PipelineConfig.model_validate(
        {
            "model": {"source": "tiny"},
            "tasks": [{"name": t, "path": str(DATA / "reverse.jsonl")} for t in ("a", "b", "c")],
            "regions": {"p": 5},
            "groups": {"tau_mode": "chance", "tau": 3, "order": "given", "given": [["a", "b"], ["c"]]},
        }
    )
    compute_groups(cfg, reg, tmp_path / "groups", ["a", "b", "c"])
    ov = json.loads((tmp_path / "groups" / "overlap.json").read_text())
    assert ov["chance"] == chance_jaccard(5) and ov["threshold"] == 3 * chance_jaccard(5)
    assert ov["components"] == [["a", "b"], ["c"]]  # a-b share a quarter; c is at chance
    assert "x chance" in overlap_summary(ov)
