"""Trie-constrained decoding (flower_rec.decoding) with a tiny seeded Llama and a trained BPE.

The model is random but peaked (a large init scale), so items have clearly different
probabilities. Reference implementations here are deliberately naive: per-item teacher forcing
for the exact scores, transformers' own beam search (``generate`` with the flower_ext logits
processor) for beam search, and exact sampling without replacement in numpy for sampled top-K.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from flower_ext.generation import TrieLogitsProcessor
from flower_rec.decoding import GUIDANCE_FORMS, Catalog, Guidance, TrieDecoder
from flower_rec.prompts import build_prompt, item_token_sequences
from helpers_data import seeded_llama, synthetic_titles, train_bpe

PAD, EOS = "<pad>", "<eos>"


@pytest.fixture(scope="module")
def titles() -> list[str]:
    return synthetic_titles(40, seed=0)


@pytest.fixture(scope="module")
def tokenizer(titles) -> PreTrainedTokenizerFast:
    bpe = train_bpe(titles, vocab_size=320)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS)


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return seeded_llama(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
        initializer_range=0.2,  # peaked next-token distributions
    ).eval()


@pytest.fixture(scope="module")
def catalog(titles, tokenizer) -> Catalog:
    return Catalog.from_titles(titles, tokenizer)


@pytest.fixture(scope="module")
def small_catalog(titles, tokenizer) -> Catalog:
    """8 items of 8 different token lengths."""
    items = item_token_sequences(titles, tokenizer)
    by_length = {}
    for title, sequence in zip(titles, items.sequences):
        by_length.setdefault(len(sequence), title)
    chosen = [by_length[n] for n in sorted(by_length)][:8]
    assert len(chosen) == 8
    return Catalog.from_titles(chosen, tokenizer)


@pytest.fixture(scope="module")
def prompts(titles) -> list[str]:
    rng = random.Random(2)
    return [build_prompt(rng.sample(titles, rng.randint(0, 6)), "video_games") for _ in range(7)]


def decoder(model, tokenizer, catalog, **options) -> TrieDecoder:
    options.setdefault("progress", False)
    return TrieDecoder(model, tokenizer, catalog, **options)


# -- exact scoring ----------------------------------------------------------------------------


def teacher_forced(model, tokenizer, catalog, prompt, normalize, include_eos) -> torch.Tensor:
    """One plain forward over prompt + each item's tokens (+ EOS), all items in one right-padded
    batch; the trie normalisation renormalises each step over the children found by scanning
    the item sequences."""
    sequences = catalog.item_tokens.sequences
    prompt_ids = tokenizer(prompt)["input_ids"]
    paths = [s + ([tokenizer.eos_token_id] if include_eos else []) for s in sequences]
    width = len(prompt_ids) + max(map(len, paths))
    ids = torch.full((len(paths), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(paths), width), dtype=torch.long)
    for row, path in enumerate(paths):
        ids[row, : len(prompt_ids) + len(path)] = torch.tensor(prompt_ids + path)
        mask[row, : len(prompt_ids) + len(path)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, len(prompt_ids) - 1 :]
    logits = logits.double().numpy()

    def logsumexp(x: np.ndarray) -> float:
        top = x.max()
        return float(top + np.log(np.exp(x - top).sum()))

    out = []
    for row, (sequence, path) in enumerate(zip(sequences, paths)):
        total = 0.0
        for t, token in enumerate(path):
            if normalize == "trie" and t < len(sequence):
                allowed = sorted({s[t] for s in sequences if s[:t] == sequence[:t]})
                total += logits[row, t, token] - logsumexp(logits[row, t, allowed])
            else:
                total += logits[row, t, token] - logsumexp(logits[row, t])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "normalize, include_eos", [("trie", False), ("model", False), ("model", True)]
)
def test_exact_log_probs_match_teacher_forcing(
    model, tokenizer, catalog, prompts, normalize, include_eos
):
    chosen = prompts[:3]
    exact = decoder(model, tokenizer, catalog, batch_size=2).exact_item_log_probs(
        chosen, normalize=normalize, include_eos=include_eos
    )
    for row, prompt in enumerate(chosen):
        expected = teacher_forced(model, tokenizer, catalog, prompt, normalize, include_eos)
        torch.testing.assert_close(exact[row].double(), expected, rtol=0, atol=2e-4)


def test_exact_log_probs_do_not_depend_on_chunking(model, tokenizer, catalog, prompts):
    """Chunks of 5 nodes carry their first node's ancestors; results agree with one chunk."""
    dec = decoder(model, tokenizer, catalog)
    whole = dec.exact_item_log_probs(prompts[:2], chunk_tokens=10_000, include_eos=True)
    for size in (1, 5, 37):
        chunked = dec.exact_item_log_probs(prompts[:2], chunk_tokens=size, include_eos=True)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_trie_probabilities_sum_to_one(model, tokenizer, catalog, prompts):
    log_probs = decoder(model, tokenizer, catalog).exact_item_log_probs(prompts, temperature=0.7)
    torch.testing.assert_close(
        log_probs.double().exp().sum(1),
        torch.ones(len(prompts), dtype=torch.float64),
        rtol=0,
        atol=1e-5,
    )


