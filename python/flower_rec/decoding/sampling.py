"""Sampling through the trie: ancestral samples (the distribution a rollout draws from) and
sampled top-K, K distinct items without replacement (stochastic beam search), both optionally
flow-guided."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .guidance import Guidance, flows_of_rows
from .runner import ModelRunner, group_rank, sort_by_group_then_score


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurately on both sides of -log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _truncated_gumbel(parent: Tensor, maximum: Tensor, perturbed: Tensor) -> Tensor:
    """Gumbels conditioned on their maximum being ``parent`` (Kool et al. 2019, appendix B):
    ``-log(exp(-parent) - exp(-maximum) + exp(-perturbed))``, computed stably."""
    v = parent - perturbed + _log1mexp(perturbed - maximum)
    return parent - torch.relu(v) - torch.log1p(torch.exp(-v.abs()))


def _check_sampling(name: str, count: int, temperature: float) -> None:
    if count < 1:
        raise ValueError(f"{name} must be positive, got {count}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")


class Sampling(ModelRunner):
    def constrained_log_probs(
        self,
        logits: Tensor,
        nodes: Tensor,
        temperature: float,
        guidance: Guidance | None = None,
        flows: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """log_softmax over each row's trie children of ``logits / temperature``, with the
        guidance term of each child when guided (``rows`` indexes per-prompt ``flows``)."""
        scaled = logits / temperature if temperature != 1.0 else logits.clone()
        with self.timer("constraint"):
            if guidance is None:
                self.trie.mask_logits_(scaled, nodes.to(torch.int32))
            else:
                self.trie.guide_logits_(
                    scaled, nodes.to(torch.int32), flows_of_rows(flows, rows), guidance.beta
                )
        return torch.log_softmax(scaled, dim=-1)

    # -- ancestral sampling ---------------------------------------------------------------

    def sample_items(
        self,
        prompts,
        *,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        seed: int | None = None,
        guidance: Guidance | None = None,
    ) -> Tensor:
        """Ancestral samples from the trie-constrained distribution at ``temperature``
        (guided when ``guidance`` is given): ``[P, num_samples]`` item ids (samples are
        independent, with replacement; -1 for a sample that needed more than ``max_new_tokens``
        tokens). The generation stops when an item is complete (the EOS that would follow is the
        only allowed token)."""
        _check_sampling("num_samples", num_samples, temperature)
        self.check_length(max_new_tokens, extra=0)
        generator = self.generator(seed)

        def decode_batch(batch, flows):
            leaves = self._sample_batch(
                batch, num_samples, temperature, max_new_tokens, generator, guidance, flows
            )
            return leaves.view(-1, num_samples), None

        items, _ = self.decode_into(prompts, "sampling", num_samples, decode_batch, guidance)
        return items

    def sample(self, prompts, **options) -> list[list[str]]:
        """Titles of :meth:`sample_items`, ``num_samples`` per prompt."""
        return self.titles(self.sample_items(prompts, **options))

    def _sample_batch(
        self, batch, num_samples, temperature, max_new_tokens, generator, guidance=None, flows=None
    ):
        device = self.device
        B = batch.input_ids.shape[0]
        logits, cache = self.prefill(batch)
        rows = torch.arange(B, device=device).repeat_interleave(num_samples)
        cache.reorder_cache(rows)
        logits, row_mask = logits[rows], batch.attention_mask[rows]
        row_out = torch.arange(B * num_samples, device=device)
        row_length = batch.lengths[rows]
        row_node = torch.zeros(B * num_samples, dtype=torch.long, device=device)
        result = torch.full((B * num_samples,), -1, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            log_probs = self.constrained_log_probs(
                logits, row_node, temperature, guidance, flows, row_out // num_samples
            )
            tokens = torch.multinomial(log_probs.exp_(), 1, generator=generator).squeeze(1)
            with self.timer("constraint"):
                row_node = self.trie.advance(row_node.to(torch.int32), tokens).long()
            complete = self.child_count[row_node] == 0
            result[row_out[complete]] = row_node[complete]
            keep = (~complete).nonzero().squeeze(1)
            if keep.numel() == 0 or step == max_new_tokens - 1:
                break
            row_out, row_node, row_length = row_out[keep], row_node[keep], row_length[keep]
            logits, cache, row_mask = self.extend(
                cache, row_mask, keep, tokens[keep], row_length + step
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
        guidance: Guidance | None = None,
    ) -> tuple[Tensor, Tensor]:
        """K distinct items per prompt, drawn without replacement from the trie-constrained
        distribution at ``temperature`` (guided when ``guidance`` is given):
        ``(items [P, k], log_probs [P, k])``, in draw order (the first is a plain sample; the
        whole list is a Plackett-Luce sample). -1 / -inf pad rows where fewer than ``k`` items
        exist.

        Stochastic beam search over the trie: every node gets a Gumbel perturbation of its
        log-probability conditioned on the maximum of its parent's (Kool et al. 2019), so that a
        node's value is the largest among the items below it, and the search keeps the ``k``
        largest; the ``k`` items it ends with are exactly the Gumbel-top-k of all items."""
        _check_sampling("k", k, temperature)
        self.check_length(max_new_tokens, extra=0)
        generator = self.generator(seed)
        return self.decode_into(
            prompts, "sampled top-k", k,
            lambda batch, flows: self._sbs_batch(
                batch, k, temperature, max_new_tokens, generator, guidance, flows
            ),
            guidance,
        )

    def sampled_top_k(self, prompts, **options) -> list[list[str]]:
        """Titles of :meth:`sampled_top_k_items`."""
        items, _ = self.sampled_top_k_items(prompts, **options)
        return self.titles(items)

    def _sbs_batch(self, batch, k, temperature, max_new_tokens, generator, guidance, flows):
        device = self.device
        B = batch.input_ids.shape[0]
        logits, cache = self.prefill(batch)
        row_batch = torch.arange(B, device=device)
        row_node = torch.zeros(B, dtype=torch.long, device=device)
        row_phi = torch.zeros(B, dtype=torch.float64, device=device)  # log-probability so far
        row_key = torch.zeros(B, dtype=torch.float64, device=device)  # perturbed (Gumbel) value
        row_mask = batch.attention_mask
        # Complete items on the frontier: they stay until better nodes push them out.
        done_batch = torch.zeros(0, dtype=torch.long, device=device)
        done_node, done_phi, done_key = done_batch.clone(), row_phi[:0], row_key[:0]

        for step in range(max_new_tokens):
            log_probs = self.constrained_log_probs(
                logits, row_node, temperature, guidance, flows, row_batch
            )
            with self.timer("constraint"):
                rows, tokens, nodes = self.children(row_node)
            phi = row_phi[rows] + log_probs[rows, tokens].double()
            # A zero-prior child (guided -inf) can never be drawn; it must not enter the search.
            alive = torch.isfinite(phi)
            rows, tokens, nodes, phi = rows[alive], tokens[alive], nodes[alive], phi[alive]
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
            order = sort_by_group_then_score(all_batch, all_key)
            order = order[group_rank(all_batch[order], B) < k]

            complete = self.child_count[all_node[order]] == 0
            finished, running = order[complete], order[~complete]
            done_batch, done_node = all_batch[finished], all_node[finished]
            done_phi, done_key = all_phi[finished], all_key[finished]
            if running.numel() == 0 or step == max_new_tokens - 1:
                break
            row_batch, row_node = all_batch[running], all_node[running]
            row_phi, row_key = all_phi[running], all_key[running]
            logits, cache, row_mask = self.extend(
                cache, row_mask, all_parent[running], all_token[running],
                batch.lengths[row_batch] + step,
            )

        nodes = torch.full((B, k), -1, dtype=torch.long)
        values = torch.full((B, k), -math.inf, dtype=torch.float32)
        order = sort_by_group_then_score(done_batch, done_key)
        rank = group_rank(done_batch[order], B)
        nodes[done_batch[order].cpu(), rank.cpu()] = done_node[order].cpu()
        values[done_batch[order].cpu(), rank.cpu()] = done_phi[order].float().cpu()
        return nodes, values
