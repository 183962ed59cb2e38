"""Log-flows of every node for B = 64 reward vectors (float32): ``Trie.log_flows`` vs plain
PyTorch level by level (:class:`baselines.LevelScatterFlows`: per depth, deepest first, a
``scatter_reduce('amax')`` and a ``scatter_add`` of exponentials into the parents).

Log-rewards are standard normal with 1% of the items at -inf (zero reward, as items without
popularity get), so empty subtrees are exercised too. Target: >= 10x. Check before timing: the
two results agree to float32 rounding, -inf where the subtree is empty.
"""

from __future__ import annotations

import pytest
import torch

import baselines
from harness import Case, baseline, ours

BATCH = 64
ZERO_REWARD_SHARE = 0.01
OURS = "flower_ext"
SCATTER = "scatter_reduce"


def _log_rewards(num_items: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(BATCH, num_items, generator=generator)
    zero = torch.rand(BATCH, num_items, generator=generator) < ZERO_REWARD_SHARE
    return rewards.masked_fill_(zero, float("-inf"))


def _check(results) -> None:
    # Row blocks keep the comparison's temporaries small: the 1M-item flows are 4 GB each.
    for ours_rows, scatter_rows in zip(results[OURS].split(8), results[SCATTER].split(8)):
        torch.testing.assert_close(ours_rows, scatter_rows, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="session")
def log_flows_case(catalog, trie) -> Case:
    log_rewards = _log_rewards(trie.num_items)
    scatter_flows = baselines.LevelScatterFlows(trie)
    return Case(
        "log_flows",
        catalog.name,
        [
            ours(OURS, lambda: trie.log_flows(log_rewards)),
            baseline(SCATTER, lambda: scatter_flows(log_rewards), target=10),
        ],
        _check,
    )


@pytest.mark.parametrize("implementation", [OURS, SCATTER])
def test_log_flows(benchmark, log_flows_case, implementation):
    log_flows_case.measure(benchmark, implementation)
