"""The house's dependency rules, read from the import statements: experiments -> ocnode ->
solvers, one way; inside ocnode, training -> optim -> curvature -> nn, and data alone; and no
import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> the first-party packages it may import (besides itself)
ALLOWED = {
    "solvers": set(),
    "ocnode.data": {"solvers"},
    "ocnode.nn": {"solvers"},
    "ocnode.curvature": {"solvers", "ocnode.nn"},
    "ocnode.optim": {"solvers", "ocnode.nn", "ocnode.curvature"},
    "ocnode.training": {"solvers", "ocnode.nn", "ocnode.curvature", "ocnode.optim",
                        "ocnode.data", "ocnode.workprecision"},
    "ocnode.workprecision": {"solvers", "ocnode.nn", "ocnode.optim", "ocnode.training"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """First-party modules imported at module level (function-level imports are lazy)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from package import submodule" needs the submodule, not the package's names
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in MODULES] or [node.module]
        found |= {n for n in names if n.split(".")[0] in ("ocnode", "solvers")}
    return found


MODULES = {_module(p): p for d in ("solvers", "ocnode") for p in (ROOT / d).rglob("*.py")}


def _package(module: str) -> str:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True)
                 if module == p or module.startswith(p + ".")), module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _package(m) in ALLOWED))
def test_each_module_imports_only_the_layers_below_it(module: str) -> None:
    package = _package(module)
    for target in _imports(MODULES[module]):
        other = _package(target)
        if other in ALLOWED and other != package:
            assert other in ALLOWED[package], f"{module} imports {target}"


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, t]))
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
