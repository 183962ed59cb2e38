"""Constraining one decoding step of 64 rows to the trie: ``token_bitmask`` and
``mask_logits_`` vs the published approach (:class:`baselines.IsinMasker`: a dict from the
row's prefix to its allowed tokens, ``torch.isin`` over ``arange(V)`` per row, then
``masked_fill_``); and flow-guided masking, ``guide_logits_``, vs what a user would write on
the other ops (:func:`gather_scatter_guide_`: ``mask_logits_``, then the children's logits
gathered through ``children``, shifted by beta times their flow ratios and scattered back).

Rows are the states of 64 random partial item paths: 8 at the root, 24 shallow (1-3 tokens in)
and 32 deep (4 tokens in or more, before the termination token). Each side starts from the
state it tracks while decoding: ours from trie node ids, the baseline from prefix tuples.
Logits are float32 ``[64, 151936]`` (the Qwen models' width). Target: >= 50x. Checks before
timing: our bitmask, unpacked, is the baseline's mask, and both maskings give the same logits.
Guidance uses the float32 flows of a seeded item log-prior (a tenth of the items with prior
zero) and beta = 0.5; target >= 1.5x, and both sides must give the same logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import baselines
from harness import Case, baseline, ours

ROWS_AT_DEPTH = {"root": 8, "shallow": 24, "deep": 32}  # 64 rows
SHALLOW_DEPTHS = (1, 3)
OURS = "flower_ext"
ISIN = "dict+isin"
GATHER_SCATTER = "mask+gather/scatter"
BETA = 0.5


def _row_prefixes(catalog) -> list[tuple[int, ...]]:
    """Prefixes of random items, each shorter than its item, so every row has children."""
    rng = np.random.default_rng(0)
    prefixes = []
    for kind, count in ROWS_AT_DEPTH.items():
        for item in rng.integers(catalog.num_items, size=count):
            begin, end = catalog.offsets[item], catalog.offsets[item + 1]
            longest = end - begin - 1
            if kind == "root":
                depth = 0
            elif kind == "shallow":
                depth = rng.integers(SHALLOW_DEPTHS[0], min(SHALLOW_DEPTHS[1], longest) + 1)
            else:
                depth = rng.integers(min(SHALLOW_DEPTHS[1] + 1, longest), longest + 1)
            prefixes.append(tuple(catalog.tokens[begin : begin + depth].tolist()))
    return prefixes


def _node_ids(trie, prefixes) -> torch.Tensor:
    """Trie node of each prefix (the root for the empty one)."""
    lengths = torch.tensor([len(prefix) for prefix in prefixes])
    tokens = torch.zeros(len(prefixes), int(lengths.max()), dtype=torch.int64)
    for row, prefix in enumerate(prefixes):
        tokens[row, : len(prefix)] = torch.tensor(prefix, dtype=torch.int64)
    path = trie.walk(tokens, lengths)
    last = path.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    nodes = torch.where(lengths > 0, last, 0).to(torch.int32)
    assert bool((nodes >= 0).all()), "a row's prefix is missing from the trie"
    return nodes


class _Step:
    """One decoding step's inputs for both sides."""

    def __init__(self, catalog, trie):
        self.prefixes = _row_prefixes(catalog)
        self.node_ids = _node_ids(trie, self.prefixes)
        self.vocab_size = catalog.vocab_size
        self.masker = baselines.IsinMasker(catalog.padded(), self.prefixes, self.vocab_size)
        generator = torch.Generator().manual_seed(0)
        self.logits = torch.randn(len(self.prefixes), self.vocab_size, generator=generator)
        prior = torch.randn(catalog.num_items, generator=generator)
        prior[torch.rand(catalog.num_items, generator=generator) < 0.1] = float("-inf")
        self.log_flows = trie.log_flows(prior)


@pytest.fixture(scope="session")
def step(catalog, trie) -> _Step:
    return _Step(catalog, trie)


@pytest.fixture(scope="session")
def token_bitmask_case(catalog, trie, step) -> Case:
    def check(results):
        assert torch.equal(baselines.unpack_bitmask(results[OURS], step.vocab_size), results[ISIN])

    return Case(
        "token_bitmask",
        catalog.name,
        [
            ours(OURS, lambda: trie.token_bitmask(step.node_ids, step.vocab_size)),
            baseline(ISIN, lambda: step.masker.allowed_mask(step.prefixes), target=50),
        ],
        check,
    )


@pytest.fixture(scope="session")
def mask_logits_case(catalog, trie, step) -> Case:
    # Masking is idempotent, so each side masks its own copy in place on every round and does
    # the same work each time.
    ours_logits, isin_logits = step.logits.clone(), step.logits.clone()

    def check(results):
        assert results[OURS] is ours_logits and results[ISIN] is isin_logits
        assert torch.equal(ours_logits, isin_logits)
        assert torch.isfinite(ours_logits).sum() > 0

    return Case(
        "mask_logits_",
        catalog.name,
        [
            ours(OURS, lambda: trie.mask_logits_(ours_logits, step.node_ids)),
            baseline(ISIN, lambda: step.masker.mask_logits_(isin_logits, step.prefixes), target=50),
        ],
        check,
    )


def gather_scatter_guide_(trie, logits, node_ids, log_flows, beta: float):
    """Flow guidance on the unfused ops: mask, then gather each child's logit through the
    children CSR, subtract beta * (F(child) - F(node)) (-inf for a zero prior), scatter back."""
    row_ptr, child_tokens, child_nodes = trie.children(node_ids)
    rows = torch.repeat_interleave(torch.arange(node_ids.shape[0]), row_ptr.diff())
    tokens = child_tokens.long()
    child_flows = log_flows[child_nodes.long()]
    ratio = child_flows - log_flows[node_ids.long()][rows]
    trie.mask_logits_(logits, node_ids)
    guided = logits[rows, tokens] - beta * ratio
    logits[rows, tokens] = guided.masked_fill(child_flows == float("-inf"), float("-inf"))
    return logits


@pytest.fixture(scope="session")
def guide_logits_case(catalog, trie, step) -> Case:
    # Guidance is not idempotent: each side guides its own copy again on every round (the same
    # work each time), and the check compares one call of each on fresh copies.
    ours_logits, baseline_logits = step.logits.clone(), step.logits.clone()

    def ours_(logits):
        return trie.guide_logits_(logits, step.node_ids, step.log_flows, BETA)

    def baseline_(logits):
        return gather_scatter_guide_(trie, logits, step.node_ids, step.log_flows, BETA)

    def check(results):
        expected = baseline_(step.logits.clone())
        assert torch.equal(ours_(step.logits.clone()), expected)
        assert torch.isfinite(expected).sum() > 0
        assert (expected != step.logits).logical_and(torch.isfinite(expected)).any()

    return Case(
        "guide_logits_",
        catalog.name,
        [
            ours(OURS, lambda: ours_(ours_logits)),
            baseline(GATHER_SCATTER, lambda: baseline_(baseline_logits), target=1.5),
        ],
        check,
    )


@pytest.mark.parametrize("implementation", [OURS, ISIN])
def test_token_bitmask(benchmark, token_bitmask_case, implementation):
    token_bitmask_case.measure(benchmark, implementation)


@pytest.mark.parametrize("implementation", [OURS, ISIN])
def test_mask_logits(benchmark, mask_logits_case, implementation):
    mask_logits_case.measure(benchmark, implementation)


@pytest.mark.parametrize("implementation", [OURS, GATHER_SCATTER])
def test_guide_logits(benchmark, guide_logits_case, implementation):
    guide_logits_case.measure(benchmark, implementation)
