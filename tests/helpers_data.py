"""Small catalogs, node rows, synthetic titles, tokenizers and models shared by the tests.

Imported as a plain module (``from helpers_data import ...``): pytest puts this folder on
``sys.path`` because ``tests/`` is not a package.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from flower_ext import Trie
from flower_rec.data import Dataset, Sample
from flower_rec.prompts import build_prompt, response_text


def random_catalog(
    rng: random.Random,
    num_items: int,
    tokens: Sequence[int],
    max_length: int,
    termination_token: int,
) -> list[list[int]]:
    """``num_items`` distinct items: 1 .. ``max_length`` tokens drawn from ``tokens``, then
    ``termination_token``. Drawing from a few tokens makes items share prefixes and makes some
    items prefixes of others (up to the termination token), as in a real catalog."""
    distinct_paths = sum(len(tokens) ** length for length in range(1, max_length + 1))
    if num_items > distinct_paths:
        raise ValueError(f"only {distinct_paths} distinct items exist, {num_items} requested")
    items: set[tuple[int, ...]] = set()
    while len(items) < num_items:
        length = rng.randint(1, max_length)
        items.add(tuple(rng.choice(tokens) for _ in range(length)) + (termination_token,))
    return [list(item) for item in sorted(items)]


def leaf_nodes(trie: Trie) -> Tensor:
    """Ids of the nodes without children (where items end), int32."""
    return (trie.child_ptr.diff() == 0).nonzero().flatten().to(torch.int32)


def node_rows(trie: Trie, rng: random.Random, count: int) -> Tensor:
    """``count`` random node ids, followed by the rows that must always be covered: -1 (a row
    that left the trie), the root and a leaf. int32 ``[count + 3]``."""
    chosen = [rng.randrange(trie.num_nodes) for _ in range(count)]
    leaves = leaf_nodes(trie).tolist()
    return torch.tensor(chosen + [-1, 0, rng.choice(leaves)], dtype=torch.int32)


def allowed_tokens(trie: Trie, node_ids: Tensor, vocab_size: int) -> Tensor:
    """``[B, V]`` bool: True where the token is a child of the row's node. Built from
    :meth:`Trie.children` (CSR), independently of the bitmask kernels under test."""
    row_ptr, child_tokens, _ = trie.children(node_ids)
    rows = torch.repeat_interleave(torch.arange(node_ids.numel()), row_ptr.diff())
    allowed = torch.zeros(node_ids.numel(), vocab_size, dtype=torch.bool)
    allowed[rows, child_tokens.long()] = True
    return allowed


# Words of readable synthetic titles for tokenizer and decoding tests.
WORDS = [
    "Star",
    "Wars",
    "Mario",
    "Kart",
    "Zelda",
    "Legend",
    "of",
    "the",
    "Edition",
    "Deluxe",
    "PlayStation",
    "4",
    "Xbox",
    "One",
    "(Black)",
    "-",
    "Controller",
    "Game",
    "Halo:",
    "Duty",
    "Sonic",
    "Ultimate",
    "Pack",
    "2",
    "Remastered",
    "[Digital",
    "Code]",
    "Vol.",
    "1.",
    "Hero!",
]


def synthetic_titles(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    titles: set[str] = set()
    while len(titles) < count:
        titles.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))))
    return sorted(titles)


def train_bpe(titles: list[str], *, pre_tokenize: bool = True, vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) or, without pre-tokenisation, a BPE whose
    merges may span the prompt / title boundary."""
    tokenizer = Tokenizer(models.BPE())
    if pre_tokenize:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if pre_tokenize else [],
    )
    rng = random.Random(1)
    corpus = [
        build_prompt(rng.sample(titles, 3)) + response_text(t) for t in titles for _ in range(3)
    ]
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def tiny_dataset() -> Dataset:
    """Items 0..5; items 4 and 5 share a title. Two users; u1's sequence starts in train."""
    titles = ["Alpha - PS4", "Beta", 'Gamma: "Deluxe"', "Delta's", "Twin", "Twin"]
    train = [
        Sample((0,), 1, "u1", 100, 5.0, (90,), (4.0,)),
        Sample((0, 1), 2, "u1", 110, 3.0, (90, 100), (4.0, 5.0)),
        Sample((3,), 4, "u2", 120, 4.0, (95,), (2.0,)),
        Sample((0, 1, 2), 5, "u1", 130, 1.0, (90, 100, 110), (4.0, 5.0, 3.0)),
    ]
    valid = [Sample((3, 4), 0, "u2", 140, 5.0, (95, 120), (2.0, 4.0))]
    test = [Sample((3, 4, 0), 1, "u2", 150, 5.0, (95, 120, 140), (2.0, 4.0, 5.0))]
    keys = ["A1", "B2", "C3", "D4", "E5", "F6"]
    return Dataset("tiny", titles, train, valid, test, item_keys=keys)


def seeded_llama(
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    *,
    num_key_value_heads: int = 2,
    initializer_range: float = 0.02,
):
    """A random two-layer Llama (hidden 32, 4 heads) initialised with seed 0, the global RNG
    state left as it was, so that it is the same model whichever tests ran before."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)
