"""Running a Hugging Face causal LM for the decoders: prompt batches (left padding, grouped by
length, a progress bar), the KV cache, forwards that return float32 logits, and the small tensor
helpers every decoder shares."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from flower_ext import ops

from ..prompts import encode
from .catalog import Catalog
from .guidance import Guidance


def group_rank(sorted_groups: Tensor, num_groups: int) -> Tensor:
    """Rank of each element within its group, for an array sorted by group."""
    counts = torch.bincount(sorted_groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_groups.numel(), device=sorted_groups.device) - starts[sorted_groups]


def sort_by_group_then_score(groups: Tensor, scores: Tensor) -> Tensor:
    """Permutation ordering elements by group ascending, then score descending (stable)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[torch.argsort(groups[order], stable=True)]


def status_checks(device: torch.device):
    """The context of a decoding or rollout loop's op calls: on CUDA the ops' status words are
    read once when it ends (:func:`flower_ext.ops.deferred_checks`), not after every call, which
    would synchronise the host with the GPU at every step; on the CPU, where reading them costs
    nothing, each call checks its own."""
    return ops.deferred_checks() if torch.device(device).type == "cuda" else nullcontext()


def new_cache(model):
    """An empty KV cache for ``model`` (a transformers ``DynamicCache``)."""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover
        return None
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


class Timer:
    """Accumulates wall time per label when enabled (for the benchmark's constraint share)."""

    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, label: str):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start


@dataclass
class PromptBatch:
    input_ids: Tensor  # [B, P] left-padded
    attention_mask: Tensor  # [B, P]
    position_ids: Tensor  # [B, P]
    lengths: Tensor  # [B] real prompt lengths
    indices: list[int]  # positions of these prompts in the caller's list

    @classmethod
    def from_padded(
        cls, input_ids: Tensor, attention_mask: Tensor, indices: list[int]
    ) -> PromptBatch:
        """The batch of left-padded prompts, positions counted over the real tokens."""
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return cls(input_ids, attention_mask, positions, attention_mask.sum(1), indices)


