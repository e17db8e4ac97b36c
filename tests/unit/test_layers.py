"""The package-level import graph, read from the source (AST): floors point one way and nothing loops.

Floors, lowest first (DESIGN.md): ``mtrec`` (the core) < ``cluster`` < ``train`` < ``tune`` and ``serve``
< ``app`` (the front door). A package may import its own floor's or lower floors' packages, never a higher
one; ``serve`` never imports ``train``; shipped code imports no dev-only package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"mtrec": "mtrec", "mtrec_cluster": "cluster", "mtrec_train": "train", "mtrec_tune": "tune"}
FOLDERS |= {"mtrec_serve": "serve", "mtrec_app": "app"}
FLOOR = {"mtrec": 1, "cluster": 2, "train": 3, "serve": 4, "tune": 4, "app": 5}
FORBIDDEN = {("serve", "train"), ("serve", "tune"), ("tune", "serve")}
DEV_ONLY = {"pytest", "hypothesis", "schemathesis", "jsonschema", "psutil", "ruff", "bench", "tests"}


def imports(folder: str) -> dict[str, set[str]]:
    """``{top-level module imported: {file, ...}}`` for every absolute import under ``folder``."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def graph() -> dict[str, dict[str, set[str]]]:
    """Package -> {package it imports: files that do} over our own packages (by folder name)."""
    edges: dict[str, dict[str, set[str]]] = {}
    for folder in FLOOR:
        for module, files in imports(folder).items():
            target = FOLDERS.get(module)
            if target and target != folder:
                edges.setdefault(folder, {})[target] = files
    return edges


def cycle(edges: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One cycle of the graph as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in edges.get(node, {}):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in edges:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert cycle({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b": set()}, "b": {}}) is None


def test_package_graph_has_no_cycle():
    assert cycle(graph()) is None


@pytest.mark.parametrize("folder", sorted(FLOOR))
def test_imports_point_down(folder):
    wrong = {
        target: sorted(files)
        for target, files in graph().get(folder, {}).items()
        if FLOOR[target] > FLOOR[folder] or (folder, target) in FORBIDDEN
    }
    assert not wrong, f"{folder}/ (floor {FLOOR[folder]}) imports from a higher floor or a sibling: {wrong}"


def test_core_imports_no_other_package_and_no_ray():
    found = imports("mtrec")
    assert not {m for m in found if m in FOLDERS and m != "mtrec"}, found
    assert "ray" not in found, sorted(found["ray"])


@pytest.mark.parametrize("folder", sorted(FLOOR))
def test_shipped_code_imports_no_dev_only_package(folder):
    used = {m: sorted(f) for m, f in imports(folder).items() if m in DEV_ONLY}
    assert not used, f"{folder}/ imports dev-only packages: {used}"


def test_every_package_is_installed_under_its_own_name():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: v for k, v in setuptools["package-dir"].items()} == {k: v for k, v in FOLDERS.items() if k != "mtrec"}
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for folder in FLOOR
        for p in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    installed = {name.replace(name.split(".")[0], FOLDERS[name.split(".")[0]], 1) for name in setuptools["packages"]}
    assert installed == on_disk
