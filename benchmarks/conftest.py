"""flower_ext microbenchmarks: every op timed beside the baseline a user would otherwise run.

Run everything and print the README's table of ratios (baseline time / our time)::

    pytest benchmarks --benchmark-json=benchmarks/results.json && python benchmarks/report.py benchmarks/results.json

About 4 minutes on 2 CPU cores and 12 GB of memory at the peak, most of it the 1M-item
catalog; ``-k "not synthetic_1m"`` makes a one-minute run. Needs the ``bench`` extra
(pytest-benchmark, marisa-trie, tokenizers). Run it on an otherwise idle machine: with two cores,
another busy process stalls the parallel regions of both sides and the ratios stop meaning much
(the report prints the load average at the start). The CUDA bandwidth check is a separate
script, ``gpu_bandwidth.py``.

Layout:
    bench_build.py      Trie.from_sequences vs a Python dict trie and marisa-trie
    bench_log_flows.py  Trie.log_flows vs level-by-level scatter_reduce (B = 64)
    bench_masks.py      token_bitmask and mask_logits_ vs dict + torch.isin (64 rows)
    bench_losses.py     subtb_loss_from_log_probs vs the O(T^2) loops (B = 64, T = 32)
    catalogs.py         the catalogs; baselines.py the baselines; harness.py the shared timing
    report.py           pytest-benchmark JSON -> markdown table
    bench_training_step.py  a standalone script, not a pytest module (it defines no tests): SFT,
                        Flower and flow-matching training steps, their trie-work share, and the
                        published per-step trie work on the same batches
    bench_rollout_calls.py  a standalone script too: mask_logits_ and advance call by call inside
                        a rollout beside the same calls in a tight loop

Rules (docs/design.md section 6): each op sits in one pytest-benchmark group per catalog with its
baselines; every result is checked equal to the baselines' before anything is timed; only
ratios from one run are reported. Catalogs: the real Video_Games titles (skipped when the
shared data is absent) and seeded synthetic catalogs of 100k and 1M items.

The files are named ``bench_*.py`` so that ``pytest`` on the default ``tests/`` never collects
them; the hook below collects them when pytest is pointed at this directory.
"""

from __future__ import annotations

import os

import pytest
import torch

import catalogs
from flower_ext import Trie

CATALOG_NAMES = [catalogs.VIDEO_GAMES, *catalogs.SYNTHETIC_SIZES]
_LOAD_AT_START = pytest.StashKey[float]()


def pytest_collect_file(file_path, parent):
    # pytest collects explicitly named files itself; collecting them here too would run twice.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_sessionstart(session):
    # Any other busy process stalls the parallel regions of both sides (an OpenMP barrier waits
    # for its descheduled thread), so the report shows how quiet the machine was.
    session.config.stash[_LOAD_AT_START] = os.getloadavg()[0]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["load_average_at_start"] = config.stash.get(_LOAD_AT_START, None)


@pytest.fixture(scope="session", params=CATALOG_NAMES)
def catalog(request) -> catalogs.Catalog:
    """Each catalog, built once per session (the tests are grouped by catalog, so one is held
    at a time)."""
    loaded = catalogs.load(request.param)
    if loaded is None:
        pytest.skip(f"{request.param}: the shared data is not under {catalogs.SHARED}")
    return loaded


@pytest.fixture(scope="session")
def trie(catalog) -> Trie:
    return Trie.from_sequences(catalog.tokens, offsets=catalog.offsets)
