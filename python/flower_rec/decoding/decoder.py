"""The decoder: one class with every way of getting catalog items out of a causal LM."""

from __future__ import annotations

from .beam import BeamSearch
from .catalog import Catalog
from .exact import ExactScoring
from .sampling import Sampling


class TrieDecoder(BeamSearch, Sampling, ExactScoring):
    """Decodes catalog items from a causal LM for batches of prompts (see the package
    docstring for the four ways, and :mod:`~flower_rec.decoding.guidance` for flow guidance,
    which every one of them takes as ``guidance=``).

    Args:
        model: a Hugging Face causal LM (decoder-only, with a KV cache), in eval mode.
        tokenizer: a transformers tokenizer or ``tokenizers.Tokenizer``; prompts given as text
            are tokenised with its special tokens (a BOS where the tokenizer adds one), as for
            SFT. Prompts may also be given as token-id lists.
        catalog: the items (:class:`Catalog`).
        eos_token_id: the token that ends a generation (beam search scores it after an item);
            defaults to the tokenizer's (the EOS that SFT appends), then the model's.
        pad_token_id: fills the left padding (masked; any id works).
        batch_size: prompts per forward batch (beam search runs ``batch_size * num_beams`` rows).
        progress: show a tqdm bar per call.
    """


def beam_search(model, tokenizer, catalog: Catalog, prompts, *, batch_size: int = 16, **options):
    """Top-``num_beams`` titles per prompt (:meth:`TrieDecoder.beam_search`)."""
    return TrieDecoder(model, tokenizer, catalog, batch_size=batch_size).beam_search(
        prompts, **options
    )


def sample(model, tokenizer, catalog: Catalog, prompts, *, batch_size: int = 16, **options):
    """``num_samples`` sampled titles per prompt (:meth:`TrieDecoder.sample`)."""
    return TrieDecoder(model, tokenizer, catalog, batch_size=batch_size).sample(prompts, **options)


def sampled_top_k(model, tokenizer, catalog: Catalog, prompts, *, batch_size: int = 16, **options):
    """``k`` distinct titles per prompt, drawn without replacement
    (:meth:`TrieDecoder.sampled_top_k`)."""
    return TrieDecoder(model, tokenizer, catalog, batch_size=batch_size).sampled_top_k(
        prompts, **options
    )


def exact_item_log_probs(
    model, tokenizer, catalog: Catalog, prompts, *, batch_size: int = 16, **options
):
    """``[P, num_items]`` item log-probabilities (:meth:`TrieDecoder.exact_item_log_probs`)."""
    decoder = TrieDecoder(model, tokenizer, catalog, batch_size=batch_size)
    return decoder.exact_item_log_probs(prompts, **options)
