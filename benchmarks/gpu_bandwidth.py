"""CUDA log_flows against the device's own copy bandwidth: B = 64 reward vectors over the
1M-item synthetic catalog (the suite's ``synthetic_1m``).

Usage (on a machine with a CUDA device and flower_ext built with its CUDA kernels)::

    python benchmarks/gpu_bandwidth.py

Times ``Trie.log_flows`` with CUDA events, counts the bytes the op cannot avoid moving (read the
log-rewards once, write every node's flow, read every non-root flow once more as its parent's
input, read the trie's ``child_ptr``, ``item_ptr`` and ``item_list`` once), and divides the
achieved rate by the device-to-device copy bandwidth measured in the same run with a copy of the
flows' size (a copy reads and writes each byte once). Target: >= 50%. Before timing, rows of the
CUDA result are checked against the CPU kernels.

Without a CUDA device it prints why and exits with status 0 (nothing to measure); with a device
but a flower_ext built without CUDA kernels it exits with status 1.
"""

from __future__ import annotations

import sys

import torch

import catalogs
import flower_ext
from flower_ext import Trie

CATALOG = "synthetic_1m"
BATCH = 64
REPEATS = 10
CHECKED_ROWS = 2
TARGET = 0.5
FLOAT_BYTES = INDEX_BYTES = 4


def cuda_milliseconds(fn, repeats: int = REPEATS) -> float:
    """Mean time of ``fn`` on the current stream, after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def minimum_bytes(trie: Trie, batch: int) -> int:
    nodes, items = trie.num_nodes, trie.num_items
    rewards = batch * items * FLOAT_BYTES
    flows = batch * (nodes + nodes - 1) * FLOAT_BYTES  # written once, read once by the parent
    trie_arrays = (2 * (nodes + 1) + items) * INDEX_BYTES  # child_ptr, item_ptr, item_list
    return rewards + flows + trie_arrays


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_bandwidth: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return 0
    if not flower_ext.has_cuda:
        print(
            "gpu_bandwidth: a CUDA device is present but flower_ext was built without CUDA "
            "kernels; reinstall it where nvcc is available",
            file=sys.stderr,
        )
        return 1

    catalog = catalogs.load(CATALOG)
    cpu_trie = Trie.from_sequences(catalog.tokens, offsets=catalog.offsets)
    trie = cpu_trie.to("cuda")
    generator = torch.Generator().manual_seed(0)
    log_rewards = torch.randn(BATCH, trie.num_items, generator=generator)

    cuda_rewards = log_rewards.cuda()
    torch.testing.assert_close(
        trie.log_flows(cuda_rewards[:CHECKED_ROWS]).cpu(),
        cpu_trie.log_flows(log_rewards[:CHECKED_ROWS]),
        rtol=1e-5,
        atol=1e-5,
    )

    flows_ms = cuda_milliseconds(lambda: trie.log_flows(cuda_rewards))
    moved = minimum_bytes(trie, BATCH)
    achieved = moved / (flows_ms * 1e-3)

    source = torch.empty(BATCH, trie.num_nodes, device="cuda")
    destination = torch.empty_like(source)
    copy_ms = cuda_milliseconds(lambda: destination.copy_(source))
    copy_bytes = 2 * source.numel() * source.element_size()
    copy_bandwidth = copy_bytes / (copy_ms * 1e-3)

    fraction = achieved / copy_bandwidth
    print(f"device: {torch.cuda.get_device_name()}")
    print(
        f"log_flows, B = {BATCH} x {trie.num_items:,} items ({trie.num_nodes:,} nodes, "
        f"{len(trie.level_ptr) - 1} levels): {flows_ms:.2f} ms, at least {moved / 1e9:.2f} GB "
        f"moved -> {achieved / 1e9:.0f} GB/s"
    )
    print(
        f"device-to-device copy of {copy_bytes / 2e9:.2f} GB: {copy_ms:.2f} ms -> "
        f"{copy_bandwidth / 1e9:.0f} GB/s"
    )
    print(
        f"log_flows reaches {fraction:.0%} of the copy bandwidth (target >= {TARGET:.0%}: "
        f"{'met' if fraction >= TARGET else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
