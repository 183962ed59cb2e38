"""Hypothesis strategies and helpers shared by the test modules.

Catalogs are drawn to hit the trie's corner cases: many shared prefixes (a small alphabet),
duplicate sequences, sequences that are prefixes of others, a single item, long sequences and
token ids at the int32 limit. Large float tensors (rewards, logits) come from a drawn seed, which
is much faster than drawing every element and still replays exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

import flower_ext
from flower_ext import Trie, reference
from flower_ext.reference import ReferenceTrie

# The devices the ops run on here: CUDA only where a GPU is present and the extension was
# compiled with its kernels. The `device` fixture of conftest.py parametrises tests over them.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and flower_ext.has_cuda else [])

INT32_MAX = 2**31 - 1

# Title tokens and the termination token ending every item of a terminated catalog. A small
# alphabet makes items share prefixes; the huge one sits at the top of the int32 range.
SMALL_TOKENS, SMALL_END = st.integers(1, 6), 0
HUGE_TOKENS, HUGE_END = st.integers(INT32_MAX - 6, INT32_MAX - 1), INT32_MAX
# A vocabulary that covers every small-alphabet token, not a multiple of 32 (a partial last
# bitmask word), for the masking ops.
SMALL_VOCAB = 45

# Batch sizes: empty, one, a few and many.
BATCH_SIZES = st.sampled_from([0, 1, 3, 64])
# Seeds of the generated float tensors (see `seeded`).
SEEDS = st.integers(0, 2**32 - 1)


class Catalog(NamedTuple):
    sequences: list[list[int]]
    termination_token: int  # ends every sequence when the catalog was drawn terminated
    huge: bool  # token ids near 2^31 - 1 (no dense vocabulary covers them)


@st.composite
def catalogs(
    draw,
    *,
    terminated: bool | None = None,
    huge: bool | None = None,
    max_items: int = 8,
    max_length: int = 6,
) -> Catalog:
    """A catalog of token sequences, each ending with the termination token when ``terminated``
    (drawn when None); token ids near 2^31 - 1 when ``huge`` (drawn when None)."""
    terminated = draw(st.booleans()) if terminated is None else terminated
    huge = draw(st.booleans()) if huge is None else huge
    tokens, end = (HUGE_TOKENS, HUGE_END) if huge else (SMALL_TOKENS, SMALL_END)
    title = st.lists(tokens, min_size=1, max_size=max_length)
    shape = draw(st.sampled_from(["random", "single", "long"]))
    titles = (
        [draw(title)]
        if shape == "single"
        else draw(st.lists(title, min_size=1, max_size=max_items))
    )
    if shape == "long":  # a long path, repeating a short pattern, and a long prefix of it
        long_title = draw(st.lists(tokens, min_size=1, max_size=3)) * draw(st.integers(20, 80))
        titles += [long_title, long_title[: draw(st.integers(1, len(long_title)))]]
    if shape != "single":
        # Duplicates (cut at or past the end) and prefixes of other items.
        for _ in range(draw(st.integers(0, 3))):
            source = titles[draw(st.integers(0, len(titles) - 1))]
            titles.append(source[: draw(st.integers(1, len(source) + 1))])
    sequences = [t + [end] for t in titles] if terminated else titles
    return Catalog(sequences, end, huge)


def build(catalog: Catalog, device: torch.device | str = "cpu") -> tuple[Trie, ReferenceTrie]:
    """The compiled trie (on ``device``) and the reference trie of a catalog."""
    return (
        Trie.from_sequences(catalog.sequences, device=device),
        ReferenceTrie(catalog.sequences),
    )


def seeded(seed: int, shape, dtype=torch.float64, scale: float = 3.0) -> Tensor:
    """Normal values of a given shape, reproducible from ``seed`` (on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


@st.composite
def log_reward_tensors(draw, shape, dtype=torch.float64, allow_zero_rewards: bool = True) -> Tensor:
    """Item log-rewards; some, all or none of them -inf (zero rewards, empty subtrees)."""
    values = seeded(draw(SEEDS), shape, dtype)
    zero_share = draw(st.sampled_from([0.0, 0.3, 1.0])) if allow_zero_rewards else 0.0
    generator = torch.Generator().manual_seed(draw(SEEDS))
    zero = torch.rand(shape, generator=generator) < zero_share
    return values.masked_fill(zero, float("-inf"))


def node_id_lists(num_nodes: int, size: int):
    """``size`` valid node ids, -1 (no node) included."""
    return st.lists(st.integers(-1, num_nodes - 1), min_size=size, max_size=size)


@st.composite
def token_rows(draw, catalog: Catalog, batch: int, length: int) -> list[list[int]]:
    """Rows of ``length`` tokens that mostly follow item sequences: each row is an item's
    sequence, perhaps with one token changed (so it may leave the trie), cut or padded to
    ``length`` with alphabet tokens."""
    tokens = HUGE_TOKENS if catalog.huge else SMALL_TOKENS
    rows = []
    for _ in range(batch):
        row = list(draw(st.sampled_from(catalog.sequences)))[:length]
        if row and draw(st.booleans()):
            row[draw(st.integers(0, len(row) - 1))] = draw(tokens)
        rows.append(
            row + draw(st.lists(tokens, min_size=length - len(row), max_size=length - len(row)))
        )
    return rows


@st.composite
def item_paths(draw, catalog: Catalog, ref: ReferenceTrie, batch: int) -> tuple[Tensor, Tensor]:
    """Teacher-forced state paths: ``path_nodes [B, S]`` (root, then the nodes of a prefix of an
    item's sequence, which may stop anywhere, -1 padding after it) and the number of actions
    ``lengths [B]`` of each row (its states minus one)."""
    prefixes = []
    for _ in range(batch):
        sequence = draw(st.sampled_from(catalog.sequences))
        prefixes.append(sequence[: draw(st.integers(0, len(sequence)))])
    num_states = 1 + max((len(p) for p in prefixes), default=0) + draw(st.integers(0, 2))
    path_nodes = torch.full((batch, num_states), -1, dtype=torch.int64)
    for b, prefix in enumerate(prefixes):
        for depth in range(len(prefix) + 1):
            path_nodes[b, depth] = ref.node_of[tuple(prefix[:depth])]
    lengths = torch.tensor([len(p) for p in prefixes], dtype=torch.int64)
    return path_nodes, lengths


@st.composite
def paths_and_flows(
    draw, catalog: Catalog, ref: ReferenceTrie, batch: int, dtype: torch.dtype, per_row: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`item_paths` and reference log-flows to score them with: ``[B, N]`` per-row flows
    or ``[N]`` flows shared by every row."""
    path_nodes, lengths = draw(item_paths(catalog, ref, batch))
    shape = (batch, ref.num_items) if per_row else (ref.num_items,)
    flows = reference.log_flows(ref, draw(log_reward_tensors(shape, dtype)))
    return path_nodes, lengths, flows


def finite_or_zero(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Non-finite entries replaced by 0: -inf outputs have no numerical derivative, so gradcheck
    differentiates this instead (their analytic gradient is 0 as well)."""
    return tuple(torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in tensors)


@st.composite
def prior_log_flows(
    draw, ref: ReferenceTrie, batch: int | None, dtype=torch.float64, allow_zero_rewards=True
) -> Tensor:
    """Reference log-flows of drawn item log-rewards, ``[N]`` (``batch`` None) or ``[batch, N]``:
    a prior for guidance, -inf on the subtrees whose rewards are all zero."""
    shape = (ref.num_items,) if batch is None else (batch, ref.num_items)
    rewards = draw(log_reward_tensors(shape, dtype, allow_zero_rewards))
    return reference.log_flows(ref, rewards)


# A small fixed catalog: items 0 and 3 are duplicates, item 1 is a terminated prefix of item 0,
# item 5 an unterminated prefix of item 4; token 0 terminates. Nodes: 0 root, 1 [1], 2 [3],
# 3 [1 0], 4 [1 2], 5 [3 0], 6 [3 4], 7 [1 2 0], 8 [3 4 5].
SAMPLE = [[1, 2, 0], [1, 0], [3, 0], [1, 2, 0], [3, 4, 5], [3, 4]]
