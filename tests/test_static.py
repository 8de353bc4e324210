"""The strict gates: ruff, mypy --strict and no import cycles over the package, as part of the suite."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_ruff() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "supervisor", "tests", "bench", "contrib"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The package's modules `module` imports when it is loaded (not under TYPE_CHECKING, not in functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & known


def test_no_import_cycles() -> None:
    """Every module can be read on its own terms: no two modules need each other to load."""
    root = REPO / "supervisor"
    paths = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in root.rglob("*.py")
    }
    graph = {m: _imports(p, m, set(paths)) for m, p in paths.items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        for dep in graph[module]:
            assert dep not in stack, " -> ".join([*stack[stack.index(dep) :], dep])
            if dep not in done:
                visit(dep, [*stack, dep])
        done.add(module)

    for module in graph:
        visit(module, [module])
