"""How well a SASRec ranks the catalog: :func:`evaluate_sasrec`, beside the most-popular
baseline :func:`most_popular_baseline`.

Both rank the whole catalog for every sample, by default without the items of the sample's
history (SASRec's own protocol; ``exclude_history=False`` ranks them too, see
:func:`~flower_rec.auxiliary.item_probabilities` for why it matters), and score the list the way
the LLM recommenders are scored: by title, with :func:`flower_rec.metrics.ranking_metrics` (rank
0-based, NDCG ``1 / log2(rank + 2)``). Items that share a title (re-listings) are one entry of
the list, with the best score of its items; ties keep catalog order. Where every title is
distinct, this is the usual full-ranking HR@K/NDCG@K on item ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..data import Dataset, Sample, popularity_counts
from ..metrics import DEFAULT_KS, ranking_metrics
from .model import SASRec, catalog_fingerprint
from .probabilities import history_mask

__all__ = ["evaluate_sasrec", "most_popular_baseline"]


def _title_index(dataset: Dataset) -> tuple[list[str], Tensor]:
    """The distinct titles in catalog order and the title index of every item."""
    order: dict[str, int] = {}
    index = [order.setdefault(title, len(order)) for title in dataset.titles]
    return list(order), torch.tensor(index, dtype=torch.long)


def _ranked_titles(
    scores: Tensor, title_of: Tensor, titles: list[str], depth: int
) -> list[list[str]]:
    """The ``depth`` best titles per row; a title scores the best of its items; ties keep
    catalog order. Titles whose items all score -inf (excluded) are left out."""
    scores = scores.float().cpu()
    if len(titles) < scores.shape[1]:
        per_title = torch.full((scores.shape[0], len(titles)), -math.inf)
        scores = per_title.scatter_reduce(
            1, title_of.expand(scores.shape[0], -1), scores, "amax", include_self=True
        )
    depth = min(depth, scores.shape[1])
    top = torch.sort(scores, dim=1, descending=True, stable=True)
    order, values = top.indices[:, :depth].tolist(), top.values[:, :depth].tolist()
    return [
        [titles[t] for t, v in zip(row, row_values) if v != -math.inf]
        for row, row_values in zip(order, values)
    ]


def _check_catalog(model: SASRec, dataset: Dataset) -> None:
    if model.config.num_items != dataset.num_items:
        raise ValueError(
            f"the SASRec model scores {model.config.num_items} items but dataset "
            f"{dataset.name!r} has {dataset.num_items}"
        )
    if model.config.catalog is not None and model.config.catalog != catalog_fingerprint(dataset):
        raise ValueError(
            f"the SASRec model was trained on another catalog than dataset {dataset.name!r}'s"
        )


def _ranking(
    score: Callable[[list[Sample]], Tensor],
    dataset: Dataset,
    split: str,
    ks: Sequence[int],
    exclude_history: bool,
    batch_size: int,
) -> dict[str, float]:
    samples = dataset.split(split)
    titles, title_of = _title_index(dataset)
    lists: list[list[str]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        scores = score(chunk).float().cpu()
        if exclude_history:
            scores = scores.masked_fill(
                history_mask([s.history for s in chunk], dataset.num_items), -math.inf
            )
        lists += _ranked_titles(scores, title_of, titles, max(ks))
    return ranking_metrics(lists, [dataset.titles[s.target] for s in samples], ks)


@torch.no_grad()
def evaluate_sasrec(
    model: SASRec,
    dataset: Dataset,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_history: bool = True,
    batch_size: int = 1024,
) -> dict[str, float]:
    """HR@K and NDCG@K of ``model`` on a split: every catalog title ranked for every sample
    (see the module docstring), scored with :func:`~flower_rec.metrics.ranking_metrics`.
    ``exclude_history``: the items of the sample's history are not ranked (SASRec's own
    protocol; see :func:`item_probabilities` for why it matters)."""
    _check_catalog(model, dataset)
    was_training = model.training
    model.eval()
    try:
        return _ranking(
            lambda chunk: model.scores([s.history for s in chunk]),
            dataset, split, ks, exclude_history, batch_size,
        )
    finally:
        model.train(was_training)


def most_popular_baseline(
    dataset: Dataset,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_history: bool = True,
    counts: str = "interactions",
    batch_size: int = 1024,
) -> dict[str, float]:
    """HR@K and NDCG@K of recommending the titles by training popularity
    (:func:`~flower_rec.data.popularity_counts`, ``"interactions"`` by default, or the paper's
    ``"history"``), ties and uncounted titles in catalog order; ``exclude_history`` as in
    :func:`evaluate_sasrec` (then each user gets the popular titles they do not have yet)."""
    popularity = popularity_counts(dataset, counts)  # type: ignore[arg-type]
    item_scores = torch.tensor([float(popularity.get(t, 0)) for t in dataset.titles])
    return _ranking(
        lambda chunk: item_scores.expand(len(chunk), -1),
        dataset, split, ks, exclude_history, batch_size,
    )
