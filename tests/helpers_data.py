"""Small catalog and node-row generators shared by the interop and generation tests.

Imported as a plain module (``from helpers_data import ...``): pytest puts this folder on
``sys.path`` because ``tests/`` is not a package.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from flower_ext import Trie


def random_catalog(
    rng: random.Random,
    num_items: int,
    tokens: Sequence[int],
    max_length: int,
    termination_token: int,
) -> list[list[int]]:
    """``num_items`` distinct items: 1 .. ``max_length`` tokens drawn from ``tokens``, then
    ``termination_token``. Drawing from a few tokens makes items share prefixes and makes some
    items prefixes of others (up to the termination token), as in a real catalog."""
    distinct_paths = sum(len(tokens) ** length for length in range(1, max_length + 1))
    if num_items > distinct_paths:
        raise ValueError(f"only {distinct_paths} distinct items exist, {num_items} requested")
    items: set[tuple[int, ...]] = set()
    while len(items) < num_items:
        length = rng.randint(1, max_length)
        items.add(tuple(rng.choice(tokens) for _ in range(length)) + (termination_token,))
    return [list(item) for item in sorted(items)]


def leaf_nodes(trie: Trie) -> Tensor:
    """Ids of the nodes without children (where items end), int32."""
    return (trie.child_ptr.diff() == 0).nonzero().flatten().to(torch.int32)


def node_rows(trie: Trie, rng: random.Random, count: int) -> Tensor:
    """``count`` random node ids, followed by the rows that must always be covered: -1 (a row
    that left the trie), the root and a leaf. int32 ``[count + 3]``."""
    chosen = [rng.randrange(trie.num_nodes) for _ in range(count)]
    leaves = leaf_nodes(trie).tolist()
    return torch.tensor(chosen + [-1, 0, rng.choice(leaves)], dtype=torch.int32)


def allowed_tokens(trie: Trie, node_ids: Tensor, vocab_size: int) -> Tensor:
    """``[B, V]`` bool: True where the token is a child of the row's node. Built from
    :meth:`Trie.children` (CSR), independently of the bitmask kernels under test."""
    row_ptr, child_tokens, _ = trie.children(node_ids)
    rows = torch.repeat_interleave(torch.arange(node_ids.numel()), row_ptr.diff())
    allowed = torch.zeros(node_ids.numel(), vocab_size, dtype=torch.bool)
    allowed[rows, child_tokens.long()] = True
    return allowed
