"""Flow guidance: decoding that ranks items by ``log p(i | u) - beta * log(R(i) / Z)``.

A model fine-tuned with SFT recommends popular items because they are popular in its training
data. Dividing each item's probability by its prior share ``R(i) / Z`` to the power ``beta``
(popularity deconfounding at ranking time, as PDA does for classic recommenders: Zhang et al.,
SIGIR 2021) is a per-token rule on the catalog trie: the prior's log-flows ``F`` (``log_flows``
of the item log-prior) give ``log Phat(a | s) = F(s.a) - F(s)`` at every state, and these sum to
``log(R(i) / Z)`` along an item's path. So every decoder adds ``-beta * log Phat(a | s)`` to each
child's score (the fused op :meth:`flower_ext.Trie.guide_logits_` where a decoder works on full
logits rows, the same formula on the gathered children in beam search), and an item whose prior
is zero (log-prior -inf) is never recommended.

Beam search normalises a list's scores by length, and how the guidance meets that normalisation
changes the result, differently on different data (a weak model on a real catalog grows MORE
head-heavy when the guidance is normalised with the model term, since short popular titles gain
most per token), so both forms are offered and :func:`flower_rec.guidance_selection` picks one on
the validation split:

- ``"normalized"``: ``(log p + guidance) / (tokens + 1) ** length_penalty``; what per-token
  guidance inside transformers' beam search gives (:class:`flower_ext.generation.TrieLogitsProcessor`).
- ``"item"``: ``log p / (tokens + 1) ** length_penalty + guidance``: the guidance added once per
  item, not normalised.

Sampling and sampled top-K have no length normalisation: they draw from the guided per-token
distribution, the model's next-token distribution times ``Phat ** -beta``, renormalised over the
trie's children.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flower_ext import Trie

GuidanceForm = Literal["normalized", "item"]
GUIDANCE_FORMS: tuple[GuidanceForm, ...] = ("normalized", "item")

__all__ = ["GUIDANCE_FORMS", "Guidance", "GuidanceForm", "guided_beam_scores"]


@dataclass(frozen=True, eq=False)
class Guidance:
    """Flow guidance for a decoder call.

    Args:
        log_prior: item log-prior, ``[I]`` shared by every prompt or ``[P, I]`` one row per
            prompt of the call (e.g. personalised rewards); any scale (only ratios matter).
            The training popularity is the usual choice
            (:meth:`flower_rec.rewards.PopularityRewards.item_log_rewards`). -inf excludes an
            item; NaN and +inf are errors.
        beta: the strength; 0 decodes as without guidance (bit for bit where the prior is
            finite), 1 divides each item's probability by its prior share.
        form: how the guidance meets beam search's length normalisation (module docstring).
    """

    log_prior: Tensor
    beta: float = 0.5
    form: GuidanceForm = "normalized"

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ValueError(f"guidance beta must be a number, got {self.beta!r}")
        if not math.isfinite(self.beta):
            raise ValueError(f"guidance beta must be finite, got {self.beta}")
        if self.form not in GUIDANCE_FORMS:
            raise ValueError(f"guidance form must be one of {GUIDANCE_FORMS}, got {self.form!r}")
        prior = self.log_prior
        if not isinstance(prior, Tensor) or not prior.is_floating_point():
            raise ValueError("guidance log_prior must be a floating-point tensor")
        if prior.dim() not in (1, 2) or prior.shape[-1] == 0:
            raise ValueError(
                f"guidance log_prior must have shape [num_items] or [num_prompts, num_items], "
                f"got {tuple(prior.shape)}"
            )
        if bool((torch.isnan(prior) | (prior == math.inf)).any()):
            raise ValueError("guidance log_prior must not hold NaN or +inf (-inf excludes an item)")
        if bool((prior == -math.inf).all(dim=-1).any()):
            raise ValueError("guidance log_prior excludes every item of a row: nothing to decode")

    @property
    def per_prompt(self) -> bool:
        return self.log_prior.dim() == 2

    def check(self, num_items: int, num_prompts: int) -> None:
        """Raises ``ValueError`` unless the prior fits a catalog and a decoder call."""
        if self.log_prior.shape[-1] != num_items:
            raise ValueError(
                f"guidance log_prior has {self.log_prior.shape[-1]} items, the catalog "
                f"{num_items}"
            )
        if self.per_prompt and self.log_prior.shape[0] != num_prompts:
            raise ValueError(
                f"guidance log_prior has {self.log_prior.shape[0]} rows for {num_prompts} prompts"
            )

    def flows(self, trie: Trie, prompts: Sequence[int]) -> Tensor:
        """The prior's log-flows on ``trie`` (float64): ``[N]`` for a shared prior, else
        ``[len(prompts), N]`` for those prompts' rows."""
        prior = self.log_prior
        if self.per_prompt:
            prior = prior[torch.as_tensor(list(prompts), dtype=torch.long)]
        return trie.log_flows(prior.to(device=trie.device, dtype=torch.float64))


def flows_of_rows(flows: Tensor, rows: Tensor) -> Tensor:
    """The flows of each decoding row (``rows`` indexes the batch): a shared ``[N]`` stays
    shared."""
    return flows if flows.dim() == 1 else flows[rows]


def child_guidance(flows: Tensor, rows: Tensor, parents: Tensor, children: Tensor, beta: float):
    """``-beta * log Phat(child | parent)`` for each candidate (the formula of
    :meth:`flower_ext.Trie.guide_logits_`), float32; -inf where the child's prior flow is zero.
    ``rows`` indexes the batch rows of per-prompt ``flows [B, N]``."""
    if flows.dim() == 1:
        child_flow, parent_flow = flows[children], flows[parents]
    else:
        child_flow, parent_flow = flows[rows, children], flows[rows, parents]
    guided = -beta * (child_flow - parent_flow).float()
    return torch.where(child_flow == -math.inf, -math.inf, guided)


def item_log_shares(flows: Tensor, item_node: Tensor) -> Tensor:
    """``log Phat(item) = F(leaf) - F(root)`` of every item, ``[I]`` or ``[B, I]`` (float64):
    the sum of the per-token guidance terms along the item's path, divided by ``-beta``."""
    return flows[..., item_node] - flows[..., :1]


def guided_beam_scores(
    model_log_probs: Tensor,
    lengths: Tensor,
    log_shares: Tensor,
    beta: float,
    form: GuidanceForm,
    length_penalty: float = 1.0,
) -> Tensor:
    """The score guided beam search ranks items by, from the model's log-probabilities of each
    item and its EOS (``[P, I]``), the item token counts ``[I]`` and the prior's
    ``log Phat`` (``[I]`` or ``[P, I]``): see the module docstring for the two forms.
    ``beta = 0`` gives the unguided score exactly; a zero-prior item scores -inf."""
    norm = (lengths.to(model_log_probs.device).float() + 1.0) ** length_penalty
    guidance = torch.where(
        log_shares == -math.inf, -math.inf, -beta * log_shares.to(model_log_probs.device)
    ).float()
    if form == "normalized":
        return (model_log_probs + guidance) / norm
    return model_log_probs / norm + guidance
