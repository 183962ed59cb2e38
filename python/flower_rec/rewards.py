"""Item rewards of the Flower loss: popularity, the floor for unseen items, and the personalised
variants (docs/method.md sections 2 and 3).

The output of this module is a tensor of *item* log-rewards, one entry per item id (``[I]``, or
``[B, I]`` with one row per training sample), ready for ``trie.log_flows`` on the loss trie,
whose leaves are the items' token sequences followed by EOS. Everything that makes the rewards
per user is applied here, to the item rewards, *before* the flows are aggregated, so each
user's flows are exact (docs/method.md section 3.2).

Popularity ``R_o``: how often the item's title occurs in the history lists of the training
samples (:func:`flower_rec.data.popularity_counts`, ``mode="history"``). Items are keyed by
title, as in the paper:

- Several item ids with one title (duplicate catalog entries) share the title's reward: each of
  the ``k`` ids of a title carries ``1/k`` of it (``log_share``), so the trie leaf where their
  identical sequences end has the flow of the title, not ``k`` times it. With personalised
  rewards the ids of a title may get different per-user factors; the leaf then holds the *mean*
  of the ids' personalised rewards.
- Titles that never occur in a training history (items seen only as targets, or never) get the
  floor count ``floor_count``, 0.5 by default: half the smallest count a seen title can have
  (1), so an unseen item is rewarded less than any seen item but stays reachable with a finite
  log-reward (a zero reward would leave a trie path that the on-policy rollout can sample but
  whose per-state log-reward is -inf; docs/method.md section 5, pitfall 4).
- ``Z`` is the sum of the rewards of the distinct titles (floors included); the base log-reward
  of an item is ``log(R_o(title) / Z)``, so for the plain ``logp`` variant the root flow is
  ``log 1 = 0`` and the path product to an item is ``R_o / Z`` (docs/method.md section 3, step 3).

Personalised variants, from ``p [B, I]``, the auxiliary recommender's probability of each item id
for each sample's history (rows sum to 1 or not; only ratios and ranks within a row matter):

- ``logp``: ``log(R_o / Z)`` for every user (no ``p`` needed).
- ``logp_div_s`` (the paper's default): ``log(R_o / Z) / s_ui`` with
  ``s_ui = (p_ui - mean_j p_uj) / (max_j p_uj - min_j p_uj) + 1``, i.e. the item reward
  ``(R_o / Z) ** (1 / s_ui)``: items the user is likely to pick (s > 1) move toward reward 1,
  unlikely ones (s < 1) toward 0. By construction ``s`` lies in ``[0, 2]``; it gets near 0 only
  for the least likely item of an almost uniform row (mean close to max). ``s`` is clamped to at
  least :data:`MIN_CENTRED_SCALE` (0.01), which caps the exponent ``1 / s`` at 100 and keeps the
  log-reward finite; the exact limit would be a zero reward.
- ``logp_add_logs``: ``log(R_o / Z) + log s'_ui`` with ``s'_ui = (p_ui - min_j p_uj) /
  (max_j p_uj - min_j p_uj)``, i.e. the reward ``R_o / Z * s'``. ``s'`` is 0 at the least likely
  item of every row, so it is clamped to at least :data:`MIN_MINMAX_SCALE` (1e-6, a factor
  e^-13.8) for the same reason.

- ``p_div_pop`` (ours, not the paper's): ``log p̄_ui - beta x log(R_o / Z)`` with ``p̄`` the row
  normalised to sum 1, i.e. the reward ``p̄_ui / (R_o / Z) ** beta``: the auxiliary
  recommender's distribution with popularity divided out to the power ``beta``
  (``popularity_exponent``, 0.25 by default). It is the item-level form of flow-guided decoding
  of the auxiliary recommender, whose exact top-10 ``flower-rec screen`` finds both fair and
  accurate (the "SASRec, guidance beta" rows): a reward whose mode is fair, where the
  popularity-based ones make the model's mode the popular titles. ``p̄`` is clamped to at least
  :data:`MIN_PROBABILITY` (a factor e^-27.6) for a finite log-reward.

A row whose probabilities are all equal carries no preference: its scales are 1 (``s = s' = 1``),
which gives that user the ``logp`` rewards (and ``p_div_pop`` the inverse-popularity ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import Dataset, popularity_counts

__all__ = [
    "DEFAULT_FLOOR_COUNT",
    "MIN_CENTRED_SCALE",
    "MIN_MINMAX_SCALE",
    "MIN_PROBABILITY",
    "DEFAULT_POPULARITY_EXPONENT",
    "REWARD_VARIANTS",
    "PopularityRewards",
    "centred_scale",
    "min_max_scale",
    "personalise",
]

#: The reward variants (docs/method.md section 3.2); ``logp_div_s`` is the paper's default.
REWARD_VARIANTS = ("logp", "logp_div_s", "logp_add_logs", "p_div_pop")
#: Count given to titles without a training-history count: half the smallest real count (1).
DEFAULT_FLOOR_COUNT = 0.5
#: Lower bound of ``s_ui`` in ``logp_div_s`` (caps the exponent ``1 / s`` at 100).
MIN_CENTRED_SCALE = 1e-2
#: Lower bound of ``s'_ui`` in ``logp_add_logs`` (its log is at least -13.8).
MIN_MINMAX_SCALE = 1e-6
#: Lower bound of the normalised ``p̄_ui`` in ``p_div_pop`` (its log is at least -27.6).
MIN_PROBABILITY = 1e-12
#: ``beta`` of ``p_div_pop``: the screen's fair and accurate guidance strength on the synthetic
#: data's valid split (docs/ablation.md, round 3).
DEFAULT_POPULARITY_EXPONENT = 0.25
# Rows whose max - min is below this (relative to the max) are treated as uniform.
_UNIFORM_TOLERANCE = 1e-12


def _row_range(probabilities: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row min, max and a mask of the rows with a usable spread (``[B, 1]`` each)."""
    low = probabilities.amin(dim=-1, keepdim=True)
    high = probabilities.amax(dim=-1, keepdim=True)
    spread = (high - low) > _UNIFORM_TOLERANCE * high.abs().clamp(min=1e-30)
    return low, high, spread


