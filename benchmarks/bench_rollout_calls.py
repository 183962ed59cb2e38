"""Per-call cost of ``mask_logits_`` and ``advance`` inside a rollout, beside the same calls in a
tight loop.

A rollout (:func:`flower_rec.loop.rollout`) calls each op once per decoding step, between a
model forward and the sampling, so a call meets caches that the model's work has just filled
and, on CUDA, a stream still busy with the forward, which a status check that synchronised would
wait for (hence :func:`flower_ext.ops.deferred_checks`, which the rollout opens on CUDA). Target
(issue 11): a call inside the rollout costs at most 1.5x what it costs in a tight loop.

Set-up of ``bench_training_step.build_setup``: the default synthetic dataset, the tiny default
model, batches of 16 training prompts, and the loss trie (every item's tokens, then EOS). Per
batch: one rollout with both ops timed call by call (wall time on the host, what the loop
waits) and their arguments kept; then the same calls replayed in a tight loop, each repeated
``--repeats`` times back to back and timed the same way, the median of its repeats (the logits
are masked again in place: masking is idempotent, so every repeat does the same work). Rollouts
and replays alternate, so a slow spell of the machine hits both. Per op and batch the ratio is
the rollout's total time in the op over the tight loop's for the same calls; the report gives
the median over the batches of the per-call means and of the ratios.

A control tells the op's own cost from the state the forward leaves the machine in: inside the
rollout each call is made a second time at once, with the same arguments (idempotent, its
result unused), and timed apart. A first call much slower than its immediate repeat is paying
to warm the caches after the forward, as any code that ran first would.

A second control tells the op's cost from the custom-op machinery every such op goes through:
after a prefill forward of the model on the batch (what a rollout's first step follows), one
call is timed, then the same call in a tight loop, for ``mask_logits_``, ``advance``, a custom
op with ``mask_logits_``'s schema that does nothing (:func:`do_nothing_`: the dispatch alone)
and ``torch.empty``; the report gives each one's first-call / tight-loop ratio (median over the
batches).

``--checks immediate`` reads every status word after its call, as the ops do outside
:func:`flower_ext.ops.deferred_checks` (the rollout and the replays open that block on CUDA; on
the CPU both modes are the same): the before and after of the deferred checks on a GPU.

``--vocab-size`` pads the model's vocabulary (a production tokenizer's 151,936, say): logits,
masks and the forward's working set grow to that scale around the same catalog.

Usage::

    python benchmarks/bench_rollout_calls.py [--batches 20] [--repeats 20] [--threads 1]
        [--device cpu] [--checks deferred] [--vocab-size N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

import bench_training_step as training_step_bench
import flower_rec.loop
from flower_ext import Trie
from flower_rec.decoding.runner import status_checks
from flower_rec.loop import rollout

OPS = ("mask_logits_", "advance")
TARGET = 1.5
WARMUP_BATCHES = 2


class CallRecorder:
    """While active, times every call of the :class:`flower_ext.Trie` methods in :data:`OPS` and
    keeps a copy of its arguments, taken after the call (outside the timed part), for the
    replay."""

    def __init__(self):
        self.calls: dict[str, list[tuple[object, tuple, dict, float]]] = {op: [] for op in OPS}
        self.repeat_seconds: dict[str, list[float]] = {op: [] for op in OPS}

    def _recorded(self, op: str, method):
        def call(trie, *args, **kwargs):
            start = time.perf_counter()
            result = method(trie, *args, **kwargs)
            first = time.perf_counter()
            method(trie, *args, **kwargs)  # the control: the same call, at once
            repeat = time.perf_counter()
            copies = tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args)
            self.calls[op].append((trie, copies, kwargs, first - start))
            self.repeat_seconds[op].append(repeat - first)
            return result

        return call

    @contextmanager
    def active(self):
        originals = {op: getattr(Trie, op) for op in OPS}
        try:
            for op, method in originals.items():
                setattr(Trie, op, self._recorded(op, method))
            yield self
        finally:
            for op, method in originals.items():
                setattr(Trie, op, method)


def checks(mode: str, device: torch.device):
    """The status-check context of the rollout and the replays: the bundled one (deferred on
    CUDA), or none, so that every call reads its own status word."""
    return status_checks(device) if mode == "deferred" else nullcontext()


def tight_loop_seconds(
    op: str, calls, repeats: int, device: torch.device, mode: str
) -> list[float]:
    """Each recorded call of ``op`` repeated back to back: the median wall time of its repeats."""
    method = getattr(Trie, op)
    medians = []
    with checks(mode, device):
        for trie, args, kwargs, _ in calls:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                method(trie, *args, **kwargs)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
    return medians


@torch.library.custom_op("flower_ext_bench::do_nothing_", mutates_args=("logits",),
                         device_types=("cpu", "cuda"))
def do_nothing_(trie_data: torch.Tensor, layout: list[int], logits: torch.Tensor,
                node_ids: torch.Tensor) -> None:
    """``mask_logits_``'s schema, mutation and dispatch, and no work: what any custom op pays."""


