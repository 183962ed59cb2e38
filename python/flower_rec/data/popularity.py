"""Popularity (docs/method.md, section 4): counts per title and the popularity groups.

:func:`popularity_counts` keys counts by title (identical titles merge); ``mode="history"`` is
the paper's reward and the published ``*_title_interaction_*.json``: how often each title occurs
in the history lists of the training samples. :func:`popularity_groups` sorts the counted titles
by count, descending, ties in the order in which the titles first occur in the training histories
(the key order of the counts), and cuts them into equal-size groups, the first ones one larger
(like ``numpy.array_split``). This tie-break reproduces the published ``*_group_title_8_*.json``
(and the ``_5_`` variant) of Video_Games and Movies_and_TV title for title and position for
position; no other natural order does (alphabetical, by item id, reversed: about 8% of positions
agree, the group memberships differ). :func:`flower_rec.metrics.group_shares` gives GH.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from .dataset import Dataset

__all__ = ["PopularityMode", "group_item_ids", "popularity_counts", "popularity_groups"]

PopularityMode = Literal["history", "interactions"]


def popularity_counts(dataset: Dataset, mode: PopularityMode = "history") -> dict[str, int]:
    """Popularity of each title in the training split, keyed by title (identical titles merge),
    in the order in which the titles are first counted (the tie-break of
    :func:`popularity_groups`). Titles never counted are absent.

    ``mode="history"`` (the paper's reward): the number of times the title occurs in the history
    lists of the training samples, so an interaction counts once per window it falls in (up to
    10 times). Reproduces the published ``*_title_interaction_*.json`` exactly, key order
    included.

    ``mode="interactions"``: each training interaction once: every training target, plus the
    first item of each user sequence that starts in the training split (recognised as the
    single history item of a one-item-history sample, which is how the 10-item-window samples
    of :func:`flower_rec.data.build_dataset` begin a sequence)."""
    titles = dataset.titles
    counts: dict[str, int] = {}
    if mode == "history":
        for s in dataset.train:
            for item in s.history:
                t = titles[item]
                counts[t] = counts.get(t, 0) + 1
    elif mode == "interactions":
        for s in dataset.train:
            if len(s.history) == 1:
                t = titles[s.history[0]]
                counts[t] = counts.get(t, 0) + 1
            t = titles[s.target]
            counts[t] = counts.get(t, 0) + 1
    else:
        raise ValueError(f"unknown popularity mode {mode!r}; expected 'history' or 'interactions'")
    return counts


def popularity_groups(counts: Mapping[str, float], num_groups: int = 8) -> list[list[str]]:
    """The titles with a positive count, sorted by count descending (ties keep the order of
    ``counts``), cut into ``num_groups`` groups of equal size, the first ``len % num_groups``
    groups one larger (``numpy.array_split``). Group 0 is the most popular. Groups are empty only
    when there are fewer titles than groups."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    ranked = sorted((t for t, c in counts.items() if c > 0), key=lambda t: -counts[t])
    size, extra = divmod(len(ranked), num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        stop = start + size + (1 if g < extra else 0)
        groups.append(ranked[start:stop])
        start = stop
    return groups


def group_item_ids(dataset: Dataset, groups: Sequence[Iterable[str]]) -> list[list[int]]:
    """The item ids of each group's titles: every id of a title shared by several items (sorted
    by title rank, then id). The published ``*_group_ids_*.json`` instead keep one id per
    title, the largest; :func:`save_dataset` writes that form."""
    by_title = dataset.title_items()
    return [[i for t in group for i in by_title.get(t, ())] for group in groups]