def _check_probabilities(probabilities: Tensor, num_items: int) -> Tensor:
    if probabilities.dim() != 2 or probabilities.shape[1] != num_items:
        raise ValueError(
            f"item probabilities must have shape [batch, {num_items}], got "
            f"{tuple(probabilities.shape)}"
        )
    if not probabilities.dtype.is_floating_point:
        raise ValueError(f"item probabilities must be floating point, got {probabilities.dtype}")
    if not bool(torch.isfinite(probabilities).all()):
        raise ValueError("item probabilities hold NaN or infinite values")
    return probabilities.to(torch.float64 if probabilities.dtype == torch.float64 else torch.float32)


def centred_scale(probabilities: Tensor) -> Tensor:
    """``s_ui = (p_ui - mean_j p_uj) / (max_j p_uj - min_j p_uj) + 1`` per row of ``[B, I]``,
    clamped to at least :data:`MIN_CENTRED_SCALE`; 1 on rows whose entries are all equal."""
    low, high, spread = _row_range(probabilities)
    mean = probabilities.mean(dim=-1, keepdim=True)
    width = torch.where(spread, high - low, torch.ones_like(high))
    scale = (probabilities - mean) / width + 1.0
    scale = torch.where(spread, scale, torch.ones_like(scale))
    return scale.clamp(min=MIN_CENTRED_SCALE)


def min_max_scale(probabilities: Tensor) -> Tensor:
    """``s'_ui = (p_ui - min_j p_uj) / (max_j p_uj - min_j p_uj)`` per row of ``[B, I]``,
    clamped to at least :data:`MIN_MINMAX_SCALE`; 1 on rows whose entries are all equal."""
    low, high, spread = _row_range(probabilities)
    width = torch.where(spread, high - low, torch.ones_like(high))
    scale = (probabilities - low) / width
    scale = torch.where(spread, scale, torch.ones_like(scale))
    return scale.clamp(min=MIN_MINMAX_SCALE)


