"""The helpers for hand-written training loops (flower_rec.loop): the rollout against greedy
``generate`` and against the exact trie-constrained distribution, the teacher-forced logits and
transformers-style SFT labels against the model's own loss.

A tiny random Llama built from a config (no download); items that are prefixes of others, so
that the rollout must weigh the termination token against the continuations."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, LogitsProcessorList

from flower_ext import Trie, losses
from flower_ext.generation import TrieLogitsProcessor
from flower_rec.loop import (
    Rollout,
    continuation_labels,
    continuation_logits,
    mixed_rollout,
    padded_items,
    reward_rollout,
    rollout,
    state_logits,
    with_termination,
)
from helpers_data import seeded_llama

VOCAB, PAD, EOS = 40, 0, 39
ITEMS = [[5, 6], [5, 6, 7], [5, 8, 9, 10], [11], [11, 12, 13], [14, 15, 16, 17, 18]]
PROMPT_LENGTHS = [6, 3, 5, 6]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return seeded_llama(VOCAB, PAD, EOS, num_key_value_heads=4)


@pytest.fixture(scope="module")
def trie() -> Trie:
    return Trie.from_sequences([item + [EOS] for item in ITEMS])


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths: ``(input_ids, attention_mask)``."""
    width = max(PROMPT_LENGTHS)
    mask = torch.arange(width) >= width - torch.tensor(PROMPT_LENGTHS).unsqueeze(1)
    tokens = torch.randint(1, 5, (len(PROMPT_LENGTHS), width), generator=torch.Generator().manual_seed(1))
    return tokens.masked_fill(~mask, PAD), mask.long()


def items_of(actions: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:length] for row, length in zip(actions.tolist(), lengths.tolist())]


def test_a_cold_rollout_is_greedy_generate(model, trie, prompts):
    """At a temperature near 0 the rollout picks what greedy ``generate`` with the trie
    processor picks: the KV cache, the positions of left-padded prompts, the mask and the rows
    that end (by drawing EOS, or where only EOS may follow) all agree."""
    input_ids, attention_mask = prompts
    sample = rollout(model, input_ids, attention_mask, trie, EOS, temperature=1e-6)
    processor = TrieLogitsProcessor(trie, input_ids.shape[1], EOS)
    with torch.no_grad():
        sequences = model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=trie.depth,
            pad_token_id=PAD, eos_token_id=EOS, logits_processor=LogitsProcessorList([processor]),
        )
    greedy = [row[: row.index(EOS)] for row in sequences[:, input_ids.shape[1] :].tolist()]
    assert items_of(sample.actions, sample.lengths) == greedy
    assert torch.equal(sample.path, losses.path_nodes(trie, sample.actions, sample.lengths))
    assert (sample.actions[torch.arange(sample.actions.shape[1]) >= sample.lengths[:, None]] == EOS).all()


def test_rollouts_follow_the_trie_constrained_distribution(model, trie, prompts):
    """Many rollouts of one prompt at temperature 2 against each item's exact probability: the
    product over its states of the tempered softmax over the node's children, EOS included.
    The model's logits are scaled up so that the temperature matters (at temperature 1 the
    item distribution is a total variation of 0.16 away)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    input_ids, attention_mask = (t[:1].expand(3000, -1) for t in prompts)
    sample = rollout(model, input_ids, attention_mask, trie, EOS, temperature=2.0,
                     generator=torch.Generator().manual_seed(2))
    drawn = items_of(sample.actions, sample.lengths)
    observed = torch.tensor([drawn.count(item) for item in ITEMS]) / len(drawn)

    tokens = [item + [EOS] for item in ITEMS]
    width = max(map(len, tokens))
    padded = torch.tensor([t + [EOS] * (width - len(t)) for t in tokens])
    lengths = torch.tensor([len(t) for t in tokens])
    count = len(ITEMS)
    with torch.no_grad():
        logits = state_logits(model, prompts[0][:1].expand(count, -1),
                              prompts[1][:1].expand(count, -1), padded, lengths)
    choosing = torch.arange(width) < lengths.unsqueeze(1)  # the states before each token
    nodes = torch.where(choosing, losses.path_nodes(trie, padded, lengths)[:, :-1], 0)
    scores = (logits[:, :-1] / 2.0).reshape(-1, VOCAB)
    trie.mask_logits_(scores, nodes.reshape(-1))
    log_probs = scores.log_softmax(-1).gather(1, padded.reshape(-1, 1)).view(count, width)
    exact = torch.where(choosing, log_probs, 0.0).sum(1).exp()
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (observed - exact).abs().sum().item() < 0.06  # total variation x 2; ~0.03 expected


def test_rollout_restores_the_mode_and_repeats_with_its_generator(model, trie, prompts):
    model.train()
    try:
        first = rollout(model, *prompts, trie, EOS, generator=torch.Generator().manual_seed(3))
        assert model.training
        again = rollout(model, *prompts, trie, EOS, generator=torch.Generator().manual_seed(3))
    finally:
        model.eval()
    assert torch.equal(first.actions, again.actions) and torch.equal(first.lengths, again.lengths)
    assert all(item in ITEMS for item in items_of(first.actions, first.lengths))
    for temperature in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            rollout(model, *prompts, trie, EOS, temperature=temperature)


def test_state_logits_are_the_logits_of_each_whole_sequence(model, trie, prompts):
    input_ids, attention_mask = prompts
    sample = rollout(model, input_ids, attention_mask, trie, EOS,
                     generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = state_logits(model, input_ids, attention_mask, sample.actions, sample.lengths)
        for row, length in enumerate(sample.lengths.tolist()):
            prompt = input_ids[row, attention_mask[row].bool()]
            sequence = torch.cat([prompt, sample.actions[row, :length]])
            expected = model(sequence[None]).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(logits[row, : length + 1], expected, atol=2e-5, rtol=0)


def test_sft_on_continuation_labels_is_the_transformers_loss(model, prompts):
    """Targets after left-padded prompts, through the shared-prompt forward and
    ``continuation_labels``, score what transformers' loss scores on each whole sequence
    (prompt masked with -100): the item's tokens and its EOS."""
    input_ids, attention_mask = prompts
    chosen = [ITEMS[1], ITEMS[3], ITEMS[5], ITEMS[2]]
    width = max(map(len, chosen))
    targets = torch.tensor([item + [PAD] * (width - len(item)) for item in chosen])
    targets, target_lengths = with_termination(targets, torch.tensor([len(i) for i in chosen]), EOS)
    assert targets[1, :2].tolist() == [11, EOS] and target_lengths.tolist() == [4, 2, 6, 5]
    with torch.no_grad():
        (logits,) = continuation_logits(model, input_ids, attention_mask, [(targets, target_lengths)])
        ours = losses.sft_loss(logits, continuation_labels(targets, target_lengths))
        total, count = 0.0, 0
        for row, length in enumerate(target_lengths.tolist()):
            prompt = input_ids[row, attention_mask[row].bool()]
            sequence = torch.cat([prompt, targets[row, :length]])[None]
            labels = sequence.clone()
            labels[:, : len(prompt)] = -100
            total += model(sequence, labels=labels).loss.item() * length
            count += length
    assert ours.item() == pytest.approx(total / count, rel=1e-5)


