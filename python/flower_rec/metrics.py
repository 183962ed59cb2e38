"""The paper's evaluation metrics, as pure functions over plain Python data.

Nothing here knows about models, tokenizers or the data layer: a recommendation list is a
``list[str]`` of titles (ranked, best first), a run is one such list per test sample, and every
item is identified by its exact title, as in the paper (``docs/method.md`` section 4).

=====================================  ==========================================================
function                               what it computes
=====================================  ==========================================================
:func:`ranking_metrics`                HR@K and NDCG@K, K in (1, 3, 5, 10, 20)
:func:`group_shares`                   GH: each popularity group's share of the training counts
:func:`popularity_fairness`            GP per group, the outside bucket, GU, DGU and MGU
:func:`diversity`                      word entropy (bits), type-token ratio, distinct titles,
                                       invalid outputs
:func:`invalid_outputs`                recommended titles that are not catalog titles
:func:`distribution_fit`               KL(m||b), KL(b||m) and JS (natural log)
:func:`evaluate_recommendations`       all of the above as one flat JSON-serialisable dict
:func:`write_report`                   that dict as a JSON file, written atomically
=====================================  ==========================================================

Conventions shared by every function (the points the paper leaves open):

* **Counting.** Every recommended title counts once per occurrence, pooled over all samples
  (all 10 of every user): for the group shares, the word distribution and the invalid count.
  Only the ranking metrics look at positions, and they use the target's *first* occurrence in a
  list (the authors' ``calc.py`` kept the last one, which only matters if a list repeats a title).
* **Short lists.** K is a cut-off, not a requirement: HR@K and NDCG@K with fewer than K
  recommendations are computed over what is there. With 10 beams HR@20 therefore equals HR@10
  and NDCG@20 equals NDCG@10; they are reported because the paper's tables have them.
* **Empty input.** Zero samples, or samples with empty lists, are allowed: they have no hits, no
  recommended titles and no words, and every ratio whose denominator is zero is reported as 0.0
  (so the result is always valid JSON, never NaN). :func:`distribution_fit` is the exception:
  an empty generated distribution is not a distribution, so it raises ``ValueError``.
* **Titles are compared exactly** (no stripping, no case folding): cleaning the model's output
  is the decoder's job.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write_bytes

__all__ = [
    "DEFAULT_KS",
    "EPS",
    "distribution_fit",
    "diversity",
    "evaluate_recommendations",
    "group_shares",
    "invalid_outputs",
    "popularity_fairness",
    "ranking_metrics",
    "write_report",
]

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)

#: Mass given to a title that one distribution lacks (float64 machine epsilon, as in the paper).
EPS: float = float(np.finfo(float).eps)

Recommendations = Sequence[Sequence[str]]
Groups = Sequence[Iterable[str]] | Mapping[str, Iterable[str]]


# ---------------------------------------------------------------------------------------------
# input checks


def _check_recommendations(recommendations: Recommendations) -> list[list[str]]:
    """The lists as ``list[list[str]]``; a bare string where a list belongs is a TypeError (it
    would otherwise be read as a list of one-character titles)."""
    if isinstance(recommendations, str):
        raise TypeError("recommendations must be a list of lists of titles, got a string")
    checked = []
    for index, titles in enumerate(recommendations):
        if isinstance(titles, str):
            raise TypeError(
                f"recommendations[{index}] is a string; each sample needs a list of titles"
            )
        titles = list(titles)
        for title in titles:
            if not isinstance(title, str):
                raise TypeError(
                    f"recommendations[{index}] holds {type(title).__name__} {title!r}, not a title"
                )
        checked.append(titles)
    return checked


def _pooled(recommendations: list[list[str]]) -> Counter[str]:
    """How often each title is recommended, all lists pooled, every occurrence counted."""
    pooled: Counter[str] = Counter()
    for titles in recommendations:
        pooled.update(titles)
    return pooled


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0


def _group_lists(groups: Groups) -> list[list[str]]:
    """Groups as a list of title lists, most popular first. A mapping (the published
    ``group_title`` JSON, ``{"0": [...], ..., "7": [...]}``) is ordered by its integer keys. A
    title in two groups is a ValueError (the groups partition the counted titles)."""
    if isinstance(groups, Mapping):
        try:
            keys = sorted(groups, key=int)
        except (TypeError, ValueError) as error:
            raise ValueError(f"group keys must be integers, got {list(groups)}") from error
        if [int(key) for key in keys] != list(range(len(keys))):
            raise ValueError(f"group keys must be 0 .. n-1, got {keys}")
        lists = [list(groups[key]) for key in keys]
    else:
        if isinstance(groups, str):
            raise TypeError("groups must be a list of lists of titles, got a string")
        lists = []
        for index, group in enumerate(groups):
            if isinstance(group, str):
                raise TypeError(f"groups[{index}] is a string; each group is a list of titles")
            lists.append(list(group))
    if not lists:
        raise ValueError("at least one popularity group is needed")
    seen: dict[str, int] = {}
    for index, group in enumerate(lists):
        for title in group:
            if title in seen and seen[title] != index:
                raise ValueError(f"title {title!r} is in groups {seen[title]} and {index}")
            seen[title] = index
    return lists


# ---------------------------------------------------------------------------------------------
# accuracy


def ranking_metrics(
    recommendations: Recommendations,
    targets: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """HR@K and NDCG@K of ranked recommendation lists against one target title per sample.

    ``HR@K`` is the share of samples whose target is among the first K recommendations.
    ``NDCG@K`` is the mean over *all* samples of ``1 / log2(rank + 2)`` where ``rank`` (0-based)
    is the position of the target's first occurrence in the list if ``rank < K``, else 0. (With
    a single relevant item the ideal DCG is 1, so this is the normalised DCG; the authors compute
    the same with natural logs divided by ``1/ln 2``.)

    Lists shorter than K are used as they are: with 10 recommendations per sample HR@20 equals
    HR@10 and NDCG@20 equals NDCG@10. A target that is not a catalog title simply never matches
    a constrained recommendation. Zero samples give 0.0 everywhere.

    Returns ``{"HR@1": ..., "NDCG@1": ..., "HR@3": ..., ...}`` in the order of ``ks``.
    """
    lists = _check_recommendations(recommendations)
    if isinstance(targets, str):
        raise TypeError("targets must be a list of titles, got a string")
    targets = list(targets)
    if len(lists) != len(targets):
        raise ValueError(f"{len(lists)} recommendation lists but {len(targets)} targets")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be at least 1, got {ks}")

    hits = np.zeros(len(ks))
    gains = np.zeros(len(ks))
    for titles, target in zip(lists, targets):
        try:
            rank = titles.index(target)  # first occurrence
        except ValueError:
            continue
        gain = 1.0 / math.log2(rank + 2)
        for index, k in enumerate(ks):
            if rank < k:
                hits[index] += 1
                gains[index] += gain

    result: dict[str, float] = {}
    for index, k in enumerate(ks):
        result[f"HR@{k}"] = _ratio(hits[index], len(lists))
        result[f"NDCG@{k}"] = _ratio(gains[index], len(lists))
    return result


# ---------------------------------------------------------------------------------------------
# popularity fairness


def group_shares(counts: Mapping[str, float], groups: Groups) -> list[float]:
    """GH: each group's share of the training popularity counts.

    ``GH_g = sum(counts[t] for t in group g) / sum(counts.values())``. The denominator is *all*
    counts, so GH sums to 1 exactly when the groups cover every counted title (they do for the
    published groups); a group title without a count contributes 0.
    """
    lists = _group_lists(groups)
    values = np.array([float(value) for value in counts.values()], dtype=np.float64)
    if values.size and (not np.all(np.isfinite(values)) or np.any(values < 0)):
        raise ValueError("counts must be finite and non-negative")
    total = float(values.sum())
    if total <= 0:
        raise ValueError("the counts sum to zero: group shares are undefined")
    return [sum(float(counts.get(title, 0)) for title in group) / total for group in lists]


def popularity_fairness(
    recommendations: Recommendations,
    groups: Groups,
    group_shares: Sequence[float],
) -> dict[str, Any]:
    """GP, GU, DGU and MGU of a run against the training popularity groups.

    ``groups`` are the popularity groups (lists of titles, group 0 the most popular; a mapping
    ``{"0": [...], ...}`` as in the published JSON is accepted) and ``group_shares`` is GH, the
    training share of each group (:func:`group_shares`).

    * ``GP[g]``: group g's share of all recommended titles, pooled over all samples, every
      occurrence counted.
    * ``GP_outside``: the share of recommended titles that are in no group (catalog titles never
      seen in a training history, and invalid outputs). Each occurrence counts once in this
      separate bucket and in the denominator, so ``sum(GP) + GP_outside == 1``. (The authors'
      ``calc.py`` instead *set* the last group's count to 1 whenever such a title appeared.)
    * ``GU[g] = GP[g] - GH[g]``, ``DGU = max(GU) - min(GU)``, ``MGU = mean(|GU|)`` over the
      groups only (the outside bucket has no GH). Lower is fairer.

    With no recommended titles at all, GP and GP_outside are 0.0 and GU = -GH.

    Returns ``{"GH", "GP", "GU": list[float], "GP_outside", "DGU", "MGU": float,
    "num_recommended": int}``.
    """
    lists = _check_recommendations(recommendations)
    group_lists = _group_lists(groups)
    gh = [float(share) for share in group_shares]
    if len(gh) != len(group_lists):
        raise ValueError(f"{len(group_lists)} groups but {len(gh)} group shares")

    group_of = {title: index for index, group in enumerate(group_lists) for title in group}
    in_group = [0] * len(group_lists)
    outside = 0
    pooled = _pooled(lists)
    for title, count in pooled.items():
        index = group_of.get(title)
        if index is None:
            outside += count
        else:
            in_group[index] += count
    total = sum(pooled.values())

    gp = [_ratio(count, total) for count in in_group]
    gu = [p - h for p, h in zip(gp, gh)]
    return {
        "GH": gh,
        "GP": gp,
        "GU": gu,
        "GP_outside": _ratio(outside, total),
        "DGU": max(gu) - min(gu),
        "MGU": sum(abs(u) for u in gu) / len(gu),
        "num_recommended": total,
    }


# ---------------------------------------------------------------------------------------------
# diversity


def invalid_outputs(recommendations: Recommendations, catalog_titles: Iterable[str]) -> int:
    """How many recommended titles (every occurrence) are not catalog titles. Zero under
    trie-constrained decoding; free generation can produce titles that do not exist."""
    lists = _check_recommendations(recommendations)
    catalog = (
        catalog_titles if isinstance(catalog_titles, (set, frozenset)) else set(catalog_titles)
    )
    return sum(count for title, count in _pooled(lists).items() if title not in catalog)


def diversity(
    recommendations: Recommendations,
    catalog_titles: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Word entropy, type-token ratio, distinct titles and (given the catalog) invalid outputs.

    The word pool is every whitespace-separated token (``str.split()``, case kept) of every
    recommended title, each occurrence of a title contributing its words again.

    * ``word_entropy``: Shannon entropy of the word distribution of that pool, in **bits**.
    * ``type_token_ratio``: distinct words / total words in the pool.
    * ``distinct_titles``: number of distinct recommended titles (valid or not).
    * ``invalid_outputs``: recommended titles (occurrences) that are not in ``catalog_titles``;
      only present when the catalog is given.

    Returns ``{"word_entropy", "type_token_ratio": float, "distinct_titles": int,
    ["invalid_outputs": int]}``.
    """
    lists = _check_recommendations(recommendations)
    pooled = _pooled(lists)
    words: Counter[str] = Counter()
    for title, count in pooled.items():
        for word in title.split():
            words[word] += count
    total = sum(words.values())
    if total:
        probabilities = np.array(list(words.values()), dtype=np.float64) / total
        entropy = float(-(probabilities * np.log2(probabilities)).sum())
    else:
        entropy = 0.0
    result: dict[str, Any] = {
        "word_entropy": max(0.0, entropy),  # not -0.0 for a single word
        "type_token_ratio": _ratio(len(words), total),
        "distinct_titles": len(pooled),
    }
    if catalog_titles is not None:
        result["invalid_outputs"] = invalid_outputs(lists, catalog_titles)
    return result


# ---------------------------------------------------------------------------------------------
# distribution fitting


def _as_masses(distribution: Mapping[str, float] | Iterable[str], name: str) -> dict[str, float]:
    if isinstance(distribution, str):
        raise TypeError(f"{name} must be a mapping title -> mass or a list of titles, not a string")
    if isinstance(distribution, Mapping):
        masses = {title: float(mass) for title, mass in distribution.items()}
    else:
        masses = {title: float(count) for title, count in Counter(distribution).items()}
    for title, mass in masses.items():
        if not math.isfinite(mass) or mass < 0:
            raise ValueError(f"{name}[{title!r}] = {mass}: masses must be finite and non-negative")
    if sum(masses.values()) <= 0:
        raise ValueError(f"{name} has no mass: it is not a distribution")
    return masses


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p||q) in nats for strictly positive p and q."""
    return max(0.0, float(np.sum(p * (np.log(p) - np.log(q)))))


def distribution_fit(
    generated: Mapping[str, float] | Iterable[str],
    target: Mapping[str, float],
) -> dict[str, float]:
    """KL(m||b), KL(b||m) and the Jensen-Shannon divergence between a target distribution m and a
    generated one b, in **nats** (natural log).

    ``target`` maps titles to counts or probabilities (normalised here). ``generated`` is either a
    mapping title -> count (the empirical distribution of sampled titles), a mapping title ->
    probability (exact scoring of every item, the paper's "exact alternative"), or simply the
    list of sampled titles. Both are normalised, so counts and probabilities are handled alike.

    Support and smoothing: the support is every target title plus every generated title with
    positive mass. A title with no mass in b (never generated) gets ``EPS`` =
    ``np.finfo(float).eps``; symmetrically, a generated title outside the target gets ``EPS`` in
    m (so KL(b||m) charges about ln(1/EPS) = 36 nats per unit of such mass, instead of being
    infinite or silently ignoring it). Each distribution is renormalised after smoothing, and all
    three divergences use the same smoothed pair. ``JS = (KL(m||M) + KL(b||M)) / 2`` with the
    mixture ``M = (m + b) / 2``; it is symmetric and at most ln 2.

    Returns ``{"KL_m_b", "KL_b_m", "JS", "generated_outside_target": float, "support": int}``,
    ``generated_outside_target`` being the share of b's (unsmoothed) mass on titles outside the
    target.
    """
    b_masses = _as_masses(generated, "generated")
    m_masses = _as_masses(target, "target")
    support = list(m_masses) + [t for t, mass in b_masses.items() if mass > 0 and t not in m_masses]
    m = np.array([m_masses.get(title, 0.0) for title in support], dtype=np.float64)
    b = np.array([b_masses.get(title, 0.0) for title in support], dtype=np.float64)
    m /= m.sum()
    b /= b.sum()
    outside = float(b[len(m_masses) :].sum())
    m = np.where(m > 0, m, EPS)
    b = np.where(b > 0, b, EPS)
    m /= m.sum()
    b /= b.sum()
    mixture = (m + b) / 2
    return {
        "KL_m_b": _kl(m, b),
        "KL_b_m": _kl(b, m),
        "JS": min((_kl(m, mixture) + _kl(b, mixture)) / 2, math.log(2)),
        "generated_outside_target": outside,
        "support": len(support),
    }


# ---------------------------------------------------------------------------------------------
# everything at once, and the report


def evaluate_recommendations(
    recommendations: Recommendations,
    targets: Sequence[str],
    groups: Groups,
    group_shares: Sequence[float],
    catalog_titles: Iterable[str] | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    target_distribution: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Every metric of a run as one flat, JSON-serialisable dict (plain floats, ints, lists).

    Keys: ``num_samples``, ``num_recommended``, ``HR@K`` / ``NDCG@K`` for each K
    (:func:`ranking_metrics`), ``GH``, ``GP``, ``GU``, ``GP_outside``, ``DGU``, ``MGU``
    (:func:`popularity_fairness`), ``word_entropy``, ``type_token_ratio``, ``distinct_titles``
    and, given ``catalog_titles``, ``invalid_outputs`` (:func:`diversity`). Given
    ``target_distribution`` (e.g. the training popularity counts), also ``KL_m_b``, ``KL_b_m``,
    ``JS`` and ``generated_outside_target`` between it (m) and the pooled recommended titles (b)
    (:func:`distribution_fit`; raises ValueError if nothing was recommended).
    """
    lists = _check_recommendations(recommendations)
    result: dict[str, Any] = {"num_samples": len(lists)}
    result.update(ranking_metrics(lists, targets, ks))
    fairness = popularity_fairness(lists, groups, group_shares)
    result["num_recommended"] = fairness.pop("num_recommended")
    result.update(fairness)
    result.update(diversity(lists, catalog_titles))
    if target_distribution is not None:
        fit = distribution_fit(_pooled(lists), target_distribution)
        fit.pop("support")
        result.update(fit)
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(metrics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``metrics`` as indented UTF-8 JSON, atomically (:func:`atomic_write_bytes`).

    NumPy scalars and arrays are converted; NaN or infinity raise ValueError, so the file is
    always strict JSON. Returns the path.
    """
    text = json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))
