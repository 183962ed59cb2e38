"""``flower-rec rq1``: the paper's distribution-fitting experiment (RQ1) on the movie set.

No user history: every prompt is the same, and a recommender should produce the movies in
proportion to a target distribution m (``select_<size>_Movies.json``, counts over
``Movies_<size>_title.txt``). The published SFT baseline reads ``train_<size>.json`` only for its
number of records: each record becomes the fixed prompt followed by a title drawn from m (the
file's own outputs are MovieLens titles with years, almost none of them in the catalog), and it
is evaluated on one title sampled per record of ``test_<size>.json``. We do the same, with the
draws seeded (``data_seed``), and train:

- ``sft`` on those draws, i.e. maximum likelihood of a finite sample of m;
- each Flower variant (:mod:`flower_rec.variants`) with m's counts as the popularity reward
  (``reward="logp"``, ``reward_counts``), which it can fit exactly.

Every run follows the paper's protocol: up to ``epochs`` epochs, the combined validation loss
every epoch, early stopping with patience ``patience`` and the best checkpoint kept. Each model
is then judged two ways against m: by one sampled title per test record (the paper's:
KL(m||b), KL(b||m), JS of the sampled counts b) and by exact scoring of every title's
probability through the trie (no sampling noise: the ``_exact`` keys).

``run_rq1`` writes under ``out``: ``data/`` (the dataset and ``target_counts.json``),
``runs/<variant>/seed-<s>/`` (each training run and its ``rq1.json``), ``report.json`` (whose
``results`` maps each variant to the mean and sd over seeds of every divergence, and the
per-seed values), ``table.md`` and ``rq1.png`` (generated vs target share by the target's title
rank). Finished runs are skipped and interrupted ones resume, so the command can be run again
until it completes.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config_checks import BOOLEAN, COUNT, PATH, SEED, Rule, first_problem
from .data import Dataset, DatasetError, Sample, save_dataset
from .files import atomic_open, read_json
from .metrics import distribution_fit, write_report
from .variants import variant_options

__all__ = ["RQ1Config", "RQ1Data", "format_rq1_table", "load_rq1", "rq1_dataset", "run_rq1"]

DOMAIN = "movies"
DEFAULT_VARIANTS = ("sft", "subtb", "subtb-masked-conservative", "subtb-masked-conservative-mixed",
                    "flow-matching-0.5")
DIVERGENCES = ("KL_m_b", "KL_b_m", "JS", "KL_m_b_exact", "KL_b_m_exact", "JS_exact")


@dataclass
class RQ1Data:
    """The movie distribution-fitting set: the catalog, the target counts and the number of
    training and test records."""

    titles: list[str]
    target_counts: dict[str, float]
    num_train: int
    num_test: int

    @property
    def target_shares(self) -> list[float]:
        """m over ``titles``, in catalog order."""
        total = math.fsum(self.target_counts.values())
        return [self.target_counts[t] / total for t in self.titles]


def _records(path: Path) -> int:
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise DatasetError("expected a non-empty JSON list of records", path)
    return len(records)


def load_rq1(data: str | Path, size: int = 100) -> RQ1Data:
    """Reads ``Movies/Movies_<size>_title.txt``, ``Movies/select_<size>_Movies.json`` and the
    record counts of ``base_line_data/{train,test}_<size>.json`` under ``data``."""
    root = Path(data)
    paths = {
        "titles": root / "Movies" / f"Movies_{size}_title.txt",
        "target": root / "Movies" / f"select_{size}_Movies.json",
        "train": root / "base_line_data" / f"train_{size}.json",
        "test": root / "base_line_data" / f"test_{size}.json",
    }
    missing = [str(path.relative_to(root)) for path in paths.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"the RQ1 set of size {size} lacks {', '.join(missing)}", root)
    titles = [line.strip() for line in paths["titles"].read_text(encoding="utf-8").splitlines()]
    titles = [title for title in titles if title]
    if len(set(titles)) != len(titles):
        raise DatasetError("the catalog repeats a title", paths["titles"])
    counts = read_json(paths["target"])
    if not isinstance(counts, dict):
        raise DatasetError("expected a JSON object {title: count}", paths["target"])
    unknown = sorted(set(counts) - set(titles))
    if unknown or set(titles) - set(counts):
        raise DatasetError(
            f"the target and the catalog differ (e.g. {(unknown or sorted(set(titles) - set(counts)))[0]!r})",
            paths["target"],
        )
    for title, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not (
            math.isfinite(count) and count > 0
        ):
            raise DatasetError(f"{title!r} has count {count!r}; counts must be positive", paths["target"])
    return RQ1Data(titles, {t: float(c) for t, c in counts.items()}, _records(paths["train"]),
                   _records(paths["test"]))


def rq1_dataset(rq1: RQ1Data, seed: int = 0) -> Dataset:
    """The RQ1 set as a :class:`~flower_rec.data.Dataset`: empty histories, targets drawn from
    m (``num_train`` training, and ``num_test`` validation and test samples), seeded."""
    shares = rq1.target_shares
    draw = random.Random(seed)

    def samples(count: int) -> list[Sample]:
        items = draw.choices(range(len(rq1.titles)), weights=shares, k=count)
        return [Sample(history=(), target=item) for item in items]

    return Dataset("Movies_RQ1", list(rq1.titles), samples(rq1.num_train),
                   samples(rq1.num_test), samples(rq1.num_test))


@dataclass
class RQ1Config:
    """Settings of :func:`run_rq1` (see the module docstring).

    Args:
        data: the Movies_RQ1 folder (Movies/ and base_line_data/).
        out: output folder.
        size: the target set: 100, or 1500 where its files exist.
        variants: training variants (:data:`flower_rec.variants.TRAINING_VARIANTS`).
        seeds: training seeds.
        data_seed: seed of the titles drawn from m.
        epochs: most epochs.
        patience: early-stopping patience in epochs.
        batch_size: samples per step.
        valid_limit: validation samples per evaluation.
        progress: progress bars.
    """

    data: str
    out: str
    size: int = 100
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    epochs: int = 7
    patience: int = 2
    batch_size: int = 16
    valid_limit: int = 500
    progress: bool = True

    def validate(self) -> None:
        problem = first_problem({name: getattr(self, name) for name in RQ1_RULES}, RQ1_RULES)
        if problem:
            raise ValueError(problem)
        for name in self.variants:
            variant_options(name)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if len(set(self.variants)) != len(self.variants) or not self.variants:
            raise ValueError(f"variants must be distinct and at least one, got {self.variants}")


RQ1_RULES: dict[str, Rule] = {
    "data": PATH,
    "out": PATH,
    "size": COUNT,
    "seeds": Rule("be a list of seeds", lambda v: isinstance(v, list) and all(SEED.accepts(s) for s in v)),
    "data_seed": SEED,
    "epochs": COUNT,
    "patience": COUNT,
    "batch_size": COUNT,
    "valid_limit": COUNT,
    "progress": BOOLEAN,
}


def _train_run(config: RQ1Config, variant: str, seed: int, data: Path, counts: Path,
               run: Path, num_train: int) -> None:
    from .training import DataArguments, FlowerConfig, epoch_protocol, is_trained, train

    if is_trained(run):
        return
    protocol = epoch_protocol(num_train, config.batch_size, config.patience, config.valid_limit)
    train(FlowerConfig(
        output_dir=run, domain=DOMAIN, reward="logp", reward_counts=str(counts),
        num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, **protocol,
        logging_steps=max(1, protocol["eval_steps"] // 10), seed=seed,
        resume=(run / "train_config.json").is_file(), disable_tqdm=not config.progress,
        **variant_options(variant),
    ), DataArguments(data=data))


def _evaluate_run(rq1: RQ1Data, run: Path, seed: int) -> dict:
    """The divergences of the run's model from m: sampled (one title per test record) and exact
    (every title's trie-constrained probability); with the best epoch and the shares."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .decoding import Catalog, TrieDecoder
    from .prompts import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    prompt = build_prompt([], DOMAIN)
    catalog = Catalog.from_titles(rq1.titles, tokenizer, prompt)
    decoder = TrieDecoder(model, tokenizer, catalog, progress=False)
    sampled = decoder.sample([prompt], num_samples=rq1.num_test, seed=seed)[0]
    exact = decoder.exact_item_log_probs([prompt], normalize="trie").double().exp()[0]
    exact_shares = {title: float(p) for title, p in zip(rq1.titles, exact)}
    sampled_fit = distribution_fit(sampled, rq1.target_counts)
    exact_fit = distribution_fit(exact_shares, rq1.target_counts)
    counts = Counter(sampled)
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    evaluations = [json.loads(line) for line in lines if '"eval_loss"' in line]
    best = min(evaluations, key=lambda record: record["eval_loss"]) if evaluations else None
    return {
        **{name: sampled_fit[name] for name in ("KL_m_b", "KL_b_m", "JS")},
        **{f"{name}_exact": exact_fit[name] for name in ("KL_m_b", "KL_b_m", "JS")},
        "distinct_sampled": len(counts),
        "best_epoch": None if best is None else best.get("epoch"),
        "epochs_run": evaluations[-1].get("epoch") if evaluations else None,
        "sampled_shares": [counts.get(t, 0) / len(sampled) for t in rq1.titles],
        "exact_shares": [exact_shares[t] for t in rq1.titles],
    }


def sampling_floor(rq1: RQ1Data, repeats: int = 300, seed: int = 0) -> dict[str, float]:
    """What the sampled divergences of a *perfect* model are: ``num_test`` titles drawn from m
    itself, ``repeats`` times; mean and sd of each divergence. A sampled KL(m||b) near this
    floor says nothing about the model; the exact keys have no such floor."""
    import numpy as np

    shares = np.array(rq1.target_shares)
    draw = np.random.default_rng(seed)
    values: dict[str, list[float]] = {"KL_m_b": [], "KL_b_m": [], "JS": []}
    for _ in range(repeats):
        counts = draw.multinomial(rq1.num_test, shares)
        fit = distribution_fit(dict(zip(rq1.titles, counts.tolist())), rq1.target_counts)
        for name in values:
            values[name].append(fit[name])
    return {**{name: statistics.fmean(v) for name, v in values.items()},
            **{f"{name}_sd": statistics.stdev(v) for name, v in values.items()},
            "repeats": repeats}


def _summary(per_seed: list[dict]) -> dict:
    summary = {}
    for name in DIVERGENCES:
        values = [result[name] for result in per_seed]
        summary[name] = statistics.fmean(values)
        summary[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    summary["seeds"] = len(per_seed)
    return summary


def run_rq1(config: RQ1Config) -> dict:
    """Trains and judges every variant for every seed (see the module docstring); returns the
    report, also written to ``out/report.json``."""
    config.validate()
    started = time.perf_counter()
    out = Path(config.out)
    rq1 = load_rq1(config.data, config.size)
    data = out / "data"
    counts_path = data / "target_counts.json"
    if not counts_path.is_file():
        save_dataset(rq1_dataset(rq1, config.data_seed), data)
        with atomic_open(counts_path, "w", encoding="utf-8") as handle:
            json.dump(rq1.target_counts, handle)

    results: dict[str, dict] = {}
    per_seed: dict[str, dict[str, dict]] = {}
    for variant in config.variants:
        per_seed[variant] = {}
        for seed in config.seeds:
            run = out / "runs" / variant / f"seed-{seed}"
            path = run / "rq1.json"
            if not path.is_file():
                _train_run(config, variant, seed, data, counts_path, run, rq1.num_train)
                write_report(_evaluate_run(rq1, run, seed), path)
            per_seed[variant][str(seed)] = read_json(path)
        results[variant] = _summary(list(per_seed[variant].values()))

    report = {
        "config": asdict(config),
        "target": {"titles": rq1.titles, "shares": rq1.target_shares},
        "results": results,
        "sampling_floor": sampling_floor(rq1),
        "per_seed": {v: {s: {k: r[k] for k in (*DIVERGENCES, "distinct_sampled", "best_epoch",
                                                 "epochs_run")}
                         for s, r in runs.items()} for v, runs in per_seed.items()},
        "seconds": time.perf_counter() - started,
    }
    report["table"] = format_rq1_table(report)
    write_report(report, out / "report.json")
    with atomic_open(out / "table.md", "w", encoding="utf-8") as handle:
        handle.write(report["table"] + "\n")
    _plot(rq1, per_seed, out / "rq1.png")
    return report


def _plot(rq1: RQ1Data, per_seed: dict[str, dict[str, dict]], path: Path) -> None:
    from .plots import plot_distribution_fit

    order = sorted(range(len(rq1.titles)), key=lambda i: -rq1.target_shares[i])
    target = [rq1.target_shares[i] for i in order]
    generated = {
        variant: [statistics.fmean(r["exact_shares"][i] for r in runs.values()) for i in order]
        for variant, runs in per_seed.items()
    }
    plot_distribution_fit(target, generated, path,
                          title=f"RQ1: exact generated share vs target ({len(rq1.titles)} movies)")


def format_rq1_table(report: dict) -> str:
    """The report's results as a markdown table: mean ± sd over seeds of each divergence, and
    the sampled divergences of a perfect model (the sampling floor) as the last row."""
    names = ("KL_m_b", "KL_m_b_exact", "KL_b_m", "KL_b_m_exact", "JS", "JS_exact")
    lines = ["| variant | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for variant, result in report["results"].items():
        cells = [f"{result[n]:.4f} ± {result[n + '_sd']:.4f}" for n in names]
        lines.append(f"| {variant} | {result['seeds']} | " + " | ".join(cells) + " |")
    floor = report.get("sampling_floor")
    if floor is not None:
        cells = [f"{floor[n]:.4f} ± {floor[n + '_sd']:.4f}" if n in floor else "0" for n in names]
        lines.append(f"| m itself, sampled ({floor['repeats']} draws) | - | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