def personalise(
    log_rewards: Tensor,
    variant: str,
    probabilities: Tensor | None = None,
    popularity_exponent: float = DEFAULT_POPULARITY_EXPONENT,
) -> Tensor:
    """Applies a reward ``variant`` to normalised item log-rewards ``log(R_o / Z)`` ``[I]``.

    ``logp`` returns them unchanged (``[I]``; with ``probabilities``, expanded to ``[B, I]``);
    the personalised variants need ``probabilities [B, I]`` and return ``[B, I]``;
    ``popularity_exponent`` is the ``beta`` of ``p_div_pop``.
    """
    if variant not in REWARD_VARIANTS:
        raise ValueError(f"unknown reward variant {variant!r}; expected one of {REWARD_VARIANTS}")
    if probabilities is None:
        if variant != "logp":
            raise ValueError(
                f"reward variant {variant!r} needs per-sample item probabilities p_u (from an "
                "auxiliary recommender); use 'logp' for popularity-only rewards"
            )
        return log_rewards
    p = _check_probabilities(probabilities, log_rewards.shape[-1]).to(log_rewards.device)
    base = log_rewards.to(p.dtype).unsqueeze(0)
    if variant == "logp":
        return base.expand(p.shape[0], -1)
    if variant == "logp_div_s":
        return base / centred_scale(p)
    if variant == "p_div_pop":
        if not (math.isfinite(popularity_exponent) and popularity_exponent >= 0):
            raise ValueError(f"popularity_exponent must be a non-negative number, got "
                             f"{popularity_exponent!r}")
        normalised = p / p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
        return torch.log(normalised.clamp(min=MIN_PROBABILITY)) - popularity_exponent * base
    return base + torch.log(min_max_scale(p))


@dataclass
class PopularityRewards:
    """Popularity rewards of a catalog (see the module docstring).

    Attributes:
        titles: the catalog (item id -> title).
        title_counts: the count used for each item id's title: its training-history count, or
            ``floor_count`` where the title has none.
        floor_count: the count of titles never seen in a training history.
        log_rewards: ``[I]`` float64, ``log(R_o(title) / Z)`` of each item id (the title's
            whole reward).
        log_share: ``[I]`` float64, ``log k`` for an id whose title has ``k`` ids.
        num_floored: number of distinct titles that got the floor count.
    """

    titles: list[str]
    title_counts: list[float]
    floor_count: float
    log_rewards: Tensor
    log_share: Tensor
    num_floored: int

    @classmethod
    def from_counts(
        cls,
        titles: Sequence[str],
        counts: Mapping[str, float],
        floor_count: float = DEFAULT_FLOOR_COUNT,
    ) -> PopularityRewards:
        """From ``{title: count}`` (titles absent or with a zero count get ``floor_count``)."""
        if not (isinstance(floor_count, (int, float)) and math.isfinite(floor_count)) or (
            floor_count <= 0
        ):
            raise ValueError(
                f"floor_count must be a positive number (the reward of titles never seen in a "
                f"training history), got {floor_count!r}"
            )
        titles = list(titles)
        if not titles:
            raise ValueError("the catalog has no titles")
        per_title: dict[str, float] = {}
        for title in titles:
            count = float(counts.get(title, 0.0))
            if not math.isfinite(count) or count < 0:
                raise ValueError(f"title {title!r} has an invalid count {count!r}")
            per_title[title] = count if count > 0 else float(floor_count)
        num_floored = sum(1 for t in per_title if not counts.get(t, 0) > 0)
        total = math.fsum(per_title.values())
        multiplicity: dict[str, int] = {}
        for title in titles:
            multiplicity[title] = multiplicity.get(title, 0) + 1
        title_counts = [per_title[t] for t in titles]
        log_rewards = torch.tensor(
            [math.log(c) - math.log(total) for c in title_counts], dtype=torch.float64
        )
        log_share = torch.tensor([math.log(multiplicity[t]) for t in titles], dtype=torch.float64)
        return cls(titles, title_counts, float(floor_count), log_rewards, log_share, num_floored)

    @classmethod
    def from_dataset(
        cls, dataset: Dataset, floor_count: float = DEFAULT_FLOOR_COUNT
    ) -> PopularityRewards:
        """The paper's reward: training-history counts of the dataset's titles."""
        return cls.from_counts(dataset.titles, popularity_counts(dataset, "history"), floor_count)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def item_log_rewards(
        self,
        variant: str = "logp",
        probabilities: Tensor | None = None,
        *,
        popularity_exponent: float = DEFAULT_POPULARITY_EXPONENT,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Per-id log-rewards for ``trie.log_flows`` on the loss trie: the ``variant`` applied
        to ``log(R_o / Z)`` (see :func:`personalise`), then each title's reward split evenly
        among its ids. ``[I]`` for ``logp`` without probabilities, else ``[B, I]``."""
        device = device if device is not None else (
            probabilities.device if probabilities is not None else "cpu"
        )
        base = self.log_rewards.to(device)
        rewards = personalise(base, variant, probabilities, popularity_exponent)
        rewards = rewards - self.log_share.to(device)
        return rewards.to(dtype)
