"""The pre-registered ablation of docs/ablation.md: does any training objective make lists fairer
than SFT beyond seed noise, at SFT's accuracy?

Trains each named variant (:mod:`flower_rec.variants`) with the tiny default model on the
default synthetic dataset (the demo's data, seed 0), popularity rewards (``logp``; a variant that
names its own reward keeps it), under the
paper's protocol (up to 7 epochs, the validation loss every epoch on 500 valid samples, early
stopping with patience 2, the best epoch kept), for each seed; decodes every model on the test
split with beam search, flow-guided beam search (chosen on the valid split) and sampled top-K;
prints one table per decoding (mean ± sd over the seeds done) and the decision rule's verdict.

Runs go seed by seed (every variant's first seed before any second seed), and everything lands
in ``--out`` (the demo's layout) with finished stages skipped, so the command can be rerun
until it completes: a session that ends mid-way loses at most the run in progress's last epoch.

    python scripts/ablation.py --out runs/ablation
    python scripts/ablation.py --out runs/ablation --variants sft subtb-masked --seeds 0

``--finished`` reports what is done: the runs of ``--variants`` and ``--seeds`` already finished
in ``--out`` (the tables, the verdicts and ``report.json``), training and decoding nothing.
``groups-by-variant.png`` shows each variant's group shares (mean over its seeds) per decoding,
``accuracy-fairness.png`` each variant's NDCG@10 against DGU (mean ± sd over its seeds) beside
the decision rule's lines.

``--merge REPORT`` folds the runs of this call into ``REPORT``, an earlier ``report.json`` of this
script kept as the record (``docs/ablation-v2-report.json``), and reports over both: a run of
``--out`` replaces the record's run of the same name, and the record is rewritten. A record
outlives the run folders it came from (checkpoints are not kept), so every row carries its own
training seconds and kept epoch.

``--data`` runs the same protocol on a dataset folder instead (the Video_Games part of
docs/ablation.md, with ``--domain video_games``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from flower_rec.demo import COLUMNS, DECODINGS, DemoConfig, Variant, is_finished, run_demo
from flower_rec.files import atomic_write_bytes, read_json
from flower_rec.metrics import write_report
from flower_rec.plots import plot_accuracy_fairness_panels, plot_group_share_panels
from flower_rec.prompts import DOMAINS
from flower_rec.training import METRICS_FILE
from flower_rec.variants import TRAINING_VARIANTS, variant_options

#: The order runs are made in: the baseline, then the candidates the fixed-batch fits of
#: scripts/flow_fit.py favour, then the rest.
PRIORITY = ("sft", "subtb-masked-conservative-mixed", "subtb-masked-conservative",
            "flow-matching-0.5", "subtb", "subtb-masked", "subtb-conservative",
            "flow-matching-0.9", "flow-matching-0.99", "flow-matching-0.999")
# The decision rule (docs/ablation.md): a variant is fairer than SFT under a decoding when its
# mean DGU is lower by more than two standard deviations (the larger of the two over seeds)
# at a mean NDCG@10 of at least this share of SFT's.
MIN_ACCURACY = 0.95


def plan(names: list[str], seeds: list[int]) -> list[Variant]:
    return [
        Variant(f"{name}-seed{seed}", {"reward": "logp", **variant_options(name)}, seed=seed)
        for seed in seeds for name in names
    ]


def run_of(label: str) -> str:
    """The run of a report row's label ("<run>, <decoding>")."""
    return label.split(", ")[0]


def grouped(report: dict, decoding: str) -> dict[str, dict[str, dict]]:
    """The rows of one decoding by variant name, then by run (seeds folded together)."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for label, metrics in report["results"].items():
        run, row_decoding = label.split(", ")
        if row_decoding == decoding:
            groups[run.rsplit("-seed", 1)[0]][run] = metrics
    return groups


def plot_variant_groups(report: dict, path: Path) -> Path:
    """One panel per decoding, one bar series per variant: its GP averaged over its seeds."""
    panels = {
        decoding: {
            name: [statistics.fmean(shares) for shares in zip(*(m["GP"] for m in runs.values()))]
            for name, runs in grouped(report, decoding).items()
        }
        for decoding in DECODINGS
    }
    title = "Recommendation share per popularity group, mean over seeds (test split)"
    return plot_group_share_panels(report["GH"], panels, path, title)


def plot_variant_tradeoff(report: dict, path: Path) -> Path:
    """One panel per decoding: each variant's NDCG@10 against DGU over its seeds, with SFT's
    DGU and the rule's accuracy floor (MIN_ACCURACY x SFT's NDCG@10) where SFT is in."""
    panels = {decoding: {name: list(runs.values())
                         for name, runs in grouped(report, decoding).items()}
              for decoding in DECODINGS}
    baseline = "sft" if all("sft" in methods for methods in panels.values()) else None
    return plot_accuracy_fairness_panels(
        panels, path, "NDCG@10 against DGU per variant, mean ± sd over seeds (test split)",
        baseline=baseline, min_accuracy=MIN_ACCURACY if baseline else None,
    )


def kept_epoch(run_dir: Path) -> str:
    """``kept/run``: the epoch of the lowest validation loss (the model kept) and the last
    epoch validated, from the run's metrics file; "-" without validation."""
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    evaluations = [line for line in lines if "eval_loss" in line]
    if not evaluations:
        return "-"
    best = min(evaluations, key=lambda line: line["eval_loss"])
    return f"{best['epoch']:.0f}/{evaluations[-1]['epoch']:.0f}"


