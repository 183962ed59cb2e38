"""The project's own code outside the package (scripts, also the Python inside shell scripts,
examples, benchmarks) imports only names that flower_rec has: a module that moves must take its
importers with it, and these files run in no test of their own."""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from paths import ROOT

FOLDERS = ("scripts", "examples", "benchmarks")
# A shell script's Python: the body of a `python ... <<'PY'` here-document.
_HEREDOC = re.compile(r"<<\s*'?(\w+)'?\n(.*?)\n\1\n", re.DOTALL)


def python_sources() -> dict[str, str]:
    """Every Python source of FOLDERS, by a name for the test id."""
    sources = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*")):
            name = str(path.relative_to(ROOT))
            if path.suffix == ".py":
                sources[name] = path.read_text(encoding="utf-8")
            elif path.suffix == ".sh":
                for index, match in enumerate(_HEREDOC.finditer(path.read_text(encoding="utf-8"))):
                    sources[f"{name}#{index}"] = match.group(2)
    return sources


def flower_rec_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) of each `from flower_rec... import name` (name None for `import module`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flower_rec"):
            found.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((a.name, None) for a in node.names if a.name.startswith("flower_rec"))
    return found


SOURCES = python_sources()


def test_the_shell_scripts_python_is_found():
    assert any("#" in name for name in SOURCES)
    assert sum(len(flower_rec_imports(source)) for source in SOURCES.values()) > 20


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_flower_rec_import_resolves(name):
    for module_name, attribute in flower_rec_imports(SOURCES[name]):
        module = importlib.import_module(module_name)
        if attribute is not None and not hasattr(module, attribute):
            importlib.import_module(f"{module_name}.{attribute}")  # a submodule, or it fails

