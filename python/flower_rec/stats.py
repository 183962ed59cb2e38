"""Dataset statistics: what ``flower-rec stats`` prints.

:func:`dataset_stats` returns a JSON-serialisable dict (catalog size, unique titles, samples,
users and time range per split, history lengths, popularity counts, the popularity groups with
their sizes, count ranges and training shares GH, and where each split's targets fall in the
groups); :func:`format_stats` renders it for people.
"""

from __future__ import annotations

import datetime
import os
import statistics
from collections import Counter
from typing import Any

from .data import (
    SPLITS,
    Dataset,
    PopularityMode,
    load_dataset,
    popularity_counts,
    popularity_groups,
)
from .metrics import group_shares

__all__ = ["dataset_stats", "format_stats"]


def dataset_stats(
    dataset: Dataset | str | os.PathLike,
    counts: PopularityMode = "history",
    num_groups: int = 8,
    top: int = 5,
) -> dict[str, Any]:
    """Statistics of ``dataset``: items, unique titles, samples per split, history lengths,
    popularity counts, the equal-size popularity groups
    (:func:`~flower_rec.data.popularity_groups` of the counts) and ``GH``, their training shares.

    Args:
        dataset: a :class:`~flower_rec.data.Dataset` or a dataset folder.
        counts: the popularity: history (the paper's: occurrences in the training histories) or
            interactions (each training interaction once); see
            :func:`~flower_rec.data.popularity_counts`.
        num_groups: popularity groups.
        top: the most popular titles listed.
    """
    if type(top) is not int or top < 0:
        raise ValueError(f"top must be a non-negative integer, got {top!r}")
    if not isinstance(dataset, Dataset):
        dataset = load_dataset(dataset)
    titles = dataset.titles
    by_title = dataset.title_items()
    pop = popularity_counts(dataset, counts)
    groups = popularity_groups(pop, num_groups)
    group_of = {t: g for g, members in enumerate(groups) for t in members}
    values = sorted(pop.values(), reverse=True)
    total = sum(values)
    top_decile = values[: max(1, len(values) // 10)] if values else []

    splits: dict[str, Any] = {}
    for split in SPLITS:
        samples = dataset.split(split)
        lengths = Counter(len(s.history) for s in samples)
        longest = max(lengths) if lengths else 0
        users = {s.user for s in samples}
        stamps = [s.timestamp for s in samples if s.timestamp is not None]
        in_group = [0] * num_groups
        outside = 0
        for s in samples:
            g = group_of.get(titles[s.target])
            if g is None:
                outside += 1
            else:
                in_group[g] += 1
        n = len(samples)
        splits[split] = {
            "samples": n,
            "users": None if None in users else len(users),
            "first_timestamp": min(stamps) if len(stamps) == n and n else None,
            "last_timestamp": max(stamps) if len(stamps) == n and n else None,
            "history_length": {
                "min": min(lengths) if lengths else 0,
                "mean": sum(k * c for k, c in lengths.items()) / n if n else 0.0,
                "max": longest,
                "counts": [lengths.get(k, 0) for k in range(longest + 1)],
            },
            "distinct_target_titles": len({titles[s.target] for s in samples}),
            "target_group_shares": [c / n if n else 0.0 for c in in_group],
            "targets_outside_groups": outside / n if n else 0.0,
        }

    return {
        "name": dataset.name,
        "items": dataset.num_items,
        "unique_titles": len(by_title),
        "shared_titles": sum(len(ids) > 1 for ids in by_title.values()),
        "items_with_shared_title": sum(len(ids) for ids in by_title.values() if len(ids) > 1),
        "splits": splits,
        "popularity": {
            "counts": counts,
            "titles_counted": len(pop),
            "titles_uncounted": len(by_title) - len(pop),
            "total": total,
            "max": values[0] if values else 0,
            "median": statistics.median(values) if values else 0,
            "min": values[-1] if values else 0,
            "top10pct_share": sum(top_decile) / total if total else 0.0,
            "top": [[t, pop[t]] for t in sorted(pop, key=lambda t: -pop[t])[:top]],
        },
        "groups": {
            "num_groups": num_groups,
            "sizes": [len(g) for g in groups],
            "count_range": [[pop[g[0]], pop[g[-1]]] if g else [0, 0] for g in groups],
            "GH": group_shares(pop, groups) if total else [0.0] * num_groups,
        },
    }


def _date(stamp: int | None) -> str:
    if stamp is None:
        return "?"
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d")


def format_stats(stats: dict[str, Any]) -> str:
    """A readable multi-line rendering of :func:`dataset_stats`'s dict."""
    pop, groups = stats["popularity"], stats["groups"]
    lines = [
        f"dataset {stats['name']}",
        f"  items {stats['items']:,}, unique titles {stats['unique_titles']:,} "
        f"({stats['shared_titles']:,} titles shared by {stats['items_with_shared_title']:,} items)",
        "",
        f"  {'split':<6} {'samples':>9} {'users':>8}  {'history len min/mean/max':>25}  "
        f"{'target titles':>13}  period",
    ]
    for split, s in stats["splits"].items():
        h = s["history_length"]
        users = "?" if s["users"] is None else f"{s['users']:,}"
        period = (
            "?"
            if s["first_timestamp"] is None
            else f"{_date(s['first_timestamp'])} .. {_date(s['last_timestamp'])}"
        )
        lines.append(
            f"  {split:<6} {s['samples']:>9,} {users:>8}  "
            f"{h['min']:>9} / {h['mean']:5.2f} / {h['max']:<3}  "
            f"{s['distinct_target_titles']:>13,}  {period}"
        )
    train_lengths = stats["splits"]["train"]["history_length"]["counts"]
    lines += [
        "  train history lengths: "
        + ", ".join(f"{k}: {c:,}" for k, c in enumerate(train_lengths) if c),
        "",
        f"  popularity ({pop['counts']} counts): {pop['titles_counted']:,} titles counted, "
        f"{pop['titles_uncounted']:,} never; total {pop['total']:,}, "
        f"max {pop['max']:,}, median {pop['median']:g}, min {pop['min']:,}; "
        f"top 10% of titles hold {pop['top10pct_share']:.1%}",
        "  most popular: " + "; ".join(f"{t} ({c:,})" for t, c in pop["top"]),
        "",
        f"  {groups['num_groups']} popularity groups (0 = most popular)",
        f"    {'group':<12}" + "".join(f"{g:>9}" for g in range(groups["num_groups"])),
        f"    {'titles':<12}" + "".join(f"{n:>9,}" for n in groups["sizes"]),
        f"    {'counts':<12}" + "".join(f"{f'{a}-{b}':>9}" for a, b in groups["count_range"]),
        f"    {'GH (train)':<12}" + "".join(f"{v:>9.4f}" for v in groups["GH"]),
    ]
    for split in ("valid", "test"):
        s = stats["splits"][split]
        lines.append(
            f"    {split + ' targets':<12}"
            + "".join(f"{v:>9.4f}" for v in s["target_group_shares"])
            + f"   outside: {s['targets_outside_groups']:.4f}"
        )
    return "\n".join(lines)
