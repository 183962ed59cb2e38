"""Turns the ``--benchmark-json`` output of the benchmark suite into the README's markdown table.

Usage::

    python benchmarks/report.py benchmarks/results.json

One row per op, catalog, our variant and baseline: the speedup (the baseline's time divided
by ours, both from the same run) beside the target. Times are each benchmark's fastest round:
on a shared machine the minimum is the measurement least disturbed by other work, and the slow
baselines run one or two rounds anyway. The op, catalog, role and target of each benchmark come
from the ``extra_info`` that ``harness.Case.measure`` records.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import catalogs

OP_ORDER = [
    "build", "log_flows", "token_bitmask", "mask_logits_", "guide_logits_", "subtb_loss",
    "beam_search", "guided_beam_search",
]
CATALOG_ORDER = [catalogs.VIDEO_GAMES, *catalogs.SYNTHETIC_SIZES]


def _sort_key(op: str, catalog: str) -> tuple[int, int, str]:
    def position(order: list[str], name: str) -> int:
        return order.index(name) if name in order else len(order)

    return position(OP_ORDER, op), position(CATALOG_ORDER, catalog), catalog


def _format_target(target: float) -> str:
    return "faster (> 1x)" if target == 1 else f">= {target:g}x"


def table(results: dict) -> str:
    """The markdown table (with a one-line header naming the machine) of a benchmark JSON."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        groups[info["op"], info["catalog"]][info["role"]].append(bench)

    lines = [
        "| op | catalog | ours | baseline | baseline / ours | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, catalog in sorted(groups, key=lambda key: _sort_key(*key)):
        roles = groups[op, catalog]
        for mine in roles["ours"]:
            for theirs in roles["baseline"]:
                ratio = theirs["stats"]["min"] / mine["stats"]["min"]
                target = theirs["extra_info"]["target"]
                lines.append(
                    f"| {op} | {catalog} | {mine['extra_info']['implementation']} "
                    f"| {theirs['extra_info']['implementation']} "
                    f"| {ratio:,.1f}x | {_format_target(target)} "
                    f"| {'yes' if ratio >= target else 'NO'} |"
                )

    shares = [
        f"{bench['extra_info']['implementation']} {bench['extra_info']['constraint_share']:.1%}"
        for bench in results["benchmarks"]
        if "constraint_share" in bench["extra_info"]
    ]
    if shares:
        lines.append("")
        lines.append("Time share of the trie constraint inside decoding: " + ", ".join(shares) + ".")

    machine = results.get("machine_info", {})
    load = machine.get("load_average_at_start")
    header = (
        f"CPU: {machine.get('cpu', {}).get('brand_raw', 'unknown')} "
        f"({machine.get('cpu', {}).get('count', '?')} cores), "
        f"torch {machine.get('torch', '?')} with {machine.get('torch_threads', '?')} threads, "
        f"load average {'?' if load is None else f'{load:.2f}'} at the start; "
        f"run of {results.get('datetime', '?')}."
    )
    return header + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the file written by pytest --benchmark-json")
    arguments = parser.parse_args()
    print(table(json.loads(arguments.results.read_text())))


if __name__ == "__main__":
    main()
