"""Trie-constrained beam search: the evaluation protocol (10 beams, the finished beams are the
top-10 list, length penalty 1), optionally flow-guided."""

from __future__ import annotations

import math

import torch

from .guidance import Guidance, child_guidance
from .runner import ModelRunner, PromptBatch, group_rank, sort_by_group_then_score


class BeamSearch(ModelRunner):
    def beam_search_items(
        self,
        prompts,
        *,
        num_beams: int = 10,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
        guidance: Guidance | None = None,
    ):
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

        With ``guidance`` the model term and the guidance term are summed apart and a beam is
        ranked by the score it would finish with at the current length
        (:func:`~flower_rec.decoding.guidance.guided_beam_scores`, which is what the scores
        are); running beams of one step share a length, so for ``beta = 0`` the search and its
        scores are the unguided ones bit for bit.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be positive, got {num_beams}")
        self.check_length(max_new_tokens, extra=1)
        return self.decode_into(
            prompts, "beam search", num_beams,
            lambda batch, flows: self._beam_batch(
                batch, num_beams, max_new_tokens, length_penalty, guidance, flows
            ),
            guidance,
        )

    def beam_search(self, prompts, **options) -> list[list[str]]:
        """The titles of :meth:`beam_search_items`: each prompt's top-``num_beams`` list."""
        items, _ = self.beam_search_items(prompts, **options)
        return self.titles(items)

    def _beam_batch(
        self,
        batch: PromptBatch,
        num_beams: int,
        max_new_tokens: int,
        length_penalty: float,
        guidance: Guidance | None,
        flows,
    ):
        # One function for the whole search, longer than the others: a step updates a dozen
        # tensors of rows and candidates together, which split functions would pass back and
        # forth; the comments mark its stages.
        device, eos, K = self.device, self.eos_token_id, num_beams
        B = batch.input_ids.shape[0]
        logits, cache = self.prefill(batch)
        row_batch = torch.arange(B, device=device)
        row_node = torch.zeros(B, dtype=torch.long, device=device)
        row_model = torch.zeros(B, dtype=torch.float32, device=device)  # sum of log-probs
        row_guide = torch.zeros(B, dtype=torch.float32, device=device)  # sum of guidance terms
        row_mask = batch.attention_mask
        finished_score = torch.full((B, K), -math.inf, device=device)
        finished_node = torch.full((B, K), -1, dtype=torch.long, device=device)
        open_batch = torch.ones(B, dtype=torch.bool, device=device)

        for step in range(max_new_tokens):
            norm = float((step + 1) ** length_penalty)
            log_probs = torch.log_softmax(logits, dim=-1)
            with self.timer("constraint"):
                rows, tokens, nodes = self.children(row_node)
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
            cand_model = row_model[cand_row] + log_probs[cand_row, cand_token]
            cand_batch = row_batch[cand_row]
            cand_guide = row_guide[cand_row]
            if guidance is not None:
                # EOS after a complete item leaves the trie state (and its guidance) unchanged.
                step_guide = child_guidance(
                    flows, row_batch[rows], row_node[rows], nodes, guidance.beta
                )
                cand_guide = cand_guide + torch.cat([step_guide, step_guide.new_zeros(len(leaf_rows))])
            # The score each candidate would finish with, times `norm` (same order at one step).
            scale = norm if guidance is not None and guidance.form == "item" else 1.0
            cand_score = cand_model + scale * cand_guide

            # The best 2K continuations of each prompt.
            order = sort_by_group_then_score(cand_batch, cand_score)
            rank = group_rank(cand_batch[order], B)
            order, rank = order[rank < 2 * K], rank[rank < 2 * K]
            is_eos = cand_eos[order]

            # Finished: EOS among the first K, normalised by the generated length (EOS included).
            done = order[is_eos & (rank < K)]
            new_score = torch.full((B, K), -math.inf, device=device)
            new_node = torch.full((B, K), -1, dtype=torch.long, device=device)
            if done.numel():
                done_rank = rank[is_eos & (rank < K)]
                new_score[cand_batch[done], done_rank] = cand_score[done] / norm
                new_node[cand_batch[done], done_rank] = cand_node[done]
            merged_score = torch.cat([finished_score, new_score], dim=1)
            merged_node = torch.cat([finished_node, new_node], dim=1)
            finished_score, best = torch.topk(merged_score, K, dim=1)
            finished_node = merged_node.gather(1, best)

            # Running: the best K continuations that did not end.
            if step == max_new_tokens - 1:
                break
            running = order[~is_eos]
            running = running[group_rank(cand_batch[running], B) < K]
            best_running = torch.full((B,), -math.inf, device=device).scatter_reduce(
                0, cand_batch[running], cand_score[running], "amax"
            )
            # transformers' early-stopping heuristic (early_stopping=False): stop once the list
            # is full and the best running beam at the current length cannot beat its worst.
            full = torch.isfinite(finished_score).all(dim=1)
            can_improve = best_running / norm > finished_score[:, -1]
            open_batch &= (~full | can_improve) & torch.isfinite(best_running)
            running = running[open_batch[cand_batch[running]]]
            if running.numel() == 0:
                break

            row_batch, row_node = cand_batch[running], cand_node[running]
            row_model, row_guide = cand_model[running], cand_guide[running]
            logits, cache, row_mask = self.extend(
                cache, row_mask, cand_row[running], cand_token[running],
                batch.lengths[row_batch] + step,
            )
        return finished_node.cpu(), finished_score.cpu()
