"""``flower-rec demo``: SFT and Flower side by side, on the embedded synthetic dataset or yours.

Prepares the synthetic default dataset (or reads the dataset folder given as ``data``), trains
the auxiliary SASRec (p_u for the personalised reward), fine-tunes the tiny default model with
SFT and with Flower (or the given variants), evaluates each on the test split with beam search,
flow-guided beam search (the guidance chosen on the valid split, :mod:`flower_rec.
guidance_selection`) and sampled top-K, and writes ``report.json``, ``groups.png``
(recommendation share vs training share per popularity group, every method and decoding) and
``guidance-<variant>.png`` (each model's accuracy / fairness curve over the guidance).

Every stage leaves its result in the output folder and is skipped when it is already there, and
an interrupted training run resumes from its last checkpoint, so running the demo again
continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import BOOLEAN, COUNT, PATH, SEED, Rule, first_problem, number, one_of, optional
from .data import load_dataset
from .evaluate import evaluate, popularity_reference, resolve_guidance
from .files import atomic_open
from .guidance_selection import GuidanceSelection
from .metrics import write_report
from .prompts import DOMAINS
from .rewards import REWARD_VARIANTS

COLUMNS = ("NDCG@10", "HR@10", "DGU", "MGU", "word_entropy", "type_token_ratio", "distinct_titles")
DECODINGS = ("beam", "guided-beam", "sampled-top-k")
#: The row every other row of the report is judged against.
BASELINE = "sft, beam"


@dataclass
class DemoConfig:
    """The demo's settings (``flower-rec demo``).

    Args:
        out: output folder.
        data: a dataset folder to use instead of the synthetic one (info/, train/, ...;
            :func:`flower_rec.data.load_dataset`).
        domain: wording of the prompts.
        quick: a smoke run of a minute or two (training and evaluation shrunk).
        seed: random seed of every stage: the synthetic data, the auxiliary model and the
            training of the two default variants.
        epochs: training epochs per method (the most epochs with ``early_stopping_patience``).
        theta: Flower's SFT weight.
        reward: Flower's item reward variant.
        eval_limit: evaluate the first N test samples only.
        guidance: flow guidance of the guided-beam rows: ``auto`` chooses beta and its form on
            the valid split (lowest DGU at NDCG@10 >= 0.95x unguided), or a beta.
        guidance_users: valid samples the guidance is chosen on.
        early_stopping_patience: the paper's protocol instead of a fixed budget: the validation
            loss every epoch, training stopped after this many epochs without improvement and
            the best epoch kept.
        valid_limit: valid samples of that validation loss.
    """

    out: str = "flower-demo"
    data: str | None = None
    domain: str = "items"
    quick: bool = False
    seed: int = 0
    epochs: float = 2.0
    theta: float = 0.9995
    reward: str = "logp_div_s"
    eval_limit: int | None = None
    guidance: str = "auto"
    guidance_users: int = 500
    early_stopping_patience: int | None = None
    valid_limit: int = 500

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad option, before any stage runs."""
        values = {name: getattr(self, name) for name in DEMO_RULES}
        problem = first_problem(values, DEMO_RULES)
        if problem:
            raise ValueError(problem)
        resolve_guidance(self.guidance)

    @property
    def max_steps(self) -> int:
        return 60 if self.quick else -1

    @property
    def limit(self) -> int | None:
        return 200 if self.quick and self.eval_limit is None else self.eval_limit

    def default_variants(self) -> list[Variant]:
        flower = {"method": "flower", "theta": self.theta, "reward": self.reward}
        return [Variant("sft", seed=self.seed), Variant("flower", flower, seed=self.seed)]


#: What each option of :class:`DemoConfig` must be.
DEMO_RULES: dict[str, Rule] = {
    "out": PATH,
    "data": optional(PATH),
    "domain": one_of(sorted(DOMAINS)),
    "quick": BOOLEAN,
    "seed": SEED,
    "epochs": number(0, above=True, must="be a positive number"),
    "theta": number(0, 1, must="lie in [0, 1]"),
    "reward": one_of(REWARD_VARIANTS),
    "eval_limit": optional(COUNT),
    "guidance_users": COUNT,
    "early_stopping_patience": optional(COUNT),
    "valid_limit": COUNT,
}


