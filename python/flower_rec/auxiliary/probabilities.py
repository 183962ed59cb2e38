"""p_u of docs/method.md section 3.2 from a trained SASRec: :func:`item_probabilities` for a
list of samples, and :func:`training_probabilities`, the per-batch source that training
(:func:`flower_rec.training.train`'s ``aux_probabilities``) and the demo take."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..data import Dataset, Sample
from .model import SASRec

__all__ = ["history_mask", "item_probabilities", "training_probabilities"]


def history_mask(histories: Sequence[Sequence[int]], num_items: int) -> Tensor:
    """``[B, num_items]`` bool, True at the items of each history (all of it, not only the
    newest ``max_len``). A row whose history holds every item is all False (nothing would be
    left to rank)."""
    mask = torch.zeros(len(histories), num_items, dtype=torch.bool)
    rows = [row for row, history in enumerate(histories) for _ in history]
    columns = [item for history in histories for item in history]
    if columns:
        mask[rows, columns] = True
    mask[mask.all(dim=1)] = False
    return mask


def _masked_scores(
    model: SASRec, histories: Sequence[Sequence[int]], exclude_history: bool
) -> Tensor:
    scores = model.scores(histories).float()
    if exclude_history:
        mask = history_mask(histories, model.config.num_items).to(scores.device)
        scores = scores.masked_fill(mask, -math.inf)
    return scores


@torch.no_grad()
def item_probabilities(
    model: SASRec,
    samples: Sequence[Sample] | Sequence[Sequence[int]],
    *,
    exclude_history: bool = True,
    batch_size: int = 1024,
) -> Tensor:
    """p_u of docs/method.md section 3.2: the softmax of the model's scores for each sample's
    history, ``[B, num_items]`` float32 on the model's device (eval mode, no gradient; the
    model's mode is restored). ``samples`` are :class:`Sample` objects or plain histories.

    ``exclude_history`` (the default): the softmax runs over the items that are not in the
    history, which get probability 0. SASRec scores the items the user already has far above
    the rest (the output at the last position is close to the embedding of the newest item,
    and BCE with negatives drawn outside the history never pushes them down): on the default
    synthetic data the top item is a history item for 95% of the test samples and 53% of the
    softmax mass sits on the history, although no target there is a history item.
    ``exclude_history=False`` gives the plain softmax over all items."""
    histories = [s.history if isinstance(s, Sample) else s for s in samples]
    was_training = model.training
    model.eval()
    try:
        if not histories:
            return torch.empty(0, model.config.num_items, device=model.device)
        parts = [
            torch.softmax(
                _masked_scores(model, histories[start:start + batch_size], exclude_history),
                dim=-1,
            )
            for start in range(0, len(histories), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def training_probabilities(model: SASRec, dataset: Dataset, split: str = "train"):
    """p_u of the samples of ``split`` as a function of sample indices, the form
    :func:`flower_rec.training.train`'s ``aux_probabilities`` takes (``valid_aux_probabilities`` with ``split="valid"``):
    computed per batch, so the [samples, items] table is never held in memory."""
    samples = dataset.split(split)

    def probabilities(indices):
        return item_probabilities(model, [samples[int(i)] for i in indices])

    return probabilities
