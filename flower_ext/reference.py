"""Plain-PyTorch reference of every trie op and Flower loss, for tests and benchmark baselines.

Everything here is written from the definitions (docs/design.md section 4, docs/method.md sections
2-3) and shares no code with the compiled kernels, :mod:`flower_ext.ops` or
:class:`flower_ext.Trie`:

- :class:`ReferenceTrie` is a dict keyed by token prefixes, built straight from the raw item
  sequences. Its node ids are defined from first principles: BFS order with siblings sorted by
  token is the order of the prefixes by (length, tokens), so the reference and the compiled trie
  must number their nodes identically and results can be compared id for id.
  :func:`node_prefixes` recovers the prefix of every node of a compiled trie from its ``token``
  and ``parent`` arrays, which is how the tests check that claim.
- Each op takes a :class:`ReferenceTrie` where the real op takes a trie, and otherwise has the
  real op's arguments and results (mutating ops return a new tensor instead).
- :func:`subtb_loss_all_pairs` is the sub-trajectory balance loss summed pair by pair, O(T^2)
  Python loops as in the published implementation; benchmarks time it as the baseline of the
  O(T) closed form in :mod:`flower_ext.losses`.

Clarity over speed throughout: Python loops and dense ``[nodes, items]`` matrices. Index checks
raise ``ValueError`` as the real ops do. Differentiable quantities stay torch expressions so
autograd runs through the reference too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ReferenceTrie",
    "node_prefixes",
    "log_flows",
    "walk",
    "advance",
    "allowed_tokens",
    "token_bitmask",
    "apply_token_bitmask",
    "mask_logits",
    "guide_logits",
    "children",
    "transition_log_probs",
    "state_log_rewards",
    "ancestors",
    "preorder",
    "path_sums",
    "subtree_sums",
    "subtb_loss_all_pairs",
    "subtb_loss",
    "masked_subtb_loss",
    "flow_matching_loss",
    "trie_log_partitions",
    "leakage_loss",
]

Prefix = tuple[int, ...]

NEG_INF = float("-inf")
# Token ids are int32 in the trie; ids outside [0, 2^31) are rejected rather than truncated.
TOKEN_LIMIT = 2**31
# c_k of the method for a state that is not a complete title (docs/method.md section 3, step 3).
INCOMPLETE_LOG_REWARD = -15.0


# ---------------------------------------------------------------------------------------------
# build


class ReferenceTrie:
    """The prefix tree of a catalog as dicts keyed by token prefixes (tuples).

    Args:
        sequences: one token-id sequence per catalog entry.
        item_ids: the item id of each sequence (a permutation of ``0 .. len - 1``); sequence k
            is item k when omitted.

    Attributes:
        item_sequences: ``item_sequences[i]`` is the token tuple of item i.
        children: every prefix of every item (the empty prefix included) -> its child tokens,
            sorted ascending.
        items_at: prefix -> the ids (ascending) of the items whose sequence is exactly it.
        prefixes: all prefixes in node-id order (BFS, siblings by token).
        node_of: prefix -> node id.
    """

    def __init__(self, sequences: Iterable[Sequence[int]], item_ids: Sequence[int] | None = None):
        sequences = [tuple(int(token) for token in sequence) for sequence in sequences]
        if not sequences:
            raise ValueError("the catalog is empty")
        if any(len(sequence) == 0 for sequence in sequences):
            raise ValueError("every sequence needs at least one token")
        if any(not 0 <= token < TOKEN_LIMIT for sequence in sequences for token in sequence):
            raise ValueError("token ids must lie in [0, 2^31)")
        ids = list(range(len(sequences))) if item_ids is None else [int(i) for i in item_ids]
        if sorted(ids) != list(range(len(sequences))):
            raise ValueError("item_ids must be a permutation of 0 .. len(sequences) - 1")

        self.item_sequences: list[Prefix] = [()] * len(sequences)
        for sequence, item in zip(sequences, ids):
            self.item_sequences[item] = sequence

        child_sets: dict[Prefix, set[int]] = {(): set()}
        self.items_at: dict[Prefix, list[int]] = {}
        for item, sequence in enumerate(self.item_sequences):
            for depth, token in enumerate(sequence):
                child_sets.setdefault(sequence[:depth], set()).add(token)
                child_sets.setdefault(sequence[: depth + 1], set())
            self.items_at.setdefault(sequence, []).append(item)
        self.children: dict[Prefix, list[int]] = {
            prefix: sorted(tokens) for prefix, tokens in child_sets.items()
        }
        # BFS with siblings sorted by token visits depth d in the lexicographic order of the
        # depth-d prefixes (their parents are in that order by induction, then the tokens are).
        self.prefixes: list[Prefix] = sorted(
            self.children, key=lambda prefix: (len(prefix), prefix)
        )
        self.node_of: dict[Prefix, int] = {
            prefix: node for node, prefix in enumerate(self.prefixes)
        }

    @property
    def num_nodes(self) -> int:
        return len(self.prefixes)

    @property
    def num_items(self) -> int:
        return len(self.item_sequences)

    @property
    def depth(self) -> int:
        return max(len(sequence) for sequence in self.item_sequences)

    @property
    def max_token(self) -> int:
        return max(token for sequence in self.item_sequences for token in sequence)

    @property
    def level_ptr(self) -> list[int]:
        """Node-id boundaries of the depth levels: depth d is nodes ``level_ptr[d]`` to
        ``level_ptr[d + 1] - 1``."""
        counts = [0] * (self.depth + 1)
        for prefix in self.prefixes:
            counts[len(prefix)] += 1
        return [sum(counts[:d]) for d in range(self.depth + 2)]

    @property
    def item_node(self) -> list[int]:
        """The node where each item's sequence ends."""
        return [self.node_of[sequence] for sequence in self.item_sequences]

    def prefix(self, node: int) -> Prefix:
        """The prefix of a node id, checked: ``ValueError`` outside ``[0, num_nodes)``."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node id {node} is outside [0, {self.num_nodes})")
        return self.prefixes[node]

    def subtree_membership(self) -> Tensor:
        """``[N, I]`` bool: item i lies in the subtree of node n (its sequence starts with n's
        prefix)."""
        nodes, items = [], []
        for item, sequence in enumerate(self.item_sequences):
            for depth in range(len(sequence) + 1):
                nodes.append(self.node_of[sequence[:depth]])
                items.append(item)
        membership = torch.zeros(self.num_nodes, self.num_items, dtype=torch.bool)
        membership[nodes, items] = True
        return membership


def node_prefixes(token: Tensor, parent: Tensor) -> list[Prefix]:
    """The token prefix of every node of a trie given by its ``token`` and ``parent`` arrays
    (parents before children, as in BFS order), for comparison with :class:`ReferenceTrie`."""
    prefixes: list[Prefix] = []
    for node, (incoming, up) in enumerate(zip(token.tolist(), parent.tolist())):
        if up >= node:
            raise ValueError(f"node {node}: its parent {up} is not an earlier node")
        prefixes.append(() if up < 0 else prefixes[up] + (incoming,))
    return prefixes


def _node_or_none(ref: ReferenceTrie, node: int) -> Prefix | None:
    """The prefix of a node id, None for -1 (no node); ``ValueError`` for anything else."""
    return None if node == -1 else ref.prefix(node)


def _is_child(parent: Prefix, child: Prefix) -> bool:
    return len(child) == len(parent) + 1 and child[:-1] == parent


def _check_token(token: int) -> None:
    if not 0 <= token < TOKEN_LIMIT:
        raise ValueError(f"token id {token} is outside [0, 2^31)")


# ---------------------------------------------------------------------------------------------
# flows


def log_flows(ref: ReferenceTrie, log_rewards: Tensor) -> Tensor:
    """``[..., I]`` item log-rewards -> ``[..., N]`` node log-flows: the logsumexp of the rewards
    of the items whose sequence starts with the node's prefix (-inf for an empty subtree),
    computed densely over a ``[N, I]`` membership matrix."""
    if torch.isnan(log_rewards).any() or (log_rewards == math.inf).any():
        raise ValueError("log-rewards must not be NaN or +inf")
    membership = ref.subtree_membership().to(log_rewards.device)
    masked = torch.where(membership, log_rewards.unsqueeze(-2), NEG_INF)  # [..., N, I]
    return torch.logsumexp(masked, dim=-1)


# ---------------------------------------------------------------------------------------------
# walk / advance


def walk(ref: ReferenceTrie, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
    """``[B, L]`` int32: ``out[b, t]`` is the node of the prefix ``tokens[b, :t + 1]``, -1 once it
    is not a prefix in the trie and at positions ``t >= lengths[b]``."""
    batch, max_length = tokens.shape
    rows = tokens.tolist()
    row_lengths = [max_length] * batch if lengths is None else lengths.tolist()
    out = torch.full((batch, max_length), -1, dtype=torch.int32)
    for b, (row, length) in enumerate(zip(rows, row_lengths)):
        if not 0 <= length <= max_length:
            raise ValueError(f"length {length} of row {b} is outside [0, {max_length}]")
        for t in range(length):
            _check_token(row[t])
            out[b, t] = ref.node_of.get(tuple(row[: t + 1]), -1)
    return out.to(tokens.device)


def advance(ref: ReferenceTrie, node_ids: Tensor, tokens: Tensor) -> Tensor:
    """The node of ``prefix(node) + (token,)`` for each element (same shape, int32); -1 where
    that is no prefix in the trie or where the node id is -1."""
    out = []
    for node, token in zip(node_ids.reshape(-1).tolist(), tokens.reshape(-1).tolist()):
        prefix = _node_or_none(ref, node)
        _check_token(token)
        out.append(-1 if prefix is None else ref.node_of.get(prefix + (token,), -1))
    return torch.tensor(out, dtype=torch.int32, device=node_ids.device).reshape(node_ids.shape)


# ---------------------------------------------------------------------------------------------
# token bitmask and logit masking


def allowed_tokens(
    ref: ReferenceTrie, node_ids: Tensor, vocab_size: int, finished_token: int | None = None
) -> Tensor:
    """``[B, V]`` bool: the child tokens of each row's node; a finished row (a node without
    children, or -1) allows ``finished_token`` alone, or nothing when it is None. Built per row
    with ``arange`` + ``isin`` over the whole vocabulary, the published Flower approach."""
    vocabulary = torch.arange(vocab_size)
    rows = []
    for node in node_ids.tolist():
        prefix = _node_or_none(ref, node)
        child_tokens = [] if prefix is None else ref.children[prefix]
        if child_tokens and child_tokens[-1] >= vocab_size:
            raise ValueError(f"vocab_size {vocab_size} does not cover token {child_tokens[-1]}")
        if not child_tokens and finished_token is not None:
            child_tokens = [finished_token]
        rows.append(torch.isin(vocabulary, torch.tensor(child_tokens, dtype=torch.int64)))
    if not rows:
        return torch.zeros(0, vocab_size, dtype=torch.bool, device=node_ids.device)
    return torch.stack(rows).to(node_ids.device)


def _pack_bits(allowed: Tensor) -> Tensor:
    """``[B, V]`` bool -> ``[B, ceil(V / 32)]`` int32, bit j of word w = column 32 w + j."""
    batch, vocab_size = allowed.shape
    words = -(-vocab_size // 32)
    padded = torch.zeros(batch, words * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :vocab_size] = allowed.long()
    weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64, device=allowed.device)
    unsigned = (padded.view(batch, words, 32) * weights).sum(-1)  # in [0, 2^32)
    # Reinterpret as two's-complement int32: bit 31 is the sign bit.
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def _unpack_bits(bitmask: Tensor, vocab_size: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: ``[B, W]`` int32 -> ``[B, vocab_size]`` bool."""
    shifts = torch.arange(32, device=bitmask.device)
    bits = (bitmask.long().unsqueeze(-1) >> shifts) & 1  # sign extension leaves bits 0..31 intact
    return bits.reshape(bitmask.shape[0], bitmask.shape[1] * 32)[:, :vocab_size].bool()


