"""Evaluating a recommender on a split: decode top-K lists for every sample, then every metric of
the paper (docs/method.md section 4) against the training popularity groups; optionally with flow
guidance (:mod:`flower_rec.decoding.guidance`), set by hand or chosen on the valid split
(:mod:`flower_rec.guidance_selection`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .config_checks import COUNT, SEED, Rule, first_problem, number, one_of, optional
from .data import SPLITS, Dataset, popularity_counts, popularity_groups
from .decoding import GUIDANCE_FORMS, Catalog, Guidance, TrieDecoder
from .files import atomic_open
from .guidance_selection import GuidanceSelection, select_guidance
from .metrics import evaluate_recommendations, group_shares, write_report
from .prompts import DOMAINS, build_prompt, sample_prompts
from .rewards import PopularityRewards

DecodingMode = Literal["beam", "sampled-top-k", "sample"]
DECODING_MODES: tuple[DecodingMode, ...] = ("beam", "sampled-top-k", "sample")


#: What each option of :func:`evaluate` must be, checked before any decoding.
EVALUATE_RULES: dict[str, Rule] = {
    "split": one_of(SPLITS),
    "domain": one_of(sorted(DOMAINS)),
    "k": COUNT,
    "limit": optional(COUNT),
    "batch_size": COUNT,
    "seed": SEED,
    "temperature": number(0, above=True, must="be a positive number"),
    "max_prompt_tokens": optional(COUNT),
    "guidance_users": optional(COUNT),
    "mode": one_of(DECODING_MODES),
}


@dataclass
class Evaluation:
    """Metrics of one run and the lists they were computed from."""

    metrics: dict
    recommendations: list[list[str]]
    targets: list[str]
    selection: GuidanceSelection | None = None


def popularity_prior(dataset: Dataset) -> Tensor:
    """The default guidance prior: ``log(R(i) / Z)`` of the training popularity (history
    counts, unseen titles at the floor count, duplicate titles sharing their reward), ``[I]``
    float64."""
    rewards = PopularityRewards.from_dataset(dataset)
    return rewards.item_log_rewards("logp", dtype=torch.float64)


def resolve_guidance(guidance: str | float | None, form: str = "normalized") -> tuple:
    """``(auto, beta, form)`` of an evaluation's guidance option: ``"auto"``, a number (0 or
    None: off) as a number or as text, and its form. Raises ``ValueError`` naming the option."""
    if form not in GUIDANCE_FORMS:
        raise ValueError(f"guidance form must be one of {GUIDANCE_FORMS}, got {form!r}")
    if guidance is None or guidance == "auto":
        return guidance == "auto", 0.0, form
    try:
        beta = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be 'auto' or a number (beta), got {guidance!r}") from None
    if isinstance(guidance, bool) or beta != beta or beta in (float("inf"), float("-inf")):
        raise ValueError(f"guidance must be 'auto' or a finite number (beta), got {guidance!r}")
    return False, beta, form


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
    guidance: Guidance | None = None,
) -> tuple[list[list[str]], list[str]]:
    """``k`` titles for each sample of ``split`` (the first ``limit`` samples when given) and
    the target titles. ``beam`` is beam search with ``k`` beams (mode-seeking, ranked);
    ``sampled-top-k`` draws ``k`` distinct items without replacement from the model's
    trie-constrained distribution (recommends in proportion to what the model learned);
    ``sample`` draws ``k`` independent samples at ``temperature`` (distribution fitting).
    ``max_prompt_tokens``: the prompt cutoff of training (oldest history titles dropped).
    ``guidance``: flow guidance for every mode (the prior's rows, if per sample, follow the
    samples)."""
    samples = dataset.split(split)[:limit]
    titles = dataset.titles
    prompts = sample_prompts(decoder.tokenizer, titles, samples, max_prompt_tokens, domain)
    if mode == "beam":
        recommendations = decoder.beam_search(prompts, num_beams=k, guidance=guidance)
    elif mode == "sampled-top-k":
        recommendations = decoder.sampled_top_k(
            prompts, k=k, temperature=temperature, seed=seed, guidance=guidance
        )
    elif mode == "sample":
        recommendations = decoder.sample(
            prompts, num_samples=k, temperature=temperature, seed=seed, guidance=guidance
        )
    else:
        raise ValueError(f"unknown decoding mode {mode!r}; choose one of {DECODING_MODES}")
    return recommendations, [titles[s.target] for s in samples]


def check_options(
    *, guidance: str | float | None, guidance_form: str, **options: Any
) -> tuple:
    """Raises ValueError naming the first option of :func:`evaluate` that breaks its rule
    (``options``: one value per name of :data:`EVALUATE_RULES`); returns the guidance setting
    (:func:`resolve_guidance`). The command line calls it before it loads anything."""
    problem = first_problem(options, EVALUATE_RULES)
    if problem:
        raise ValueError(problem)
    auto, beta, form = resolve_guidance(guidance, guidance_form)
    if auto and options["mode"] != "beam":
        raise ValueError(
            f"guidance 'auto' chooses beta for beam search; give {options['mode']!r} a number "
            "instead"
        )
    return auto, beta, form


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
    guidance: str | float | None = None,
    guidance_form: str = "normalized",
    guidance_prior: Tensor | None = None,
    guidance_users: int | None = 1000,
) -> Evaluation:
    """Decodes ``split`` with ``model`` constrained to the catalog and computes every metric
    (:class:`Evaluation`; the metrics record the guidance setting under ``"guidance"``).

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        dataset: the dataset whose catalog and split are decoded.
        split: the split to decode and score.
        mode: beam search (``k`` beams) or sampled top-K (``k`` distinct items drawn without
            replacement from the trie-constrained distribution).
        k: list length (beams).
        domain: wording of the prompt (as in training).
        limit: decode the first this many samples only; None: all of them.
        batch_size: prompts per batch.
        seed: seed of sampled decoding.
        temperature: temperature of sampled decoding.
        target_distribution: ``{title: count or probability}`` to compare the recommended titles
            with (KL(m||b), KL(b||m), JS).
        progress: a progress bar.
        max_prompt_tokens: the prompt cutoff the model was trained with: longer prompts drop
            their oldest history titles (:func:`flower_rec.prompts.fit_prompts`).
        guidance: flow guidance: each item's score gets -beta x log(R(i)/Z) under the prior;
            None or 0 turns it off; a number is beta, in ``guidance_form``; ``"auto"`` (beam
            search) chooses beta and the form on ``guidance_users`` valid samples, the lowest
            DGU at NDCG@10 >= 0.95x unguided (:func:`~flower_rec.guidance_selection.select_guidance`),
            and keeps the whole curve in :attr:`Evaluation.selection`.
        guidance_form: beam search: ``normalized`` divides the guidance by the length with the
            model term, ``item`` adds it once per item.
        guidance_prior: the prior, ``[I]`` item log-prior or ``[samples, I]`` one row per
            evaluated sample; None: the training popularity (:func:`popularity_prior`).
        guidance_users: valid samples (a seeded subset) the ``"auto"`` selection uses.
    """
    auto, beta, form = check_options(
        split=split, domain=domain, mode=mode, k=k, limit=limit, batch_size=batch_size, seed=seed, temperature=temperature,
        max_prompt_tokens=max_prompt_tokens, guidance=guidance, guidance_form=guidance_form,
        guidance_users=guidance_users,
    )
    catalog = Catalog.from_titles(dataset.titles, tokenizer, build_prompt([], domain))
    decoder = TrieDecoder(model, tokenizer, catalog, batch_size=batch_size, progress=progress)
    popularity = popularity_reference(dataset)
    prior = popularity_prior(dataset) if guidance_prior is None else guidance_prior
    selection = None
    if auto:
        if prior.dim() != 1:
            raise ValueError("guidance 'auto' needs a shared [num_items] prior")
        selection = select_guidance(
            decoder, dataset, prior, popularity, users=guidance_users, seed=seed, k=k,
            domain=domain, max_prompt_tokens=max_prompt_tokens,
        )
        beta, form = selection.beta, selection.form
    guided = Guidance(prior, beta, form) if beta != 0 else None
    recommendations, targets = recommend(
        decoder, dataset, split, mode, k, domain, limit, seed, temperature, max_prompt_tokens,
        guided,
    )
    metrics = evaluate_recommendations(
        recommendations, targets, *popularity, catalog_titles=dataset.titles,
        target_distribution=target_distribution,
    )
    metrics["guidance"] = {
        "beta": beta,
        "form": form,
        "prior": "popularity" if guidance_prior is None else "given",
        "selection": None if selection is None else selection.to_dict(),
    }
    return Evaluation(metrics, recommendations, targets, selection)


def write_evaluation(evaluation: Evaluation, out: str | Path, label: str, config: dict) -> Path:
    """Writes ``metrics.json`` (metrics and the run's configuration), ``recommendations.jsonl``
    (one line per sample: target and ranked list), ``groups.png`` (recommendation share vs
    training share per popularity group) and, when the guidance was chosen on valid,
    ``guidance.png`` (its accuracy / fairness curve) into ``out``. Returns the metrics path."""
    from .plots import plot_group_shares, plot_guidance_curve

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
    selection = evaluation.selection
    if selection is not None:
        plot_guidance_curve(
            selection.curve, selection.chosen, out / "guidance.png",
            title=f"Flow guidance on {selection.users} valid users ({label})",
            min_accuracy=selection.min_accuracy,
        )
    return metrics_path
