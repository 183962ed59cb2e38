"""Training samples as token ids, and the collator that batches them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import Dataset
from ..decoding import Catalog
from ..prompts import encode, sample_prompts

# ---------------------------------------------------------------------------------------------
# data


@dataclass
class EncodedSamples:
    """Token ids of each training sample: its prompt (with the tokenizer's special tokens, as
    decoding encodes prompts) and its target item's sequence (without EOS)."""

    prompts: list[list[int]]
    targets: list[list[int]]


def encode_samples(
    dataset: Dataset,
    split: str,
    tokenizer,
    catalog: Catalog,
    domain: str = "items",
    max_prompt_tokens: int | None = None,
    limit: int | None = None,
) -> EncodedSamples:
    """The first ``limit`` samples of ``split`` (all with None), prompts cut to
    ``max_prompt_tokens`` (:func:`flower_rec.prompts.sample_prompts`)."""
    samples = dataset.split(split)[:limit]
    texts = sample_prompts(tokenizer, dataset.titles, samples, max_prompt_tokens, domain)
    prompts = encode(tokenizer, texts, add_special_tokens=True)
    sequences = catalog.item_tokens.sequences
    return EncodedSamples(prompts, [list(sequences[s.target]) for s in samples])


class SampleSet(torch.utils.data.Dataset):
    """The samples of a split as collator inputs; each carries its index in the split
    (per-sample rewards and rollout seeds key on it)."""

    def __init__(self, encoded: EncodedSamples):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "sample_index": index,
            "prompt": self.encoded.prompts[index],
            "target": self.encoded.targets[index],
        }


@dataclass
class RecommendationCollator:
    """Batches samples: ``input_ids`` / ``attention_mask`` ``[B, P]`` (prompts, left-padded),
    ``target_ids [B, W]`` (item sequences without EOS, right-padded), ``target_lengths [B]``,
    ``sample_index [B]``."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch = len(features)
        prompt_width = max(len(f["prompt"]) for f in features)
        target_width = max(len(f["target"]) for f in features)
        input_ids = torch.full((batch, prompt_width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, prompt_width), dtype=torch.long)
        target_ids = torch.full((batch, target_width), self.pad_token_id, dtype=torch.long)
        for row, feature in enumerate(features):
            prompt, target = feature["prompt"], feature["target"]
            input_ids[row, prompt_width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, prompt_width - len(prompt) :] = 1
            target_ids[row, : len(target)] = torch.tensor(target)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_ids": target_ids,
            "target_lengths": torch.tensor([len(f["target"]) for f in features]),
            "sample_index": torch.tensor([int(f["sample_index"]) for f in features]),
        }