# -- beam search ------------------------------------------------------------------------------


def generate_beams(model, tokenizer, catalog, prompts, num_beams=10, **guidance):
    """transformers' beam search constrained by flower_ext's logits processor (flow-guided with
    ``log_flows`` and ``beta``): item ids and sequence scores, ``[P, num_beams]``."""
    inputs = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    processor = TrieLogitsProcessor(
        catalog.trie, prompt_length, tokenizer.eos_token_id, **guidance
    )
    config = GenerationConfig(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=64,
        length_penalty=1.0,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, generation_config=config, logits_processor=LogitsProcessorList([processor])
        )
    lookup = {tuple(s): i for i, s in reversed(list(enumerate(catalog.item_tokens.sequences)))}
    items = []
    for row in out.sequences[:, prompt_length:].tolist():
        end = row.index(tokenizer.eos_token_id)
        items.append(lookup[tuple(row[:end])])
    return (
        torch.tensor(items).view(len(prompts), num_beams),
        out.sequences_scores.view(len(prompts), num_beams),
    )


def test_beam_search_equals_transformers_beam_search(model, tokenizer, catalog, prompts):
    """Same lists and scores as ``generate(num_beams=10)`` with the trie processor, for prompts
    of different lengths (left padding) in batches of 3."""
    items, scores = decoder(model, tokenizer, catalog, batch_size=3).beam_search_items(prompts)
    expected_items, expected_scores = generate_beams(model, tokenizer, catalog, prompts)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-4)


def test_beam_scores_are_exact_scores(model, tokenizer, catalog, prompts):
    """Beam search's scores are the exact scores of its items, and no better than the exact
    top-10 (a beam of 10 can miss the best items, never invent better ones)."""
    dec = decoder(model, tokenizer, catalog)
    items, scores = dec.beam_search_items(prompts)
    exact = dec.exact_beam_scores(prompts)
    torch.testing.assert_close(scores, exact.gather(1, items), rtol=0, atol=1e-4)
    top_items, top_scores = dec.exact_top_k(prompts, k=10)
    assert (top_scores >= scores - 1e-5).all()
    torch.testing.assert_close(top_scores, exact.gather(1, top_items))


def test_beam_search_is_exact_when_the_beam_holds_the_catalog(
    model, tokenizer, small_catalog, prompts
):
    """10 beams over 8 items of different lengths: the list is every item, ranked by the exact
    length-normalised score (EOS included, as transformers counts it)."""
    dec = decoder(model, tokenizer, small_catalog, batch_size=4)
    items, scores = dec.beam_search_items(prompts, num_beams=10)
    exact = dec.exact_beam_scores(prompts)
    expected = exact.argsort(dim=1, descending=True)
    assert torch.equal(items[:, :8], expected)
    assert (items[:, 8:] == -1).all() and torch.isinf(scores[:, 8:]).all()
    torch.testing.assert_close(scores[:, :8], exact.gather(1, expected), rtol=0, atol=1e-4)
    titles = dec.beam_search(prompts[:1], num_beams=10)
    assert titles == [small_catalog.title_of(expected[0])]


def test_left_padding_gives_the_single_prompt_results(model, tokenizer, catalog, prompts):
    batched = decoder(model, tokenizer, catalog, batch_size=len(prompts))
    single = decoder(model, tokenizer, catalog, batch_size=1)
    assert torch.equal(batched.beam_search_items(prompts)[0], single.beam_search_items(prompts)[0])
    torch.testing.assert_close(
        batched.exact_item_log_probs(prompts, include_eos=True, normalize="model"),
        single.exact_item_log_probs(prompts, include_eos=True, normalize="model"),
        rtol=1e-6,
        atol=1e-5,
    )
    sampled = [d.sampled_top_k_items(prompts[:1], k=5, seed=3)[0] for d in (batched, single)]
    assert torch.equal(sampled[0], sampled[1])  # one prompt: the same noise


