"""No import circle in flower_rec: the graph of which module imports which, read from the source
(every import statement, at module level or inside a function, ``TYPE_CHECKING`` blocks too), has
no cycle. A function-level import only hides a circle from the interpreter, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import flower_rec


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package in folder ``root`` (subpackages included) -> its file."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (source ``path``) imports. ``from a import b``
    is an edge to ``a.b`` where that is a module, else to ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return edges & known - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its nodes (the first one repeated at the end), or
    None. Depth-first search with the three colours."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor in on_path:
                return path[path.index(successor):] + [successor]
            if successor not in done:
                cycle = visit(successor)
                if cycle:
                    return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_relative_imports_resolve_to_modules(tmp_path):
    source = tmp_path / "layout.py"
    source.write_text("from .dataset import Dataset\nfrom .. import files\nimport os\n"
                      "def f():\n    from ..data import load\n")
    known = {"p", "p.files", "p.data", "p.data.dataset", "p.data.layout"}
    assert imported_modules("p.data.layout", source, known) == {
        "p.data.dataset", "p.files", "p.data"
    }


def test_flower_rec_has_no_import_cycle():
    files = module_files(Path(flower_rec.__file__).parent)
    assert {"flower_rec.cli", "flower_rec.data.dataset", "flower_rec.training.run"} <= set(files)
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
