"""The package's shape: a module imports only from the stages before it, so no import circle
(type-only imports count: they are a circle a reader has to untangle all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import ml_playground

PACKAGE = Path(ml_playground.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (importing a submodule
    imports its parent packages too)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for end in range(2, len(parts) + 1):
                    found = ".".join(parts[:end])
                    if found in modules and found != name and not name.startswith(f"{found}."):
                        graph[name].add(found)
    return graph


def test_no_import_circle() -> None:
    graph = imports()
    assert graph.get("ml_playground.cli")
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise AssertionError(f"import circle: {cycle}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_nothing_imports_the_command_line() -> None:
    importers = sorted(
        name for name, targets in imports().items() if "ml_playground.cli" in targets
    )
    assert importers == ["ml_playground.__main__"]
