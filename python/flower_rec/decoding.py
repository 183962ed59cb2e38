"""Trie-constrained decoding of a Hugging Face causal LM over an item catalog.

Four ways to get items out of a model, all batched over prompts (left padding with an attention
mask, ``batch_size`` prompts at a time, a tqdm progress bar) and all returning catalog items only:

- :meth:`TrieDecoder.beam_search`: the evaluation protocol (10 beams, the 10 finished beams are
  the top-10 list, length penalty 1). It reproduces transformers' beam search exactly (same
  candidates, same finished-beam bookkeeping, same early-stopping heuristic, EOS scored and
  counted in the length), so its lists are those of ``model.generate(num_beams=10, ...)`` with a
  trie constraint, but it runs its own loop over the KV cache: each prompt is prefilled once
  instead of once per beam, only the trie's children of each beam are candidates, and prompts
  whose beams are settled leave the batch.
- :meth:`TrieDecoder.sample`: ancestral sampling with the logits masked to the trie (the
  distribution a rollout draws from), any temperature, several samples per prompt.
- :meth:`TrieDecoder.sampled_top_k`: K distinct items without replacement, in proportion to the
  model's trie-constrained distribution: stochastic beam search (Kool, van Hoof and Welling,
  ICML 2019) over the trie with the KV cache, i.e. Gumbel-top-k over the items without scoring
  them all. It costs what a K-beam search costs (about K x depth token steps per prompt), so it
  scales to a 4k-item catalog and batches of users, where Gumbel-top-k over exact item
  log-probabilities would score the whole trie (30k nodes for Video_Games) for every user.
- :meth:`TrieDecoder.exact_item_log_probs`: the log-probability of every item for each prompt,
  each trie node's logits computed once: the trie's nodes are packed after the prompt's KV cache
  in chunks of consecutive depth-first nodes, with a 4-D attention mask in which a node sees the
  prompt and its ancestors and sits at position ``prompt length + depth - 1`` (tree attention).
  A chunk also carries the ancestors of its first node, so chunks are independent and memory is
  bounded.

Two distributions over items appear here. The *trie-constrained* one renormalises the model's
next-token distribution over each node's children (``normalize="trie"``): it is what constrained
sampling, rollouts and :meth:`sampled_top_k` draw from, and it sums to 1 over the distinct item
sequences. Beam search instead ranks by the model's own full-vocabulary log-probabilities (the
mask removes tokens, it does not renormalise), plus the EOS token that ends the generation, divided
by the generated length: :meth:`exact_beam_scores` computes that score for every item, so the
exact top-K of the beam objective is a sort away.

Items with identical token sequences (``ItemTokens.collisions``, in practice duplicate titles)
share one trie leaf: decoding outputs the first item of such a group, and the exact methods give
every item of the group the sequence's value (sum over ``Catalog.canonical`` items to get 1).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from flower_ext import Trie
from torch import Tensor

from .prompts import ItemTokens, encode, item_token_sequences

__all__ = [
    "Catalog",
    "TrieDecoder",
    "beam_search",
    "exact_item_log_probs",
    "sample",
    "sampled_top_k",
]


# ---------------------------------------------------------------------------------------------
# catalog


@dataclass
class Catalog:
    """Titles, their token sequences and the trie over them (item k ends at ``item_node[k]``).

    Build it with :meth:`from_titles` (tokenises) or :meth:`from_item_tokens`.
    """

    item_tokens: ItemTokens
    trie: Trie

    def __post_init__(self):
        self.item_node = self.trie.item_node.long().cpu()  # [I]
        counts = self.trie.item_ptr.diff().cpu()
        if int(self.trie.child_ptr.diff()[counts > 0].max().cpu()) > 0:
            raise ValueError(
                "an item's sequence is a proper prefix of another's: every item must end with "
                "its termination token (ItemTokens.prefix_conflicts)"
            )
        first = torch.full((self.trie.num_nodes,), -1, dtype=torch.long)
        # item_list is grouped by node and ascending within a node: the first is the lowest id.
        starts = self.trie.item_ptr[:-1].long().cpu()
        has = counts > 0
        first[has] = self.trie.item_list.long().cpu()[starts[has]]
        self.node_item = first  # [N] canonical (lowest) item id ending at each node, -1 elsewhere
        self.lengths = torch.tensor([len(s) for s in self.item_tokens.sequences])  # [I]

    @classmethod
    def from_item_tokens(cls, item_tokens: ItemTokens) -> Catalog:
        trie = Trie.from_sequences(item_tokens.sequences, list(range(len(item_tokens))))
        return cls(item_tokens, trie)

    @classmethod
    def from_titles(
        cls, titles: Sequence[str], tokenizer, prompt: str | None = None, **options
    ) -> Catalog:
        """Tokenises the titles with :func:`~flower_rec.prompts.item_token_sequences` (options
        such as ``termination="split"`` pass through) and builds the trie."""
        return cls.from_item_tokens(item_token_sequences(titles, tokenizer, prompt, **options))

    @property
    def titles(self) -> list[str]:
        return self.item_tokens.titles

    @property
    def canonical(self) -> Tensor:
        """``[I]`` bool: True for the first item of each distinct sequence, the one decoding
        outputs. Sums of exact probabilities over items run over these (duplicates would count
        a shared sequence twice)."""
        return self.node_item[self.item_node] == torch.arange(self.num_items)

    @property
    def num_items(self) -> int:
        return len(self.item_tokens)

    def title_of(self, items: Tensor | Sequence[int]) -> list[str]:
        return [self.titles[i] for i in (items.tolist() if isinstance(items, Tensor) else items)]


# ---------------------------------------------------------------------------------------------
# helpers


def _group_rank(sorted_groups: Tensor, num_groups: int) -> Tensor:
    """Rank of each element within its group, for an array sorted by group."""
    counts = torch.bincount(sorted_groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_groups.numel(), device=sorted_groups.device) - starts[sorted_groups]


def _sort_by_group_then_score(groups: Tensor, scores: Tensor) -> Tensor:
    """Permutation ordering elements by group ascending, then score descending (stable)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[torch.argsort(groups[order], stable=True)]


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurately on both sides of -log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _truncated_gumbel(parent: Tensor, maximum: Tensor, perturbed: Tensor) -> Tensor:
    """Gumbels conditioned on their maximum being ``parent`` (Kool et al. 2019, appendix B):
    ``-log(exp(-parent) - exp(-maximum) + exp(-perturbed))``, computed stably."""
    v = parent - perturbed + _log1mexp(perturbed - maximum)
    return parent - torch.relu(v) - torch.log1p(torch.exp(-v.abs()))


