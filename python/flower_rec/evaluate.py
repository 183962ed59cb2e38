"""Evaluating a recommender on a split: decode top-K lists for every sample, then every metric of
the paper (docs/method.md section 4) against the training popularity groups."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .data import Dataset, popularity_counts, popularity_groups
from .decoding import Catalog, TrieDecoder
from .files import atomic_open
from .metrics import evaluate_recommendations, group_shares, write_report
from .prompts import build_prompt, sample_prompts

DecodingMode = Literal["beam", "sampled-top-k", "sample"]
DECODING_MODES: tuple[DecodingMode, ...] = ("beam", "sampled-top-k", "sample")


@dataclass
class Evaluation:
    """Metrics of one run and the lists they were computed from."""

    metrics: dict
    recommendations: list[list[str]]
    targets: list[str]


def popularity_reference(dataset: Dataset) -> tuple[list[list[str]], list[float]]:
    """The 8 training popularity groups (most popular first) and their shares GH."""
    counts = popularity_counts(dataset, "history")
    groups = popularity_groups(counts, 8)
    return groups, group_shares(counts, groups)


def recommend(
    decoder: TrieDecoder,
    dataset: Dataset,
    split: str = "test",
    mode: DecodingMode = "beam",
    k: int = 10,
    domain: str = "items",
    limit: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    max_prompt_tokens: int | None = None,
) -> tuple[list[list[str]], list[str]]:
    """``k`` titles for each sample of ``split`` (the first ``limit`` samples when given) and
    the target titles. ``beam`` is beam search with ``k`` beams (mode-seeking, ranked);
    ``sampled-top-k`` draws ``k`` distinct items without replacement from the model's
    trie-constrained distribution (recommends in proportion to what the model learned);
    ``sample`` draws ``k`` independent samples at ``temperature`` (distribution fitting).
    ``max_prompt_tokens``: the prompt cutoff of training (oldest history titles dropped)."""
    samples = dataset.split(split)[:limit]
    titles = dataset.titles
    prompts = sample_prompts(decoder.tokenizer, titles, samples, max_prompt_tokens, domain)
    if mode == "beam":
        recommendations = decoder.beam_search(prompts, num_beams=k)
    elif mode == "sampled-top-k":
        recommendations = decoder.sampled_top_k(prompts, k=k, temperature=temperature, seed=seed)
    elif mode == "sample":
        recommendations = decoder.sample(
            prompts, num_samples=k, temperature=temperature, seed=seed
        )
    else:
        raise ValueError(f"unknown decoding mode {mode!r}; choose one of {DECODING_MODES}")
    return recommendations, [titles[s.target] for s in samples]


def evaluate(
    model,
    tokenizer,
    dataset: Dataset,
    split: str = "test",
    mode: DecodingMode = "beam",
    k: int = 10,
    domain: str = "items",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    temperature: float = 1.0,
    target_distribution: Mapping[str, float] | None = None,
    progress: bool = True,
    max_prompt_tokens: int | None = None,
) -> Evaluation:
    """Decodes ``split`` with ``model`` constrained to the catalog and computes every metric;
    with ``target_distribution`` ({title: count or probability}) also KL(m||b), KL(b||m) and
    JS of the recommended titles against it. ``max_prompt_tokens``: the prompt cutoff the model
    was trained with (:func:`flower_rec.prompts.fit_prompts`)."""
    catalog = Catalog.from_titles(dataset.titles, tokenizer, build_prompt([], domain))
    decoder = TrieDecoder(model, tokenizer, catalog, batch_size=batch_size, progress=progress)
    recommendations, targets = recommend(
        decoder, dataset, split, mode, k, domain, limit, seed, temperature, max_prompt_tokens
    )
    groups, shares = popularity_reference(dataset)
    metrics = evaluate_recommendations(
        recommendations, targets, groups, shares, catalog_titles=dataset.titles,
        target_distribution=target_distribution,
    )
    return Evaluation(metrics, recommendations, targets)


def write_evaluation(evaluation: Evaluation, out: str | Path, label: str, config: dict) -> Path:
    """Writes ``metrics.json`` (metrics and the run's configuration), ``recommendations.jsonl``
    (one line per sample: target and ranked list) and ``groups.png`` (recommendation share vs
    training share per popularity group) into ``out``. Returns the metrics path."""
    from .plots import plot_group_shares

    out = Path(out)
    metrics_path = write_report({"config": config, "metrics": evaluation.metrics}, out / "metrics.json")
    with atomic_open(out / "recommendations.jsonl", "w", encoding="utf-8") as handle:
        for target, ranked in zip(evaluation.targets, evaluation.recommendations, strict=True):
            handle.write(json.dumps({"target": target, "recommended": ranked}, ensure_ascii=False))
            handle.write("\n")
    plot_group_shares(
        evaluation.metrics["GH"],
        {label: evaluation.metrics["GP"]},
        out / "groups.png",
        title=f"Recommendation share per popularity group ({label})",
    )
    return metrics_path
