"""xgrammar interop: our token bitmasks are bit-for-bit in xgrammar's layout.

The layout (int32 ``[B, ceil(V / 32)]``, bit j of word w = token 32 w + j, 1 = allowed) is what
lets a serving engine apply the trie's masks with the kernels it already runs for grammars.
Checked against xgrammar's own apply kernel, its packing and reading helpers, and its grammar
matcher.
"""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
import xgrammar as xgr
from xgrammar.testing import _get_masked_tokens_from_bitmask, bool_mask_to_bitmask

from flower_ext import Trie
from flower_ext.generation import allowed_token_bitmask
from helpers_data import allowed_tokens, node_rows, random_catalog

QWEN_VOCAB = 151_936  # Qwen2.5 / Qwen3 embedding rows: a multiple of 32
RAGGED_VOCAB = 1_000  # 31 full words and a last word of 8 tokens
VOCABS = [RAGGED_VOCAB, QWEN_VOCAB]


def _catalog_trie(vocab_size: int, seed: int) -> Trie:
    """A catalog over a few tokens chosen to cover the layout's edges: bit 0 and bit 31 (the
    int32 sign bit) of a word, and the last token of the vocabulary (the termination token,
    so that it is a child of many nodes)."""
    rng = random.Random(seed)
    termination = vocab_size - 1
    tokens = sorted({0, 31, 32, 63, *rng.sample(range(vocab_size - 1), 6)})
    return Trie.from_sequences(random_catalog(rng, 60, tokens, 4, termination))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab_size", VOCABS)
def test_xgrammar_apply_masks_the_same_tokens_as_mask_logits(vocab_size, dtype):
    trie = _catalog_trie(vocab_size, seed=vocab_size)
    nodes = node_rows(trie, random.Random(1), count=29)
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(nodes.numel(), vocab_size, generator=generator).to(dtype)

    by_xgrammar = logits.clone()
    bitmask = trie.token_bitmask(nodes, vocab_size)
    xgr.apply_token_bitmask_inplace(by_xgrammar, bitmask, backend="cpu")
    by_trie = trie.mask_logits_(logits.clone(), nodes)

    # Same -inf positions and the other logits untouched, in both.
    assert torch.equal(by_xgrammar, by_trie)
    # ... and those positions are the non-children (so that neither masked nothing).
    allowed = allowed_tokens(trie, nodes, vocab_size)
    assert torch.equal(by_trie.isfinite(), allowed)
    assert torch.equal(by_trie[allowed], logits[allowed])


@pytest.mark.parametrize("vocab_size", VOCABS)
def test_bitmask_words_equal_xgrammar_packing(vocab_size):
    trie = _catalog_trie(vocab_size, seed=vocab_size + 1)
    nodes = node_rows(trie, random.Random(3), count=13)
    bitmask = trie.token_bitmask(nodes, vocab_size)

    assert bitmask.shape == tuple(xgr.get_bitmask_shape(nodes.numel(), vocab_size))
    assert bitmask.dtype == xgr.bitmask_dtype
    # xgrammar pads a ragged last word with allowed bits; we never allow tokens past the
    # vocabulary, so pad the bool mask with False before packing it.
    allowed = allowed_tokens(trie, nodes, vocab_size)
    padding = -vocab_size % 32
    expected = bool_mask_to_bitmask(torch.nn.functional.pad(allowed, (0, padding), value=False))
    assert torch.equal(bitmask, expected)


@pytest.mark.parametrize("vocab_size", VOCABS)
def test_xgrammar_reads_the_rejected_tokens_from_our_bitmask(vocab_size):
    trie = _catalog_trie(vocab_size, seed=vocab_size + 2)
    nodes = node_rows(trie, random.Random(4), count=3)
    bitmask = trie.token_bitmask(nodes, vocab_size)
    allowed = allowed_tokens(trie, nodes, vocab_size)
    for row in range(nodes.numel()):
        rejected = _get_masked_tokens_from_bitmask(bitmask, vocab_size, row)
        assert rejected == (~allowed[row]).nonzero().flatten().tolist(), f"row {row}"


# A raw vocabulary of one distinct character per token, so that a grammar over the catalog's
# strings allows, at every prefix, exactly the tokens of that prefix's trie children.
CHARACTER_VOCAB = 70  # not a multiple of 32
# No '"' or backslash, so that json.dumps writes the items as plain EBNF string literals.
CHARACTERS = string.ascii_letters + string.digits + "!#$%&'()*+,-./:;<=>?@[]^_`{|}~"


@pytest.mark.parametrize("eos_token_id", [31, 63, 69])
def test_allowed_token_bitmask_matches_xgrammar_grammar_matcher(eos_token_id):
    """Constrained decoding of every catalog item, step by step: our bitmask (children, then
    EOS alone once the item is complete) equals the one xgrammar's matcher fills for the grammar
    ``root ::= item_1 | item_2 | ...`` that stops on the same EOS."""
    rng = random.Random(eos_token_id)
    termination = 5
    title_tokens = [t for t in range(CHARACTER_VOCAB) if t not in (eos_token_id, termination)]
    items = random_catalog(rng, 40, rng.sample(title_tokens, 8), 5, termination)
    trie = Trie.from_sequences(items)

    vocab = list(CHARACTERS[:CHARACTER_VOCAB])
    vocab[eos_token_id] = "</s>"
    tokenizer_info = xgr.TokenizerInfo(
        vocab, vocab_size=CHARACTER_VOCAB, stop_token_ids=[eos_token_id]
    )
    strings = ["".join(vocab[token] for token in item) for item in items]
    grammar = "root ::= " + " | ".join(json.dumps(text) for text in strings)
    compiled = xgr.GrammarCompiler(tokenizer_info, max_threads=1).compile_grammar(grammar)

    expected = xgr.allocate_token_bitmask(1, CHARACTER_VOCAB)
    for item in items:
        matcher = xgr.GrammarMatcher(compiled)
        node = torch.zeros(1, dtype=torch.int32)
        for token in item + [eos_token_id]:
            matcher.fill_next_token_bitmask(expected)
            ours = allowed_token_bitmask(trie, node, CHARACTER_VOCAB, eos_token_id)
            # Compare the first V bits: xgrammar's padding bits past the vocabulary are its own.
            rejected = _get_masked_tokens_from_bitmask(ours, CHARACTER_VOCAB)
            assert rejected == _get_masked_tokens_from_bitmask(expected, CHARACTER_VOCAB), (
                f"item {item}, before token {token}"
            )
            assert matcher.accept_token(token)
            node = trie.advance(node, torch.tensor([token], dtype=torch.int32))
        assert matcher.is_terminated()
