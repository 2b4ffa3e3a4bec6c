"""The package's shape: imports go one way only (read from the source, imports inside functions included), and no module is oversized."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "syncbn"

# The layers, lowest first: a module may import only modules listed before it. Configuration and
# torch-version shims, then the math (kernels, statistics and their merge, functional), the transport and communication, the
# autograd Function, the shared forward, the modules, the converters, the integrations.
ORDER = [
    "_config",
    "_compat",
    "_kernels",
    "_stats",
    "functional",
    "_masking",
    "_shm",
    "comm",
    "_consistency",
    "_autograd",
    "_forward",
    "batchnorm",
    "renorm",
    "frozen",
    "norm_act",
    "micro_batch",
    "_carry",
    "_rules",
    "convert",
    "distributed",
    "lightning",
    "__init__",
]
MAX_LINES = 450


def _imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """syncbn modules ``path`` imports anywhere in its body (top level, functions, classes)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "syncbn":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "syncbn" and len(parts) > 1:
                    found.add(parts[1])
    modules = modules if modules is not None else {p.stem for p in PACKAGE.glob("*.py")}
    return {m for m in found if m in modules and m != path.stem}


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer():
    assert sorted(_graph()) == sorted(ORDER), "add new modules to ORDER, at the layer they belong to"


def test_imports_go_down_the_layers_only():
    rank = {m: i for i, m in enumerate(ORDER)}
    upward = [
        f"{m} imports {dep}" for m, deps in _graph().items() for dep in sorted(deps) if rank[dep] >= rank[m]
    ]
    assert not upward, "imports against the layering: " + "; ".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                cycle.extend(path[path.index(dep):] + [m, dep] if dep in path else [m, dep])
                return True
            if state.get(dep) is None and visit(dep, path + [m]):
                return True
        state[m] = 2
        return False

    for m in graph:
        if state.get(m) is None and visit(m, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The check can fail: a lazy import inside a function is an edge too."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    assert _imports(tmp_path / "b.py", {"a", "b"}) == {"a"}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it (one job per file, about 400 lines)"
