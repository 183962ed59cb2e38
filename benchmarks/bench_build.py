"""Building the catalog trie: ``Trie.from_sequences`` vs a Python dict trie and marisa-trie.

Inputs, each builder from the form it naturally takes, converted before timing unless noted:
- flower_ext-flat: the flat int64 token array and offsets (numpy), as a catalog stored or
  prepared with numpy holds it (no Python object per token);
- flower_ext-lists: one Python list of token ids per item; the conversion to flat arrays
  inside ``from_sequences`` is timed;
- dict_trie: the same lists (:func:`baselines.build_dict_trie`);
- marisa_trie: each sequence pre-encoded as a string of 3 ASCII characters per token
  (:func:`baselines.marisa_keys`); the encoding is not timed, which favours marisa.

The 1M-item dict trie takes about 15 s and several GB here (the process peaks near 5 GB); like
every implementation slower than ``harness.SLOW_CALL_S`` it is timed in a few fixed rounds (one,
for it).

Targets: >= 10x the dict trie, faster than marisa-trie. Checks before timing: both flower_ext
inputs give identical tries; the dict trie, renumbered in BFS order, has exactly our parent,
token and item-node arrays; marisa holds one key per distinct sequence, as many as our trie has
nodes where items end.
"""

from __future__ import annotations

import marisa_trie
import numpy as np
import pytest
import torch

import baselines
from flower_ext import Trie
from harness import Case, baseline, ours

OURS_FLAT = "flower_ext-flat"
OURS_LISTS = "flower_ext-lists"
DICT_TRIE = "dict_trie"
MARISA = "marisa_trie"


def _check(catalog, results) -> None:
    flat, lists = results[OURS_FLAT], results[OURS_LISTS]
    assert torch.equal(flat.data, lists.data) and flat.level_ptr == lists.level_ptr

    parent, token, item_node = baselines.dict_trie_arrays(results[DICT_TRIE], catalog.num_items)
    np.testing.assert_array_equal(parent, flat.parent.numpy())
    np.testing.assert_array_equal(token, flat.token.numpy())
    np.testing.assert_array_equal(item_node, flat.item_node.numpy())

    distinct_sequences = int((flat.item_ptr.diff() > 0).sum())
    assert len(results[MARISA]) == distinct_sequences


@pytest.fixture(scope="session")
def build_case(catalog) -> Case:
    sequences = catalog.sequences
    keys = baselines.marisa_keys(catalog.tokens, catalog.offsets, catalog.vocab_size)
    return Case(
        "build",
        catalog.name,
        [
            ours(OURS_FLAT, lambda: Trie.from_sequences(catalog.tokens, offsets=catalog.offsets)),
            ours(OURS_LISTS, lambda: Trie.from_sequences(sequences)),
            baseline(DICT_TRIE, lambda: baselines.build_dict_trie(sequences), target=10),
            baseline(MARISA, lambda: marisa_trie.Trie(keys), target=1),
        ],
        lambda results: _check(catalog, results),
    )


@pytest.mark.parametrize("implementation", [OURS_FLAT, OURS_LISTS, DICT_TRIE, MARISA])
def test_build(benchmark, build_case, implementation):
    build_case.measure(benchmark, implementation)
