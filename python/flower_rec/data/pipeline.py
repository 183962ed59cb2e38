"""The pipeline every source goes through (Amazon, MovieLens, the synthetic generator):
:func:`build_dataset`, from raw :class:`Interaction` records to a :class:`~flower_rec.data.Dataset`.
It is the authors' preprocessing
(``with_history/code/process.py`` of the official repository, docs/method.md section 4):

1. drop the interactions of items without a usable title;
2. iterative k-core (k = 5): drop every user and every item with fewer than k interactions, count
   again, repeat until nothing changes (duplicate interactions count, as in the authors' code);
3. shuffle the surviving items, listed in order of first appearance in the input, with
   ``random.Random(seed).shuffle`` (seed 42 as the authors), and number them 0..n-1;
4. order each user's interactions by timestamp (stable: input order breaks ties) and make one
   sample per interaction after the first: history = up to ``max_history`` (10) previous items;
5. sort all samples by target timestamp (stable: users in order of first appearance, then
   sequence position) and split them globally 80/10/10: the first ``n*8//10`` train, up to
   ``n*9//10`` valid, the rest test.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .dataset import Dataset, DatasetError, Sample
from .layout import save_dataset

__all__ = ["Interaction", "build_dataset"]

Log = Callable[[str], object] | None


class Interaction(NamedTuple):
    """One raw interaction: who, which item (its raw key: ASIN, movie id), rating, unix time."""

    user: str
    item: str
    rating: float | None
    timestamp: int


def build_dataset(
    name: str,
    interactions: Sequence[Interaction],
    titles: dict[str, str],
    *,
    k_core: int = 5,
    max_history: int = 10,
    seed: int = 42,
    source: str | os.PathLike | None = None,
    log: Log = None,
) -> Dataset:
    """Steps 1-5 of the module docstring. ``interactions`` in source order; ``titles`` maps the
    raw item key to its (already cleaned) title, and items without one are dropped. ``source``
    names the input in the error raised when too little data is left for three splits."""
    if max_history < 1:
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    current = [r for r in interactions if r.item in titles]
    note(log, f"interactions with a titled item: {len(current):,} of {len(interactions):,}")
    current = _k_core(current, k_core, log)

    keys = list(dict.fromkeys(r.item for r in current))
    random.Random(seed).shuffle(keys)
    item_id = {key: i for i, key in enumerate(keys)}
    sequences: dict[str, list[Interaction]] = {}
    for r in current:
        sequences.setdefault(r.user, []).append(r)
    samples = [
        sample for user, events in sequences.items()
        for sample in _user_samples(user, events, item_id, max_history)
    ]
    samples.sort(key=lambda s: s.timestamp)
    n = len(samples)
    train_end, valid_end = n * 8 // 10, n * 9 // 10
    if not (0 < train_end < valid_end < n):
        raise DatasetError(
            f"only {n} samples ({len(sequences)} users, {len(keys)} items) are left after "
            f"filtering: too few for non-empty 80/10/10 splits",
            source,
        )
    note(log, f"{len(keys):,} items, {len(sequences):,} users, {n:,} samples")
    return Dataset(
        name=name,
        titles=[titles[key] for key in keys],
        train=samples[:train_end],
        valid=samples[train_end:valid_end],
        test=samples[valid_end:],
        item_keys=keys,
    )


def _k_core(current: list[Interaction], k_core: int, log: Log) -> list[Interaction]:
    rounds = 0
    while k_core > 1:
        users = Counter(r.user for r in current)
        items = Counter(r.item for r in current)
        bad_users = {u for u, c in users.items() if c < k_core}
        bad_items = {i for i, c in items.items() if c < k_core}
        note(
            log,
            f"{k_core}-core round {rounds}: {len(users):,} users, {len(items):,} items, "
            f"{len(current):,} interactions",
        )
        if not bad_users and not bad_items:
            break
        current = [r for r in current if r.user not in bad_users and r.item not in bad_items]
        rounds += 1
    return current


def _user_samples(
    user: str, events: list[Interaction], item_id: dict[str, int], max_history: int
) -> list[Sample]:
    """One sample per interaction of ``user`` after the first, in time order."""
    events.sort(key=lambda r: r.timestamp)
    ids = [item_id[r.item] for r in events]
    times = [r.timestamp for r in events]
    ratings = [r.rating for r in events]
    known_ratings = all(x is not None for x in ratings)
    samples = []
    for i in range(1, len(events)):
        start = max(i - max_history, 0)
        samples.append(
            Sample(
                history=tuple(ids[start:i]),
                target=ids[i],
                user=user,
                timestamp=times[i],
                rating=ratings[i],
                history_timestamps=tuple(times[start:i]),
                history_ratings=tuple(ratings[start:i]) if known_ratings else None,
            )
        )
    return samples


def note(log: Log, message: str) -> None:
    """Pass ``message`` to ``log`` where there is one (the sources' progress lines)."""
    if log is not None:
        log(message)


def save_if_asked(dataset: Dataset, out: str | os.PathLike | None, log: Log) -> Dataset:
    """The sources' last step: write ``dataset`` to ``out`` unless it is None."""
    if out is not None:
        save_dataset(dataset, out)
        note(log, f"wrote {out}")
    return dataset


def clean_whitespace(title: str) -> str:
    """``title`` with every run of tabs and line breaks made one space."""
    # the catalog is one line per item, "title<TAB>id": tabs and line breaks cannot be kept
    return re.sub(r"[\t\r\n\v\f]+", " ", title)
