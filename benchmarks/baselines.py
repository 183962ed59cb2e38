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
from torch import Tensor

from flower_ext import Trie

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


# ---------------------------------------------------------------------------------------------
# one training step's trie work


def prefix_key(key: str, token: int) -> str:
    """The published code's key of a token prefix: the token ids joined by ``"-"`` (``"12-873-5"``),
    extended by one token; the empty prefix is ``""``."""
    return f"{key}-{token}" if key else str(token)


class PrefixKeyTrie:
    """The trie work of one Flower training step the way the published code does it: dicts keyed
    by ``"-"``-joined token-prefix strings, a ``torch.isin`` mask over the vocabulary per row and
    rollout step, per-state rewards read prefix by prefix from string-keyed dicts.

    Args:
        sequences: each item's token sequence, without the termination token (the decoding trie).
        termination_token: the token that ends every item in the loss (EOS).
        vocab_size: the model's vocabulary.
        popularity_log_rewards: ``[I]`` item log-rewards of the popularity-only reward (``logp``),
            for :meth:`published_state_log_rewards`; optional.

    Attributes:
        allowed: prefix key -> the tokens that may follow it in a rollout (``[k]`` int64), for the
            prefixes of the decoding trie that are not complete items.
        items_under: prefix key -> the items (``[k]`` int64) whose loss sequence (the item's
            tokens then the termination token) starts with the prefix: what a per-user flow of
            that prefix sums over.
        transition: prefix key -> ``{token: log P̂(token | prefix)}`` of the popularity reward,
            the published ``token_distri`` (JSON) table.

    The dicts are built once (not timed); what is timed is the per-step work. Keys are extended
    one token at a time rather than re-joined from the whole prefix, the allowed tokens are kept
    as tensors rather than re-parsed from the JSON keys, and ``arange(V)`` is made once per step
    rather than once per row (the published code did all three the slow way): each of these is
    the fastest form that keeps the approach."""

    def __init__(
        self,
        sequences: list[list[int]],
        termination_token: int,
        vocab_size: int,
        popularity_log_rewards: Tensor | None = None,
    ):
        self.eos = int(termination_token)
        self.vocab_size = vocab_size
        allowed: dict[str, set[int]] = {}
        under: dict[str, list[int]] = {}
        for item, sequence in enumerate(sequences):
            key = ""
            under.setdefault(key, []).append(item)
            for token in sequence:
                allowed.setdefault(key, set()).add(token)
                key = prefix_key(key, token)
                under.setdefault(key, []).append(item)
            under.setdefault(prefix_key(key, self.eos), []).append(item)
        self.allowed = {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in allowed.items()}
        self.items_under = {k: torch.tensor(v, dtype=torch.long) for k, v in under.items()}
        self.transition: dict[str, dict[int, float]] = {}
        if popularity_log_rewards is not None:
            rewards = popularity_log_rewards.double()
            flows = {k: torch.logsumexp(rewards[v], 0).item() for k, v in self.items_under.items()}
            for key, flow in flows.items():
                row = self.transition.setdefault(key, {})
                tokens = self.allowed[key].tolist() if key in self.allowed else []
                for token in [*tokens, self.eos]:
                    child = flows.get(prefix_key(key, token))
                    if child is not None:
                        row[token] = child - flow

    # -- rollout ----------------------------------------------------------------------------

    def mask_logits_(self, logits: Tensor, keys: list[str]) -> Tensor:
        """Sets, in place, every logit whose token may not follow the row's prefix to -inf."""
        vocabulary = torch.arange(logits.shape[1])
        allowed = torch.stack([torch.isin(vocabulary, self.allowed[key]) for key in keys])
        return logits.masked_fill_(~allowed, float("-inf"))

    def rollout_masks(self, steps) -> list[Tensor]:
        """The masking work of a rollout, replayed: ``steps`` is a list of ``(logits [n, V],
        rows [n], tokens [n])`` per generation step, the logits of the rows still generating and
        the tokens they drew. Returns the masked logits of every step. A row's prefix key grows
        by the token it drew, as the published code keys the generated prefix."""
        keys: dict[int, str] = {}
        out = []
        for logits, rows, tokens in steps:
            rows = rows.tolist()
            out.append(self.mask_logits_(logits, [keys.get(row, "") for row in rows]))
            for row, token in zip(rows, tokens.tolist()):
                keys[row] = prefix_key(keys.get(row, ""), token)
        return out

    # -- rewards ----------------------------------------------------------------------------

    def state_log_rewards(
        self,
        item_log_rewards: Tensor,
        actions: Tensor,
        lengths: Tensor,
        incomplete_log_reward: float = -15.0,
        floor: float = -1e4,
    ) -> Tensor:
        """Per-state log-rewards ``[B, T+1]`` (``flower_ext.losses.state_log_rewards``) of each
        row's own item rewards ``item_log_rewards [B, I]``: per state the row's flow
        ``logsumexp`` over the items under the prefix (looked up by its key), and that of its
        termination child; the sum of the step log-ratios so far plus the termination
        log-ratio (or ``incomplete_log_reward``). Exact per-user flows, which the published code
        does not compute (see :meth:`published_state_log_rewards`); states past a row's length
        are 0."""
        batch, width = actions.shape
        out = torch.zeros((batch, width + 1), dtype=torch.float64)
        rewards = item_log_rewards.double()
        for row, (tokens, length) in enumerate(zip(actions.tolist(), lengths.tolist())):
            user = rewards[row]
            key, flow, total = "", torch.logsumexp(user, 0).item(), 0.0
            for k in range(length + 1):
                end = self.items_under.get(prefix_key(key, self.eos))
                if end is None:
                    ending = incomplete_log_reward
                else:
                    ending = torch.logsumexp(user[end], 0).item() - flow
                out[row, k] = max(total + ending, floor)
                if k < length:
                    key = prefix_key(key, tokens[k])
                    child = torch.logsumexp(user[self.items_under[key]], 0).item()
                    total += child - flow
                    flow = child
        return out

    def published_state_log_rewards(
        self,
        actions: Tensor,
        lengths: Tensor,
        scale: list[float] | None = None,
        incomplete_log_reward: float = -15.0,
    ) -> Tensor:
        """The published per-state log-rewards: the popularity transitions ``log P̂`` read from
        :attr:`transition` prefix by prefix, each divided by the row's ``scale`` (``s_ui`` of
        the sampled item under ``logp_div_s``; 1 for ``logp``). With ``scale`` None this equals
        :meth:`state_log_rewards` of the popularity rewards; with a scale it is the published
        approximation of the personalised reward (the division applies to every transition of
        the path, not to the item rewards before the flows are summed)."""
        batch, width = actions.shape
        out = torch.zeros((batch, width + 1), dtype=torch.float64)
        for row, (tokens, length) in enumerate(zip(actions.tolist(), lengths.tolist())):
            divisor = 1.0 if scale is None else scale[row]
            key, total = "", 0.0
            for k in range(length + 1):
                row_table = self.transition[key]
                ending = row_table.get(self.eos)
                if ending is None:
                    out[row, k] = total + incomplete_log_reward
                else:
                    out[row, k] = total + ending / divisor
                if k < length:
                    total += row_table[tokens[k]] / divisor
                    key = prefix_key(key, tokens[k])
        return out
