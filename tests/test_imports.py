"""No file circles in the strategy layer, the data stage, or between checkpoint and state: module A importing B (at the
top or lazily inside a function) while B imports A, directly or through others. A lazy import hides a circle from
Python but not from a reader; DESIGN.md (Style) asks for none."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every shardtune module `path` imports anywhere in its body; `from pkg import sub` names the submodule."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or ({node.module} & known)
    return out - {_module(path)}


def graph(*names: str) -> dict[str, set[str]]:
    """The imports among the modules `names` name (a package: all of its modules)."""
    inside = lambda m: any(m == n or m.startswith(n + ".") for n in names)  # noqa: E731
    files = {_module(p): p for p in (SRC / "shardtune").rglob("*.py")}
    edges = {m: _imports(p, set(files)) for m, p in files.items()}
    return {m: {d for d in deps if inside(d)} for m, deps in edges.items() if inside(m)}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `edges` (each as the path back to its start), found by depth-first search."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for dep in sorted(edges.get(node, ())):
            visit(dep, path + [node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_file_circle_in_the_strategy_layer():
    edges = graph("shardtune.distributed")
    assert circles(edges) == []
    assert "shardtune.distributed.comm" in edges["shardtune.distributed.fsdp"]  # the graph sees the imports


def test_no_file_circle_in_the_data_stage():
    edges = graph("shardtune.data")
    assert circles(edges) == []
    assert "shardtune.data.packed" in edges["shardtune.data.plan"]  # the graph sees the imports
    assert "shardtune.data.settings" in edges["shardtune.data.stream"]


def test_no_file_circle_between_checkpoint_and_state():
    edges = graph("shardtune.checkpoint", "shardtune.state")
    assert set(edges) == {"shardtune.checkpoint", "shardtune.state"}
    assert circles(edges) == []
