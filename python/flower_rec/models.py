"""The embedded default model: a tiny Llama-style causal LM built from a config, with a byte-level
BPE tokenizer trained on the dataset's own text, so that everything runs offline on a CPU."""

from __future__ import annotations

from collections.abc import Iterable

from .data import Dataset
from .prompts import DOMAINS, build_prompt, response_text

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def corpus(dataset: Dataset, domain: str = "items") -> Iterable[str]:
    """The text a tokenizer for this dataset should know: every title as generated, and the
    prompt's fixed wording."""
    yield build_prompt([], domain)
    for title in dataset.titles:
        yield response_text(title)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``texts`` (the ``tokenizers`` library), wrapped as a
    transformers fast tokenizer with BOS, EOS and padding tokens; padding on the left, as
    batched generation needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **SPECIAL_TOKENS)


def tiny_llama(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
):
    """A small Llama-style causal LM over ``tokenizer``'s vocabulary, initialised with ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


__all__ = ["SPECIAL_TOKENS", "DOMAINS", "corpus", "train_tokenizer", "tiny_llama"]