def summary_table(report: dict, decoding: str) -> str:
    """Markdown table of one decoding: a row per variant, mean ± sd over its seeds; guided rows
    name each seed's beta and form, and "kept epoch" each seed's kept and last epoch ("-" where
    a row of an older record lacks it)."""
    header = "| variant | seeds | " + " | ".join(COLUMNS) + " | train s | kept epoch |"
    lines = [f"{decoding}:", "", header, "|" + "---|" * (len(COLUMNS) + 4)]
    for name, runs in grouped(report, decoding).items():
        rows = list(runs.values())
        cells = []
        for column in (*COLUMNS, "train_seconds"):
            values = [row[column] for row in rows if column in row]
            digits = 0 if column in ("distinct_titles", "train_seconds") else 4
            cell = f"{statistics.fmean(values):.{digits}f}" if values else "-"
            if len(values) > 1:
                cell += f" ± {statistics.stdev(values):.{digits}f}"
            cells.append(cell)
        label = name
        if decoding == "guided-beam":
            label += " (beta " + ", ".join(
                f"{row['guidance']['beta']:g} {row['guidance']['form']}" for row in rows) + ")"
        epochs = ", ".join(row.get("kept_epoch", "-") for row in rows)
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(lines)


def merged(report: dict, record: dict) -> dict:
    """``report`` folded into ``record`` (an earlier report of this script): the record's rows
    of runs that ``report`` does not hold, then ``report``'s rows; ``report``'s other keys win."""
    runs = {run_of(label) for label in report["results"]}
    kept = {label: row for label, row in record["results"].items() if run_of(label) not in runs}
    variants = [v for v in record.get("variants", []) if v["name"] not in runs]
    return {**record, **report, "results": {**kept, **report["results"]},
            "variants": variants + report["variants"]}


def verdicts(report: dict) -> list[str]:
    """The decision rule, per decoding and variant (only with at least two seeds of both)."""
    lines = []
    for decoding in DECODINGS:
        groups = grouped(report, decoding)
        sft = list(groups.get("sft", {}).values())
        for name, runs in groups.items():
            if name == "sft":
                continue
            rows = list(runs.values())
            if len(rows) < 2 or len(sft) < 2:
                lines.append(f"{decoding}, {name}: undecided ({len(rows)} seed(s) vs SFT's "
                             f"{len(sft)}; the rule needs two or more of each)")
                continue
            dgu = [row["DGU"] for row in rows]
            sft_dgu = [row["DGU"] for row in sft]
            margin = 2 * max(statistics.stdev(dgu), statistics.stdev(sft_dgu))
            accuracy = statistics.fmean(r["NDCG@10"] for r in rows) / statistics.fmean(
                r["NDCG@10"] for r in sft)
            fairer = statistics.fmean(sft_dgu) - statistics.fmean(dgu) > margin
            verdict = "fairer than SFT" if fairer and accuracy >= MIN_ACCURACY else "not fairer"
            lines.append(
                f"{decoding}, {name}: {verdict} (DGU {statistics.fmean(sft_dgu):.4f} -> "
                f"{statistics.fmean(dgu):.4f}, margin {margin:.4f}; NDCG@10 {accuracy:.2f}x)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ablation", help="output folder")
    parser.add_argument("--variants", nargs="+", choices=list(TRAINING_VARIANTS),
                        default=list(PRIORITY), metavar="VARIANT",
                        help=f"variants, in the order to run them (default: {' '.join(PRIORITY)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=7.0, help="most epochs per run")
    parser.add_argument("--patience", type=int, default=2, help="early-stopping patience")
    parser.add_argument("--quick", action="store_true", help="a smoke run (60 steps each)")
    parser.add_argument("--finished", action="store_true",
                        help="report the runs already finished in --out; train nothing")
    parser.add_argument("--merge", metavar="REPORT",
                        help="an earlier report.json to fold this call's runs into and rewrite")
    parser.add_argument("--data", help="a dataset folder instead of the synthetic one")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="items",
                        help="wording of the prompts (items)")
    args = parser.parse_args()
    config = DemoConfig(out=args.out, data=args.data, domain=args.domain, epochs=args.epochs,
                        quick=args.quick,
                        early_stopping_patience=None if args.quick else args.patience)
    try:  # a bad record fails before any training, not after it
        record = read_json(args.merge) if args.merge else None
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    variants = plan(args.variants, args.seeds)
    if args.finished:
        variants = [v for v in variants if is_finished(out / "runs" / v.name)]
        if not variants:
            parser.error(f"no finished run in {args.out}")
    report = run_demo(config, variants)
    epochs = {variant.name: kept_epoch(out / "runs" / variant.name) for variant in variants}
    for label, row in report["results"].items():
        row["kept_epoch"] = epochs[run_of(label)]
    if record is not None:
        report = merged(report, record)
    report["verdicts"] = verdicts(report)
    write_report(report, args.merge or out / "report.json")
    atomic_write_bytes(out / "verdicts.json", json.dumps(report["verdicts"], indent=2).encode())
    plot_variant_groups(report, out / "groups-by-variant.png")
    plot_variant_tradeoff(report, out / "accuracy-fairness.png")
    for decoding in DECODINGS:
        print(summary_table(report, decoding), end="\n\n")
    print("\n".join(report["verdicts"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