def _new_cache(model):
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover
        return None
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


class _Timer:
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
class _Batch:
    input_ids: Tensor  # [B, P] left-padded
    attention_mask: Tensor  # [B, P]
    position_ids: Tensor  # [B, P]
    lengths: Tensor  # [B] real prompt lengths
    indices: list[int]  # positions of these prompts in the caller's list

    @classmethod
    def from_padded(cls, input_ids: Tensor, attention_mask: Tensor, indices: list[int]) -> _Batch:
        """The batch of left-padded prompts, positions counted over the real tokens."""
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return cls(input_ids, attention_mask, positions, attention_mask.sum(1), indices)


# ---------------------------------------------------------------------------------------------
# decoder


class TrieDecoder:
    """Decodes catalog items from a causal LM for batches of prompts.

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
        self.child_count = self.trie.child_ptr.diff().long()
        self.eos_token_id = self._resolve_eos(eos_token_id)
        self.pad_token_id = self._resolve_pad(pad_token_id)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.progress = progress
        if model.training:
            warnings.warn(
                "the model is in training mode (dropout): call model.eval()", stacklevel=2
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
        self._host = {
            "parent": self.catalog.trie.parent.long().cpu().numpy(),
            "child_ptr": self.catalog.trie.child_ptr.long().cpu().numpy(),
            "token": self.catalog.trie.token.long().cpu().numpy(),
            "depth": self.catalog.trie.node_depth.long().cpu().numpy(),
        }
        self.timer = _Timer()

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

    def _prompt_ids(self, prompts) -> list[list[int]]:
        prompts = list(prompts)
        if not prompts:
            return []
        if all(isinstance(p, str) for p in prompts):
            return encode(self.tokenizer, prompts, add_special_tokens=True)
        if any(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be all strings or all token-id lists")
        return [[int(t) for t in (p.tolist() if isinstance(p, Tensor) else p)] for p in prompts]

    def _batches(self, prompts, desc: str):
        """Left-padded batches of prompts, grouped by length (less padding); a progress bar."""
        from tqdm.auto import tqdm

        ids = self._prompt_ids(prompts)
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
                yield _Batch.from_padded(input_ids.to(self.device), mask.to(self.device), chosen)
                bar.update(len(chosen))

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
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

    def _prefill(self, batch: _Batch):
        return self._forward(
            batch.input_ids, batch.attention_mask, batch.position_ids, _new_cache(self.model), True
        )

    def _check_length(self, max_new_tokens: int, extra: int) -> None:
        too_long = int((self.catalog.lengths + extra > max_new_tokens).sum())
        if too_long:
            warnings.warn(
                f"{too_long} catalog items need more than max_new_tokens={max_new_tokens} tokens "
                f"and cannot be decoded",
                stacklevel=3,
            )

    def _children(self, nodes: Tensor):
        """CSR children of each node: (row of each child, child token, child node), int64."""
        row_ptr, tokens, children = self.trie.children(nodes.to(torch.int32))
        rows = torch.repeat_interleave(
            torch.arange(nodes.numel(), device=nodes.device), row_ptr.diff().to(nodes.device)
        )
        return rows, tokens.long(), children.long()

    # -- beam search ----------------------------------------------------------------------

    def beam_search_items(
        self,
        prompts,
        *,
        num_beams: int = 10,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Trie-constrained beam search: ``(items [P, num_beams], scores [P, num_beams])``.

        Row p holds prompt p's finished beams, best first: item ids (the first item of a
        collision group), -1 where fewer than ``num_beams`` items could finish; and their
        scores, ``(sum of the model's log-probabilities of the item's tokens and EOS) /
        (tokens + 1) ** length_penalty``, exactly as transformers ranks finished beams.

        The search is transformers' (``early_stopping=False``): at each step the best
        ``2 * num_beams`` continuations of the running beams (the trie's children, or EOS on a
        complete item); those among the first ``num_beams`` that end with EOS enter the finished
        list (kept to the best ``num_beams`` by normalised score); the best ``num_beams`` others
        run on; a prompt stops once its list is full and its best running beam, normalised by
        the current length, cannot beat the list's worst. One difference: where transformers
        would fill the list with sequences cut at ``max_new_tokens`` (not items), they are left
        out here.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be positive, got {num_beams}")
        self._check_length(max_new_tokens, extra=1)
        items, scores = self._empty_results(len(prompts), num_beams, -math.inf)
        with torch.inference_mode():
            for batch in self._batches(prompts, "beam search"):
                nodes, values = self._beam_batch(batch, num_beams, max_new_tokens, length_penalty)
                rows = torch.tensor(batch.indices)
                items[rows] = torch.where(
                    nodes >= 0, self.catalog.node_item[nodes.clamp(min=0)], -1
                )
                scores[rows] = values
        return items, scores

    def beam_search(self, prompts, **options) -> list[list[str]]:
        """The titles of :meth:`beam_search_items`: each prompt's top-``num_beams`` list."""
        items, _ = self.beam_search_items(prompts, **options)
        return self._titles(items)

    def _empty_results(self, rows: int, width: int, fill: float):
        return (
            torch.full((rows, width), -1, dtype=torch.long),
            torch.full((rows, width), fill, dtype=torch.float32),
        )

    def _titles(self, items: Tensor) -> list[list[str]]:
        titles = self.catalog.titles
        return [[titles[i] for i in row if i >= 0] for row in items.tolist()]

    def _beam_batch(
        self, batch: _Batch, num_beams: int, max_new_tokens: int, length_penalty: float
    ):
        device, eos, K = self.device, self.eos_token_id, num_beams
        B = batch.input_ids.shape[0]
        logits, cache = self._prefill(batch)
        row_batch = torch.arange(B, device=device)
        row_node = torch.zeros(B, dtype=torch.long, device=device)
        row_score = torch.zeros(B, dtype=torch.float32, device=device)
        row_mask = batch.attention_mask
        finished_score = torch.full((B, K), -math.inf, device=device)
        finished_node = torch.full((B, K), -1, dtype=torch.long, device=device)
        open_batch = torch.ones(B, dtype=torch.bool, device=device)

        for step in range(max_new_tokens):
            log_probs = torch.log_softmax(logits, dim=-1)
            with self.timer("constraint"):
                rows, tokens, nodes = self._children(row_node)
                leaf_rows = (self.child_count[row_node] == 0).nonzero().squeeze(1)
                cand_row = torch.cat([rows, leaf_rows])
                cand_token = torch.cat([tokens, torch.full_like(leaf_rows, eos)])
                cand_node = torch.cat([nodes, row_node[leaf_rows]])
                cand_eos = torch.cat(
                    [
                        torch.zeros_like(rows, dtype=torch.bool),
                        torch.ones_like(leaf_rows, dtype=torch.bool),
                    ]
                )
            cand_score = row_score[cand_row] + log_probs[cand_row, cand_token]
            cand_batch = row_batch[cand_row]

            # The best 2K continuations of each prompt.
            order = _sort_by_group_then_score(cand_batch, cand_score)
            rank = _group_rank(cand_batch[order], B)
            order, rank = order[rank < 2 * K], rank[rank < 2 * K]
            is_eos = cand_eos[order]

            # Finished: EOS among the first K, normalised by the generated length (EOS included).
            done = order[is_eos & (rank < K)]
            new_score = torch.full((B, K), -math.inf, device=device)
            new_node = torch.full((B, K), -1, dtype=torch.long, device=device)
            if done.numel():
                done_rank = rank[is_eos & (rank < K)]
                new_score[cand_batch[done], done_rank] = cand_score[done] / float(
                    (step + 1) ** length_penalty
                )
                new_node[cand_batch[done], done_rank] = cand_node[done]
            merged_score = torch.cat([finished_score, new_score], dim=1)
            merged_node = torch.cat([finished_node, new_node], dim=1)
            finished_score, best = torch.topk(merged_score, K, dim=1)
            finished_node = merged_node.gather(1, best)

            # Running: the best K continuations that did not end.
            if step == max_new_tokens - 1:
                break
            running = order[~is_eos]
            running = running[_group_rank(cand_batch[running], B) < K]
            best_running = torch.full((B,), -math.inf, device=device).scatter_reduce(
                0, cand_batch[running], cand_score[running], "amax"
            )
            # transformers' early-stopping heuristic (early_stopping=False): stop once the list
            # is full and the best running beam at the current length cannot beat its worst.
            full = torch.isfinite(finished_score).all(dim=1)
            can_improve = best_running / float((step + 1) ** length_penalty) > finished_score[:, -1]
            open_batch &= (~full | can_improve) & torch.isfinite(best_running)
            running = running[open_batch[cand_batch[running]]]
            if running.numel() == 0:
                break

            parent = cand_row[running]
            cache.reorder_cache(parent)
            row_mask = torch.cat([row_mask[parent], row_mask.new_ones(parent.numel(), 1)], dim=1)
            row_batch, row_node, row_score = (
                cand_batch[running],
                cand_node[running],
                cand_score[running],
            )
            positions = (batch.lengths[row_batch] + step).unsqueeze(1)
            logits, cache = self._forward(
                cand_token[running].unsqueeze(1), row_mask, positions, cache, True
            )
        return finished_node.cpu(), finished_score.cpu()

    # -- sampling -------------------------------------------------------------------------

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _constrained_log_probs(self, logits: Tensor, nodes: Tensor, temperature: float) -> Tensor:
        """log_softmax over each row's trie children of ``logits / temperature``."""
        scaled = logits / temperature if temperature != 1.0 else logits.clone()
        with self.timer("constraint"):
            self.trie.mask_logits_(scaled, nodes.to(torch.int32))
        return torch.log_softmax(scaled, dim=-1)

    def sample_items(
        self,
        prompts,
        *,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        seed: int | None = None,
    ) -> Tensor:
        """Ancestral samples from the trie-constrained distribution at ``temperature``:
        ``[P, num_samples]`` item ids (samples are independent, with replacement; -1 for a
        sample that needed more than ``max_new_tokens`` tokens). The generation stops when an
        item is complete (the EOS that would follow is the only allowed token)."""
        if num_samples < 1 or temperature <= 0:
            raise ValueError("num_samples must be positive and temperature > 0")
        self._check_length(max_new_tokens, extra=0)
        generator = self._generator(seed)
        out = torch.full((len(prompts), num_samples), -1, dtype=torch.long)
        with torch.inference_mode():
            for batch in self._batches(prompts, "sampling"):
                leaves = self._sample_batch(
                    batch, num_samples, temperature, max_new_tokens, generator
                )
                items = torch.where(leaves >= 0, self.catalog.node_item[leaves.clamp(min=0)], -1)
                out[torch.tensor(batch.indices)] = items.view(-1, num_samples)
        return out

    def sample(self, prompts, **options) -> list[list[str]]:
        """Titles of :meth:`sample_items`, ``num_samples`` per prompt."""
        return self._titles(self.sample_items(prompts, **options))

    def sample_leaves(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Trie-constrained samples for an already tokenised, left-padded batch (on the model's
        device): the leaf node of each sample, ``[B * num_samples]`` (-1 where an item was not
        finished within ``max_new_tokens``). The training rollouts use this."""
        batch = _Batch.from_padded(input_ids, attention_mask, list(range(input_ids.shape[0])))
        return self._sample_batch(batch, num_samples, temperature, max_new_tokens, generator)

    def _sample_batch(self, batch, num_samples, temperature, max_new_tokens, generator):
        device = self.device
        B = batch.input_ids.shape[0]
        logits, cache = self._prefill(batch)
        rows = torch.arange(B, device=device).repeat_interleave(num_samples)
        cache.reorder_cache(rows)
        logits, row_mask = logits[rows], batch.attention_mask[rows]
        row_out = torch.arange(B * num_samples, device=device)
        row_length = batch.lengths[rows]
        row_node = torch.zeros(B * num_samples, dtype=torch.long, device=device)
        result = torch.full((B * num_samples,), -1, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            probs = self._constrained_log_probs(logits, row_node, temperature).exp_()
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            with self.timer("constraint"):
                row_node = self.trie.advance(row_node.to(torch.int32), tokens).long()
            complete = self.child_count[row_node] == 0
            result[row_out[complete]] = row_node[complete]
            keep = (~complete).nonzero().squeeze(1)
            if keep.numel() == 0 or step == max_new_tokens - 1:
                break
            cache.reorder_cache(keep)
            row_mask = torch.cat([row_mask[keep], row_mask.new_ones(keep.numel(), 1)], dim=1)
            row_out, row_node, row_length = row_out[keep], row_node[keep], row_length[keep]
            logits, cache = self._forward(
                tokens[keep].unsqueeze(1), row_mask, (row_length + step).unsqueeze(1), cache, True
            )
        return result.cpu()

    # -- sampled top-K (stochastic beam search) -------------------------------------------

    def sampled_top_k_items(
        self,
        prompts,
        *,
        k: int = 10,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        seed: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """K distinct items per prompt, drawn without replacement from the trie-constrained
        distribution at ``temperature``: ``(items [P, k], log_probs [P, k])``, in draw order
        (the first is a plain sample; the whole list is a Plackett-Luce sample). -1 / -inf pad
        rows where fewer than ``k`` items exist.

        Stochastic beam search over the trie: every node gets a Gumbel perturbation of its
        log-probability conditioned on the maximum of its parent's (Kool et al. 2019), so that a
        node's value is the largest among the items below it, and the search keeps the ``k``
        largest; the ``k`` items it ends with are exactly the Gumbel-top-k of all items."""
        if k < 1 or temperature <= 0:
            raise ValueError("k must be positive and temperature > 0")
        self._check_length(max_new_tokens, extra=0)
        generator = self._generator(seed)
        items, log_probs = self._empty_results(len(prompts), k, -math.inf)
        with torch.inference_mode():
            for batch in self._batches(prompts, "sampled top-k"):
                nodes, values = self._sbs_batch(batch, k, temperature, max_new_tokens, generator)
                rows = torch.tensor(batch.indices)
                items[rows] = torch.where(
                    nodes >= 0, self.catalog.node_item[nodes.clamp(min=0)], -1
                )
                log_probs[rows] = values
        return items, log_probs

    def sampled_top_k(self, prompts, **options) -> list[list[str]]:
        """Titles of :meth:`sampled_top_k_items`."""
        items, _ = self.sampled_top_k_items(prompts, **options)
        return self._titles(items)

    def _sbs_batch(self, batch, k, temperature, max_new_tokens, generator):
        device = self.device
        B = batch.input_ids.shape[0]
        logits, cache = self._prefill(batch)
        row_batch = torch.arange(B, device=device)
        row_node = torch.zeros(B, dtype=torch.long, device=device)
        row_phi = torch.zeros(B, dtype=torch.float64, device=device)  # log-probability so far
        row_key = torch.zeros(B, dtype=torch.float64, device=device)  # perturbed (Gumbel) value
        row_mask = batch.attention_mask
        # Complete items on the frontier: they stay until better nodes push them out.
        done_batch = torch.zeros(0, dtype=torch.long, device=device)
        done_node, done_phi, done_key = done_batch.clone(), row_phi[:0], row_key[:0]

        for step in range(max_new_tokens):
            log_probs = self._constrained_log_probs(logits, row_node, temperature)
            with self.timer("constraint"):
                rows, tokens, nodes = self._children(row_node)
            phi = row_phi[rows] + log_probs[rows, tokens].double()
            uniform = torch.rand(phi.shape, generator=generator, device=device, dtype=torch.float64)
            perturbed = phi - torch.log(-torch.log(uniform.clamp(min=1e-300)))
            maximum = torch.full_like(row_key, -math.inf).scatter_reduce(0, rows, perturbed, "amax")
            key = _truncated_gumbel(row_key[rows], maximum[rows], perturbed)

            all_batch = torch.cat([done_batch, row_batch[rows]])
            all_node = torch.cat([done_node, nodes])
            all_phi = torch.cat([done_phi, phi])
            all_key = torch.cat([done_key, key])
            all_parent = torch.cat([torch.full_like(done_batch, -1), rows])
            all_token = torch.cat([torch.full_like(done_batch, -1), tokens])
            order = _sort_by_group_then_score(all_batch, all_key)
            order = order[_group_rank(all_batch[order], B) < k]

            complete = self.child_count[all_node[order]] == 0
            finished, running = order[complete], order[~complete]
            done_batch, done_node = all_batch[finished], all_node[finished]
            done_phi, done_key = all_phi[finished], all_key[finished]
            if running.numel() == 0 or step == max_new_tokens - 1:
                break
            parent = all_parent[running]
            cache.reorder_cache(parent)
            row_mask = torch.cat([row_mask[parent], row_mask.new_ones(parent.numel(), 1)], dim=1)
            row_batch, row_node = all_batch[running], all_node[running]
            row_phi, row_key = all_phi[running], all_key[running]
            positions = (batch.lengths[row_batch] + step).unsqueeze(1)
            logits, cache = self._forward(
                all_token[running].unsqueeze(1), row_mask, positions, cache, True
            )

        nodes = torch.full((B, k), -1, dtype=torch.long)
        values = torch.full((B, k), -math.inf, dtype=torch.float32)
        order = _sort_by_group_then_score(done_batch, done_key)
        rank = _group_rank(done_batch[order], B)
        nodes[done_batch[order].cpu(), rank.cpu()] = done_node[order].cpu()
        values[done_batch[order].cpu(), rank.cpu()] = done_phi[order].float().cpu()
        return nodes, values

    # -- exact scoring --------------------------------------------------------------------

    def exact_item_log_probs(
        self,
        prompts,
        *,
        normalize: str = "trie",
        include_eos: bool = False,
        temperature: float = 1.0,
        chunk_tokens: int | None = None,
    ) -> Tensor:
        """The log-probability of every item for every prompt: ``[P, num_items]`` float32.

        Every trie node's logits are computed once per prompt (tree attention over the trie,
        chunked; see the module docstring).

        Args:
            normalize: ``"trie"``: the trie-constrained distribution (each step renormalised
                over the node's children, logits divided by ``temperature``), what
                :meth:`sample` and :meth:`sampled_top_k` draw from; sums to 1 over the distinct
                sequences. ``"model"``: the model's full-vocabulary probability of generating
                the item's tokens, what beam search scores.
            include_eos: add the log-probability of EOS after the item (beam search scores it).
            chunk_tokens: trie nodes per forward (default: from a memory budget of 2^26 logits).
        """
        if normalize not in ("trie", "model"):
            raise ValueError(f"normalize must be 'trie' or 'model', got {normalize!r}")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        out = torch.empty((len(prompts), self.catalog.num_items), dtype=torch.float32)
        with torch.inference_mode():
            for batch in self._batches(prompts, "exact scoring"):
                scores = self._exact_batch(batch, normalize, include_eos, temperature, chunk_tokens)
                out[torch.tensor(batch.indices)] = scores
        return out

    def exact_beam_scores(self, prompts, *, length_penalty: float = 1.0, **options) -> Tensor:
        """The score beam search ranks every item by, ``[P, num_items]``: the model's
        log-probability of the item's tokens and EOS divided by ``(tokens + 1) **
        length_penalty``. Its top-K is the exact answer that beam search approximates."""
        log_probs = self.exact_item_log_probs(
            prompts, normalize="model", include_eos=True, **options
        )
        return log_probs / (self.catalog.lengths.float() + 1.0) ** length_penalty

    def exact_top_k(
        self, prompts, *, k: int = 10, length_penalty: float = 1.0, **options
    ) -> tuple[Tensor, Tensor]:
        """The exact top-``k`` items of the beam objective, ``(items [P, k], scores [P, k])``,
        best first, over the distinct sequences (first items of collision groups): what beam
        search would return with an unbounded beam."""
        scores = self.exact_beam_scores(prompts, length_penalty=length_penalty, **options)
        scores[:, ~self.catalog.canonical] = -math.inf
        values, items = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return torch.where(torch.isfinite(values), items, -1), values

    def _query_nodes(self, include_eos: bool) -> np.ndarray:
        """Nodes whose logits are needed (all but the root, without childless nodes unless EOS
        is scored), in depth-first preorder."""
        parent, child_ptr = self._host["parent"], self._host["child_ptr"]
        level_ptr = self.catalog.trie.level_ptr
        num_nodes = len(parent)
        size = np.ones(num_nodes, dtype=np.int64)
        for d in range(len(level_ptr) - 2, 0, -1):
            ids = np.arange(level_ptr[d], level_ptr[d + 1])
            np.add.at(size, parent[ids], size[ids])
        pre = np.zeros(num_nodes, dtype=np.int64)
        for d in range(1, len(level_ptr) - 1):
            ids = np.arange(level_ptr[d], level_ptr[d + 1])
            before = np.cumsum(size[ids]) - size[ids]  # exclusive sum over the level
            first_sibling = child_ptr[parent[ids]] - level_ptr[d]
            pre[ids] = pre[parent[ids]] + 1 + before - before[first_sibling]
        has_children = np.diff(child_ptr) > 0
        wanted = np.arange(num_nodes) > 0
        if not include_eos:
            wanted &= has_children
        nodes = np.nonzero(wanted)[0]
        return nodes[np.argsort(pre[nodes], kind="stable")]

    def _exact_batch(self, batch: _Batch, normalize, include_eos, temperature, chunk_tokens):
        device = self.device
        trie = self.trie
        host = self._host
        B, prompt_width = batch.input_ids.shape
        N = trie.num_nodes
        edge = torch.zeros((B, N), dtype=torch.float32, device=device)  # logit of each node's token
        lse = torch.zeros((B, N), dtype=torch.float32, device=device)  # logsumexp at each node
        eos = torch.zeros((B, N), dtype=torch.float32, device=device)  # log p(EOS) at each node

        def absorb(logits: Tensor, nodes: Tensor) -> None:
            """Logits ``[B, c, V]`` computed at ``nodes [c]``: store what scoring needs."""
            logits = logits / temperature if temperature != 1.0 else logits
            node_lse = torch.logsumexp(logits, dim=-1)
            lse[:, nodes] = node_lse
            rows, tokens, children = self._children(nodes)
            edge[:, children] = logits[:, rows, tokens]
            if include_eos:
                eos[:, nodes] = logits[:, :, self.eos_token_id] - node_lse

        root_logits, cache = self._prefill(batch)
        absorb(root_logits.unsqueeze(1), torch.zeros(1, dtype=torch.long, device=device))

        queries = self._query_nodes(include_eos)
        if chunk_tokens is None:
            chunk_tokens = (1 << 26) // max(1, B * self.vocab_size)
            chunk_tokens = int(min(512, max(64, chunk_tokens)))
        chunk_tokens = max(1, chunk_tokens)
        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        blocked = torch.finfo(dtype).min
        prompt_blocked = (batch.attention_mask == 0)[:, None, None, :]  # [B, 1, 1, P]
        column = np.full(N, -1, dtype=np.int64)
        for start in range(0, len(queries), chunk_tokens):
            chunk = queries[start : start + chunk_tokens]
            # The chunk's first node's ancestors precede it in preorder and are not in the chunk;
            # every other ancestor of a chunk node is in the chunk (preorder is contiguous per
            # subtree).
            ancestors = []
            node = host["parent"][chunk[0]]
            while node > 0:
                ancestors.append(node)
                node = host["parent"][node]
            nodes = np.concatenate([np.array(ancestors[::-1], dtype=np.int64), chunk])
            length = len(nodes)
            column[nodes] = np.arange(length)
            sees = np.zeros((length, length), dtype=bool)
            current, rows = nodes.copy(), np.arange(length)
            found = np.zeros(length, dtype=np.int64)
            while True:
                inside = current > 0
                if not inside.any():
                    break
                cols = column[current[inside]]
                sees[rows[inside][cols >= 0], cols[cols >= 0]] = True
                found[inside] += cols >= 0
                current = np.where(inside, host["parent"][np.maximum(current, 0)], 0)
            column[nodes] = -1
            if not np.array_equal(found, host["depth"][nodes]):  # pragma: no cover - invariant
                raise AssertionError("a chunk node's ancestor is missing from its chunk")

            tree_blocked = torch.from_numpy(~sees).to(device)[None, None]  # [1, 1, L, L]
            mask = torch.zeros((B, 1, length, prompt_width + length), dtype=dtype, device=device)
            mask[..., :prompt_width].masked_fill_(prompt_blocked, blocked)
            mask[..., prompt_width:].masked_fill_(tree_blocked, blocked)
            node_ids = torch.from_numpy(nodes).to(device)
            input_ids = torch.from_numpy(host["token"][nodes]).to(device).expand(B, -1)
            positions = batch.lengths[:, None] + torch.from_numpy(host["depth"][nodes] - 1).to(
                device
            )
            logits, _ = self._forward(input_ids, mask, positions, copy.deepcopy(cache), False)
            skip = len(ancestors)
            absorb(logits[:, skip:], node_ids[skip:])

        parent = trie.parent.long()
        if normalize == "model":
            step = edge[:, 1:] - lse[:, parent[1:]]
        else:
            # Renormalise over siblings: logsumexp of the children's logits per parent.
            siblings_max = torch.full((B, N), -math.inf, device=device).scatter_reduce(
                1, parent[1:].expand(B, -1), edge[:, 1:], "amax"
            )
            shifted = torch.exp(edge[:, 1:] - siblings_max[:, parent[1:]])
            siblings_sum = torch.zeros((B, N), device=device).scatter_add(
                1, parent[1:].expand(B, -1), shifted
            )
            step = edge[:, 1:] - (siblings_max + torch.log(siblings_sum))[:, parent[1:]]
        cumulative = torch.zeros((B, N), dtype=torch.float64, device=device)
        cumulative[:, 1:] = step.double()
        level_ptr = trie.level_ptr
        for d in range(2, len(level_ptr) - 1):
            ids = torch.arange(level_ptr[d], level_ptr[d + 1], device=device)
            cumulative[:, ids] += cumulative[:, parent[ids]]
        item_node = self.catalog.item_node.to(device)
        scores = cumulative[:, item_node]
        if include_eos:
            scores = scores + eos[:, item_node].double()
        return scores.float().cpu()


# ---------------------------------------------------------------------------------------------
# one-call forms


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