class ModelRunner:
    """The model side of :class:`~flower_rec.decoding.TrieDecoder` (its arguments are this
    class's)."""

    def __init__(
        self,
        model,
        tokenizer,
        catalog: Catalog,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.device = next(model.parameters()).device
        self.trie = catalog.trie.to(self.device)
        self.child_count = self.trie.child_count.long()
        self.eos_token_id = self._resolve_eos(eos_token_id)
        self.pad_token_id = self._resolve_pad(pad_token_id)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.progress = progress
        if model.training:
            warnings.warn(
                "the model is in training mode (dropout): call model.eval()", stacklevel=3
            )
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        self.vocab_size = (
            int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)
        )
        if self.trie.max_token >= self.vocab_size:
            raise ValueError(
                f"the catalog uses token {self.trie.max_token}, beyond the model's vocabulary "
                f"of {self.vocab_size}"
            )
        parameters = inspect.signature(model.forward).parameters
        self._keep_arg = next(
            (name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None
        )
        # transformers >= 5.x names the KV cache argument `cache` (`past_key_values` before).
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.timer = Timer()

    # -- set-up ---------------------------------------------------------------------------

    def _resolve_eos(self, eos_token_id):
        # The tokenizer's EOS is the one SFT appends to the targets; a model's generation config
        # may list several (chat models), of which only the first would be used.
        config = getattr(self.model, "generation_config", None)
        candidates = [
            eos_token_id,
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(config, "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        ]
        for candidate in candidates:
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        raise ValueError("no eos_token_id: pass one (the token that ends a generation)")

    def _resolve_pad(self, pad_token_id):
        for candidate in (
            pad_token_id,
            getattr(self.tokenizer, "pad_token_id", None),
            getattr(self.model.config, "pad_token_id", None),
        ):
            if candidate is not None:
                return int(candidate)
        return self.eos_token_id

    # -- prompts --------------------------------------------------------------------------

    def prompt_ids(self, prompts) -> list[list[int]]:
        prompts = list(prompts)
        if not prompts:
            return []
        if all(isinstance(p, str) for p in prompts):
            return encode(self.tokenizer, prompts, add_special_tokens=True)
        if any(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be all strings or all token-id lists")
        return [[int(t) for t in (p.tolist() if isinstance(p, Tensor) else p)] for p in prompts]

    def batches(self, prompts, desc: str):
        """Left-padded batches of prompts, grouped by length (less padding); a progress bar."""
        from tqdm.auto import tqdm

        ids = self.prompt_ids(prompts)
        if any(len(p) == 0 for p in ids):
            raise ValueError("a prompt has no tokens")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in chosen)
                input_ids = torch.full((len(chosen), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chosen), width), dtype=torch.long)
                for row, i in enumerate(chosen):
                    input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                    mask[row, width - len(ids[i]) :] = 1
                yield PromptBatch.from_padded(
                    input_ids.to(self.device), mask.to(self.device), chosen
                )
                bar.update(len(chosen))

    def guidance_flows(self, guidance: Guidance | None, batch: PromptBatch) -> Tensor | None:
        """The guidance prior's flows for ``batch`` (``[N]`` shared or ``[B, N]``), or None."""
        return None if guidance is None else guidance.flows(self.trie, batch.indices)

    def check_guidance(self, guidance: Guidance | None, num_prompts: int) -> None:
        if guidance is not None:
            if not isinstance(guidance, Guidance):
                raise ValueError(f"guidance must be a Guidance or None, got {type(guidance)}")
            guidance.check(self.catalog.num_items, num_prompts)

    # -- the model ------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        """One forward over the cache (a DynamicCache, extended in place): float32 logits of
        the last position (``[R, V]``) or of every position (``[R, L, V]``), and the cache."""
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": True,
        }
        kwargs[self._cache_arg] = cache
        if last_only and self._keep_arg is not None:
            kwargs[self._keep_arg] = 1
        output = self.model(**kwargs)
        logits = output.logits[:, -1] if last_only else output.logits
        return logits.float(), cache

    def extend(self, cache, row_mask: Tensor, parent: Tensor, tokens: Tensor, positions: Tensor):
        """One decoding step of the rows that go on: row r continues cache row ``parent[r]``
        with token ``tokens[r]`` at position ``positions[r]``. Returns the new rows' logits
        ``[R, V]``, the cache and the attention mask."""
        cache.reorder_cache(parent)
        row_mask = torch.cat([row_mask[parent], row_mask.new_ones(parent.numel(), 1)], dim=1)
        logits, cache = self.forward(
            tokens.unsqueeze(1), row_mask, positions.unsqueeze(1), cache, True
        )
        return logits, cache, row_mask

    def prefill(self, batch: PromptBatch):
        return self.forward(
            batch.input_ids, batch.attention_mask, batch.position_ids, new_cache(self.model), True
        )

    def check_length(self, max_new_tokens: int, extra: int) -> None:
        too_long = int((self.catalog.lengths + extra > max_new_tokens).sum())
        if too_long:
            warnings.warn(
                f"{too_long} catalog items need more than max_new_tokens={max_new_tokens} tokens "
                f"and cannot be decoded",
                stacklevel=4,
            )

    def children(self, nodes: Tensor):
        """CSR children of each node: (row of each child, child token, child node), int64."""
        row_ptr, tokens, children = self.trie.children(nodes.to(torch.int32))
        rows = torch.repeat_interleave(
            torch.arange(nodes.numel(), device=nodes.device), row_ptr.diff().to(nodes.device)
        )
        return rows, tokens.long(), children.long()

    def generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    # -- results --------------------------------------------------------------------------

    @staticmethod
    def empty_results(rows: int, width: int) -> tuple[Tensor, Tensor]:
        """``(items, values)`` to fill: -1 items and -inf values."""
        return (
            torch.full((rows, width), -1, dtype=torch.long),
            torch.full((rows, width), -math.inf, dtype=torch.float32),
        )

    def titles(self, items: Tensor) -> list[list[str]]:
        titles = self.catalog.titles
        return [[titles[i] for i in row if i >= 0] for row in items.tolist()]

    def decode_into(
        self, prompts, desc: str, width: int, decode_batch, guidance: Guidance | None = None
    ) -> tuple[Tensor, Tensor]:
        """Runs ``decode_batch(batch, flows) -> (nodes [B, width], values [B, width] or None)``
        over the prompt batches and gathers ``(items [P, width], values [P, width])``."""
        self.check_guidance(guidance, len(prompts))
        items, values = self.empty_results(len(prompts), width)
        with torch.inference_mode():
            for batch in self.batches(prompts, desc):
                with status_checks(self.device):
                    nodes, batch_values = decode_batch(batch, self.guidance_flows(guidance, batch))
                rows = torch.tensor(batch.indices)
                items[rows] = self.catalog.items_at(nodes)
                if batch_values is not None:
                    values[rows] = batch_values
        return items, values
