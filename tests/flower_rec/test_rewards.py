"""Item rewards of the Flower loss (flower_rec.rewards) on hand-computed examples, and
p_div_pop against its formula on random rows."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flower_ext import Trie
from flower_rec.data import popularity_counts, prepare_synthetic
from flower_rec.rewards import (
    MIN_CENTRED_SCALE,
    MIN_MINMAX_SCALE,
    MIN_PROBABILITY,
    PopularityRewards,
    centred_scale,
    min_max_scale,
    personalise,
)

# Items 0 and 2 share the title "A"; "C" has no count and "D" a zero count: both get the floor.
TITLES = ["A", "B", "A", "C", "D"]
COUNTS = {"A": 4, "B": 2, "D": 0}
Z = 4 + 2 + 0.5 + 0.5
EOS = 9
# Token sequences of the items, each followed by EOS as in the loss trie.
SEQUENCES = [[1, EOS], [2, EOS], [1, EOS], [1, 3, EOS], [4, EOS]]


@pytest.fixture
def rewards() -> PopularityRewards:
    return PopularityRewards.from_counts(TITLES, COUNTS, floor_count=0.5)


@pytest.fixture
def trie() -> Trie:
    return Trie.from_sequences(SEQUENCES, list(range(len(SEQUENCES))))


def node_of(trie: Trie, tokens: list[int]) -> int:
    return int(trie.walk(torch.tensor(tokens))[-1])


def test_counts_floor_and_normalisation(rewards):
    assert rewards.title_counts == [4, 2, 4, 0.5, 0.5]
    assert rewards.num_floored == 2
    expected = torch.tensor([math.log(c / Z) for c in (4, 2, 4, 0.5, 0.5)], dtype=torch.float64)
    torch.testing.assert_close(rewards.log_rewards, expected)
    torch.testing.assert_close(
        rewards.log_share, torch.tensor([math.log(2), 0, math.log(2), 0, 0], dtype=torch.float64)
    )


def test_shared_title_leaf_holds_the_title_count(rewards, trie):
    flows = trie.log_flows(rewards.item_log_rewards("logp", dtype=torch.float64))
    assert flows[0].item() == pytest.approx(0.0, abs=1e-12)  # root: sum of R_o / Z
    leaf_a = node_of(trie, [1, EOS])
    assert flows[leaf_a].item() == pytest.approx(math.log(4 / Z))  # not 2 x 4
    assert flows[node_of(trie, [1])].item() == pytest.approx(math.log((4 + 0.5) / Z))
    assert flows[node_of(trie, [4, EOS])].item() == pytest.approx(math.log(0.5 / Z))


def test_scales_on_a_hand_example():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    # mean 0.2, max - min 0.4
    torch.testing.assert_close(
        centred_scale(p), torch.tensor([[0.75, 1.0, 1.25, 1.5, 0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        min_max_scale(p),
        torch.tensor([[0.25, 0.5, 0.75, 1.0, MIN_MINMAX_SCALE]], dtype=torch.float64),
    )


def test_logp_div_s(rewards, trie):
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    s = torch.tensor([0.75, 1.0, 1.25, 1.5, 0.5], dtype=torch.float64)
    got = rewards.item_log_rewards("logp_div_s", p, dtype=torch.float64)
    expected = rewards.log_rewards / s - rewards.log_share
    torch.testing.assert_close(got, expected.unsqueeze(0))
    # The shared leaf holds the mean of its ids' personalised rewards: ((4/Z)^(1/.75) +
    # (4/Z)^(1/1.25)) / 2.
    flows = trie.log_flows(got)
    mean = ((4 / Z) ** (1 / 0.75) + (4 / Z) ** (1 / 1.25)) / 2
    assert flows[0, node_of(trie, [1, EOS])].item() == pytest.approx(math.log(mean))


def test_logp_add_logs(rewards):
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    s = torch.tensor([0.25, 0.5, 0.75, 1.0, MIN_MINMAX_SCALE], dtype=torch.float64)
    got = rewards.item_log_rewards("logp_add_logs", p, dtype=torch.float64)
    torch.testing.assert_close(got, (rewards.log_rewards + s.log() - rewards.log_share)[None])


def test_p_div_pop(rewards, trie):
    """p_u normalised per row, divided by (R / Z) ** beta; the shared title's leaf holds the mean
    of its two ids' rewards; a zero p_u is floored; beta 0 leaves p_u's own ranking."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64) * 7  # any row scale
    got = rewards.item_log_rewards("p_div_pop", p, popularity_exponent=0.5, dtype=torch.float64)
    shares = torch.tensor([0.1, 0.2, 0.3, 0.4, MIN_PROBABILITY], dtype=torch.float64)
    expected = shares.log() - 0.5 * rewards.log_rewards - rewards.log_share
    torch.testing.assert_close(got, expected[None])
    flows = trie.log_flows(got)
    mean = (0.1 + 0.3) / 2 / (4 / Z) ** 0.5
    assert flows[0, node_of(trie, [1, EOS])].item() == pytest.approx(math.log(mean))
    flat = rewards.item_log_rewards("p_div_pop", p, popularity_exponent=0.0, dtype=torch.float64)
    torch.testing.assert_close(flat, (shares.log() - rewards.log_share)[None])


