"""The package's modules import each other in layers: no circle, and the low layers know no cache.

Every import counts, also one inside a function: a lazy import hides a circle, it does not
remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "modelcache"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parent = ".".join(base + ([node.module] if node.module else []))
            names += [f"{parent}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # `from x import function` names the module x
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    return seen


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    circles = sorted(m for m in graph if m in _reaches(graph, m) and m != "modelcache")
    assert circles == []


def test_planners_fetching_and_transfer_know_no_cache_and_no_handle() -> None:
    graph = _graph()
    low = [m for m in graph if m.startswith(("modelcache._planners", "modelcache._transfer"))]
    low += ["modelcache._plan", "modelcache._fetch", "modelcache._hashing", "modelcache._posix"]
    assert low
    for module in low:
        above = {
            m
            for m in _reaches(graph, module)
            if m.startswith(("modelcache.cache", "modelcache.handle"))
        }
        assert above == set(), module