@dataclass(frozen=True)
class Variant:
    """One fine-tuned model of a comparison; ``name`` is its run folder and its table label,
    ``options`` its :class:`~flower_rec.training.FlowerConfig` options (e.g. a named variant's,
    :func:`flower_rec.variants.variant_options`); the demo's settings fill in the rest."""

    name: str
    options: Mapping[str, Any] = field(default_factory=lambda: {"method": "sft"})
    seed: int = 0

    @property
    def personalised(self) -> bool:
        """Whether the variant's reward needs p_u (FlowerConfig's default reward does)."""
        from .training import FlowerConfig

        return self.options.get("method") == "flower" and \
            self.options.get("reward", FlowerConfig.reward) != "logp"


def _train_aux(data: Path, out: Path, config: DemoConfig):
    from .auxiliary import load_sasrec, save_sasrec, train_sasrec

    if (out / "model.safetensors").is_file():
        return load_sasrec(out)
    model, report = train_sasrec(
        load_dataset(data), seed=config.seed, epochs=5 if config.quick else 200
    )
    save_sasrec(model, out)
    with atomic_open(out / "report.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return model


def _train_variant(
    variant: Variant, data: Path, num_train: int, run: Path, config: DemoConfig, probabilities
) -> float:
    """Trains one variant (on ``data``, ``num_train`` training samples) unless its run is
    complete; returns the training seconds of the run (read back from its metrics when it was
    trained before)."""
    from .training import DataArguments, FlowerConfig, epoch_protocol, is_trained, train

    if not is_trained(run):
        protocol: dict[str, Any] = {"save_steps": 200}
        valid_probabilities = None
        if config.early_stopping_patience is not None:
            protocol = epoch_protocol(
                num_train, variant.options.get("per_device_train_batch_size",
                                               FlowerConfig.per_device_train_batch_size),
                config.early_stopping_patience, config.valid_limit,
            )
            if variant.personalised:
                valid_probabilities = probabilities["valid"]
        train(
            FlowerConfig(
                output_dir=run, domain=config.domain, num_train_epochs=config.epochs,
                max_steps=config.max_steps, seed=variant.seed, resume=run.exists(),
                **protocol, **variant.options,
            ),
            DataArguments(data=data),
            aux_probabilities=probabilities["train"] if variant.personalised else None,
            valid_aux_probabilities=valid_probabilities,
        )
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    runtimes = [json.loads(line)["train_runtime"] for line in lines if "train_runtime" in line]
    return float(sum(runtimes))


def evaluation_path(run: Path, decoding: str) -> Path:
    """Where a run's metrics with ``decoding`` are kept (a rerun reuses them)."""
    return Path(run) / f"evaluation-{decoding}.json"


def is_finished(run: Path) -> bool:
    """Whether a run folder holds its final model and its metrics under every decoding."""
    from .training import is_trained

    return is_trained(run) and all(evaluation_path(run, d).is_file() for d in DECODINGS)


def _evaluate_run(run: Path, dataset, decoding: str, config: DemoConfig) -> dict:
    """The run's metrics with ``decoding``, kept in the run folder so a rerun reuses them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    guided = decoding == "guided-beam"
    setting = {"decoding": decoding, "domain": config.domain, "limit": config.limit,
               "seed": config.seed}
    if guided:
        setting.update(guidance=config.guidance, guidance_users=config.guidance_users)
    path = evaluation_path(run, decoding)
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["setting"] == setting:
            return saved["metrics"]
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    metrics = evaluate(
        model, tokenizer, dataset, mode="beam" if guided else decoding, domain=config.domain,
        limit=config.limit, seed=config.seed, guidance=config.guidance if guided else None,
        guidance_users=config.guidance_users,
    ).metrics
    write_report({"setting": setting, "metrics": metrics}, path)
    return metrics


def _plot_guidance(metrics: dict, path: Path, title: str) -> None:
    from .plots import plot_guidance_curve

    selection = metrics["guidance"]["selection"]
    if selection is not None:
        selection = GuidanceSelection(**selection)
        plot_guidance_curve(selection.curve, selection.chosen, path, title=title,
                            min_accuracy=selection.min_accuracy)


def run_demo(config: DemoConfig, variants: list[Variant] | None = None) -> dict:
    """Trains and evaluates ``variants`` (default: SFT and Flower with the config's theta and
    reward) and returns the report (also written to ``report.json``)."""
    from .auxiliary import training_probabilities
    from .data import prepare_synthetic
    from .plots import plot_group_share_panels

    variants = config.default_variants() if variants is None else variants
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    config.validate()  # a bad option fails before any training
    out = Path(config.out)
    if config.data is not None:
        data = Path(config.data)
    else:
        data = out / "synthetic"
        if not (data / "info").is_dir():
            prepare_synthetic(data, seed=config.seed)
    dataset = load_dataset(data)
    aux = _train_aux(data, out / "aux", config)
    probabilities = {split: training_probabilities(aux, dataset, split)
                     for split in ("train", "valid")}

    rows: dict[str, dict] = {}
    for variant in variants:
        run = out / "runs" / variant.name
        seconds = _train_variant(variant, data, len(dataset.train), run, config, probabilities)
        for decoding in DECODINGS:
            metrics = _evaluate_run(run, dataset, decoding, config)
            rows[f"{variant.name}, {decoding}"] = {**metrics, "train_seconds": seconds}
        _plot_guidance(
            rows[f"{variant.name}, guided-beam"], out / f"guidance-{variant.name}.png",
            f"Flow guidance of {variant.name} ({dataset.name} valid split)",
        )

    _, shares = popularity_reference(dataset)
    report = {
        "config": asdict(config),
        "variants": [asdict(variant) for variant in variants],
        "GH": shares,
        "results": rows,
    }
    if BASELINE in rows:
        report["claim"] = claim_verdicts(rows)
    write_report(report, out / "report.json")
    plot_group_share_panels(
        shares,
        {decoding: {variant.name: rows[f"{variant.name}, {decoding}"]["GP"]
                    for variant in variants} for decoding in DECODINGS},
        out / "groups.png",
        title=f"Recommendation share per popularity group ({dataset.name} test split)",
    )
    return report


def format_table(report: dict) -> str:
    """The side-by-side table of the report, in markdown."""
    header = "| method, decoding | " + " | ".join(COLUMNS) + " | train s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, metrics in report["results"].items():
        values = [
            f"{metrics[name]:.0f}" if name == "distinct_titles" else f"{metrics[name]:.4f}"
            for name in COLUMNS
        ]
        lines.append(f"| {label} | " + " | ".join(values) + f" | {metrics['train_seconds']:.0f} |")
    return "\n".join(lines)


# How much better a fairness metric must be to count: about two standard deviations of three
# SFT seeds in docs/ablation.md (beam DGU 0.554 +- 0.030, MGU 0.104 +- 0.005, word entropy
# 4.77 +- 0.05); a smaller difference is no difference.
CLAIM_MARGINS = {"DGU": 0.10, "MGU": 0.10, "word_entropy": 0.02}


def claim_verdicts(results: dict, baseline: str = BASELINE) -> list[str]:
    """One line per row of ``results`` other than ``baseline``: does it meet the paper's claim
    against ``baseline`` (DGU and MGU lower, word entropy higher, each by more than
    :data:`CLAIM_MARGINS`; NDCG@10 at least 0.9x), and by which numbers."""
    theirs = results[baseline]
    lines = []
    for label, ours in results.items():
        if label == baseline:
            continue
        change = {
            name: ours[name] / theirs[name] - 1 if theirs[name] else 0.0 for name in CLAIM_MARGINS
        }
        checks = {
            f"DGU {CLAIM_MARGINS['DGU']:.0%} lower": change["DGU"] <= -CLAIM_MARGINS["DGU"],
            f"MGU {CLAIM_MARGINS['MGU']:.0%} lower": change["MGU"] <= -CLAIM_MARGINS["MGU"],
            f"entropy {CLAIM_MARGINS['word_entropy']:.0%} higher":
                change["word_entropy"] >= CLAIM_MARGINS["word_entropy"],
            "NDCG@10 >= 0.9x": ours["NDCG@10"] >= 0.9 * theirs["NDCG@10"],
        }
        failed = [name for name, passed in checks.items() if not passed]
        verdict = "met" if not failed else f"NOT met ({', '.join(failed)} failed)"
        lines.append(
            f"{label}: the claim against {baseline} is {verdict}: DGU {theirs['DGU']:.4f} -> "
            f"{ours['DGU']:.4f} ({change['DGU']:+.0%}), MGU {theirs['MGU']:.4f} -> "
            f"{ours['MGU']:.4f} ({change['MGU']:+.0%}), entropy {theirs['word_entropy']:.3f} -> "
            f"{ours['word_entropy']:.3f} ({change['word_entropy']:+.1%}), NDCG@10 "
            f"{ours['NDCG@10'] / theirs['NDCG@10']:.2f}x"
        )
    return lines


def main_demo(config: DemoConfig) -> int:
    started = time.perf_counter()
    report = run_demo(config)
    print(format_table(report))
    print("\n" + "\n".join(report.get("claim", [])))
    out = Path(config.out)
    print(f"\nwrote {out / 'report.json'} and {out / 'groups.png'} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0