@given(
    st.lists(st.floats(1e-6, 1.0), min_size=5, max_size=5),
    st.floats(0.0, 3.0),
)
def test_p_div_pop_is_p_u_over_popularity_to_the_beta(row, beta):
    """Reference: reward_i = (p_i / sum p) / (R_i / Z) ** beta / k_i, computed in plain Python."""
    rewards = PopularityRewards.from_counts(TITLES, COUNTS, floor_count=0.5)
    p = torch.tensor([row], dtype=torch.float64)
    got = rewards.item_log_rewards("p_div_pop", p, popularity_exponent=beta, dtype=torch.float64)
    total = math.fsum(row)
    multiplicity = [TITLES.count(title) for title in TITLES]
    expected = [
        math.log(value / total) - beta * math.log(count / Z) - math.log(k)
        for value, count, k in zip(row, rewards.title_counts, multiplicity)
    ]
    torch.testing.assert_close(got[0], torch.tensor(expected, dtype=torch.float64))


def test_rows_are_personalised_independently(rewards):
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.4, 0.3, 0.2, 0.1, 0.0]], dtype=torch.float64)
    got = rewards.item_log_rewards("logp_div_s", p, dtype=torch.float64)
    for row in range(2):
        torch.testing.assert_close(got[row], rewards.item_log_rewards("logp_div_s", p[row : row + 1],
                                                                      dtype=torch.float64)[0])
    assert not torch.allclose(got[0], got[1])


def test_uniform_rows_give_the_popularity_rewards(rewards):
    p = torch.full((2, 5), 0.2)
    plain = rewards.item_log_rewards("logp")
    for variant in ("logp", "logp_div_s", "logp_add_logs"):
        torch.testing.assert_close(rewards.item_log_rewards(variant, p), plain.expand(2, -1))


def test_scale_guards_keep_rewards_finite(rewards):
    # An almost uniform row with one zero: s of the zero is 1 - 0.999 -> clamped.
    p = torch.ones(1, 1000, dtype=torch.float64)
    p[0, -1] = 0.0
    assert centred_scale(p)[0, -1].item() == MIN_CENTRED_SCALE
    assert min_max_scale(p)[0, -1].item() == MIN_MINMAX_SCALE
    p = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    for variant in ("logp_div_s", "logp_add_logs", "p_div_pop"):
        assert torch.isfinite(rewards.item_log_rewards(variant, p)).all()
    assert torch.isfinite(rewards.item_log_rewards("p_div_pop", torch.zeros(1, 5))).all()


def test_bad_input(rewards):
    with pytest.raises(ValueError, match="floor_count"):
        PopularityRewards.from_counts(TITLES, COUNTS, floor_count=0)
    with pytest.raises(ValueError, match="needs per-sample item probabilities"):
        rewards.item_log_rewards("logp_div_s")
    with pytest.raises(ValueError, match="unknown reward variant"):
        personalise(rewards.log_rewards, "logp_times_s")
    with pytest.raises(ValueError, match=r"shape \[batch, 5\]"):
        rewards.item_log_rewards("logp_div_s", torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        rewards.item_log_rewards("logp_div_s", torch.full((1, 5), float("nan")))
    for beta in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="popularity_exponent must be a non-negative number"):
            rewards.item_log_rewards("p_div_pop", torch.ones(1, 5), popularity_exponent=beta)


def test_from_dataset_uses_the_training_history_counts(tmp_path):
    dataset = prepare_synthetic(tmp_path / "d", items=60, users=300, seed=0, progress=False)
    rewards = PopularityRewards.from_dataset(dataset)
    counts = popularity_counts(dataset, "history")
    for item, title in enumerate(dataset.titles):
        assert rewards.title_counts[item] == counts.get(title, 0.5)
    assert rewards.num_floored == len(set(dataset.titles) - set(counts))
    trie = Trie.from_sequences([[i, 10_000] for i in range(dataset.num_items)])
    # Distinct sequences here, so the root flow counts every id's share once: log 1.
    flows = trie.log_flows(rewards.item_log_rewards("logp", dtype=torch.float64))
    assert flows[0].item() == pytest.approx(0.0, abs=1e-9)
