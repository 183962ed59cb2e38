"""Trie-constrained decoding with transformers' ``generate`` and a tiny random Llama model.

A random model left alone would emit arbitrary tokens, so every decoding strategy producing only
catalog items (followed by EOS) is the processor's doing. The model is built from a config with
a fixed seed: no download.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch import Tensor
from transformers import GenerationConfig, LlamaForCausalLM, LogitsProcessorList

from flower_ext import Trie, ops
from flower_ext.generation import TrieLogitsProcessor, allowed_token_bitmask
from helpers_data import allowed_tokens, leaf_nodes, node_rows, random_catalog, seeded_llama

VOCAB = 300  # not a multiple of 32
PAD = 0
EOS = 255  # bit 31 (the int32 sign bit) of bitmask word 7
TERMINATION = 10  # ends every item, like "\n" after a title
PROMPT_TOKENS = range(1, EOS)  # neither PAD nor EOS
MAX_ITEM_LENGTH = 6  # title tokens; + TERMINATION + EOS bounds the generated length
MAX_NEW_TOKENS = MAX_ITEM_LENGTH + 2


@pytest.fixture(scope="module")
def catalog() -> list[list[int]]:
    rng = random.Random(0)
    title_tokens = rng.sample([t for t in range(11, VOCAB) if t != EOS], 12)
    return random_catalog(rng, 30, title_tokens, MAX_ITEM_LENGTH, TERMINATION)


@pytest.fixture(scope="module")
def trie(catalog) -> Trie:
    return Trie.from_sequences(catalog)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return seeded_llama(VOCAB, PAD, EOS).eval()


def random_prompts(batch: int, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        PROMPT_TOKENS.start, PROMPT_TOKENS.stop, (batch, length), generator=generator
    )


def generate(model, trie: Trie, input_ids: Tensor, attention_mask: Tensor, **options) -> Tensor:
    """``model.generate`` constrained by the trie; returns only the generated tokens."""
    processor = TrieLogitsProcessor(trie, input_ids.shape[1], EOS)
    config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS, pad_token_id=PAD, eos_token_id=EOS, **options
    )
    with torch.no_grad():
        sequences = model.generate(
            input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([processor]),
        )
    return sequences[:, input_ids.shape[1] :]


def decoded_items(generated: Tensor) -> list[tuple[int, ...]]:
    """The item of each row: its tokens before the first EOS. Fails on a row without EOS or with
    anything but EOS / PAD after it."""
    items = []
    for row in generated.tolist():
        assert EOS in row, f"row {row} did not end"
        end = row.index(EOS)
        assert set(row[end:]) <= {EOS, PAD}, f"row {row} continues after EOS"
        items.append(tuple(row[:end]))
    return items


def assert_all_in_catalog(items, catalog) -> None:
    outside = set(items) - {tuple(item) for item in catalog}
    assert not outside, f"generated items outside the catalog: {outside}"


def test_greedy_generates_catalog_items(model, trie, catalog):
    prompts = random_prompts(4, 7, seed=1)
    generated = generate(model, trie, prompts, torch.ones_like(prompts), do_sample=False)
    assert_all_in_catalog(decoded_items(generated), catalog)


def test_greedy_with_left_padding_generates_catalog_items(model, trie, catalog):
    """Prompts of different lengths, left-padded: the trie state starts after the padded prompt
    for every row."""
    lengths = [3, 7, 5, 1]
    prompts = random_prompts(len(lengths), max(lengths), seed=2)
    attention_mask = torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths).unsqueeze(1)
    input_ids = prompts.masked_fill(~attention_mask, PAD)
    generated = generate(model, trie, input_ids, attention_mask.long(), do_sample=False)
    assert_all_in_catalog(decoded_items(generated), catalog)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_generates_catalog_items(model, trie, catalog, seed):
    prompts = random_prompts(8, 5, seed=10 + seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generated = generate(model, trie, prompts, torch.ones_like(prompts), do_sample=True)
    assert_all_in_catalog(decoded_items(generated), catalog)


def test_beam_search_returns_ten_distinct_catalog_items(model, trie, catalog):
    beams = 10
    prompts = random_prompts(2, 6, seed=3)
    generated = generate(
        model,
        trie,
        prompts,
        torch.ones_like(prompts),
        do_sample=False,
        num_beams=beams,
        num_return_sequences=beams,
    )
    items = decoded_items(generated)
    assert_all_in_catalog(items, catalog)
    for prompt in range(prompts.shape[0]):
        top = items[prompt * beams : (prompt + 1) * beams]
        assert len(set(top)) == beams, f"prompt {prompt}: repeated items in {top}"


def test_processor_does_not_modify_scores_in_place(trie, catalog):
    prompt_length = 4
    # Generated so far: the first token of two items (inside the trie), and PAD (outside it).
    generated = torch.tensor([[catalog[0][0]], [catalog[-1][0]], [PAD]])
    input_ids = torch.cat([random_prompts(3, prompt_length, seed=4), generated], dim=1)
    scores = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    original = scores.clone()

    processor = TrieLogitsProcessor(trie, prompt_length, EOS)
    processor(input_ids[:, :prompt_length], scores)  # generate's first call: the prompt alone
    masked = processor(input_ids, scores)

    assert torch.equal(scores, original)
    kept = masked.isfinite()
    assert torch.equal(masked[kept], scores[kept])
    assert kept.any(dim=1).all() and not kept.all(dim=1).any()
    assert kept[2].nonzero().flatten().tolist() == [EOS]  # left the trie: only EOS remains


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """``[B, V]`` bool from an int32 bitmask: bit j of word w is token 32 w + j. (An arithmetic
    shift keeps bit 31 of a negative word readable.)"""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten(1)[:, :vocab_size].bool()


@pytest.mark.parametrize("eos_token_id", [31, 63, VOCAB - 1])
def test_allowed_token_bitmask_allows_only_eos_after_an_item(trie, eos_token_id):
    """Rows at a leaf (complete item) or at -1 (left the trie) may only end; other rows get
    their children and no EOS. EOS 31 and 63 sit on the int32 sign bit."""
    nodes = node_rows(trie, random.Random(eos_token_id), count=20)
    finished = (nodes == -1) | torch.isin(nodes, leaf_nodes(trie))
    assert finished.any() and not finished.all()
    children = allowed_tokens(trie, nodes, VOCAB)
    assert not children[finished].any()

    expected = children.clone()
    expected[finished, eos_token_id] = True
    bitmask = allowed_token_bitmask(trie, nodes, VOCAB, eos_token_id)
    assert torch.equal(unpack_bitmask(bitmask, VOCAB), expected)
    # Without an EOS id, a finished row allows nothing.
    assert torch.equal(unpack_bitmask(allowed_token_bitmask(trie, nodes, VOCAB), VOCAB), children)


# -- finished rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("finished_token", [PAD, 31, EOS])
def test_mask_logits_keeps_only_the_finished_token_on_finished_rows(trie, finished_token):
    """A finished row (at a leaf, or -1) keeps the finished token's logit alone, so that
    sampling over the whole batch stays finite; the other rows are masked as without it."""
    nodes = node_rows(trie, random.Random(finished_token), count=20)
    finished = (nodes == -1) | torch.isin(nodes, leaf_nodes(trie))
    logits = torch.randn(len(nodes), VOCAB, generator=torch.Generator().manual_seed(6))
    plain = trie.mask_logits_(logits.clone(), nodes)
    assert not plain[finished].isfinite().any()

    masked = trie.mask_logits_(logits.clone(), nodes, finished_token=finished_token)
    assert torch.equal(masked[~finished], plain[~finished])
    assert masked[finished].isfinite().nonzero()[:, 1].unique().tolist() == [finished_token]
    assert torch.equal(masked[finished, finished_token], logits[finished, finished_token])
    assert torch.multinomial(masked.softmax(-1), 1)[finished].eq(finished_token).all()
    bitmask = trie.token_bitmask(nodes, VOCAB, finished_token=finished_token)
    assert torch.equal(unpack_bitmask(bitmask, VOCAB), masked.isfinite())


def test_finished_token_is_checked_and_the_ops_pass_opcheck(trie):
    nodes = node_rows(trie, random.Random(7), count=5)
    with pytest.raises(ValueError, match=r"finished_token 300 is outside the vocabulary \[0, 300\)"):
        trie.mask_logits_(torch.zeros(len(nodes), VOCAB), nodes, finished_token=VOCAB)
    with pytest.raises(ValueError, match=r"finished_token -1 is outside the vocabulary"):
        trie.token_bitmask(nodes, VOCAB, finished_token=-1)
    logits = torch.randn(len(nodes), VOCAB)
    torch.library.opcheck(ops.mask_logits_, (trie.data, trie.layout, logits, nodes, EOS))
    torch.library.opcheck(ops.token_bitmask, (trie.data, trie.layout, nodes, VOCAB, EOS))


# -- the processor's checks --------------------------------------------------------------------


def test_processor_rejects_a_prompt_length_that_is_not_the_prompt_width(model, trie):
    """A prompt_length off the padded prompt width would read prompt tokens as generated ones
    (or generated ones as prompt): the first call of every generate says so."""
    prompts = random_prompts(2, 6, seed=8)
    for wrong in (5, 7):
        processor = TrieLogitsProcessor(trie, wrong, EOS)
        with pytest.raises(ValueError, match=f"prompt_length is {wrong} but generate started "
                                             "from input_ids of 6 tokens"):
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2,
                           pad_token_id=PAD, eos_token_id=EOS,
                           logits_processor=LogitsProcessorList([processor]))
    # One processor serves several generate calls with prompts of its width.
    processor = TrieLogitsProcessor(trie, 6, EOS)
    for seed in (9, 10):
        prompts = random_prompts(2, 6, seed=seed)
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3,
                       pad_token_id=PAD, eos_token_id=EOS,
                       logits_processor=LogitsProcessorList([processor]))


def test_processor_warns_about_items_it_can_never_generate():
    """Items 0 (1 2) and 2 (1 2 3 4) are prefixes of others: without EOS in the trie they
    cannot end; with each item followed by EOS every item can. An item with EOS inside is cut
    short at it."""
    items = [[1, 2], [1, 2, 3], [1, 2, 3, 4], [5]]
    with pytest.warns(UserWarning, match=r"2 of the trie's 4 items can never be generated "
                                         rf"with eos_token_id={EOS} \(items \[0, 1\]\)"):
        TrieLogitsProcessor(Trie.from_sequences(items), 3, EOS)
    with pytest.warns(UserWarning, match=r"items \[0, 1\]"):
        TrieLogitsProcessor(Trie.from_sequences(items), 3, None)
    with pytest.warns(UserWarning, match=r"1 of the trie's 2 items .* \(items \[1\]\)"):
        TrieLogitsProcessor(Trie.from_sequences([[1, EOS], [1, EOS, 2, EOS]]), 3, EOS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrieLogitsProcessor(Trie.from_sequences([s + [EOS] for s in items]), 3, EOS)


def test_generate_produces_items_that_are_prefixes_of_others(model):
    """With EOS as every item's last trie token, greedy, sampling and beam search produce only
    items, and the items that other items continue are among the beams."""
    items = [[20, 21], [20, 21, 22], [20, 21, 22, 23], [24], [24, 25]]
    trie = Trie.from_sequences([s + [EOS] for s in items])
    prompts = random_prompts(2, 5, seed=11)
    beams = len(items)
    for options in (
        {"do_sample": False},
        {"do_sample": True},
        {"do_sample": False, "num_beams": beams, "num_return_sequences": beams},
    ):
        processor = TrieLogitsProcessor(trie, prompts.shape[1], EOS)
        with torch.no_grad():
            sequences = model.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=trie.depth,
                pad_token_id=PAD, eos_token_id=EOS, top_k=None,
                logits_processor=LogitsProcessorList([processor]), **options,
            )
        generated = decoded_items(sequences[:, prompts.shape[1] :])
        assert_all_in_catalog(generated, items)
    assert set(generated[:beams]) == {tuple(item) for item in items}
