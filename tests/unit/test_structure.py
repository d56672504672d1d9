"""The house's shape, kept by a test: imports point one way, from the entry points down to the foundation, and
form no circle. Every import counts (a lazy one inside a function too), except those under `if TYPE_CHECKING:`,
which never run. A new module joins a layer here; an import against the arrows fails with the edge named.

    entry points   src.main, src.cli.*, src.report.*
    driver         src.job -> src.plan, src.runner, src.shards
    costs, launch  src.costs.*, src.launch
    stages         src.stages.* (none imports another)
    libraries      src.judging, src.classification, src.tracking, src.step (the plan / Runner / stage contract)
    models         src.models.*
    rules          src.rules.*, src.benchmarks.* (pure)
    foundation     src.config, src.records, src.cache, src.data, src.pool, src.prompts, src.provenance, src.sandbox
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LAYERS = [
    ["src.config", "src.records", "src.cache", "src.data", "src.pool", "src.prompts", "src.provenance", "src.sandbox"],
    ["src.rules", "src.benchmarks"],
    ["src.models"],
    ["src.judging", "src.classification", "src.tracking", "src.step"],
    ["src.stages"],
    ["src.costs", "src.launch"],
    ["src.plan", "src.runner", "src.shards", "src.job"],
    ["src.report", "src.cli", "src.main"],
]


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The src modules `name` imports, lazily or not (`from src.x import y` counts src.x.y when it is a module)."""
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("src"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(path.read_text()))), \
        f"{path}: relative import (the layer check reads absolute src.* imports)"
    return {m for m in found if m in known and m != name and m != "src"}


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer of tests/unit/test_structure.py: add it where it belongs")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items() if m != "src"}


def test_every_import_points_down_the_layers():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_no_stage_imports_another_stage():
    bad = [f"{a} imports {b}" for a, deps in graph().items() if a.startswith("src.stages.")
           for b in deps if b.startswith("src.stages.")]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    assert not cycles, cycles


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: a rule module importing a stage is reported (a check that cannot fail is no check)."""
    known = {"src.rules.x": tmp_path / "x.py", "src.stages.judge": tmp_path / "j.py"}
    known["src.rules.x"].write_text("def f():\n    from src.stages.judge import run\n")
    known["src.stages.judge"].write_text("")
    deps = imports("src.rules.x", known["src.rules.x"], known)
    assert deps == {"src.stages.judge"} and layer("src.stages.judge") > layer("src.rules.x")
    known["src.rules.x"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from src.stages.judge import run\n")
    assert imports("src.rules.x", known["src.rules.x"], known) == set()