# -- every output is a catalog item ------------------------------------------------------------


def test_every_output_is_a_catalog_item(model, tokenizer, catalog, prompts):
    dec = decoder(model, tokenizer, catalog, batch_size=4)
    titles = set(catalog.titles)
    beams = dec.beam_search(prompts)
    assert all(len(row) == 10 and len(set(row)) == 10 and set(row) <= titles for row in beams)
    samples = dec.sample(prompts, num_samples=6, temperature=1.5, seed=0)
    assert all(len(row) == 6 and set(row) <= titles for row in samples)
    top = dec.sampled_top_k(prompts, k=10, seed=0)
    assert all(len(row) == 10 and len(set(row)) == 10 and set(row) <= titles for row in top)
    # Token-id prompts work too.
    ids = [tokenizer(p)["input_ids"] for p in prompts[:2]]
    assert dec.beam_search(ids) == beams[:2]


def test_k_beyond_the_catalog(model, tokenizer, small_catalog, prompts):
    items, log_probs = decoder(model, tokenizer, small_catalog).sampled_top_k_items(
        prompts[:2], k=12, seed=0
    )
    assert (items[:, :8] >= 0).all() and (items[:, 8:] == -1).all()
    assert sorted(items[0, :8].tolist()) == list(range(8))
    assert torch.isinf(log_probs[:, 8:]).all()


def test_collided_items_share_a_leaf(model, tokenizer, titles, prompts):
    """A duplicate title shares its sequence: decoding names the first, exact scoring gives
    both the sequence's value."""
    catalog = Catalog.from_titles(titles[:12] + [titles[4]], tokenizer)
    dec = decoder(model, tokenizer, catalog)
    assert catalog.item_tokens.collisions == [[4, 12]]
    items, _ = dec.beam_search_items(prompts[:2])
    assert 12 not in items.tolist()[0] + items.tolist()[1]
    exact = dec.exact_item_log_probs(prompts[:2])
    assert torch.equal(exact[:, 4], exact[:, 12])
    assert catalog.canonical.tolist() == [True] * 12 + [False]
    torch.testing.assert_close(
        exact[:, catalog.canonical].double().exp().sum(1), torch.ones(2, dtype=torch.float64)
    )
    top, _ = dec.exact_top_k(prompts[:2], k=13)
    assert (top[:, :12] >= 0).all() and (top[:, 12] == -1).all() and 12 not in top.tolist()[0]
    samples = dec.sample_items(prompts[:2], num_samples=50, seed=0)
    assert not (samples == 12).any()