def token_bitmask(
    ref: ReferenceTrie, node_ids: Tensor, vocab_size: int, finished_token: int | None = None
) -> Tensor:
    """``[B, ceil(V / 32)]`` int32 allowed-token bitmask, xgrammar / vLLM layout (bit j of word
    w is token 32 w + j, 1 = allowed); finished rows as in :func:`allowed_tokens`."""
    return _pack_bits(allowed_tokens(ref, node_ids, vocab_size, finished_token))


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """A copy of ``logits [B, V]`` with -inf wherever the bitmask bit is 0."""
    return logits.masked_fill(~_unpack_bits(bitmask, logits.shape[-1]), NEG_INF)


def mask_logits(
    ref: ReferenceTrie, logits: Tensor, node_ids: Tensor, finished_token: int | None = None
) -> Tensor:
    """A copy of ``logits [B, V]`` with -inf on every token that is not a child of the row's
    node; finished rows as in :func:`allowed_tokens`."""
    allowed = allowed_tokens(ref, node_ids, logits.shape[-1], finished_token)
    return logits.masked_fill(~allowed, NEG_INF)


def guide_logits(
    ref: ReferenceTrie,
    logits: Tensor,
    node_ids: Tensor,
    log_flows: Tensor,
    beta: float | Tensor,
    finished_token: int | None = None,
) -> Tensor:
    """:func:`mask_logits` (finished rows keep ``finished_token``'s logit, unguided), then for
    each child c of row b's node n (token v): -inf when
    ``log(F(c) / F(n))`` is -inf (a zero prior), else ``logits[b, v] - beta_b * log(F(c) / F(n))``
    computed in float32 (float64 for float64 logits). ``log_flows`` is ``[N]`` or ``[B, N]``,
    ``beta`` a number or a 0-d or ``[B]`` tensor; the flows a row reads must not be NaN or +inf,
    and beta must be finite."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    batch = logits.shape[0]
    betas = torch.as_tensor(beta, dtype=compute).expand(batch)
    if not torch.isfinite(betas).all():
        raise ValueError("beta must be finite")
    out = mask_logits(ref, logits, node_ids, finished_token)
    for b, (flows, node) in enumerate(zip(_row_flows(log_flows, batch), node_ids.tolist())):
        prefix = _node_or_none(ref, node)
        if prefix is None:
            continue
        for token in ref.children[prefix]:
            child = ref.node_of[prefix + (token,)]
            if torch.isnan(flows[[node, child]]).any() or (flows[[node, child]] == math.inf).any():
                raise ValueError("log-flows must not be NaN or +inf")
            ratio = _log_ratio(flows[child], flows[node]).to(compute)
            if ratio == NEG_INF:
                out[b, token] = NEG_INF
            else:
                out[b, token] = (logits[b, token].to(compute) - betas[b] * ratio).to(logits.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# children of path nodes


def children(ref: ReferenceTrie, node_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CSR ``(row_ptr [M + 1] int64, child_tokens [K] int32, child_nodes [K] int32)`` of the
    children of each node, sorted by token; node -1 has none."""
    row_ptr, child_tokens, child_nodes = [0], [], []
    for node in node_ids.tolist():
        prefix = _node_or_none(ref, node)
        tokens = [] if prefix is None else ref.children[prefix]
        child_tokens += tokens
        child_nodes += [ref.node_of[prefix + (token,)] for token in tokens]
        row_ptr.append(len(child_tokens))
    device = node_ids.device
    return (
        torch.tensor(row_ptr, dtype=torch.int64, device=device),
        torch.tensor(child_tokens, dtype=torch.int32, device=device),
        torch.tensor(child_nodes, dtype=torch.int32, device=device),
    )


