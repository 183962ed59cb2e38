"""The training benchmarks run end to end on a few steps: they run in no test of their own
otherwise, and once silently broke (the training-step benchmark lost its rollout timing when the
objective's rollout moved; a variant naming its own reward would not have built)."""

from __future__ import annotations

import importlib.util
import math
import sys

import torch

from paths import ROOT


def load(monkeypatch, name: str):
    """The benchmark module ``name``, with the benchmarks folder importable (its helpers)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_training_step_benchmark_runs(monkeypatch):
    bench = load(monkeypatch, "bench_training_step")
    result = bench.run_benchmark(steps=2, warmup=1, instrumented=1, repeats=1)
    flower = result["trie"]["flower"]
    assert math.isfinite(flower["rollout_ms"]) and 0 < flower["rollout_ms"] < flower["step_ms"]


def test_the_objectives_benchmark_covers_every_variant(monkeypatch):
    from flower_rec.variants import TRAINING_VARIANTS

    load(monkeypatch, "bench_training_step")
    bench = load(monkeypatch, "bench_objectives")
    result = bench.run_benchmark(steps=1, warmup=0)
    assert set(result["step_ms"]) == set(TRAINING_VARIANTS)
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in result["step_vs_sft"].values())


def test_the_rollout_calls_benchmark_runs(monkeypatch):
    load(monkeypatch, "bench_training_step")
    bench = load(monkeypatch, "bench_rollout_calls")
    result = bench.run_benchmark(batches=1, repeats=2, device=torch.device("cpu"))
    assert set(result["ops"]) == {"mask_logits_", "advance"}
    assert all(row["calls_per_rollout"] >= 1 and row["ratio"] > 0 for row in result["ops"].values())
    control = result["first_call_control"]
    assert set(control) == {"mask_logits_", "advance", "a custom op doing nothing", "torch.empty"}
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in control.values())