def test_item_longer_than_max_new_tokens_warns(model, tokenizer, catalog, prompts):
    dec = decoder(model, tokenizer, catalog)
    longest = int(catalog.lengths.max())
    with pytest.warns(UserWarning, match="cannot be decoded"):
        items, _ = dec.beam_search_items(prompts[:1], max_new_tokens=longest)
    assert (items >= 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.sample_items(prompts[:1], max_new_tokens=longest, seed=0)


# -- sampling matches the exact distribution ------------------------------------------------


DRAWS = 4000


@pytest.fixture(scope="module")
def short_prompts(tokenizer, prompts) -> list[list[int]]:
    """The last 12 tokens of two prompts (token-id prompts): cheap to repeat thousands of times."""
    return [tokenizer(p)["input_ids"][-12:] for p in prompts[:2]]


def assert_fits(items: torch.Tensor, probabilities: np.ndarray) -> None:
    """Pearson's chi-square test of the drawn items against the exact probabilities, at a
    significance of 1e-3 (critical value by the Wilson-Hilferty approximation). The seeds are
    fixed, so the outcome is too; a sampler off by a temperature of 2 scores in the hundreds."""
    counts = np.bincount(items.flatten().numpy(), minlength=len(probabilities))
    expected = probabilities * counts.sum()
    assert (expected >= 5).all(), "too few draws for the chi-square approximation"
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df, z = len(probabilities) - 1, 3.09  # z: the standard normal's 1e-3 upper quantile
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    assert statistic < critical, (statistic, critical, counts / counts.sum(), probabilities)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_matches_exact_probabilities(
    model, tokenizer, small_catalog, short_prompts, temperature
):
    dec = decoder(model, tokenizer, small_catalog)
    exact = (
        dec.exact_item_log_probs(short_prompts[:1], temperature=temperature)[0]
        .double()
        .exp()
        .numpy()
    )
    samples = dec.sample_items(
        short_prompts[:1], num_samples=DRAWS, temperature=temperature, seed=11
    )
    assert_fits(samples, exact)


def test_sampled_top_1_matches_exact_probabilities(model, tokenizer, small_catalog, short_prompts):
    dec = decoder(model, tokenizer, small_catalog, batch_size=DRAWS)
    exact = dec.exact_item_log_probs(short_prompts[:1])[0].double().exp().numpy()
    items, log_probs = dec.sampled_top_k_items(short_prompts[:1] * DRAWS, k=1, seed=5)
    assert_fits(items, exact)
    torch.testing.assert_close(
        log_probs[:, 0].double().exp(), torch.from_numpy(exact)[items[:, 0]], rtol=1e-4, atol=0
    )


def test_sampled_top_k_inclusion_matches_sampling_without_replacement(
    model, tokenizer, small_catalog, short_prompts
):
    """K = 3 distinct items: how often each item is among them matches a Monte-Carlo of exact
    sequential sampling without replacement; the first of the K is a plain sample."""
    k, draws = 3, 3000
    dec = decoder(model, tokenizer, small_catalog, batch_size=draws)
    exact = dec.exact_item_log_probs(short_prompts[1:2])[0].double().exp().numpy()
    items, _ = dec.sampled_top_k_items(short_prompts[1:2] * draws, k=k, seed=9)
    assert all(len(set(row)) == k for row in items.tolist())
    inclusion = np.bincount(items.flatten().numpy(), minlength=len(exact)) / draws

    # Sequential draws: pick one item in proportion to the probability of those left, k times.
    rng = np.random.default_rng(0)
    trials = 40_000
    left = np.tile(exact, (trials, 1))
    reference = np.zeros(len(exact))
    for _ in range(k):
        cumulative = np.cumsum(left / left.sum(1, keepdims=True), axis=1)
        drawn = np.minimum((cumulative < rng.random((trials, 1))).sum(1), len(exact) - 1)
        assert (left[np.arange(trials), drawn] > 0).all()
        reference += np.bincount(drawn, minlength=len(exact))
        left[np.arange(trials), drawn] = 0
    reference /= trials
    sigma = np.sqrt(reference * (1 - reference) / draws + reference * (1 - reference) / trials)
    assert (np.abs(inclusion - reference) <= 5 * sigma + 2e-3).all(), (inclusion, reference)
    assert_fits(items[:, 0], exact)


def test_seeds_repeat(model, tokenizer, catalog, prompts):
    dec = decoder(model, tokenizer, catalog, batch_size=3)
    assert torch.equal(
        dec.sampled_top_k_items(prompts, k=4, seed=1)[0],
        dec.sampled_top_k_items(prompts, k=4, seed=1)[0],
    )
    assert torch.equal(
        dec.sample_items(prompts, num_samples=3, seed=2),
        dec.sample_items(prompts, num_samples=3, seed=2),
    )
    assert not torch.equal(
        dec.sample_items(prompts, num_samples=3, seed=2),
        dec.sample_items(prompts, num_samples=3, seed=4),
    )


# -- flow guidance ----------------------------------------------------------------------------


def random_prior(catalog, seed: int, rows: int | None = None) -> torch.Tensor:
    """A long-tailed item log-prior (log of Zipf-like counts in a random order)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (catalog.num_items,) if rows is None else (rows, catalog.num_items)
    ranks = torch.rand(shape, generator=generator).argsort(dim=-1).double() + 1
    return -1.2 * torch.log(ranks)


@pytest.mark.parametrize("form", GUIDANCE_FORMS)
def test_zero_beta_decodes_as_without_guidance_bit_for_bit(
    model, tokenizer, catalog, prompts, form
):
    dec = decoder(model, tokenizer, catalog, batch_size=3)
    off = Guidance(random_prior(catalog, 0), 0.0, form)
    for method, options in [
        (dec.beam_search_items, {}),
        (dec.sampled_top_k_items, {"k": 5, "seed": 3}),
        (dec.exact_top_k, {"k": 10}),
    ]:
        plain, guided = method(prompts, **options), method(prompts, guidance=off, **options)
        assert torch.equal(plain[0], guided[0]) and torch.equal(plain[1], guided[1])
    plain = dec.sample_items(prompts, num_samples=4, seed=1)
    assert torch.equal(plain, dec.sample_items(prompts, num_samples=4, seed=1, guidance=off))


@pytest.mark.parametrize("form", GUIDANCE_FORMS)
def test_guided_beam_search_is_exact_when_the_beam_holds_the_catalog(
    model, tokenizer, small_catalog, prompts, form
):
    """10 beams over 8 items: the guided list is every item, ranked by the exact guided score."""
    dec = decoder(model, tokenizer, small_catalog, batch_size=4)
    guidance = Guidance(random_prior(small_catalog, 1), 0.8, form)
    items, scores = dec.beam_search_items(prompts, num_beams=10, guidance=guidance)
    exact = dec.exact_beam_scores(prompts, guidance=guidance)
    expected = exact.argsort(dim=1, descending=True)
    assert torch.equal(items[:, :8], expected)
    torch.testing.assert_close(scores[:, :8], exact.gather(1, expected), rtol=0, atol=1e-4)
    top_items, top_scores = dec.exact_top_k(prompts, k=8, guidance=guidance)
    assert torch.equal(top_items, expected)


@pytest.mark.parametrize("form", GUIDANCE_FORMS)
def test_guided_beam_scores_are_exact_guided_scores(model, tokenizer, catalog, prompts, form):
    dec = decoder(model, tokenizer, catalog)
    guidance = Guidance(random_prior(catalog, 2), 0.5, form)
    items, scores = dec.beam_search_items(prompts, guidance=guidance)
    exact = dec.exact_beam_scores(prompts, guidance=guidance)
    torch.testing.assert_close(scores, exact.gather(1, items), rtol=0, atol=1e-4)
    plain_items, _ = dec.beam_search_items(prompts)
    assert not torch.equal(items, plain_items)  # the guidance changes the lists


def test_guidance_moves_lists_toward_the_tail_of_the_prior(model, tokenizer, catalog, prompts):
    """The larger beta, the lower the mean prior share of the recommended items."""
    dec = decoder(model, tokenizer, catalog, batch_size=7)
    prior = random_prior(catalog, 3)
    means = []
    for beta in (0.0, 1.0, 3.0):
        items, _ = dec.beam_search_items(prompts, guidance=Guidance(prior, beta))
        means.append(float(prior[items].mean()))
    assert means[0] > means[1] > means[2]


def test_zero_prior_items_are_never_recommended(model, tokenizer, catalog, prompts):
    dec = decoder(model, tokenizer, catalog, batch_size=4)
    plain, _ = dec.beam_search_items(prompts)
    excluded = plain[:, :3].unique()
    prior = random_prior(catalog, 4)
    prior[excluded] = -math.inf
    for beta in (0.0, 0.5):
        guidance = Guidance(prior, beta)
        outputs = [
            dec.beam_search_items(prompts, guidance=guidance)[0],
            dec.sampled_top_k_items(prompts, k=10, seed=0, guidance=guidance)[0],
            dec.sample_items(prompts, num_samples=20, seed=0, guidance=guidance),
            dec.exact_top_k(prompts, k=10, guidance=guidance)[0],
        ]
        for items in outputs:
            assert (items >= 0).all() and not torch.isin(items, excluded).any()


def test_per_prompt_priors_equal_each_prompts_own_shared_prior(
    model, tokenizer, catalog, prompts
):
    dec = decoder(model, tokenizer, catalog, batch_size=3)
    priors = random_prior(catalog, 5, rows=len(prompts))
    items, scores = dec.beam_search_items(prompts, guidance=Guidance(priors, 0.7, "item"))
    for row, prompt in enumerate(prompts):
        alone = dec.beam_search_items([prompt], guidance=Guidance(priors[row], 0.7, "item"))
        assert torch.equal(items[row], alone[0][0])
        torch.testing.assert_close(scores[row], alone[1][0], rtol=0, atol=1e-5)


def test_guided_sampling_matches_the_exact_guided_distribution(
    model, tokenizer, small_catalog, short_prompts
):
    dec = decoder(model, tokenizer, small_catalog, batch_size=DRAWS)
    guidance = Guidance(random_prior(small_catalog, 6), 1.0)
    exact = dec.exact_item_log_probs(short_prompts[:1], guidance=guidance)[0].double().exp()
    plain = dec.exact_item_log_probs(short_prompts[:1])[0].double().exp()
    assert torch.allclose(exact.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
    assert (exact - plain).abs().max() > 0.05  # the guidance reshapes the distribution
    samples = dec.sample_items(short_prompts[:1], num_samples=DRAWS, seed=7, guidance=guidance)
    assert_fits(samples, exact.numpy())
    top, _ = dec.sampled_top_k_items(short_prompts[:1] * DRAWS, k=1, seed=8, guidance=guidance)
    assert_fits(top, exact.numpy())


def test_transformers_beam_search_with_the_guided_processor_is_the_normalized_form(
    model, tokenizer, catalog, prompts
):
    """Per-token guidance inside ``generate(num_beams=10)`` gives our guided beam search's
    lists and scores in the "normalized" form."""
    prior = random_prior(catalog, 7)
    guidance = Guidance(prior, 0.6, "normalized")
    flows = catalog.trie.log_flows(prior)
    items, scores = decoder(model, tokenizer, catalog, batch_size=3).beam_search_items(
        prompts, guidance=guidance
    )
    expected_items, expected_scores = generate_beams(
        model, tokenizer, catalog, prompts, log_flows=flows, beta=0.6
    )
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-4)


def test_bad_guidance_is_a_value_error_naming_it(model, tokenizer, catalog, prompts):
    prior = random_prior(catalog, 8)
    for bad, match in [
        ({"beta": math.nan}, "beta must be finite"),
        ({"beta": "0.5"}, "beta must be a number"),
        ({"form": "sum"}, "form must be one of"),
        ({"log_prior": prior.long()}, "floating-point"),
        ({"log_prior": torch.full_like(prior, math.nan)}, "NaN or \\+inf"),
        ({"log_prior": torch.full_like(prior, -math.inf)}, "excludes every item"),
        ({"log_prior": prior[None, None]}, "shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            Guidance(**{"log_prior": prior, "beta": 0.5, **bad})
    dec = decoder(model, tokenizer, catalog)
    with pytest.raises(ValueError, match="has 39 items, the catalog 40"):
        dec.beam_search_items(prompts, guidance=Guidance(prior[:-1]))
    with pytest.raises(ValueError, match="2 rows for 7 prompts"):
        dec.sampled_top_k_items(prompts, guidance=Guidance(random_prior(catalog, 0, rows=2)))
    with pytest.raises(ValueError, match="normalize='trie'"):
        dec.exact_item_log_probs(prompts, normalize="model", guidance=Guidance(prior))
    with pytest.raises(ValueError, match="must be a Guidance"):
        dec.beam_search_items(prompts, guidance=0.5)


@pytest.mark.parametrize("do_sample", [False, True])
def test_guided_processor_in_greedy_search_and_sampling(
    model, tokenizer, catalog, prompts, do_sample
):
    """transformers hands greedy search and sampling raw logits: the guided processor makes
    them pick from (or draw from) the guided trie distribution. Every output is an item, beta 0
    is the unguided processor, and a strong guidance changes the picks toward the prior's
    tail."""
    prior = random_prior(catalog, 9)
    flows = catalog.trie.log_flows(prior)
    inputs = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    width = inputs["input_ids"].shape[1]
    lookup = {tuple(s): i for i, s in reversed(list(enumerate(catalog.item_tokens.sequences)))}

    def generate(**guidance) -> torch.Tensor:
        processor = TrieLogitsProcessor(catalog.trie, width, tokenizer.eos_token_id, **guidance)
        config = GenerationConfig(
            do_sample=do_sample, max_new_tokens=64, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, top_k=None, top_p=None,
        )
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                **inputs, generation_config=config,
                logits_processor=LogitsProcessorList([processor]),
            )
        rows = out[:, width:].tolist()
        return torch.tensor([lookup[tuple(row[: row.index(tokenizer.eos_token_id)])] for row in rows])

    plain = generate()
    assert torch.equal(plain, generate(log_flows=flows, beta=0.0))
    strong = generate(log_flows=flows, beta=4.0)
    assert float(prior[strong].mean()) < float(prior[plain].mean())
    if not do_sample:  # greedy: the first token is the argmax of the guided root logits
        positions = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        root = model(**inputs, position_ids=positions).logits[:, -1].float()
        guided = catalog.trie.guide_logits_(
            root, torch.zeros(len(prompts), dtype=torch.int32), flows, 4.0
        )
        first = [catalog.item_tokens.sequences[item][0] for item in strong.tolist()]
        assert guided.argmax(dim=1).tolist() == first
