"""``flower-rec screen``: can a reward make beam lists fair? Answered before any training.

A model trained to perfection on a reward produces each user's items in proportion to R_u / Z_u,
and beam search returns the modes of what the model learned. So the exact per-user top-K of the
reward itself is what a perfectly trained model's beam search converges to, and its metrics
bound what training on that reward can do for ranked lists. :func:`screen` computes them for
every reward variant (:mod:`flower_rec.rewards`; the personalised ones need the auxiliary
SASRec's p_u), beside SASRec's own top-K and SASRec's scores under flow guidance (``log p_u -
beta x log(R / Z)``, the item-level form of guided decoding, for each beta): NDCG@K, HR@K, DGU,
MGU, word entropy, distinct titles, and the mean entropy of each row's normalised scores (nats;
how spread the target is, which sampling would show and beam search would not).

Training weighs SFT's term by theta and the flow term by 1 - theta, and flow matching's term is
a cross-entropy as SFT's is: the two together are minimised by the mixture ``theta P + (1 -
theta) R_u / Z_u`` of the data's next-item distribution P and the target. With ``thetas``, the
screen also takes each reward's mixture with SASRec's p_u (standing in for P) at each theta:
what a model that learned both terms perfectly would rank first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .data import Dataset
from .evaluate import popularity_reference
from .metrics import evaluate_recommendations
from .rewards import REWARD_VARIANTS, PopularityRewards

__all__ = ["SCREEN_BETAS", "SCREEN_COLUMNS", "format_screen", "screen", "top_titles"]

#: The guidance strengths shown beside the rewards (the beam grid of guided decoding).
SCREEN_BETAS = (0.25, 0.5, 1.0)
SCREEN_COLUMNS = ("NDCG@{k}", "HR@{k}", "DGU", "MGU", "word_entropy", "distinct_titles",
                  "target_entropy")


def top_titles(scores: Tensor, titles: Sequence[str], k: int) -> list[list[str]]:
    """Each row's ``k`` highest-scoring distinct titles (``scores [U, I]``; items that share a
    title count once, at their best score; ties go to the lower item id)."""
    num_items = scores.shape[1]
    # Enough candidates to find k distinct titles despite duplicates.
    duplicates = num_items - len(set(titles))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    candidates = order[:, : min(num_items, k + duplicates)].tolist()
    lists = []
    for row in candidates:
        chosen: list[str] = []
        for item in row:
            if titles[item] not in chosen:
                chosen.append(titles[item])
                if len(chosen) == k:
                    break
        lists.append(chosen)
    return lists


def _row_entropy(scores: Tensor) -> float:
    log_p = torch.log_softmax(scores.double(), dim=1)
    entropy = -(log_p.exp() * torch.where(torch.isfinite(log_p), log_p, 0.0)).sum(1)
    return float(entropy.mean())


def screen(
    dataset: Dataset,
    probabilities: Tensor | None = None,
    *,
    split: str = "test",
    k: int = 10,
    betas: Sequence[float] = SCREEN_BETAS,
    thetas: Sequence[float] = (),
    limit: int | None = None,
) -> dict[str, dict]:
    """The metrics of each reward's exact top-``k`` on ``split``, and, given ``probabilities``,
    of each reward's mixture with p_u at each theta and of SASRec's top-k unguided and guided by
    the popularity prior at each beta. Returns ``{row label: metrics}``.

    Args:
        dataset: the dataset to screen.
        probabilities: SASRec's p_u of the screened samples, ``[U, I]``; None screens the
            popularity reward alone.
        split: the split to screen.
        k: list length.
        betas: the guidance betas of SASRec's guided rows.
        thetas: SFT's weights of the mixture rows ``theta p_u + (1 - theta) R_u / Z_u``, each
            in [0, 1); they need p_u (``probabilities``; on the command line, ``--aux``).
        limit: screen the first this many samples only; None: all of them.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    _check_betas(betas)
    _check_thetas(thetas, probabilities)
    samples = dataset.split(split)[:limit]
    if not samples:
        raise ValueError(f"the {split} split has no samples to screen")
    if probabilities is not None and tuple(probabilities.shape) != (len(samples), dataset.num_items):
        raise ValueError(f"probabilities must have shape {(len(samples), dataset.num_items)}, "
                         f"got {tuple(probabilities.shape)}")
    targets = [dataset.titles[sample.target] for sample in samples]
    groups, shares = popularity_reference(dataset)
    rewards = PopularityRewards.from_dataset(dataset)

    def measured(scores: Tensor) -> dict:
        scores = scores.expand(len(samples), -1)
        metrics = evaluate_recommendations(top_titles(scores, dataset.titles, k), targets, groups,
                                           shares, dataset.titles, ks=(k,))
        return {**metrics, "target_entropy": _row_entropy(scores)}

    rows, mixtures = {}, {}
    # Rows of p_u for the mixtures (thetas come with probabilities: checked above).
    if thetas:
        p_u = probabilities.double()
        p_u = p_u / p_u.sum(1, keepdim=True)
    for variant in REWARD_VARIANTS:
        if variant != "logp" and probabilities is None:
            continue
        scores = rewards.item_log_rewards(variant, probabilities, dtype=torch.float64)
        rows[f"reward {variant}"] = measured(scores)
        for theta in thetas:
            mixture = theta * p_u + (1 - theta) * torch.softmax(scores, dim=-1)
            mixtures[f"reward {variant}, mixed at theta {theta:g}"] = measured(mixture.log())
    rows.update(mixtures)
    if probabilities is not None:
        prior = rewards.item_log_rewards("logp", dtype=torch.float64)
        log_p = probabilities.double().clamp(min=1e-300).log()
        for beta in (0.0, *betas):
            label = "SASRec" if beta == 0 else f"SASRec, guidance beta {beta:g}"
            rows[label] = measured(log_p - beta * prior)
    return rows


def format_screen(rows: dict[str, dict], k: int = 10) -> str:
    """The rows as a markdown table."""
    columns = [column.format(k=k) for column in SCREEN_COLUMNS]
    lines = ["| top-K of | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, metrics in rows.items():
        cells = [
            f"{metrics[c]:.0f}" if c == "distinct_titles" else f"{metrics[c]:.4f}"
            for c in columns
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_thetas(thetas: Sequence[float], probabilities: Tensor | None) -> None:
    for theta in thetas:
        if not (isinstance(theta, (int, float)) and 0 <= theta < 1):
            raise ValueError(f"thetas must be numbers in [0, 1), got {theta!r}")
    if thetas and probabilities is None:
        raise ValueError("thetas mix each reward with SASRec's p_u: they need probabilities "
                         "(--aux)")


def _check_betas(betas: Sequence[float]) -> None:
    for beta in betas:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"betas must be positive numbers, got {beta!r}")
