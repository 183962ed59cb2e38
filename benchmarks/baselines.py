"""The baselines the benchmarks time flower_ext against: what a user would otherwise run.

- :func:`build_dict_trie`: the Python dict trie of the published Flower and D3 code.
- :func:`marisa_keys`: token sequences as strings for ``marisa_trie.Trie``.
- :class:`LevelScatterFlows`: log-flows in plain PyTorch, one ``scatter_reduce`` pass per depth.
- :class:`IsinMasker`: allowed-token masks from a prefix-keyed dict and ``torch.isin``.

The O(T^2) sub-trajectory balance baseline is ``flower_ext.reference.subtb_loss_all_pairs``.
Each baseline is written the fastest way that stays faithful to the approach it stands for.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from flower_ext import Trie
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# build

# Key under which a dict-trie node lists the items whose sequence ends there; token ids are
# non-negative, so it never collides with a child.
ITEMS = -1


def build_dict_trie(sequences: list[list[int]]) -> dict:
    """Nested dicts ``{token: child}``, items listed under :data:`ITEMS` where they end.

    Nested dicts cost O(length) per sequence, where the published code's flat dict keyed by
    whole prefixes (tuples or ``"-"``-joined strings) builds a key per prefix, O(length^2); this
    is the faster of the two. ``dict.get`` then a store avoids the empty dict that
    ``setdefault(token, {})`` would allocate for every token that already has a node."""
    root: dict = {}
    for item, sequence in enumerate(sequences):
        node = root
        for token in sequence:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
            node = child
        items = node.get(ITEMS)
        if items is None:
            node[ITEMS] = [item]
        else:
            items.append(item)
    return root


def dict_trie_arrays(root: dict, num_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(parent, token, item_node)`` of a dict trie numbered like :class:`flower_ext.Trie`
    (BFS, siblings by token), so that the two builds can be compared array for array."""
    parent, token = [-1], [-1]
    item_node = np.full(num_items, -1, dtype=np.int32)
    queue = deque([(root, 0)])
    while queue:
        node, node_id = queue.popleft()
        for child_token in sorted(node):
            if child_token == ITEMS:
                item_node[node[ITEMS]] = node_id
                continue
            queue.append((node[child_token], len(parent)))
            parent.append(node_id)
            token.append(child_token)
    return np.asarray(parent, dtype=np.int32), np.asarray(token, dtype=np.int32), item_node


_MARISA_ALPHABET = 64  # printable ASCII from "0" (code 48) on, in code order


def marisa_keys(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> list[str]:
    """Each sequence as a string of fixed-width base-64 ASCII digits per token, most significant
    first. Fixed width keeps token boundaries aligned, so two sequences share a string prefix
    at a token boundary exactly when they share that token prefix, and the digits sort like the
    token ids; ASCII keeps UTF-8 at one byte per digit (3 bytes per Qwen token)."""
    width = 1
    while _MARISA_ALPHABET**width < vocab_size:
        width += 1
    powers = _MARISA_ALPHABET ** np.arange(width - 1, -1, -1)
    digits = (tokens[:, None] // powers) % _MARISA_ALPHABET + ord("0")
    text = digits.astype(np.uint8).tobytes().decode("ascii")
    bounds = (offsets * width).tolist()
    return [text[begin:end] for begin, end in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------
# log_flows


class LevelScatterFlows:
    """Log-flows of every node, ``[B, I]`` -> ``[B, N]``, level by level in plain PyTorch.

    From the deepest level to the root, each level's inputs are the flows of the level below
    (its nodes' children) and the log-rewards of the items ending on the level; per node a
    ``scatter_reduce('amax')`` gives the peak and a ``scatter_add`` of ``exp(value - peak)`` the
    sum, i.e. a per-parent logsumexp. The index tensors of every level are prepared once here,
    from the trie's parent and item-node arrays, as a user would cache them."""

    def __init__(self, trie: Trie):
        self.num_nodes = trie.num_nodes
        level_ptr = trie.level_ptr
        parent = trie.parent.long()
        item_node = trie.item_node.long()
        item_depth = torch.bucketize(item_node, torch.tensor(level_ptr), right=True) - 1
        # Deepest first: (begin, end) of the level's node ids, the end of the next level (whose
        # nodes, from `end` on, are the children), the items ending on the level, and the slot
        # of each input (children first, then items) among the level's nodes.
        self.levels = []
        for depth in range(len(level_ptr) - 2, -1, -1):
            begin, end = level_ptr[depth], level_ptr[depth + 1]
            children_end = level_ptr[depth + 2] if depth + 2 < len(level_ptr) else end
            items = torch.nonzero(item_depth == depth).squeeze(1)
            slots = torch.cat([parent[end:children_end], item_node[items]]) - begin
            self.levels.append((begin, end, children_end, items, slots))

    def __call__(self, log_rewards: Tensor) -> Tensor:
        batch = log_rewards.shape[0]
        flows = log_rewards.new_empty(batch, self.num_nodes)
        for begin, end, children_end, items, slots in self.levels:
            values = torch.cat([flows[:, end:children_end], log_rewards[:, items]], dim=1)
            index = slots.expand(batch, -1)
            peak = log_rewards.new_full((batch, end - begin), float("-inf"))
            peak.scatter_reduce_(1, index, values, "amax")
            # An empty subtree has peak -inf; shifting by 0 there keeps exp() at 0, not NaN.
            shift = torch.where(torch.isfinite(peak), peak, 0.0)
            shifted = torch.exp(values - shift.gather(1, index))
            total = torch.zeros_like(peak).scatter_add_(1, index, shifted)
            flows[:, begin:end] = shift + torch.log(total)
        return flows


# ---------------------------------------------------------------------------------------------
# token masks


class IsinMasker:
    """The published way to constrain a decoding step: a dict from a prefix key to the allowed
    next tokens, and per row ``torch.isin(arange(V), allowed)`` to build a ``[V]`` bool mask.

    The dict holds the given prefixes, its values filled with numpy from the raw token matrix
    (independently of flower_ext). The published code keeps every prefix of the catalog; lookups
    in this smaller dict are no slower, and its construction is not timed either way. The
    ``arange`` is made once per call rather than once per row, as ``reference.allowed_tokens``
    does (the published code made it per row)."""

    def __init__(self, padded_tokens: np.ndarray, prefixes: list[tuple[int, ...]], vocab_size: int):
        self.vocab_size = vocab_size
        self.allowed: dict[tuple[int, ...], Tensor] = {}
        for prefix in set(prefixes):
            depth = len(prefix)
            matches = (padded_tokens[:, :depth] == np.asarray(prefix, dtype=np.int64)).all(axis=1)
            next_tokens = padded_tokens[matches, depth]
            self.allowed[prefix] = torch.from_numpy(np.unique(next_tokens[next_tokens >= 0]))

    def allowed_mask(self, prefixes: list[tuple[int, ...]]) -> Tensor:
        """``[B, V]`` bool: True where the token may follow the row's prefix."""
        vocabulary = torch.arange(self.vocab_size)
        return torch.stack([torch.isin(vocabulary, self.allowed[prefix]) for prefix in prefixes])

    def mask_logits_(self, logits: Tensor, prefixes: list[tuple[int, ...]]) -> Tensor:
        """Sets, in place, every logit whose token may not follow the row's prefix to -inf."""
        return logits.masked_fill_(~self.allowed_mask(prefixes), float("-inf"))


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """``[B, ceil(V / 32)]`` int32 bitmask (bit j of word w = token 32 w + j) -> ``[B, V]`` bool."""
    bits = (bitmask.long().unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
