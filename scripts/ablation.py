"""The ablation behind the demo's defaults (docs/ablation.md): which part of Flower moves what.

Trains every variant below with the tiny default model on the default synthetic dataset (the
demo's data and SASRec, seed 0), evaluates each with beam search and sampled top-K on the test
split, and prints one table per decoding mode, with the mean and standard deviation over seeds
where a variant was trained with several. Everything lands in ``--out`` (the demo's layout:
synthetic/, aux/, runs/<variant>/, report.json, groups.png) and a rerun skips what is done, so
an interrupted ablation continues.

    python scripts/ablation.py --out runs/ablation       # ~85 minutes: 15 runs
    python scripts/ablation.py --out runs/sft-seeds --only-sft   # SFT over the seeds alone

Every model is decoded with beam search, flow-guided beam search (chosen on the valid split)
and sampled top-K.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from flower_rec.demo import COLUMNS, DECODINGS, DemoConfig, Variant, run_demo


def grid(seeds: list[int]) -> list[Variant]:
    """SFT, the reference Flower setting (theta 0.99, ``logp_div_s``, on-policy SubTB), the
    paper's theta 0.9995 and flow matching over every seed; the other single-factor changes from
    the reference (theta 0.9, reward variant) with the first seed."""

    def flower(theta=0.99, reward="logp_div_s", flow_loss="subtb", seed=seeds[0]) -> Variant:
        name = f"flower-{flow_loss}-{reward}-theta{theta:g}-seed{seed}"
        return Variant(name, "flower", theta, reward, flow_loss, seed)

    variants = [Variant(f"sft-seed{seed}", seed=seed) for seed in seeds]
    variants += [flower(theta=theta, seed=seed) for theta in (0.9995, 0.99) for seed in seeds]
    variants.append(flower(theta=0.9))
    variants += [flower(reward=reward) for reward in ("logp", "logp_add_logs")]
    variants += [flower(flow_loss="flow_matching", seed=seed) for seed in seeds]
    return variants


def summary_table(report: dict, variants: list[Variant], decoding: str) -> str:
    """Markdown table of one decoding mode: a row per variant with its seed folded in (mean, and
    ± the standard deviation over seeds when there are several)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for variant in variants:
        label = variant.name.rsplit("-seed", 1)[0]
        groups[label].append(report["results"][f"{variant.name}, {decoding}"])
    header = "| variant | seeds | " + " | ".join(COLUMNS) + " | train s |"
    lines = [f"{decoding}:", "", header, "|" + "---|" * (len(COLUMNS) + 3)]
    for label, rows in groups.items():
        cells = []
        for name in (*COLUMNS, "train_seconds"):
            values = [row[name] for row in rows]
            digits = 0 if name in ("distinct_titles", "train_seconds") else 4
            cell = f"{statistics.fmean(values):.{digits}f}"
            if len(values) > 1:
                cell += f" ± {statistics.stdev(values):.{digits}f}"
            cells.append(cell)
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ablation", help="output folder")
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs per variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds of SFT and the reference Flower setting")
    parser.add_argument("--quick", action="store_true", help="a smoke run (60 steps each)")
    parser.add_argument("--only-sft", action="store_true",
                        help="SFT over the seeds only (the guided-decoding evidence)")
    args = parser.parse_args()
    variants = grid(args.seeds)
    if args.only_sft:
        variants = [variant for variant in variants if variant.method == "sft"]
    report = run_demo(DemoConfig(out=args.out, epochs=args.epochs, quick=args.quick), variants)
    for decoding in DECODINGS:
        print(summary_table(report, variants, decoding), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