# ---------------------------------------------------------------------------------------------
# target transition log-probabilities and per-state rewards


def _row_flows(log_flows: Tensor, batch: int) -> list[Tensor]:
    """The ``[N]`` flows that row b of a batch uses: shared (``[N]``) or per row (``[B, N]``)."""
    return [log_flows if log_flows.dim() == 1 else log_flows[b] for b in range(batch)]


def _log_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """log(F_a / F_b) = F_a - F_b in log space; a zero-flow denominator gives probability 0."""
    return denominator.new_tensor(NEG_INF) if denominator == NEG_INF else numerator - denominator


def _termination_log_prob(
    ref: ReferenceTrie, flows: Tensor, prefix: Prefix, termination_token: int
) -> Tensor:
    """log P̂(⊤ | s) = log F(s⊤) - log F(s); -inf when s has no termination child."""
    end = ref.node_of.get(prefix + (termination_token,))
    if end is None:
        return flows.new_tensor(NEG_INF)
    return _log_ratio(flows[end], flows[ref.node_of[prefix]])


def transition_log_probs(
    ref: ReferenceTrie, log_flows: Tensor, path_nodes: Tensor, termination_token: int
) -> tuple[Tensor, Tensor]:
    """Along paths of states ``path_nodes [B, S]``: ``step [B, S-1]`` = log F(s_{t+1}) - log
    F(s_t) and ``termination [B, S]`` = log F(s_t⊤) - log F(s_t) (-inf without a termination
    child); -inf out of a zero-flow state; 0 on padding (node id -1, which may only follow the
    real states). Consecutive real states must be parent and child (``ValueError`` otherwise)."""
    batch, num_states = path_nodes.shape
    step = log_flows.new_zeros(batch, num_states - 1)
    termination = log_flows.new_zeros(batch, num_states)
    for b, (flows, path) in enumerate(zip(_row_flows(log_flows, batch), path_nodes.tolist())):
        prefixes = [_node_or_none(ref, node) for node in path]
        for t, (source, target) in enumerate(zip(prefixes, prefixes[1:])):
            if target is None:
                continue
            if source is None or not _is_child(source, target):
                raise ValueError(
                    f"row {b}: path nodes {path[t]} -> {path[t + 1]} are not parent and child"
                )
            step[b, t] = _log_ratio(flows[path[t + 1]], flows[path[t]])
        for t, prefix in enumerate(prefixes):
            if prefix is not None:
                termination[b, t] = _termination_log_prob(ref, flows, prefix, termination_token)
    return step, termination


