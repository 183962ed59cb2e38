"""Choosing the flow guidance of beam search on the validation split.

The sweep decodes a seeded subset of the valid samples with beam search's objective at every
guidance setting (beta x form, :mod:`flower_rec.decoding.guidance`) and keeps the fairest
setting, the lowest DGU, whose NDCG@10 is at least ``min_accuracy`` (0.95) times that of the
unguided list (beta = 0). Two ways to get the lists, whichever costs less:

- exact scoring: the model's log-probability of every item for every user, from one pass over
  the trie per user (:meth:`~flower_rec.decoding.TrieDecoder.exact_item_log_probs`); every
  setting is then a re-ranking, so the grid can be fine. A pass costs about one forward token
  per trie node.
- one guided beam search per setting (a coarser grid, at most 8 passes with the baseline): a
  pass costs about ``num_beams x depth`` forward tokens per user, far less than a catalog of
  thousands of titles has nodes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from torch import Tensor

from .data import Dataset
from .decoding import GUIDANCE_FORMS, Guidance, TrieDecoder, guided_beam_scores
from .metrics import evaluate_recommendations
from .prompts import sample_prompts

#: The beta grid when exact scoring serves the sweep (a re-ranking per point). Fine at the low
#: end: the ``item`` form adds the whole ``log(R / Z)`` to a per-token average, so its useful
#: betas are (mean tokens + 1) times smaller than the ``normalized`` form's.
EXACT_BETAS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 1.0, 5 / 4, 3 / 2)
#: The beta grid of one beam search per setting: with both forms and the baseline, 7 passes.
BEAM_BETAS = (0.25, 0.5, 1.0)
#: The metrics kept per point of the curve.
CURVE_METRICS = ("NDCG@10", "HR@10", "DGU", "MGU", "distinct_titles")

SweepMethod = Literal["auto", "exact", "beam"]


@dataclass
class GuidanceSelection:
    """The result of a sweep: the chosen setting, every point measured, and how."""

    beta: float
    form: str
    curve: list[dict] = field(default_factory=list)  # {"beta", "form", *CURVE_METRICS}
    method: str = "exact"
    users: int = 0
    seconds: float = 0.0
    min_accuracy: float = 0.95

    @property
    def baseline(self) -> dict:
        return next(point for point in self.curve if point["beta"] == 0)

    @property
    def chosen(self) -> dict:
        return next(
            point for point in self.curve
            if point["beta"] == self.beta and point["form"] in (self.form, "any")
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        base, best = self.baseline, self.chosen
        return (
            f"guidance chosen on {self.users} valid users ({self.method}, {self.seconds:.0f} s): "
            f"beta {self.beta:g} ({self.form}): NDCG@10 {best['NDCG@10']:.4f} "
            f"({best['NDCG@10'] / base['NDCG@10'] if base['NDCG@10'] else math.nan:.2f}x), "
            f"DGU {base['DGU']:.4f} -> {best['DGU']:.4f}"
        )


def choose(curve: list[dict], min_accuracy: float) -> dict:
    """The point of lowest DGU among those with NDCG@10 >= ``min_accuracy`` x the baseline's
    (beta = 0 qualifies by definition, so there is always one); ties go to the smaller beta."""
    baseline = next(point for point in curve if point["beta"] == 0)
    eligible = [p for p in curve if p["NDCG@10"] >= min_accuracy * baseline["NDCG@10"]]
    return min(eligible, key=lambda point: (point["DGU"], point["beta"]))


#: Trie nodes scored exactly per beam token, at equal time: the exact pass packs 512 nodes
#: per forward while beam search runs one token per beam and step (measured on the demo's
#: 1,590-node trie: one exact pass took as long as 5 ten-beam searches of depth 16).
EXACT_NODES_PER_BEAM_TOKEN = 2.0


def sweep_method(decoder: TrieDecoder, settings: int, num_beams: int) -> str:
    """``"exact"`` when one exact pass over the trie costs less than ``settings`` beam
    searches of ``num_beams`` beams (about ``num_beams x depth`` tokens each), else
    ``"beam"``."""
    trie = decoder.catalog.trie
    beam_tokens = settings * num_beams * trie.depth
    return "exact" if trie.num_nodes <= EXACT_NODES_PER_BEAM_TOKEN * beam_tokens else "beam"


def select_guidance(
    decoder: TrieDecoder,
    dataset: Dataset,
    log_prior: Tensor,
    popularity: tuple[list[list[str]], list[float]],
    *,
    split: str = "valid",
    users: int | None = 1000,
    seed: int = 0,
    k: int = 10,
    domain: str = "items",
    max_prompt_tokens: int | None = None,
    min_accuracy: float = 0.95,
    method: SweepMethod = "auto",
    betas: tuple[float, ...] | None = None,
) -> GuidanceSelection:
    """Sweeps the guidance of beam search (``k`` beams) on ``users`` samples of ``split``
    (a seeded subset; all when None or fewer) and returns the chosen setting with the curve.

    Args:
        log_prior: the item log-prior of the guidance (``[I]``, e.g. the training popularity).
        popularity: the popularity groups and their training shares, for DGU / MGU
            (:func:`flower_rec.evaluate.popularity_reference`).
        method: ``"exact"``, ``"beam"``, or ``"auto"`` (:func:`sweep_method`).
        betas: the grid (default :data:`EXACT_BETAS` or :data:`BEAM_BETAS`); beta = 0, the
            baseline, is always measured.
    """
    if method not in ("auto", "exact", "beam"):
        raise ValueError(f"method must be 'auto', 'exact' or 'beam', got {method!r}")
    if not 0 < min_accuracy <= 1:
        raise ValueError(f"min_accuracy must lie in (0, 1], got {min_accuracy}")
    if users is not None and users < 1:
        raise ValueError(f"users must be positive, got {users}")
    started = time.perf_counter()
    samples = list(dataset.split(split))
    if not samples:
        raise ValueError(f"the {split} split is empty: nothing to choose the guidance on")
    if users is not None and users < len(samples):
        samples = random.Random(seed).sample(samples, users)
    prompts = sample_prompts(decoder.tokenizer, dataset.titles, samples, max_prompt_tokens, domain)
    targets = [dataset.titles[s.target] for s in samples]
    if method == "auto":
        grid = (1 + len(BEAM_BETAS) * len(GUIDANCE_FORMS)) if betas is None else len(betas)
        method = sweep_method(decoder, grid, k)
    if betas is None:
        betas = EXACT_BETAS if method == "exact" else BEAM_BETAS
    betas = tuple(float(beta) for beta in betas if beta != 0)
    if any(not math.isfinite(beta) for beta in betas):
        raise ValueError(f"betas must be finite, got {betas}")
    settings = [(0.0, "any")] + [(beta, form) for form in GUIDANCE_FORMS for beta in betas]

    def measure(items: Tensor) -> dict:
        metrics = evaluate_recommendations(decoder.titles(items), targets, *popularity)
        return {name: metrics[name] for name in CURVE_METRICS}

    curve = []
    if method == "exact":
        model = decoder.exact_item_log_probs(prompts, normalize="model", include_eos=True)
        shares = decoder.item_log_shares(Guidance(log_prior, 0.0), len(prompts))
        for beta, form in settings:
            scores = guided_beam_scores(
                model, decoder.catalog.lengths, shares, beta, "normalized" if form == "any" else form
            )
            items, _ = decoder.top_k_of_scores(scores, k)
            curve.append({"beta": beta, "form": form, **measure(items)})
    else:
        for beta, form in settings:
            guidance = None if beta == 0 else Guidance(log_prior, beta, form)
            items, _ = decoder.beam_search_items(prompts, num_beams=k, guidance=guidance)
            curve.append({"beta": beta, "form": form, **measure(items)})
    best = choose(curve, min_accuracy)
    form = "normalized" if best["form"] == "any" else best["form"]
    return GuidanceSelection(
        best["beta"], form, curve, method, len(samples), time.perf_counter() - started,
        min_accuracy,
    )
