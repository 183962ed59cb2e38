"""The training-step benchmark runs end to end on a few steps (it runs in no test of its own
otherwise, and once silently lost its rollout timing when the objective's rollout moved)."""

from __future__ import annotations

import importlib.util
import math
import sys

from paths import ROOT


def test_the_training_step_benchmark_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its baselines module
    path = ROOT / "benchmarks" / "bench_training_step.py"
    spec = importlib.util.spec_from_file_location("bench_training_step", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    result = bench.run_benchmark(steps=2, warmup=1, instrumented=1, repeats=1)
    flower = result["trie"]["flower"]
    assert math.isfinite(flower["rollout_ms"]) and 0 < flower["rollout_ms"] < flower["step_ms"]