def state_log_rewards(
    ref: ReferenceTrie,
    log_flows: Tensor,
    path_nodes: Tensor,
    termination_token: int,
    incomplete_log_reward: float = INCOMPLETE_LOG_REWARD,
) -> Tensor:
    """Per-state log-rewards ``log R(s_k⊤) = sum_{t<k} log P̂(y_{t+1} | s_t) + c_k`` of the
    method (``[B, S]``), with ``c_k = log P̂(⊤ | s_k)`` for a complete title (a termination child
    of positive flow) and ``incomplete_log_reward`` otherwise. A row's states are its leading
    non-negative node ids; the padding after them is 0. A state of zero reward gets its exact
    value, -inf (the package floors it to keep the loss finite)."""
    batch, num_states = path_nodes.shape
    out = log_flows.new_zeros(batch, num_states)
    for b, (flows, path) in enumerate(zip(_row_flows(log_flows, batch), path_nodes.tolist())):
        states = path[: path.index(-1)] if -1 in path else path
        path_log_prob = flows.new_zeros(())
        for k, node in enumerate(states):
            if k > 0:
                if not _is_child(ref.prefix(states[k - 1]), ref.prefix(node)):
                    raise ValueError(f"row {b}: states {k - 1} and {k} are not parent and child")
                path_log_prob = path_log_prob + _log_ratio(flows[node], flows[states[k - 1]])
            ending = _termination_log_prob(ref, flows, ref.prefix(node), termination_token)
            complete = ending > NEG_INF
            out[b, k] = path_log_prob + (ending if complete else incomplete_log_reward)
    return out


