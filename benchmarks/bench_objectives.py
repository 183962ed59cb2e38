"""The step cost of every named training variant (flower_rec.variants) against SFT, in one run,
and the cost of drawing off-policy trajectories from R_u / Z_u against a step.

Usage::

    python benchmarks/bench_objectives.py [--steps 20] [--warmup 3] [--threads 1] [--json OUT]

Set-up and step of ``bench_training_step`` (the default synthetic dataset, the tiny default
model, batches of 16, the personalised reward ``logp_div_s`` with a fixed random p_u table, an
AdamW step with clipping and the schedule): every variant starts from the same weights, sees the
same batches and takes its steps interleaved with the others (the order rotating each step);
each row is the median over ``--steps`` timed steps after ``--warmup`` untimed ones.

Off-policy draws: ``flower_rec.loop.reward_rollout`` on each batch's item rewards (one item
per row from R_u / Z_u and its trie path), timed alone, median over the batches, as a share of
the median step of ``subtb-masked-conservative-mixed`` (the variant that uses them).

Targets (issue 9): every variant's step <= 2x the SFT step; off-policy draws <= 5% of a step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bench_training_step as training_step
from flower_rec.loop import reward_rollout
from flower_rec.variants import TRAINING_VARIANTS, variant_options

TARGETS = {"step_vs_sft": 2.0, "off_policy_share": 0.05}
MIXED = "subtb-masked-conservative-mixed"


def run_benchmark(steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        setup = training_step.build_setup(Path(folder) / "data")
        batches = training_step.make_batches(setup, steps + warmup)
        runs = {
            name: training_step.Run(setup, name, total_steps=len(batches),
                                    options=variant_options(name))
            for name in TRAINING_VARIANTS
        }
        times = training_step.time_steps(runs, batches, warmup)

        objective = runs[MIXED].objective
        state = objective._on(torch.device("cpu"))
        draw_ms = []
        generator = torch.Generator().manual_seed(0)
        for batch in batches[warmup:]:
            rewards = objective.item_log_rewards(batch["sample_index"], torch.device("cpu"))
            start = time.perf_counter()
            reward_rollout(rewards, state["items"], state["trie"], generator=generator)
            draw_ms.append(1e3 * (time.perf_counter() - start))

    step_ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    return {
        "step_ms": step_ms,
        "step_vs_sft": {name: ms / step_ms["sft"] for name, ms in step_ms.items()},
        "off_policy_draw_ms": statistics.median(draw_ms),
        "off_policy_share": statistics.median(draw_ms) / step_ms[MIXED],
        "targets": TARGETS,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
    }


def table(result: dict) -> str:
    lines = ["| variant | step ms | vs SFT | target | met |", "|---|---|---|---|---|"]
    for name, ms in result["step_ms"].items():
        ratio = result["step_vs_sft"][name]
        met = "yes" if ratio <= TARGETS["step_vs_sft"] else "NO"
        lines.append(f"| {name} | {ms:.1f} | {ratio:.2f}x | <= {TARGETS['step_vs_sft']:g}x | {met} |")
    share = result["off_policy_share"]
    met = "yes" if share <= TARGETS["off_policy_share"] else "NO"
    lines.append(f"| off-policy draws (per batch) | {result['off_policy_draw_ms']:.2f} | "
                 f"{share:.1%} of a {MIXED} step | <= {TARGETS['off_policy_share']:.0%} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args(argv)
    if arguments.steps < 1 or arguments.warmup < 0:
        parser.error("--steps must be positive and --warmup not negative")
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(training_step.SEED)
    result = run_benchmark(arguments.steps, arguments.warmup)
    training_step.write_report("bench_objectives.py", result, table, argv, arguments.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
