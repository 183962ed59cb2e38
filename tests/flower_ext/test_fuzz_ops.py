"""Hostile input to the raw ops and to trie files (issue 10): corrupted packed tries, another
trie's layout, wrong-sized internal tensors, output rows that share memory, mutated trie files,
FIFOs and directories. Nothing may crash, hang or corrupt memory: each call either gives the
intact trie's result or raises a ``ValueError`` starting with ``flower_ext.<op>:``.

Cases that used to crash the process run in a subprocess, so that a segfault fails the test
instead of killing pytest; each subprocess runs a batch of them.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flower_ext import Trie, ops
from paths import TESTS
from strategies import SMALL_END, SMALL_VOCAB, catalogs

OVERLAP = "more than one element of the written-to tensor"


def run_isolated(code: str) -> str:
    """Runs ``code`` in a fresh interpreter and returns its output; a crash (a signal, a
    non-zero exit) or a hang fails the test with the output so far."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        # `python -c` puts its working folder first on sys.path: from the checkout's root the
        # source folder flower_ext/ (no compiled module) would shadow the installed package.
        cwd=Path(__file__).resolve().parent,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit status {result.returncode}:\n{output}"
    return output


# ---------------------------------------------------------------------------------------------
# the crash cases of issue 10, in one subprocess


def test_former_crash_cases_raise_value_errors(tmp_path):
    fifo = tmp_path / "trie.fifo"
    os.mkfifo(fifo)
    output = run_isolated(
        f"""
        import torch
        from flower_ext import Trie, ops

        def attempt(case, call):
            try:
                call()
                print(case, "returned")
            except ValueError as error:
                print(case, "raised", error)

        trie = Trie.from_sequences([[1, 2, 0], [1, 0], [3, 0], [1, 2, 0]])
        n, i = trie.num_nodes, trie.num_items
        nodes, tokens = torch.arange(n), torch.ones(n, dtype=torch.int64)

        data = trie.data.clone()
        data[2 * n + 1] = 2**30  # the end of the root's children
        attempt("child_ptr", lambda: ops.advance(data, trie.layout, nodes, tokens))

        data = trie.data.clone()
        data[1] = -5  # the token of the root's first child
        attempt("negative token", lambda: ops.token_bitmask(data, trie.layout, nodes, 40))

        attempt("backward sizes", lambda: ops.log_flows_backward(
            trie.data, trie.layout, torch.zeros(i), torch.zeros(3), torch.zeros(3)))

        # Another trie of the same packed size: 4 nodes and 1 item, or 3 nodes and 5 items.
        long = Trie.from_sequences([[1, 2, 3]])
        wide = Trie.from_sequences([[1], [1], [1], [2], [2]])
        assert long.data.numel() == wide.data.numel()
        attempt("other layout", lambda: ops.log_flows(long.data, wide.layout, torch.zeros(5)))
        attempt("other layout path_sums", lambda: ops.path_sums(long.data, wide.layout, torch.ones(3)))

        expanded = torch.zeros(1, dtype=torch.int32).expand(trie.data.numel())
        attempt("expanded data", lambda: ops.preorder(expanded, trie.layout))

        for path in ({str(fifo)!r}, {str(tmp_path)!r}, "/dev/zero"):
            attempt("file " + path, lambda: Trie.load(path))
        """
    )
    corrupted = "trie_data holds an index outside the trie"
    for line in [
        f"child_ptr raised flower_ext.advance: {corrupted}",
        f"negative token raised flower_ext.token_bitmask: {corrupted}",
        "backward sizes raised flower_ext.log_flows_backward: flows must be",
        f"other layout raised flower_ext.log_flows: {corrupted}",
        f"other layout path_sums raised flower_ext.path_sums: {corrupted}",
        "expanded data raised flower_ext.preorder: trie_data must be contiguous",
        f"file {fifo} raised {fifo} is not a regular file",
        f"file {tmp_path} raised {tmp_path} is not a regular file",
        "file /dev/zero raised /dev/zero is not a regular file",
    ]:
        assert line in output, output