# ---------------------------------------------------------------------------------------------
# tree passes


def ancestors(ref: ReferenceTrie) -> Tensor:
    """``[N, N]`` bool: entry ``[n, m]`` is True when node m's prefix starts node n's (m is an
    ancestor of n, or n itself)."""
    out = torch.zeros(ref.num_nodes, ref.num_nodes, dtype=torch.bool)
    for node, prefix in enumerate(ref.prefixes):
        for depth in range(len(prefix) + 1):
            out[node, ref.node_of[prefix[:depth]]] = True
    return out


def preorder(ref: ReferenceTrie) -> tuple[Tensor, Tensor]:
    """``(rank [N] int64, subtree_size [N] int64)``: the order in which a depth-first walk
    visits the nodes (children by ascending token), and the number of prefixes that start with
    each node's prefix."""
    visited, stack = [], [()]
    while stack:
        prefix = stack.pop()
        visited.append(ref.node_of[prefix])
        stack.extend(prefix + (token,) for token in reversed(ref.children[prefix]))
    rank = torch.empty(ref.num_nodes, dtype=torch.int64)
    rank[visited] = torch.arange(ref.num_nodes)
    return rank, ancestors(ref).sum(0)


def path_sums(ref: ReferenceTrie, values: Tensor) -> Tensor:
    """``[..., N]`` -> ``[..., N]``: the sum of the values of every node whose prefix starts the
    node's own (its ancestors and itself)."""
    on_path = ancestors(ref).to(values.device)
    return torch.where(on_path, values.unsqueeze(-2), 0).sum(-1)


