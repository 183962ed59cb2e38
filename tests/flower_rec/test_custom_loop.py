"""examples/custom_loop.py and the README section that shows its core: the README's code runs as
written (the example's run, with the functions of the README block), and it is the example's
core, character for character."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from paths import ROOT

EXAMPLE = ROOT / "examples" / "custom_loop.py"
SECTION = "## Using the ops from another trainer"
CORE_FUNCTIONS = ("catalog_trie", "training_step", "recommend")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example():
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_block() -> str:
    """The first python block of the README section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def example_core() -> str:
    """The lines between the example's "core" marks."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("# -- core (README)"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# -- end of core"))
    return "".join(lines[start + 1 : end])


def test_the_readme_block_is_the_core_of_the_example():
    block, core = readme_block(), example_core()
    assert block.endswith(core), "README.md and examples/custom_loop.py differ: copy the core"
    imports = block[: -len(core)]
    assert all(line.startswith(("import ", "from ")) for line in imports.split("\n") if line)


def test_the_example_runs_with_the_readme_code():
    """One Flower step and greedy, sampling and beam search with the functions as the README
    writes them (with their own imports); the example checks that the loss is finite, that the
    step changed the weights and that every output is an item."""
    example = load_example()
    namespace: dict = {}
    exec(compile(readme_block(), "README.md", "exec"), namespace)
    for name in CORE_FUNCTIONS:
        setattr(example, name, namespace[name])
    result = example.main()
    recommendations = result["recommendations"]
    assert set(recommendations) == {"greedy", "sampling", "beam search"}
    assert len(recommendations["greedy"]) == len(recommendations["sampling"]) == example.USERS
    beams = recommendations["beam search"]
    for user in range(example.USERS):
        assert len(set(beams[user * 10 : (user + 1) * 10])) == 10  # ten distinct items
    # Items that other items continue ("Star Quest" before "Star Quest II") are generated too.
    assert any(title in example.SERIES for title in beams)