# ---------------------------------------------------------------------------------------------
# every raw op over corrupted packed tries


def op_calls(trie: Trie, sequences: list[list[int]]) -> dict:
    """Each raw op taking a trie, as ``name -> call(data, layout)`` with inputs that reach every
    node (all node ids, -1 and every item's path). In-place ops work on a copy and return it."""
    n, i = trie.num_nodes, trie.num_items
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(2, i, generator=generator, dtype=torch.float64)
    flows = ops.log_flows(trie.data, trie.layout, rewards)
    grad_flows = torch.randn(2, n, generator=generator, dtype=torch.float64)
    nodes = torch.arange(-1, n)
    logits = torch.randn(n + 1, SMALL_VOCAB, generator=generator)
    length = max(map(len, sequences))
    tokens = torch.tensor([s + [SMALL_END] * (length - len(s)) for s in sequences])
    lengths = torch.tensor([len(s) for s in sequences])
    path = torch.cat(
        [
            torch.zeros(len(sequences), 1, dtype=torch.int32),
            ops.walk(trie.data, trie.layout, tokens, lengths),
        ],
        dim=1,
    )
    beta = torch.tensor(0.5)

    def in_place(op, *args):
        def call(data, layout):
            out = logits.clone()
            op(data, layout, out, *args)
            return out

        return call

    advance_nodes = nodes.repeat(3)
    advance_tokens = torch.arange(3).repeat_interleave(n + 1)
    return {
        "log_flows": lambda data, layout: ops.log_flows(data, layout, rewards),
        "log_flows_backward": lambda data, layout: ops.log_flows_backward(
            data, layout, rewards, flows, grad_flows
        ),
        "walk": lambda data, layout: ops.walk(data, layout, tokens, lengths),
        "advance": lambda data, layout: ops.advance(data, layout, advance_nodes, advance_tokens),
        "token_bitmask": lambda data, layout: ops.token_bitmask(
            data, layout, nodes, SMALL_VOCAB, SMALL_END
        ),
        "mask_logits_": in_place(ops.mask_logits_, nodes, SMALL_END),
        "guide_logits_": in_place(ops.guide_logits_, nodes, flows[0].float(), beta, SMALL_END),
        "children": lambda data, layout: ops.children(data, layout, nodes),
        "transition_log_probs": lambda data, layout: ops.transition_log_probs(
            data, layout, flows[0], path, SMALL_END
        ),
        "preorder": lambda data, layout: ops.preorder(data, layout),
        "path_sums": lambda data, layout: ops.path_sums(data, layout, grad_flows),
        "subtree_sums": lambda data, layout: ops.subtree_sums(data, layout, grad_flows),
    }


def out_of_range(trie: Trie, index: int, value: int) -> bool:
    """Whether ``value`` at ``index`` of the packed trie lies outside the range of its array
    (token [-1, 2^31), parent [-1, N), child_ptr [0, N], item_ptr [0, I], item_list [0, I))."""
    n, i = trie.num_nodes, trie.num_items
    for size, low, high in [
        (n, -1, 2**31),
        (n, -1, n),
        (n + 1, 0, n + 1),
        (n + 1, 0, i + 1),
        (i, 0, i),
    ]:
        if index < size:
            return not low <= value < high
        index -= size
    raise IndexError(index)


ENTRY_VALUES = st.one_of(
    st.integers(-3, 40), st.sampled_from([-(2**31), -(2**30), 2**30, 2**31 - 1])
)