def subtree_sums(ref: ReferenceTrie, values: Tensor) -> Tensor:
    """``[..., N]`` -> ``[..., N]``: the sum of the values of every node whose prefix starts
    with the node's own (its subtree)."""
    in_subtree = ancestors(ref).t().to(values.device)
    return torch.where(in_subtree, values.unsqueeze(-2), 0).sum(-1)


# ---------------------------------------------------------------------------------------------
# losses


def subtb_loss_all_pairs(
    action_log_probs: Tensor,
    termination_log_probs: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
) -> Tensor:
    """Modified sub-trajectory balance summed pair by pair: the O(T^2) definition.

    For each row b with T = ``lengths[b]`` and every pair of states ``0 <= m < n <= T``::

        Δ(m, n) = log R(s_m⊤) + sum_{t=m}^{n-1} log π(y_{t+1} | s_t) + log π(⊤ | s_n)
                  - log R(s_n⊤) - log π(⊤ | s_m)

    and the loss is the sum of Δ(m, n)^2 over rows and pairs divided by the number of pairs
    (0 when there are none). Python loops over rows and pairs, a running sum over the actions
    between m and n: the way the published implementation computes it (docs/method.md section 5,
    pitfall 6), kept here as the baseline of the closed form.

    Args:
        action_log_probs: ``[B, T]`` log π(y_{t+1} | s_t).
        termination_log_probs: ``[B, T+1]`` log π(⊤ | s_k).
        log_rewards: ``[B, T+1]`` log R(s_k⊤).
        lengths: ``[B]`` T of each row; entries past it are ignored.
    """
    total = action_log_probs.new_zeros(())
    num_pairs = 0
    for b, length in enumerate(lengths.tolist()):
        for m in range(length + 1):
            actions_between = action_log_probs.new_zeros(())
            for n in range(m + 1, length + 1):
                actions_between = actions_between + action_log_probs[b, n - 1]
                delta = (
                    log_rewards[b, m]
                    + actions_between
                    + termination_log_probs[b, n]
                    - log_rewards[b, n]
                    - termination_log_probs[b, m]
                )
                total = total + delta**2
                num_pairs += 1
    return total / max(num_pairs, 1)


def _working(logits: Tensor) -> Tensor:
    """The logits in float32 (float64 for float64 logits), the losses' working dtype."""
    return logits.double() if logits.dtype == torch.float64 else logits.float()


def _log_policy(logits: Tensor, log_partitions: Tensor | None) -> Tensor:
    """log π per state and token: the full-vocabulary log-softmax, or the logits minus the given
    per-state log normaliser ``[B, S]`` (the masked policy of :func:`trie_log_partitions`)."""
    if log_partitions is None:
        return torch.log_softmax(_working(logits), -1)
    return _working(logits) - log_partitions.to(_working(logits).dtype).unsqueeze(-1)


def subtb_loss(
    logits: Tensor, actions: Tensor, log_rewards: Tensor, lengths: Tensor, termination_token: int
) -> Tensor:
    """:func:`subtb_loss_all_pairs` with the log-probabilities taken from the model's logits
    ``[B, T+1, V]`` (full-vocabulary log-softmax) at the states of ``actions [B, T]``."""
    log_probs = _log_policy(logits, None)
    batch, num_states, _ = logits.shape
    action_log_probs = log_probs.new_zeros(batch, num_states - 1)
    for b, length in enumerate(lengths.tolist()):
        for t in range(length):
            action_log_probs[b, t] = log_probs[b, t, int(actions[b, t])]
    return subtb_loss_all_pairs(
        action_log_probs, log_probs[..., termination_token], log_rewards, lengths
    )