def first_call_control(
    model, batch, trie: Trie, repeats: int, device: torch.device, mode: str
) -> dict[str, tuple[float, float]]:
    """Per case, ``(µs of its first call after a prefill forward, µs per call in a tight loop)``
    at the rollout's first step (every row at the root)."""
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    rows = input_ids.shape[0]
    nodes = torch.zeros(rows, dtype=torch.int32, device=device)
    tokens = trie.token[1].long().expand(rows).contiguous()  # the root's first child
    cases = {
        "mask_logits_": lambda scores: trie.mask_logits_(scores, nodes),
        "advance": lambda scores: trie.advance(nodes, tokens),
        "a custom op doing nothing": lambda scores: do_nothing_(trie.data, trie.layout, scores,
                                                                nodes),
        "torch.empty": lambda scores: torch.empty(rows, dtype=torch.int32, device=device),
    }
    result = {}
    with torch.no_grad(), checks(mode, device):
        for case, call in cases.items():
            scores = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call(scores)
            first = time.perf_counter() - start
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call(scores)
                times.append(time.perf_counter() - start)
            result[case] = (1e6 * first, 1e6 * statistics.median(times))
    return result


def time_rollout(
    model, batch, trie: Trie, eos: int, seed: int, repeats: int, device: torch.device, mode: str
) -> dict[str, dict[str, float]]:
    """One rollout with both ops timed call by call, then its calls replayed in a tight loop.
    Per op: the calls, the mean µs per call in the rollout, of its immediate repeat and in the
    tight loop, and the ratios of the rollout's and the repeats' totals to the tight loop's."""
    recorder = CallRecorder()
    generator = torch.Generator(device).manual_seed(seed)
    with recorder.active(), mock.patch.object(flower_rec.loop, "status_checks",
                                              lambda device: checks(mode, device)):
        rollout(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                trie, eos, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rows = {}
    for op in OPS:
        calls = recorder.calls[op]
        tight = tight_loop_seconds(op, calls, repeats, device, mode)
        in_rollout = [seconds for *_, seconds in calls]
        repeated = recorder.repeat_seconds[op]
        rows[op] = {
            "calls": len(calls),
            "rollout_us": 1e6 * statistics.mean(in_rollout),
            "repeat_us": 1e6 * statistics.mean(repeated),
            "tight_loop_us": 1e6 * statistics.mean(tight),
            "ratio": sum(in_rollout) / sum(tight),
            "repeat_ratio": sum(repeated) / sum(tight),
        }
    return rows


def run_benchmark(
    batches: int, repeats: int, device: torch.device, vocab_size: int | None = None,
    mode: str = "deferred",
) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_rollout_calls_") as folder:
        setup = training_step_bench.build_setup(Path(folder))
    if vocab_size is not None:
        # A production vocabulary's logits (e.g. Qwen's 151,936) around the same catalog: the
        # extra tokens are never children in the trie, so the rollout draws the same items.
        setup.model.resize_token_embeddings(vocab_size)
    eos = setup.tokenizer.eos_token_id
    trie = Trie.from_sequences([s + [eos] for s in setup.catalog.item_tokens.sequences]).to(device)
    model = setup.model.to(device)
    per_batch: dict[str, list[dict[str, float]]] = {op: [] for op in OPS}
    first_calls: dict[str, list[tuple[float, float]]] = {}
    all_batches = training_step_bench.make_batches(setup, WARMUP_BATCHES + batches)
    for index, batch in enumerate(all_batches):
        rows = time_rollout(model, batch, trie, eos, index, repeats, device, mode)
        if index < WARMUP_BATCHES:
            continue
        for op, row in rows.items():
            per_batch[op].append(row)
        for case, times in first_call_control(model, batch, trie, repeats, device, mode).items():
            first_calls.setdefault(case, []).append(times)

    def median(op: str, key: str) -> float:
        return statistics.median(row[key] for row in per_batch[op])

    return {
        "setup": {
            "dataset": "synthetic (prepare_synthetic, seed 0)",
            "items": setup.dataset.num_items,
            "trie_nodes": trie.num_nodes,
            "vocab": setup.model.config.vocab_size,
            "batch_size": training_step_bench.BATCH_SIZE,
            "batches": batches,
            "warmup_batches": WARMUP_BATCHES,
            "repeats": repeats,
        },
        "machine": {
            "cpu": training_step_bench.cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "status_checks": mode,
            "load_average_at_start": training_step_bench.LOAD_AT_START,
        },
        "ops": {
            op: {
                "calls_per_rollout": median(op, "calls"),
                "rollout_us": median(op, "rollout_us"),
                "rollout_repeat_us": median(op, "repeat_us"),
                "tight_loop_us": median(op, "tight_loop_us"),
                "ratio": median(op, "ratio"),
                "ratio_min": min(row["ratio"] for row in per_batch[op]),
                "ratio_max": max(row["ratio"] for row in per_batch[op]),
                "repeat_ratio": median(op, "repeat_ratio"),
            }
            for op in OPS
        },
        "first_call_control": {
            case: {
                "first_call_us": statistics.median(first for first, _ in times),
                "tight_loop_us": statistics.median(tight for _, tight in times),
                "ratio": statistics.median(first / tight for first, tight in times),
            }
            for case, times in first_calls.items()
        },
        "target": TARGET,
    }


def table(result: dict) -> str:
    lines = [
        "| op | calls per rollout | µs per call in the rollout | the same call repeated at once "
        "| µs per call in a tight loop | rollout / tight loop (min-max over batches) "
        "| repeated / tight loop | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, row in result["ops"].items():
        lines.append(
            f"| {op} | {row['calls_per_rollout']:g} | {row['rollout_us']:.1f} "
            f"| {row['rollout_repeat_us']:.1f} | {row['tight_loop_us']:.1f} "
            f"| {row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) "
            f"| {row['repeat_ratio']:.2f}x | <= {TARGET:g}x "
            f"| {'yes' if row['ratio'] <= TARGET else 'NO'} |"
        )
    machine, setup = result["machine"], result["setup"]
    header = (
        f"{machine['device']} ({machine['cpu']}, {machine['cores']} cores), torch "
        f"{machine['torch']} with {machine['threads']} thread(s), load average "
        f"{machine['load_average_at_start']:.2f} at the start, status checks "
        f"{machine.get('status_checks', 'deferred')}; tiny model, vocabulary "
        f"{setup['vocab']}, {setup['trie_nodes']} trie nodes, batch {setup['batch_size']}; "
        f"median over {setup['batches']} rollouts, each call replayed {setup['repeats']} times."
    )
    control = [
        "| first call after a forward | µs | µs per call in a tight loop | first / tight loop |",
        "|---|---|---|---|",
    ]
    for case, row in result["first_call_control"].items():
        control.append(f"| {case} | {row['first_call_us']:.1f} | {row['tight_loop_us']:.1f} "
                       f"| {row['ratio']:.2f}x |")
    return f"{header}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(control)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="timed rollouts (20)")
    parser.add_argument("--repeats", type=int, default=20, help="tight-loop runs of each call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--checks", choices=("deferred", "immediate"), default="deferred",
                        help="status words read once per rollout on CUDA (deferred, the default) "
                        "or after every call")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="pad the model's vocabulary to this size (default: the tokenizer's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args(argv)
    if arguments.batches < 1 or arguments.repeats < 1:
        parser.error("--batches and --repeats must be positive")
    if arguments.vocab_size is not None and arguments.vocab_size < 1:
        parser.error("--vocab-size must be positive")
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(training_step_bench.SEED)
    result = run_benchmark(arguments.batches, arguments.repeats, torch.device(arguments.device),
                           arguments.vocab_size, arguments.checks)
    training_step_bench.write_report("bench_rollout_calls.py", result, table, argv, arguments.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
