"""The package graph, computed from every import (module level and inside functions): no cycle,
and no package imports one of a higher layer (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cpi_ray"

# Lowest first; a package may import its own layer's packages or lower ones.
LAYERS = [
    {"io"},
    {"config"},
    {"run"},
    {"data", "models"},
    {"regions"},
    {"fusion", "training", "evaluation"},
    {"pipeline"},
    {"tune"},
    {"cli"},
]
LEVEL = {p: i for i, layer in enumerate(LAYERS) for p in layer}


def _package(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def import_graph() -> dict[str, set[tuple[str, str]]]:
    """package -> {(imported package, 'file:line')} over every `cpi_ray.*` import."""
    graph: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for f in PKG.rglob("*.py"):
        src = _package(f)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
                if node.module == "cpi_ray":  # `from cpi_ray import x`
                    names = [f"cpi_ray.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                parts = n.split(".")
                if parts[0] == "cpi_ray" and len(parts) > 1 and parts[1] != src:
                    graph[src].add((parts[1], f"{f.relative_to(PKG.parent)}:{node.lineno}"))
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return []

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) == []


def test_no_package_cycle():
    graph = import_graph()
    cycle = find_cycle({p: {t for t, _ in e} for p, e in graph.items()})
    assert not cycle, " -> ".join(cycle)


def test_no_package_imports_upward():
    graph = import_graph()
    assert set(graph) | {t for e in graph.values() for t, _ in e} <= set(LEVEL), (
        "a package is missing from LAYERS"
    )
    upward = sorted(
        f"{where}: {src} imports {dst}"
        for src, e in graph.items()
        for dst, where in e
        if LEVEL[dst] > LEVEL[src]
    )
    assert not upward, "\n".join(upward)


def test_stage_registry_is_the_one_stage_list():
    """Config names, folders, evaluate's model kinds and the runner's classes come from
    config/stages.py: each registered class loads, carries its name and the registry's folder."""
    from cpi_ray.config.schema import EvaluateConfig, PipelineConfig
    from cpi_ray.config.stages import MODEL_KINDS, STAGE_SPECS, STAGES
    from cpi_ray.pipeline.runner import load_stage

    for spec in STAGE_SPECS:
        stage = load_stage(spec.name)
        assert (stage.name, stage.folder) == (spec.name, spec.folder)
    cfg = PipelineConfig(tasks=[{"name": "t", "hub_id": "x/t"}])
    assert tuple(cfg.stages) == STAGES
    assert EvaluateConfig().models == list(MODEL_KINDS)
    assert all(s in STAGES for s in MODEL_KINDS.values() if s)
