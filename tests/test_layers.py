"""The package graph, computed from every import (module level and inside functions): no cycle,
and no package imports one of a higher layer (ARCHITECTURE.md); and every import inside a
function says why it is there."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

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


# A module's comment line `# Imported where used: ray (why), lm_eval (why).` explains every
# in-function import of the modules it names (and of their submodules).
MARKER = "# Imported where used:"
_PRAGMA = re.compile(r"#\s*(noqa|type:|pragma|fmt:|isort:)")


def _marker_names(text: str) -> set[str]:
    """The module names of a marker line: its comma-separated entries, reasons in () dropped."""
    entries = re.sub(r"\([^()]*\)", "", text[len(MARKER) :]).rstrip(" .").split(",")
    return {e.strip() for e in entries if re.fullmatch(r"[A-Za-z_][\w.]*", e.strip())}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """What an import statement names: `import a.b` -> a.b; `from a import b, c` -> a, a.b, a.c."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = "." * node.level + (node.module or "")
    return [base, *(f"{base}.{a.name}".replace("..", ".") for a in node.names)]


def _inner_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside a function or class body (a module-level `if` or `try` is module level)."""
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inside:
                found.append(child)
            scope = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            visit(child, inside or scope)

    visit(tree, False)
    return found


def unexplained_imports(source: str) -> list[str]:
    """`line: statement` for each import inside a function that has no comment saying why: on
    its own line(s), on the line above it (or above the block of imports it belongs to), or a
    module marker line naming what it imports."""
    lines = source.splitlines()
    comments: dict[int, list[str]] = defaultdict(list)  # line -> its comments
    markers: set[str] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if tok.string.startswith(MARKER) and tok.start[1] == 0:
            markers |= _marker_names(tok.string)
        elif not _PRAGMA.match(tok.string) and tok.string.strip("# "):
            comments[tok.start[0]].append(tok.string)
    inner = _inner_imports(ast.parse(source))
    starts = {n.end_lineno: n.lineno for n in inner}  # an import's last line -> its first

    def said_above(line: int) -> bool:
        """A comment line directly above, stepping up over the imports (and blank lines between
        their groups) of the same block."""
        above = line - 1
        while above > 0:
            if above in starts:
                above = starts[above] - 1
            elif not lines[above - 1].strip():
                above -= 1
            else:
                break
        return above > 0 and lines[above - 1].lstrip().startswith("#") and bool(comments.get(above))

    missing = []
    for node in inner:
        if any(comments.get(i) for i in range(node.lineno, node.end_lineno + 1)) or said_above(node.lineno):
            continue
        if any(n == m or n.startswith(m + ".") for n in _imported(node) for m in markers):
            continue
        missing.append(f"{node.lineno}: {ast.unparse(node)}")
    return missing


def test_the_import_check_finds_an_unexplained_import():
    """The check itself, on a made-up module: reasons on the line, above the import's block or in
    the marker line pass; a bare import, a noqa alone or an unnamed module does not."""
    src = '''"""A module."""
import json
# Imported where used: heavy (seconds to import), opt.ional (an optional extra).
try:
    import fast
except ImportError:
    fast = None


def plain():
    import os
    return os


def said_on_the_line():
    import numpy  # the worker has it, the driver may not
    from heavy.sub import thing
    import opt.ional.sub
    from opt import ional
    return numpy, thing


def said_above():
    # Ray: seconds to import, and only this path needs it
    import ray
    from ray import tune

    from mine import helper
    x = 1
    import late
    return ray, tune, helper, x, late


class K:
    def m(self):
        import heavyweight  # noqa: F401
        from opt import other
'''
    assert unexplained_imports(src) == [
        "11: import os",
        "30: import late",
        "36: import heavyweight",
        "37: from opt import other",
    ]


def test_imports_inside_functions_say_why():
    """An import inside a function hides a dependency from the top of the module: each one says
    why it cannot be there (ARCHITECTURE.md)."""
    found = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).as_posix()
        found += [f"{rel}:{m}" for m in unexplained_imports(f.read_text())]
    assert not found, "imports inside functions without a comment saying why:\n" + "\n".join(found)


def test_cli_starts_without_the_heavy_dependencies():
    """What the in-function imports of the CLI's start-up path are for: `cpi-ray --help`, `plan`
    and `check` start without torch, transformers, numpy, datasets or Ray."""
    loaded = heavy_imports("cpi_ray.cli", ["torch", "transformers", "numpy", "datasets", "ray", "pyarrow"])
    assert loaded == [], f"importing cpi_ray.cli loads {loaded}"


@pytest.mark.parametrize("module", ["cpi_ray.regions.worker", "cpi_ray.fusion.worker"])
def test_streaming_actors_start_without_torch(module):
    """What the regions and fusion actors import to run: numpy, not torch (about 1 s and 150 MiB
    per actor) and not Ray (the actor process has it already)."""
    loaded = heavy_imports(module, ["torch", "transformers", "datasets", "ray", "pyarrow"])
    assert loaded == [], f"importing {module} loads {loaded}"


def heavy_imports(module: str, heavy: list[str]) -> list[str]:
    """Which of `heavy` a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    path = [str(PKG.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


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
