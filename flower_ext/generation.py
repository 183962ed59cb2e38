"""Trie-constrained decoding helpers: a transformers logits processor (optionally flow-guided)
and the bitmask it uses."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .trie import Trie

__all__ = ["TrieLogitsProcessor", "allowed_token_bitmask"]


def _as_int32_bit(position: int) -> int:
    """The int32 value whose only set bit is ``position`` (bit 31 is the sign bit)."""
    bit = 1 << position
    return bit - (1 << 32) if bit >= 1 << 31 else bit


def allowed_token_bitmask(
    trie: Trie, node_ids: Tensor, vocab_size: int, eos_token_id: int | None = None
) -> Tensor:
    """Bitmask ``[B, ceil(V / 32)]`` of the tokens each row may generate next: the children of
    its node, or, once the row has completed an item (a node without children) or left the trie
    (node -1), only ``eos_token_id`` so that the sequence can end."""
    bitmask = trie.token_bitmask(node_ids, vocab_size)
    if eos_token_id is not None:
        if not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
        nodes = node_ids.long()
        child_ptr = trie.child_ptr.long()
        valid = nodes >= 0
        safe = nodes.clamp(min=0)
        finished = ~valid | (child_ptr[safe + 1] == child_ptr[safe])
        word = bitmask[:, eos_token_id // 32]
        word |= torch.where(finished, _as_int32_bit(eos_token_id % 32), 0).to(torch.int32)
    return bitmask


class TrieLogitsProcessor:
    """A transformers ``LogitsProcessor`` that restricts generation to the catalog trie.

    Works for greedy search, sampling and beam search: the trie state of every row is derived
    from the tokens it generated so far (``input_ids[:, prompt_length:]``), so beam reordering
    needs no bookkeeping. Each call costs one walk and one masking op for the whole batch.

    Flow guidance (``log_flows`` and ``beta``): every child token's score also gets
    ``-beta * (log_flows[child] - log_flows[node])`` (:meth:`Trie.guide_logits_`), with
    ``log_flows`` the flows of an item log-prior (``trie.log_flows(log_prior)``: ``[N]``, or one
    row per generated sequence). transformers hands beam search log-softmaxed scores, so a beam's
    score becomes ``(log p + guidance) / length ** length_penalty``: the ``"normalized"`` form of
    :mod:`flower_rec.decoding.guidance`; greedy search and sampling get raw logits, so they pick
    from, or sample, the guided distribution renormalised over the trie's children at each step.

    Args:
        trie: the catalog trie, on the device the model generates on.
        prompt_length: the (padded) prompt length of the ``generate`` call.
        eos_token_id: allowed (alone) once an item is complete, so that sequences end.
        log_flows: flows of the guidance prior, on the trie's device (None: no guidance).
        beta: strength of the guidance.

    Example::

        processor = TrieLogitsProcessor(trie, inputs["input_ids"].shape[1], tokenizer.eos_token_id)
        model.generate(**inputs, logits_processor=LogitsProcessorList([processor]), num_beams=10)
    """

    def __init__(
        self,
        trie: Trie,
        prompt_length: int,
        eos_token_id: int | None = None,
        *,
        log_flows: Tensor | None = None,
        beta: float = 0.0,
    ):
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be non-negative, got {prompt_length}")
        self.trie = trie
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.log_flows = log_flows
        self.beta = beta

    def current_nodes(self, input_ids: Tensor) -> Tensor:
        """``[B]`` trie node of each row after its generated tokens (-1 once it left the trie)."""
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.int32, device=input_ids.device)
        return self.trie.walk(generated)[:, -1]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        nodes = self.current_nodes(input_ids)
        if self.log_flows is None:
            bitmask = allowed_token_bitmask(self.trie, nodes, scores.shape[-1], self.eos_token_id)
            masked = scores.clone()
            ops.apply_token_bitmask_(masked, bitmask)
            return masked
        guided = self.trie.guide_logits_(scores.clone(), nodes, self.log_flows, self.beta)
        if self.eos_token_id is not None:
            # EOS ends a complete item (or a row that left the trie); it carries no guidance.
            finished = (nodes < 0) | (self.trie.child_count[nodes.long().clamp(min=0)] == 0)
            eos = self.eos_token_id
            guided[:, eos] = torch.where(finished, scores[:, eos], guided[:, eos])
        return guided