@settings(max_examples=60)
@given(
    catalog=catalogs(terminated=True, huge=False, max_items=6, max_length=4),
    mutations=st.lists(st.tuples(st.integers(0, 2**16), ENTRY_VALUES), min_size=1, max_size=3),
)
def test_corrupted_packed_trie_gives_intact_result_or_value_error(catalog, mutations):
    """The intact trie's results stand in for the reference: tests/test_ops.py and the other op
    suites check them against flower_ext/reference.py, and equality here is exact. A corrupted
    entry outside its array's range must be reported wherever it is read, so the result is then
    the intact one or a ValueError; entries changed within range make another (perhaps invalid)
    trie, whose results need only be memory-safe and well-formed."""
    trie = Trie.from_sequences(catalog.sequences)
    calls = op_calls(trie, catalog.sequences)
    data = trie.data.clone()
    mutations = [(index % data.numel(), value) for index, value in mutations]
    for index, value in mutations:
        data[index] = value
    detectable = all(out_of_range(trie, index, value) for index, value in mutations)
    for name, call in calls.items():
        expected = call(trie.data, trie.layout)
        try:
            got = call(data, trie.layout)
        except ValueError as error:
            assert str(error).startswith(f"flower_ext.{name}: "), error
            continue
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        if detectable:
            for want, have in zip(expected, got):
                torch.testing.assert_close(
                    have,
                    want,
                    rtol=0,
                    atol=0,
                    equal_nan=True,
                    msg=f"{name} after {mutations} differs from the intact trie's result",
                )
        elif name != "children":  # children's output size depends on the data
            assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]


def test_random_corruptions_never_crash():
    """Many seeded corruptions of a larger trie through every op, in a subprocess: any crash
    fails here instead of killing the test run."""
    output = run_isolated(
        f"""
        import random, sys
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {str(TESTS)!r}]
        import test_fuzz_ops as fuzz
        from flower_ext import Trie

        rng = random.Random(0)
        sequences = [[rng.randrange(1, 40) for _ in range(rng.randrange(1, 6))] + [0]
                     for _ in range(40)]
        trie = Trie.from_sequences(sequences)
        calls = fuzz.op_calls(trie, sequences)
        values = [-(2**31), -(2**30), -2, -1, 0, 1, trie.num_nodes, trie.num_items, 2**30, 2**31 - 1]
        outcomes = {{"returned": 0, "raised": 0}}
        for _ in range(300):
            data = trie.data.clone()
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(data.numel())] = rng.choice(values + [rng.randrange(-5, 200)])
            for name, call in calls.items():
                try:
                    call(data, trie.layout)
                    outcomes["returned"] += 1
                except ValueError as error:
                    assert str(error).startswith(f"flower_ext.{{name}}: "), error
                    outcomes["raised"] += 1
        print("outcomes", outcomes)
        """
    )
    assert "outcomes" in output, output


# ---------------------------------------------------------------------------------------------
# raw internal ops with wrong arguments


@pytest.mark.parametrize(
    "flows_shape, grad_shape, dtype, problem",
    [
        ((3,), (7,), torch.float64, "flows must be torch.float64 of shape"),
        ((7,), (2, 7), torch.float64, "grad_flows must be torch.float64 of shape"),
        ((7,), (7,), torch.float32, "flows must be torch.float64 of shape"),
    ],
)
def test_log_flows_backward_checks_its_arguments(flows_shape, grad_shape, dtype, problem):
    trie = Trie.from_sequences([[1, 2, 0], [1, 0], [3, 0], [1, 2, 0]])
    assert trie.num_nodes == 7
    rewards = torch.zeros(trie.num_items, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"flower_ext.log_flows_backward: {problem}"):
        ops.log_flows_backward(
            trie.data,
            trie.layout,
            rewards,
            torch.zeros(flows_shape, dtype=dtype),
            torch.zeros(grad_shape, dtype=torch.float64),
        )


def test_layout_must_rise():
    trie = Trie.from_sequences([[1, 2, 0], [1, 0]])
    layout = [trie.layout[0], 0, trie.num_nodes, 1, trie.num_nodes]
    with pytest.raises(ValueError, match="flower_ext.preorder: layout must be"):
        ops.preorder(trie.data, layout)


# ---------------------------------------------------------------------------------------------
# in-place ops: outputs whose rows share memory, and strided ones that do not


