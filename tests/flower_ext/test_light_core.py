"""The light core (docs/design.md section 7): ``pip install flower-ext`` brings torch, numpy and
safetensors only, so ``flower_ext`` and each of its modules must import and run without the
trainer's dependencies (the ``rec`` extra), and ``flower_rec`` without them must say how to get
them.

Each check runs in a fresh interpreter (``python -c`` in a subprocess), since this test session
has long since imported transformers and the rest. The subprocess runs outside the checkout, so
the source folder ``flower_ext/`` (no compiled module in a non-editable install) cannot shadow
the installed package. The by-hand proof in a virtualenv that really lacks the extra is
described in docs/design.md section 7.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paths import ROOT

# The modules of the rec extra (pyyaml is imported as yaml). flower_ext must import none of them.
REC_MODULES = ("transformers", "accelerate", "tokenizers", "matplotlib", "tqdm", "yaml")
# flower_ext's modules as of this writing; the test imports whatever the package holds, and checks
# that these are among them so that a rename cannot empty the test.
KNOWN_MODULES = {"ops", "trie", "losses", "generation", "reference"}

# Imports every module of flower_ext (found by walking the package, so new modules are covered)
# and prints what it saw as JSON on the last line.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
{prelude}
import torch
before = set(sys.modules)
import flower_ext
names = sorted(m.name for m in pkgutil.iter_modules(flower_ext.__path__) if m.name != "_C")
for name in names:
    importlib.import_module("flower_ext." + name)
{body}
print(json.dumps({{
    "names": names,
    "new": sorted(m for m in set(sys.modules) - before),
    "with_torch": sorted(m for m in before),
}}))
"""

# Makes every rec module unimportable, as in an environment without the extra: an import of one
# raises ModuleNotFoundError and importlib.util.find_spec returns None.
_BLOCK_REC = "\n".join(f"sys.modules[{name!r}] = None" for name in REC_MODULES)

# Runs the ops a decoder and a trainer call, on a three-item catalog, and the safetensors
# round trip (the core's third dependency).
_RUN_OPS = """
import math, os, tempfile
from flower_ext import Trie, losses
from flower_ext.generation import TrieLogitsProcessor
trie = Trie.from_sequences([[5, 7, 1], [5, 8, 1], [6, 1]])
flows = trie.log_flows(torch.log(torch.tensor([3.0, 1.0, 4.0])))
assert abs(flows[0].item() - math.log(8.0)) < 1e-5, flows
logits = torch.zeros(2, 10)
trie.mask_logits_(logits, torch.tensor([0, 1]))
assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5, 6]
assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [7, 8]
path = os.path.join(tempfile.mkdtemp(), "trie.safetensors")
trie.save(path)
assert torch.equal(Trie.load(path).data, trie.data)
"""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _import_all(cwd: Path, prelude: str = "", body: str = "") -> dict:
    result = _run(_IMPORT_ALL.format(prelude=prelude, body=body), cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_flower_ext_imports_none_of_the_rec_modules(tmp_path):
    seen = _import_all(tmp_path)
    assert KNOWN_MODULES <= set(seen["names"]), seen["names"]
    top_level = {name.split(".")[0] for name in seen["new"]}
    pulled = sorted(top_level & set(REC_MODULES))
    assert not pulled, f"importing flower_ext's modules imported {pulled}"
    # Absent outright, not only "not imported by flower_ext": `import torch` alone imports tqdm
    # when it is installed (torch.hub), which is torch's doing and costs nothing heavy; the rest
    # must not be there at all.
    present = {name.split(".")[0] for name in seen["new"] + seen["with_torch"]}
    torch_own = {"tqdm"} & {name.split(".")[0] for name in seen["with_torch"]}
    assert not (present & set(REC_MODULES)) - torch_own


def test_flower_ext_works_without_the_rec_extra(tmp_path):
    seen = _import_all(tmp_path, prelude=_BLOCK_REC, body=_RUN_OPS)
    assert KNOWN_MODULES <= set(seen["names"])


def test_flower_rec_without_the_rec_extra_names_the_install_command(tmp_path):
    result = _run(
        f"""
        import sys
        {_BLOCK_REC.replace(chr(10), chr(10) + " " * 8)}
        try:
            import flower_rec
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("flower_rec imported without its dependencies")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert 'pip install "flower-ext[rec]"' in message
    for package in ("transformers", "matplotlib", "pyyaml"):
        assert package in message


def test_flower_rec_imports_with_the_rec_extra(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("the rec extra is not installed here")
    result = _run("import flower_rec; print(flower_rec.__version__)", tmp_path)
    assert result.returncode == 0, result.stderr


def test_pyproject_keeps_the_core_light():
    tomllib = pytest.importorskip("tomllib")
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml beside the tests")
    project = tomllib.loads(pyproject.read_text())["project"]

    def names(requirements):
        return {
            requirement.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for requirement in requirements
        }

    assert names(project["dependencies"]) == {"torch", "numpy", "safetensors"}
    extras = project["optional-dependencies"]
    assert {"transformers", "accelerate", "tokenizers", "matplotlib", "tqdm", "pyyaml"} <= names(
        extras["rec"]
    )
    # The README's test command (pip install ".[test]") and the benchmarks need the trainer too.
    for extra in ("test", "bench"):
        assert "flower-ext[rec]" in extras[extra], extra
