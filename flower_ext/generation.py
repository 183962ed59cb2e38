"""Trie-constrained decoding helpers: a transformers logits processor (optionally flow-guided),
the bitmask it uses and the check of which items it can produce."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .trie import Trie

__all__ = ["TrieLogitsProcessor", "allowed_token_bitmask", "ungeneratable_items"]


def allowed_token_bitmask(
    trie: Trie, node_ids: Tensor, vocab_size: int, eos_token_id: int | None = None
) -> Tensor:
    """Bitmask ``[B, ceil(V / 32)]`` of the tokens each row may generate next: the children of
    its node, or, once the row has completed an item (a node without children) or left the trie
    (node -1), only ``eos_token_id`` so that the sequence can end (:meth:`Trie.token_bitmask`
    with ``finished_token``)."""
    return trie.token_bitmask(node_ids, vocab_size, finished_token=eos_token_id)


def ungeneratable_items(trie: Trie, eos_token_id: int | None) -> Tensor:
    """Ids of the items that ``generate`` with a :class:`TrieLogitsProcessor` over ``trie`` can
    never produce: generation ends an item with ``eos_token_id``, which the processor allows
    where the item's node has no children, or where the trie has it as a child; an item whose
    node has other children and no EOS child (an item that is a prefix of another, in a trie
    built without EOS) cannot end there. Generation also stops at the first EOS, so an item
    with EOS inside its sequence is cut short. Without an EOS id no row can end where other
    items continue."""
    has_children = trie.child_count > 0
    can_end = ~has_children
    if eos_token_id is not None:
        is_eos = trie.token == eos_token_id
        has_eos_child = torch.zeros_like(is_eos)
        has_eos_child[trie.parent[is_eos].long()] = True
        can_end |= has_eos_child | is_eos
        eos_count = trie.path_sums(is_eos.double())
        can_end &= eos_count - is_eos.double() == 0  # no EOS above the item's own node
    return (~can_end[trie.item_node.long()]).nonzero().flatten()


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
        trie: the catalog trie, on the device the model generates on. Build it from each item's
            tokens followed by the EOS token (``Trie.from_sequences([s + [eos] for s in
            items])``) so that items that are prefixes of others can end; a warning names the
            items that ``generate`` could never produce (:func:`ungeneratable_items`).
        prompt_length: the (padded) prompt width of the ``generate`` call, ``input_ids.shape[1]``:
            the trie state of a row is read from its tokens after it. Each ``generate`` call
            starts from it (the first ``input_ids`` the processor sees, and any that is not
            longer than the previous one, must have this width; ``ValueError`` otherwise).
        eos_token_id: the token ``generate`` stops on. It is the only token allowed on a
            finished row (its item is complete: a node without children; or it left the trie),
            so that the row ends, and rows that already ended (padded by ``generate``) keep a
            finite score. With None a finished row is all -inf: ``generate``'s sampling then
            fails ("probability tensor contains inf, nan") and greedy and beam search run on
            past the item; only callers that stop each row themselves may pass None.
        log_flows: flows of the guidance prior, on the trie's device (None: no guidance).
        beta: strength of the guidance.

    Use ``max_new_tokens=trie.depth`` in ``generate`` (with EOS in the trie: every item and its
    EOS); fewer tokens leave the longer items incomplete.

    Example::

        processor = TrieLogitsProcessor(trie, inputs["input_ids"].shape[1], tokenizer.eos_token_id)
        model.generate(**inputs, logits_processor=LogitsProcessorList([processor]), num_beams=10,
                       max_new_tokens=trie.depth)
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
        self._last_width: int | None = None
        lost = ungeneratable_items(trie, eos_token_id)
        if lost.numel():
            warnings.warn(
                f"TrieLogitsProcessor: {lost.numel()} of the trie's {trie.num_items} items can "
                f"never be generated with eos_token_id={eos_token_id} (items {lost[:5].tolist()}"
                f"{', ...' if lost.numel() > 5 else ''}): they end where other items continue "
                "and the trie has no EOS there, or hold EOS inside; build the trie from each "
                "item's tokens followed by EOS",
                stacklevel=2,
            )

    def current_nodes(self, input_ids: Tensor) -> Tensor:
        """``[B]`` trie node of each row after its generated tokens (-1 once it left the trie)."""
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.int32, device=input_ids.device)
        return self.trie.walk(generated)[:, -1]

    def _check_width(self, width: int) -> None:
        # Within one generate call the width grows by one token per step, so a width that does
        # not exceed the last one seen starts a call, which must be at the prompt's end.
        starts = self._last_width is None or width <= self._last_width
        if starts and width != self.prompt_length:
            raise ValueError(
                f"TrieLogitsProcessor: prompt_length is {self.prompt_length} but generate "
                f"started from input_ids of {width} tokens; pass the padded prompt width, "
                "input_ids.shape[1] of the generate call"
            )
        self._last_width = width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._check_width(input_ids.shape[1])
        nodes = self.current_nodes(input_ids)
        if self.log_flows is None:
            return self.trie.mask_logits_(scores.clone(), nodes, finished_token=self.eos_token_id)
        return self.trie.guide_logits_(
            scores.clone(), nodes, self.log_flows, self.beta, finished_token=self.eos_token_id
        )