# -- off-policy trajectories ------------------------------------------------------------------


def test_reward_rollouts_draw_items_in_proportion_to_their_reward(trie):
    """Items drawn from R / Z, per row: with one reward vector the frequencies match it, with
    per-row rewards each row keeps to its own; zero-reward items never come out; the paths are
    the items' trie paths."""
    items = padded_items(ITEMS, EOS)
    log_rewards = torch.tensor([0.0, 1.0, -1.0, float("-inf"), 2.0, 0.5])
    sample = reward_rollout(log_rewards, items, trie, num_rows=20000,
                            generator=torch.Generator().manual_seed(0))
    drawn = items_of(sample.actions, sample.lengths)
    observed = torch.tensor([drawn.count(item) for item in ITEMS], dtype=torch.float64) / len(drawn)
    expected = torch.softmax(log_rewards.double(), 0)
    assert (observed - expected).abs().sum().item() < 0.03
    assert observed[3] == 0
    torch.testing.assert_close(sample.path, losses.path_nodes(trie, sample.actions, sample.lengths))

    per_row = torch.full((len(ITEMS), len(ITEMS)), float("-inf"))
    per_row[torch.arange(len(ITEMS)), torch.arange(len(ITEMS)).flip(0)] = 0.0  # row b: one item
    sample = reward_rollout(per_row, items, trie, generator=torch.Generator().manual_seed(1))
    assert items_of(sample.actions, sample.lengths) == ITEMS[::-1]


def test_mixed_rollouts_take_the_replaced_rows_whole(model, trie, prompts):
    items = padded_items(ITEMS, EOS)
    base = reward_rollout(torch.zeros(len(ITEMS)), items, trie, num_rows=4,
                          generator=torch.Generator().manual_seed(0))
    sampled = rollout(model, prompts[0][[1, 3]], prompts[1][[1, 3]], trie, EOS,
                      generator=torch.Generator().manual_seed(1))
    mixed = mixed_rollout(base, torch.tensor([1, 3]), sampled, EOS)
    expected = [items_of(base.actions, base.lengths)[0], items_of(sampled.actions, sampled.lengths)[0],
                items_of(base.actions, base.lengths)[2], items_of(sampled.actions, sampled.lengths)[1]]
    assert items_of(mixed.actions, mixed.lengths) == expected
    torch.testing.assert_close(mixed.path, losses.path_nodes(trie, mixed.actions, mixed.lengths))
    assert isinstance(mixed, Rollout)


def test_loops_defer_status_checks_on_cuda_only():
    """A GPU loop reads the ops' status words once, not at every step (a host sync each); on the
    CPU each op checks its own, which costs nothing."""
    import contextlib

    from flower_rec.decoding.runner import status_checks

    assert isinstance(status_checks(torch.device("cpu")), contextlib.nullcontext)
    assert not isinstance(status_checks(torch.device("cuda")), contextlib.nullcontext)