def in_place_ops(trie: Trie):
    nodes = torch.tensor([0, 1])
    flows = trie.log_flows(torch.zeros(trie.num_items))
    bitmask = trie.token_bitmask(nodes, 8)
    return {
        "mask_logits_": lambda logits: ops.mask_logits_(trie.data, trie.layout, logits, nodes),
        "apply_token_bitmask_": lambda logits: ops.apply_token_bitmask_(logits, bitmask),
        "guide_logits_": lambda logits: ops.guide_logits_(
            trie.data, trie.layout, logits, nodes, flows, torch.tensor(0.5)
        ),
    }


OP_NAMES = ["mask_logits_", "apply_token_bitmask_", "guide_logits_"]


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda: torch.zeros(1, 8).expand(2, 8), OVERLAP),  # both rows are one row
        (lambda: torch.zeros(12).as_strided((2, 8), (4, 1)), OVERLAP),  # rows overlap by half
        # every element is one element: refused first for its stride along the vocabulary
        (lambda: torch.zeros(1, 1).expand(2, 8), "contiguous along the vocabulary"),
    ],
    ids=["expand", "overlapping rows", "one element"],
)
def test_in_place_ops_refuse_outputs_that_share_memory(name, make, problem):
    trie = Trie.from_sequences([[1, 2, 0], [1, 0], [3, 0]])
    logits = make()
    before = logits.clone()
    with pytest.raises(ValueError, match=f"flower_ext.{name}: .*{problem}"):
        in_place_ops(trie)[name](logits)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("name", OP_NAMES)
def test_in_place_ops_write_strided_outputs_exactly(name):
    trie = Trie.from_sequences([[1, 2, 0], [1, 0], [3, 0]])
    base = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    expected = base[::2, 1:9].clone()
    in_place_ops(trie)[name](expected)
    strided = base.clone()
    in_place_ops(trie)[name](strided[::2, 1:9])  # row stride 22, an offset, columns 1 .. 8
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[::2, 1:9] = False
    assert torch.equal(strided[::2, 1:9], expected)
    assert torch.equal(strided[outside], base[outside])


# ---------------------------------------------------------------------------------------------
# trie files with other dtypes and mutated headers


@pytest.fixture
def saved_trie(tmp_path):
    path = tmp_path / "sample.trie"
    Trie.from_sequences([[1, 2, 0], [1, 0], [3, 0], [1, 2, 0]]).save(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    return path, load_file(path), metadata


@pytest.mark.parametrize("name", ["parent", "token", "item_node"])
@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.bool,
        torch.float16,
        torch.uint8,
        torch.int64,
        torch.complex64,
    ],
)
def test_load_rejects_every_other_dtype_naming_the_array(saved_trie, name, dtype):
    path, arrays, metadata = saved_trie
    save_file({**arrays, name: arrays[name].to(dtype)}, path, metadata=metadata)
    with pytest.raises(ValueError, match=f"array '{name}' is missing or not 1-D int32"):
        Trie.load(path)


def test_load_refuses_special_files_before_opening(tmp_path):
    # A FIFO is refused without blocking (run in-process: os.stat never opens it).
    fifo = tmp_path / "trie.fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    for path in (fifo, tmp_path):
        with pytest.raises(ValueError, match="is not a regular file"):
            Trie.load(path)


@settings(max_examples=80)
@given(
    edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4)
)
def test_load_mutated_file_is_rejected_or_valid(saved_trie_bytes, edits):
    """Byte edits, mostly in the 8-byte header size and the JSON header (dtypes, shapes,
    offsets, metadata): each load raises ValueError or returns a trie that passed validation."""
    content, path = saved_trie_bytes
    (header_size,) = struct.unpack("<Q", content[:8])
    mutated = bytearray(content)
    for position, byte in edits:
        mutated[position % (8 + header_size + 8)] = byte
    path.write_bytes(bytes(mutated))
    try:
        trie = Trie.load(path)
    except ValueError:
        return
    assert trie.data.numel() == 4 * trie.num_nodes + 2 + trie.num_items


@pytest.fixture(scope="module")
def saved_trie_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("mutated") / "sample.trie"
    Trie.from_sequences([[1, 2, 0], [1, 0], [3, 0], [1, 2, 0]]).save(path)
    return path.read_bytes(), path
