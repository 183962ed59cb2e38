"""flower_rec: fine-tune, decode and evaluate LLM recommenders with flower_ext.

Data in the Flower/BIGRec layout (:mod:`flower_rec.data`), items as token sequences and prompts
(:mod:`flower_rec.prompts`), trie-constrained decoding (:mod:`flower_rec.decoding`) and the
paper's accuracy, fairness and diversity metrics (:mod:`flower_rec.metrics`); the command line is
``flower-rec`` (:mod:`flower_rec.cli`).
"""

import importlib.metadata as _importlib_metadata
import importlib.util as _importlib_util

# flower_rec ships in the flower-ext wheel; reading the version from its metadata keeps one
# source (pyproject.toml) without importing torch for `flower-rec --version`.
__version__ = _importlib_metadata.version("flower-ext")

# flower_rec's dependencies are the `rec` extra of the flower-ext wheel, whose core (flower_ext)
# needs torch, numpy and safetensors only (docs/design.md section 7). Fail at import, naming
# what is missing and the install command, rather than deep inside a run. find_spec only locates
# the packages; nothing heavy is imported here.
_REC_MODULES = {
    "transformers": "transformers",
    "accelerate": "accelerate",
    "tokenizers": "tokenizers",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "yaml": "pyyaml",
}
_missing = [
    package for module, package in _REC_MODULES.items() if _importlib_util.find_spec(module) is None
]
if _missing:
    raise ImportError(
        "flower_rec (the trainer and the flower-rec command) needs the rec extra of flower-ext; "
        f'missing: {", ".join(_missing)}. Install it with: pip install "flower-ext[rec]" '
        '(from a checkout: pip install ".[rec]"). The ops alone (import flower_ext) need '
        "only torch, numpy and safetensors."
    )
del _importlib_metadata, _importlib_util, _missing