def masked_subtb_loss(
    logits: Tensor,
    ref: ReferenceTrie,
    path_nodes: Tensor,
    actions: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
    termination_token: int,
    incomplete_log_reward: float = -15.0,
) -> Tensor:
    """:func:`subtb_loss_all_pairs` of the policy renormalised over each state's trie children;
    the termination log-probability of a state where no item ends is ``incomplete_log_reward``."""
    scores = _working(logits)
    batch, num_states, _ = logits.shape
    action_log_probs = scores.new_zeros(batch, num_states - 1)
    termination_log_probs = scores.new_zeros(batch, num_states)
    for b, length in enumerate(lengths.tolist()):
        for t in range(length + 1):
            children = list(ref.children[_node_or_none(ref, int(path_nodes[b, t]))])
            log_z = torch.logsumexp(scores[b, t, children], 0)
            if t < length:
                action_log_probs[b, t] = scores[b, t, int(actions[b, t])] - log_z
            termination_log_probs[b, t] = (
                scores[b, t, termination_token] - log_z
                if termination_token in children
                else scores.new_tensor(incomplete_log_reward)
            )
    return subtb_loss_all_pairs(action_log_probs, termination_log_probs, log_rewards, lengths)


def flow_matching_loss(
    logits: Tensor,
    ref: ReferenceTrie,
    log_flows: Tensor,
    path_nodes: Tensor,
    *,
    log_partitions: Tensor | None = None,
) -> Tensor:
    """Teacher-forced flow matching: the mean, over the states (non-negative entries of
    ``path_nodes [B, S]``) that have children, of the cross-entropy
    ``-sum_c F(c) / F(s) * log π(c | s)`` between the target children distribution and the
    model's log-probabilities (full-vocabulary log-softmax, or normalised by ``log_partitions``)
    ``logits [B, S, V]``. A zero-flow state has target 0."""
    log_probs = _log_policy(logits, log_partitions)
    batch = path_nodes.shape[0]
    total, num_states = log_probs.new_zeros(()), 0
    for b, (flows, path) in enumerate(zip(_row_flows(log_flows, batch), path_nodes.tolist())):
        for s, node in enumerate(path):
            prefix = _node_or_none(ref, node)
            if prefix is None or not ref.children[prefix]:
                continue
            num_states += 1
            if flows[node] == NEG_INF:
                continue
            for token in ref.children[prefix]:
                target = torch.exp(flows[ref.node_of[prefix + (token,)]] - flows[node])
                total = total - target.to(log_probs.dtype) * log_probs[b, s, token]
    return total / max(num_states, 1)


def trie_log_partitions(logits: Tensor, ref: ReferenceTrie, path_nodes: Tensor) -> Tensor:
    """``[B, S]``: the log-sum-exp of each state's logits ``[B, S, V]`` over its node's children,
    -inf at padding and at nodes without children."""
    scores = _working(logits)
    no_children = scores.new_tensor(NEG_INF)
    rows = []
    for b, path in enumerate(path_nodes.tolist()):
        row = []
        for s, node in enumerate(path):
            prefix = _node_or_none(ref, node)
            tokens = [] if prefix is None else list(ref.children[prefix])
            row.append(torch.logsumexp(scores[b, s, tokens], 0) if tokens else no_children)
        rows.append(torch.stack(row) if row else scores.new_zeros(0))
    return torch.stack(rows) if rows else scores.new_zeros(path_nodes.shape)


def leakage_loss(logits: Tensor, log_partitions: Tensor) -> Tensor:
    """The mean, over the states with a finite ``log_partitions`` (the log-sum-exp of the logits
    over the state's trie children), of ``-log`` of the full-vocabulary probability of those
    children."""
    log_normaliser = torch.logsumexp(_working(logits), -1)
    total, count = log_normaliser.new_zeros(()), 0
    for b in range(log_partitions.shape[0]):
        for s in range(log_partitions.shape[1]):
            if torch.isfinite(log_partitions[b, s]):
                total = total + log_normaliser[b, s] - log_partitions[b, s].to(total.dtype)
                count += 1
    return total / max(count, 1)
