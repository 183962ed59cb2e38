"""Modified sub-trajectory balance for B = 64 trajectories of up to T = 32 steps (float32):
the O(T) closed form ``losses.subtb_loss_from_log_probs`` vs the O(T^2) all-pairs Python loops
of the published implementation (``reference.subtb_loss_all_pairs``).

Lengths are uniform in 1..32 with one row at 32; log-probabilities and per-state log-rewards are
in the ranges training produces (log-rewards near the -15 of incomplete titles). Target: >= 20x.
Check before timing: the two losses agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from flower_ext.losses import subtb_loss_from_log_probs
from flower_ext.reference import subtb_loss_all_pairs
from harness import Case, baseline, ours

BATCH, MAX_STEPS = 64, 32
INPUT = f"B={BATCH}, T<={MAX_STEPS}"
OURS = "flower_ext"
LOOPS = "all_pairs_loops"


def _trajectories() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, MAX_STEPS + 1, (BATCH,), generator=generator)
    lengths[0] = MAX_STEPS
    action_log_probs = -3.0 * torch.rand(BATCH, MAX_STEPS, generator=generator)
    termination_log_probs = -10.0 * torch.rand(BATCH, MAX_STEPS + 1, generator=generator)
    log_rewards = -15.0 - 5.0 * torch.rand(BATCH, MAX_STEPS + 1, generator=generator)
    return action_log_probs, termination_log_probs, log_rewards, lengths


@pytest.fixture(scope="session")
def subtb_case() -> Case:
    inputs = _trajectories()
    return Case(
        "subtb_loss",
        INPUT,
        [
            ours(OURS, lambda: subtb_loss_from_log_probs(*inputs)),
            baseline(LOOPS, lambda: subtb_loss_all_pairs(*inputs), target=20),
        ],
        lambda results: torch.testing.assert_close(
            results[OURS], results[LOOPS], rtol=1e-5, atol=1e-5
        ),
    )


@pytest.mark.parametrize("implementation", [OURS, LOOPS])
def test_subtb_loss(benchmark, subtb_case, implementation):
    subtb_case.measure(benchmark, implementation)
