"""Trie-constrained beam search end to end: ``flower_rec``'s own loop over the KV cache
(:meth:`flower_rec.decoding.TrieDecoder.beam_search_items`, flower_ext trie ops) vs transformers'
``generate(prefix_allowed_tokens_fn=fn)`` with ``fn`` a lookup in a Python dict keyed by the
generated token prefix, the way the published BIGRec / D3 / Flower code constrains decoding.

Same tiny model (a seeded random Llama: 2 layers, hidden 64, peaked by a large init scale), same
16 prompts (the paper's template, 10 history titles each), 10 beams, 10 returned, max 64 new
tokens, length penalty 1. Catalog: the 3,858 Video_Games titles (a synthetic title catalog of the
same size when the shared data is absent), tokenised by a byte-level BPE of 4,000 tokens trained
on them. Target: >= 3x. Check before timing: the two top-10 lists of every prompt are identical,
and so are those of ``generate`` with flower_ext's ``TrieLogitsProcessor``.

Flow guidance: guided beam search (beta 0.5 on a Zipf-like item prior, each guidance form;
and beta 0, which searches exactly as unguided, so it times the guidance's own cost alone)
against the same unguided beam search, same prompts. Target: at most 1.1x its time (a
"speedup" of at least 0.91). Check before timing: every guided list is ten catalog items, and
beta = 0 gives the unguided lists exactly.

``extra_info`` also carries, from one instrumented call of each (outside the timed rounds), the
time share of the constraint itself: the ``PrefixConstrainedLogitsProcessor`` calls in the
baseline, the trie lookups (children, EOS on complete items, masking) in ours, and the same for
``generate`` with ``TrieLogitsProcessor`` (``generate_trie_processor_*``), which shows how much of
the gain is the constraint and how much the loop (one prefill per prompt instead of one per beam,
prompts leaving the batch once their beams are settled).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from harness import Case, baseline, ours

SHARED = Path(__file__).resolve().parents[2] / "shared"
VIDEO_GAMES_TITLES = (
    SHARED / "data/flower_official/Video_Games/info/Video_Games_5_2015-10-2018-11.txt"
)

NUM_PROMPTS, HISTORY, NUM_BEAMS, MAX_NEW_TOKENS = 16, 10, 10, 64
VOCAB_SIZE = 4000
OURS = "flower_rec_beam_search"
DICT = "generate+prefix_allowed_tokens_fn"
DOMAIN = "video_games"


def _titles() -> tuple[str, list[str]]:
    if VIDEO_GAMES_TITLES.is_file():
        lines = VIDEO_GAMES_TITLES.read_text(encoding="utf-8").splitlines()
        return "video_games", [line.rsplit("\t", 1)[0] for line in lines if line]
    # Pseudo-word titles with Zipf-distributed words and shared series prefixes.
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "zu", "ren", "tor", "ax", "el", "vi", "on", "sta", "ri"]
    words = sorted(
        {
            "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))).title()
            for _ in range(3000)
        }
    )
    weights = [1 / (rank + 1) for rank in range(len(words))]
    series = [" ".join(rng.choices(words, weights, k=rng.randint(1, 3))) for _ in range(500)]
    titles = set()
    while len(titles) < 3858:
        tail = " ".join(rng.choices(words, weights, k=rng.randint(0, 8)))
        titles.add(f"{rng.choice(series)} {tail}".strip())
    return "synthetic_titles", sorted(titles)


def _bpe_tokenizer(titles: list[str]):
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens trained on the prompt and the titles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flower_rec.prompts import build_prompt, response_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([build_prompt([], DOMAIN)] + [response_text(t) for t in titles], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


def _peaked_llama(tokenizer):
    """The seeded random tiny Llama, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.2,  # peaked distributions: no near-ties between the two runs
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _published_allowed_tokens(sequences, eos: int) -> dict[tuple[int, ...], list[int]]:
    """The published structure: every generated prefix (title tokens, then EOS) -> the tokens
    allowed next."""
    table: dict[tuple[int, ...], set[int]] = {}
    for sequence in sequences:
        path = [*sequence, eos]
        for end in range(len(path)):
            table.setdefault(tuple(path[:end]), set()).add(path[end])
    return {prefix: sorted(tokens) for prefix, tokens in table.items()}


