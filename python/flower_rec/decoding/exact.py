"""Exact scoring: the log-probability of every catalog item for each prompt, every trie node's
logits computed once (tree attention over the trie), and from it the exact top-K of the beam
objective, optionally flow-guided."""

from __future__ import annotations

import copy
import math
from functools import cached_property

import torch
from torch import Tensor

from .guidance import Guidance, guided_beam_scores, item_log_shares
from .runner import ModelRunner, PromptBatch

#: Logits per forward of exact scoring (chunk of trie nodes x prompts x vocabulary).
_LOGITS_BUDGET = 1 << 26


class ExactScoring(ModelRunner):
    def exact_item_log_probs(
        self,
        prompts,
        *,
        normalize: str = "trie",
        include_eos: bool = False,
        temperature: float = 1.0,
        chunk_tokens: int | None = None,
        guidance: Guidance | None = None,
    ) -> Tensor:
        """The log-probability of every item for every prompt: ``[P, num_items]`` float32.

        Every trie node's logits are computed once per prompt: the trie's nodes are packed after
        the prompt's KV cache in chunks of consecutive depth-first nodes, with a 4-D attention
        mask in which a node sees the prompt and its ancestors and sits at position
        ``prompt length + depth - 1`` (tree attention). A chunk also carries the ancestors of its
        first node, so chunks are independent and memory is bounded.

        Args:
            normalize: ``"trie"``: the trie-constrained distribution (each step renormalised
                over the node's children, logits divided by ``temperature``, plus each child's
                guidance term when guided), what :meth:`sample` and :meth:`sampled_top_k` draw
                from; sums to 1 over the distinct sequences. ``"model"``: the model's
                full-vocabulary probability of generating the item's tokens, what beam search
                scores (guided beam scores: :meth:`exact_beam_scores`).
            include_eos: add the log-probability of EOS after the item (beam search scores it).
            chunk_tokens: trie nodes per forward (default: from a memory budget of 2^26 logits).
            guidance: flow guidance, with ``normalize="trie"`` only.
        """
        if normalize not in ("trie", "model"):
            raise ValueError(f"normalize must be 'trie' or 'model', got {normalize!r}")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        if guidance is not None and normalize != "trie":
            raise ValueError(
                "guidance applies to normalize='trie' (the guided sampling distribution); guided "
                "beam scores come from exact_beam_scores(guidance=...)"
            )
        self.check_guidance(guidance, len(prompts))
        out = torch.empty((len(prompts), self.catalog.num_items), dtype=torch.float32)
        with torch.inference_mode():
            for batch in self.batches(prompts, "exact scoring"):
                flows = self.guidance_flows(guidance, batch)
                scores = self._exact_batch(
                    batch, normalize, include_eos, temperature, chunk_tokens, guidance, flows
                )
                out[torch.tensor(batch.indices)] = scores
        return out

    def exact_beam_scores(
        self,
        prompts,
        *,
        length_penalty: float = 1.0,
        guidance: Guidance | None = None,
        **options,
    ) -> Tensor:
        """The score beam search ranks every item by, ``[P, num_items]``: the model's
        log-probability of the item's tokens and EOS divided by ``(tokens + 1) **
        length_penalty``, with the guidance term in its form when guided
        (:func:`~flower_rec.decoding.guidance.guided_beam_scores`). Its top-K is the exact
        answer that beam search approximates."""
        self.check_guidance(guidance, len(prompts))
        log_probs = self.exact_item_log_probs(
            prompts, normalize="model", include_eos=True, **options
        )
        if guidance is None:
            return log_probs / (self.catalog.lengths.float() + 1.0) ** length_penalty
        return guided_beam_scores(
            log_probs, self.catalog.lengths, self.item_log_shares(guidance, len(prompts)),
            guidance.beta, guidance.form, length_penalty,
        )

    def exact_top_k(
        self, prompts, *, k: int = 10, length_penalty: float = 1.0, **options
    ) -> tuple[Tensor, Tensor]:
        """The exact top-``k`` items of the (guided) beam objective, ``(items [P, k], scores
        [P, k])``, best first, over the distinct sequences (first items of collision groups):
        what beam search would return with an unbounded beam."""
        scores = self.exact_beam_scores(prompts, length_penalty=length_penalty, **options)
        return self.top_k_of_scores(scores, k)

    def top_k_of_scores(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The best ``k`` distinct sequences of item scores ``[P, I]``: ``(items, scores)``,
        -1 / -inf where fewer than ``k`` have a finite score."""
        scores = scores.masked_fill(~self.catalog.canonical, -math.inf)
        values, items = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return torch.where(torch.isfinite(values), items, -1), values

    def item_log_shares(self, guidance: Guidance, num_prompts: int) -> Tensor:
        """``log Phat(item)`` of the guidance prior on this catalog: ``[I]``, or ``[P, I]`` for
        a per-prompt prior."""
        flows = guidance.flows(self.catalog.trie, range(num_prompts))
        return item_log_shares(flows, self.catalog.item_node)

    # -- the tree-attention pass ----------------------------------------------------------

    @cached_property
    def _preorder(self) -> tuple[Tensor, Tensor]:
        rank, size = self.catalog.trie.preorder()
        return rank.long(), size.long()

    def _query_nodes(self, include_eos: bool) -> Tensor:
        """Nodes whose logits are needed (all but the root, without childless nodes unless EOS
        is scored), in depth-first preorder."""
        rank, _ = self._preorder
        wanted = torch.arange(len(rank)) > 0
        if not include_eos:
            wanted &= self.catalog.trie.child_count.cpu() > 0
        nodes = wanted.nonzero().squeeze(1)
        return nodes[torch.argsort(rank[nodes])]

    def _chunk_with_ancestors(self, chunk: Tensor) -> tuple[Tensor, Tensor, int]:
        """The chunk's nodes after the ancestors of its first node (the only ancestors of chunk
        nodes outside it: preorder is contiguous per subtree), and which of them each sees
        (``[L, L]`` bool: ancestor or self)."""
        rank, size = self._preorder
        first = rank[chunk[0]]
        above = (rank < first) & (first < rank + size)
        above[0] = False  # the root is the prompt's last position, already in the cache
        ancestors = above.nonzero().squeeze(1)
        nodes = torch.cat([ancestors[torch.argsort(rank[ancestors])], chunk])
        node_rank, node_end = rank[nodes], rank[nodes] + size[nodes]
        sees = (node_rank[None, :] <= node_rank[:, None]) & (node_rank[:, None] < node_end[None, :])
        return nodes, sees, len(ancestors)

    def _exact_batch(
        self, batch: PromptBatch, normalize, include_eos, temperature, chunk_tokens, guidance,
        flows,
    ):
        device = self.device
        trie = self.trie
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
            rows, tokens, children = self.children(nodes)
            edge[:, children] = logits[:, rows, tokens]
            if include_eos:
                eos[:, nodes] = logits[:, :, self.eos_token_id] - node_lse

        root_logits, cache = self.prefill(batch)
        absorb(root_logits.unsqueeze(1), torch.zeros(1, dtype=torch.long, device=device))

        queries = self._query_nodes(include_eos)
        if chunk_tokens is None:
            chunk_tokens = _LOGITS_BUDGET // max(1, B * self.vocab_size)
            chunk_tokens = int(min(512, max(64, chunk_tokens)))
        chunk_tokens = max(1, chunk_tokens)
        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        blocked = torch.finfo(dtype).min
        prompt_blocked = (batch.attention_mask == 0)[:, None, None, :]  # [B, 1, 1, P]
        token, depth = trie.token.long(), trie.node_depth.long()
        for start in range(0, len(queries), chunk_tokens):
            nodes, sees, skip = self._chunk_with_ancestors(queries[start : start + chunk_tokens])
            nodes, sees = nodes.to(device), sees.to(device)
            length = len(nodes)
            mask = torch.zeros((B, 1, length, prompt_width + length), dtype=dtype, device=device)
            mask[..., :prompt_width].masked_fill_(prompt_blocked, blocked)
            mask[..., prompt_width:].masked_fill_(~sees[None, None], blocked)
            input_ids = token[nodes].expand(B, -1)
            positions = batch.lengths[:, None] + (depth[nodes] - 1)
            logits, _ = self.forward(input_ids, mask, positions, copy.deepcopy(cache), False)
            absorb(logits[:, skip:], nodes[skip:])

        parent = trie.parent.long()[1:]
        if normalize == "model":
            step = edge[:, 1:] - lse[:, parent]
        else:
            if guidance is not None:
                step_guidance = -guidance.beta * (flows[..., 1:] - flows[..., parent]).float()
                edge[:, 1:] = torch.where(
                    flows[..., 1:] == -math.inf, -math.inf, edge[:, 1:] + step_guidance
                )
            # Renormalise over siblings: logsumexp of the children's logits per parent.
            siblings = torch.full((B, N), -math.inf, device=device).scatter_reduce(
                1, parent.expand(B, -1), edge[:, 1:], "amax"
            )
            peak = siblings.clamp(min=torch.finfo(torch.float32).min)  # all -inf: no NaN
            shifted = torch.exp(edge[:, 1:] - peak[:, parent])
            total = torch.zeros((B, N), device=device).scatter_add(1, parent.expand(B, -1), shifted)
            step = edge[:, 1:] - (peak + torch.log(total))[:, parent]
            step = torch.where(edge[:, 1:] == -math.inf, -math.inf, step)  # zero prior
        values = torch.zeros((B, N), dtype=torch.float64, device=device)
        values[:, 1:] = step.double()
        scores = trie.path_sums(values)[:, self.catalog.item_node.to(device)]
        if include_eos:
            scores = scores + eos[:, self.catalog.item_node.to(device)].double()
        return scores.float().cpu()
