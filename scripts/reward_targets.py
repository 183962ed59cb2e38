"""How head-heavy is the distribution Flower trains toward? Each reward variant's per-sample
target R_u / Z over the catalog, measured against the popularity groups.

Reads a demo or ablation folder (its dataset and SASRec) and prints, per reward variant: the
share of training samples whose highest-reward item is in the most popular group (what a
perfectly trained Flower model would put first under beam search), the target's mean mass on
that group (what sampling would give it), its entropy and its largest item share; and the range
of s_ui. This is the evidence behind docs/ablation.md's note on the rewards:

    python scripts/reward_targets.py runs/ablation
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flower_rec.auxiliary import load_sasrec, training_probabilities
from flower_rec.data import load_dataset
from flower_rec.evaluate import popularity_reference
from flower_rec.rewards import REWARD_VARIANTS, PopularityRewards, centred_scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a `flower-rec demo` or scripts/ablation.py output folder")
    parser.add_argument("--data", help="its dataset folder (default: FOLDER/synthetic)")
    args = parser.parse_args()
    folder = Path(args.folder)
    dataset = load_dataset(args.data or folder / "synthetic")
    probabilities = training_probabilities(load_sasrec(folder / "aux"), dataset)
    p_u = probabilities(torch.arange(len(dataset.train))).double()
    rewards = PopularityRewards.from_dataset(dataset)
    head = set(popularity_reference(dataset)[0][0])
    in_head = torch.tensor([title in head for title in dataset.titles])

    print(f"{len(dataset.train)} training samples; SASRec's own top item is in group 0 for "
          f"{in_head[p_u.argmax(1)].double().mean():.3f} of them\n")
    print("| reward | top item in group 0 | mass on group 0 | entropy (nats) | top item share |")
    print("|---|---|---|---|---|")
    for variant in REWARD_VARIANTS:
        log_rewards = rewards.item_log_rewards(variant, None if variant == "logp" else p_u)
        target = torch.softmax(log_rewards.double(), dim=-1).expand(len(p_u), -1)
        entropy = -(target * target.log()).sum(1).mean()
        print(f"| {variant} | {in_head[target.argmax(1)].double().mean():.3f} | "
              f"{target[:, in_head].sum(1).mean():.3f} | {entropy:.2f} | "
              f"{target.max(1).values.mean():.3f} |")
    scale = centred_scale(p_u)
    print(f"\ns_ui over all samples and items: min {scale.min():.2f}, median "
          f"{scale.median():.2f}, max {scale.max():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