class _Setup:
    """Tokenizer, model, catalog, prompts and the three decoders, built once."""

    def __init__(self):
        from transformers import GenerationConfig

        from flower_rec.decoding import Catalog, TrieDecoder
        from flower_rec.prompts import build_prompt

        self.catalog_name, titles = _titles()
        self.tokenizer = _bpe_tokenizer(titles)
        self.catalog = Catalog.from_titles(titles, self.tokenizer, build_prompt([], DOMAIN))
        self.eos = self.tokenizer.eos_token_id
        self.model = _peaked_llama(self.tokenizer)

        rng = random.Random(0)
        self.prompts = [
            build_prompt(rng.sample(titles, HISTORY), DOMAIN) for _ in range(NUM_PROMPTS)
        ]
        self.inputs = self.tokenizer(
            self.prompts, padding=True, padding_side="left", return_tensors="pt"
        )
        self.prompt_length = self.inputs["input_ids"].shape[1]
        self.decoder = TrieDecoder(
            self.model, self.tokenizer, self.catalog, batch_size=NUM_PROMPTS, progress=False
        )
        self.generation_config = GenerationConfig(
            num_beams=NUM_BEAMS,
            num_return_sequences=NUM_BEAMS,
            max_new_tokens=MAX_NEW_TOKENS,
            length_penalty=1.0,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos,
        )
        self.allowed = _published_allowed_tokens(self.catalog.item_tokens.sequences, self.eos)
        # A popularity-like guidance prior: Zipf over the items in a seeded random order.
        generator = torch.Generator().manual_seed(0)
        ranks = torch.randperm(self.catalog.num_items, generator=generator).double() + 1
        self.prior = -torch.log(ranks)
        self.lookup = {
            tuple(s): item
            for item, s in reversed(list(enumerate(self.catalog.item_tokens.sequences)))
        }

    # -- the implementations ----------------------------------------------------------------

    def ours(self) -> torch.Tensor:
        return self.decoder.beam_search_items(
            self.prompts, num_beams=NUM_BEAMS, max_new_tokens=MAX_NEW_TOKENS
        )[0]

    def guided(self, form: str, beta: float = 0.5) -> torch.Tensor:
        from flower_rec.decoding import Guidance

        guidance = Guidance(self.prior, beta, form)
        return self.decoder.beam_search_items(
            self.prompts, num_beams=NUM_BEAMS, max_new_tokens=MAX_NEW_TOKENS, guidance=guidance
        )[0]

    def prefix_allowed_tokens_fn(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        # Beams that already ended keep running in transformers: after EOS only EOS.
        return self.allowed.get(tuple(input_ids[self.prompt_length :].tolist()), [self.eos])

    def dict_baseline(self) -> torch.Tensor:
        with torch.no_grad():
            sequences = self.model.generate(
                **self.inputs,
                generation_config=self.generation_config,
                prefix_allowed_tokens_fn=self.prefix_allowed_tokens_fn,
            )
        return self._items(sequences)

    def trie_processor(self) -> torch.Tensor:
        from transformers import LogitsProcessorList

        from flower_ext.generation import TrieLogitsProcessor

        processor = TrieLogitsProcessor(self.catalog.trie, self.prompt_length, self.eos)
        with torch.no_grad():
            sequences = self.model.generate(
                **self.inputs,
                generation_config=self.generation_config,
                logits_processor=LogitsProcessorList([processor]),
            )
        return self._items(sequences)

    def _items(self, sequences: torch.Tensor) -> torch.Tensor:
        items = []
        for row in sequences[:, self.prompt_length :].tolist():
            end = row.index(self.eos)  # raises on a beam that did not finish
            items.append(self.lookup[tuple(row[:end])])  # raises on a non-item
        return torch.tensor(items).view(NUM_PROMPTS, NUM_BEAMS)

    # -- constraint shares -----------------------------------------------------------------

    def constraint_shares(self) -> dict[str, float]:
        """One instrumented call of each: total seconds and seconds inside the constraint."""
        from transformers.generation import logits_process

        from flower_ext.generation import TrieLogitsProcessor

        info: dict[str, float] = {}

        def timed_call(cls, run):
            spent = [0.0]
            original = cls.__call__

            def wrapper(processor, *args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(processor, *args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - start

            cls.__call__ = wrapper
            try:
                start = time.perf_counter()
                run()
                total = time.perf_counter() - start
            finally:
                cls.__call__ = original
            return total, spent[0]

        total, constraint = timed_call(
            logits_process.PrefixConstrainedLogitsProcessor, self.dict_baseline
        )
        info[DICT] = constraint / total
        total, constraint = timed_call(TrieLogitsProcessor, self.trie_processor)
        info["generate_trie_processor_s"] = total
        info["generate_trie_processor_constraint_share"] = constraint / total

        timer = self.decoder.timer
        timer.enabled, timer.seconds = True, {}
        try:
            start = time.perf_counter()
            self.ours()
            total = time.perf_counter() - start
        finally:
            timer.enabled = False
        info[OURS] = timer.seconds.get("constraint", 0.0) / total
        return info


@pytest.fixture(scope="module")
def setup() -> _Setup:
    return _Setup()


@pytest.fixture(scope="module")
def beam_case(setup) -> Case:
    def check(results):
        trie_processor = setup.trie_processor()
        for name, items in [
            (DICT, results[DICT]),
            ("generate+TrieLogitsProcessor", trie_processor),
        ]:
            differ = (items != results[OURS]).any(dim=1).nonzero().flatten().tolist()
            assert not differ, f"{name}: top-10 lists differ from ours for prompts {differ}"
        assert (results[OURS] >= 0).all()

    return Case(
        "beam_search",
        f"{setup.catalog_name}, {NUM_PROMPTS} prompts x {NUM_BEAMS} beams",
        [ours(OURS, setup.ours), baseline(DICT, setup.dict_baseline, target=3)],
        check,
    )


@pytest.fixture(scope="module")
def shares(setup, beam_case) -> dict[str, float]:
    return setup.constraint_shares()


@pytest.mark.parametrize("implementation", [OURS, DICT])
def test_beam_search(benchmark, beam_case, shares, implementation):
    beam_case.measure(benchmark, implementation)
    benchmark.extra_info["constraint_share"] = round(shares[implementation], 4)
    if implementation == OURS:
        benchmark.extra_info["generate_trie_processor_s"] = round(
            shares["generate_trie_processor_s"], 4
        )
        benchmark.extra_info["generate_trie_processor_constraint_share"] = round(
            shares["generate_trie_processor_constraint_share"], 4
        )


GUIDED, UNGUIDED = "guided_beam_search", "unguided_beam_search"


@pytest.fixture(scope="module", params=[("normalized", 0.5), ("item", 0.5), ("normalized", 0.0)])
def guided_case(request, setup) -> Case:
    form, beta = request.param

    def check(results):
        assert (results[GUIDED] >= 0).all(), "a guided list holds fewer than 10 items"
        assert torch.equal(setup.guided(form, beta=0.0), results[UNGUIDED])

    return Case(
        "guided_beam_search",
        f"{setup.catalog_name}, {form} form, beta {beta:g}, {NUM_PROMPTS} prompts x "
        f"{NUM_BEAMS} beams",
        [
            ours(GUIDED, lambda: setup.guided(form, beta)),
            baseline(UNGUIDED, setup.ours, target=0.91),
        ],
        check,
    )


@pytest.mark.parametrize("implementation", [GUIDED, UNGUIDED])
def test_guided_beam_search(benchmark, guided_case, implementation):
    guided_case.measure(benchmark, implementation)
