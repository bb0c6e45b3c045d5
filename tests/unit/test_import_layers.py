"""Imports point down: no cycle among the project's modules, and every import inside a function says why.

Read from the source with `ast` (nothing is imported), except the last test, which imports the command
line in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("control_plane", "bentos", "training", "load")
LAZY = "# lazy:"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    def tree(self) -> ast.Module:
        return ast.parse(self.path.read_text(), str(self.path))


def project_modules() -> dict[str, Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            out[name] = Module(name, path, is_package)
    return out


def imported_names(node: ast.Import | ast.ImportFrom, module: Module) -> list[str]:
    """The dotted names an import statement loads (`from a import b`: a, and a.b should b be a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = module.name.split(".")
        if not module.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: not inside a function, nor under `if TYPE_CHECKING:`."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Module -> the project modules its module-level imports load, their packages' __init__ included.

    A module's own packages are left out: they are always loaded before it.
    """
    graph = {}
    for name, module in modules.items():
        deps = set()
        for node in module_level_imports(module.tree()):
            for target in imported_names(node, module):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        deps.add(dep)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


@dataclass(frozen=True)
class LazyImport:
    where: str  # module:line
    statement: str
    comment: str  # the line above the group of imports it belongs to


def function_level_imports(module: Module) -> Iterator[LazyImport]:
    """Project imports inside functions, each with the line above its group of consecutive imports."""
    lines = module.path.read_text().splitlines()
    tree = module.tree()
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    seen = set()
    for function in functions:
        for node in ast.walk(function):
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            for block in (body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                yield from _imports_in_block(module, lines, block, seen)


def _imports_in_block(module: Module, lines: list[str], block: list[ast.stmt], seen: set[int]):
    first = None  # the first import of the current group
    previous = None
    for stmt in block:
        if not isinstance(stmt, ast.Import | ast.ImportFrom):
            first = previous = None
            continue
        between = lines[previous.end_lineno : stmt.lineno - 1] if previous else []
        if previous is None or any(line.strip() for line in between):
            first = stmt  # a new group: the first import, or one after other lines
        previous = stmt
        if stmt.lineno in seen or not any(is_project(n) for n in imported_names(stmt, module)):
            continue
        seen.add(stmt.lineno)
        yield LazyImport(
            where=f"{module.name}:{stmt.lineno}",
            statement=lines[stmt.lineno - 1].strip(),
            comment=lines[first.lineno - 2].strip() if first.lineno > 1 else "",
        )


def test_the_module_level_imports_have_no_cycle():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_project_import_inside_a_function_says_why_it_is_lazy():
    unexplained = [
        f"{lazy.where}: {lazy.statement}"
        for module in project_modules().values()
        for lazy in function_level_imports(module)
        if not lazy.comment.startswith(LAZY)
    ]
    assert not unexplained, (
        f"imports inside functions without a `{LAZY} <reason, with the measured cost>` comment above "
        "them (or move them to the module's top):\n" + "\n".join(unexplained)
    )


def test_the_checks_see_a_cycle_and_an_unexplained_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n"
        "    # lazy: measured\n"
        "    import json\n\n"
        "    from control_plane import services\n"
        "    x = 1\n"
        "    from control_plane import context\n"
    )
    found = list(function_level_imports(Module("control_plane.m", path, False)))
    assert [(lazy.statement, lazy.comment) for lazy in found] == [
        ("from control_plane import services", "# lazy: measured"),
        ("from control_plane import context", "x = 1"),
    ]


def test_the_command_line_imports_no_mlflow_bentoml_or_kubernetes():
    code = (
        "import sys, control_plane.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'bentoml', 'kubernetes'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
