"""The tree passes (``preorder``, ``path_sums`` and its adjoint ``subtree_sums``) and the
``child_count`` / ``is_leaf`` properties against the plain-PyTorch reference on hypothesis
catalogs, plus ``torch.library.opcheck``, ``gradcheck`` (float64),
``torch.compile(fullgraph=True)``, CUDA against CPU, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flower_ext import Trie, ops
from flower_ext import reference as ref_ops
from strategies import DEVICES, SAMPLE, SEEDS, Catalog, build, catalogs, seeded

VALUE_DTYPES = st.sampled_from([torch.float32, torch.float64])
# Sums along paths and over subtrees run in another order than the reference's masked sums.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}

NUM_NODES = 9  # of strategies.SAMPLE


def node_values(trie: Trie, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """Float64 values per node, ``[N]`` or ``[batch, N]``, on the trie's device."""
    shape = (trie.num_nodes,) if batch is None else (batch, trie.num_nodes)
    return seeded(seed, shape).to(trie.device)


# ---------------------------------------------------------------------------------------------
# against the reference


@given(catalog=catalogs())
def test_child_count_and_is_leaf(device, catalog):
    trie, ref = build(catalog, device)
    counts = torch.tensor([len(ref.children[prefix]) for prefix in ref.prefixes], dtype=torch.int32)
    assert trie.child_count.dtype == torch.int32 and torch.equal(trie.child_count.cpu(), counts)
    assert trie.is_leaf.dtype == torch.bool and torch.equal(trie.is_leaf.cpu(), counts == 0)


@given(catalog=catalogs())
def test_preorder(device, catalog):
    trie, ref = build(catalog, device)
    rank, size = trie.preorder()
    expected_rank, expected_size = ref_ops.preorder(ref)
    assert rank.dtype == size.dtype == torch.int64
    assert torch.equal(rank.cpu(), expected_rank) and torch.equal(size.cpu(), expected_size)
    # The ancestor test the ranks exist for: [i, j] is True when j is an ancestor of i or i.
    rank, size = rank.cpu(), size.cpu()
    inside = (rank[None, :] <= rank[:, None]) & (rank[:, None] < (rank + size)[None, :])
    assert torch.equal(inside, ref_ops.ancestors(ref))


@given(
    catalog=catalogs(),
    batch=st.sampled_from([None, 0, 1, 3, 64]),
    dtype=VALUE_DTYPES,
    seed=SEEDS,
)
def test_path_sums(device, catalog, batch, dtype, seed):
    trie, ref = build(catalog, device)
    shape = (ref.num_nodes,) if batch is None else (batch, ref.num_nodes)
    values = seeded(seed, shape, dtype)
    sums = trie.path_sums(values.to(device))
    assert sums.dtype == dtype and sums.shape == shape
    torch.testing.assert_close(sums.cpu(), ref_ops.path_sums(ref, values), **TOLERANCE[dtype])


@given(catalog=catalogs(), dtype=VALUE_DTYPES, data=st.data())
def test_path_sums_propagate_nan_and_inf(device, catalog, dtype, data):
    """NaN and infinite values are arithmetic, not errors: they reach every path through them."""
    trie, ref = build(catalog, device)
    values = seeded(data.draw(SEEDS), (2, ref.num_nodes), dtype)
    special = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    nodes = data.draw(st.lists(st.integers(0, ref.num_nodes - 1), max_size=4))
    where = torch.tensor(nodes, dtype=torch.int64)
    values[0, where] = special[torch.arange(len(where)) % 3]
    sums = trie.path_sums(values.to(device)).cpu()
    expected = ref_ops.path_sums(ref, values)
    assert torch.equal(torch.isnan(sums), torch.isnan(expected))
    torch.testing.assert_close(sums, expected, equal_nan=True, **TOLERANCE[dtype])


@given(catalog=catalogs(), batch=st.sampled_from([None, 1, 3]), dtype=VALUE_DTYPES, data=st.data())
def test_path_sums_gradient(device, catalog, batch, dtype, data):
    """The backward (subtree sums of the incoming gradient) equals autograd through the
    reference."""
    trie, ref = build(catalog, device)
    shape = (ref.num_nodes,) if batch is None else (batch, ref.num_nodes)
    values = seeded(data.draw(SEEDS), shape, dtype).requires_grad_()
    grad_sums = seeded(data.draw(SEEDS), shape, dtype)
    values_here = values.detach().to(device).requires_grad_()
    (got,) = torch.autograd.grad(trie.path_sums(values_here), values_here, grad_sums.to(device))
    (expected,) = torch.autograd.grad(ref_ops.path_sums(ref, values), values, grad_sums)
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE[dtype])
    subtree = ops.subtree_sums(trie.data, trie.layout, grad_sums.to(device))
    expected = ref_ops.subtree_sums(ref, grad_sums)
    torch.testing.assert_close(subtree.cpu(), expected, **TOLERANCE[dtype])


def test_threaded_cpu_launchers(four_threads):
    """Batches large enough to be split between threads give each row's own result."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 50, (600, 10), generator=generator).tolist()
    trie, _ = build(Catalog(sequences, termination_token=0, huge=False))
    values = seeded(1, (64, trie.num_nodes))
    sums = trie.path_sums(values)
    subtree = ops.subtree_sums(trie.data, trie.layout, values)
    for b in range(64):
        assert torch.equal(sums[b], trie.path_sums(values[b]))
        assert torch.equal(subtree[b], ops.subtree_sums(trie.data, trie.layout, values[b]))


def test_strided_values(sample):
    values = node_values(sample, 3).t().contiguous().t()
    assert not values.is_contiguous()
    assert torch.equal(sample.path_sums(values), sample.path_sums(values.contiguous()))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_matches_cpu():
    """The level-by-level CUDA passes give the CPU's id-order results bit for bit: each node
    adds the same operands in the same order."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 3000, (5000, 8), generator=generator).tolist()
    trie = Trie.from_sequences(sequences)
    on_gpu = trie.to("cuda")
    values = seeded(1, (16, trie.num_nodes), torch.float32)
    for got, expected in zip(on_gpu.preorder(), trie.preorder()):
        assert torch.equal(got.cpu(), expected)
    assert torch.equal(on_gpu.path_sums(values.cuda()).cpu(), trie.path_sums(values))
    assert torch.equal(
        ops.subtree_sums(on_gpu.data, on_gpu.layout, values.cuda()).cpu(),
        ops.subtree_sums(trie.data, trie.layout, values),
    )


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck and torch.compile


def opcheck_cases(trie: Trie) -> dict[str, tuple]:
    data, layout = trie.data, trie.layout
    return {
        "preorder": (ops.preorder, (data, layout)),
        "path_sums 1-D": (ops.path_sums, (data, layout, node_values(trie).requires_grad_())),
        "path_sums 2-D": (ops.path_sums, (data, layout, node_values(trie, 3).requires_grad_())),
        "path_sums float32": (ops.path_sums, (data, layout, node_values(trie, 2).float())),
        "subtree_sums": (ops.subtree_sums, (data, layout, node_values(trie, 3).requires_grad_())),
    }


@pytest.mark.parametrize("name", list(opcheck_cases(Trie.from_sequences(SAMPLE))))
def test_opcheck(sample, name):
    op, args = opcheck_cases(sample)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("batch", [None, 3])
def test_path_sums_gradcheck(sample, batch):
    values = node_values(sample, batch).requires_grad_()
    assert torch.autograd.gradcheck(sample.path_sums, (values,))
    assert torch.autograd.gradgradcheck(sample.path_sums, (values,))


def test_subtree_sums_gradcheck(sample):
    values = node_values(sample, 2).requires_grad_()

    def subtree(v):
        return ops.subtree_sums(sample.data, sample.layout, v)

    assert torch.autograd.gradcheck(subtree, (values,))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(sample, backend):
    """Both ops trace without a graph break, path_sums' backward included, and give the eager
    results, also with arithmetic around them for inductor to generate code for."""
    torch._dynamo.reset()

    def prefix_scores(v):
        rank, size = sample.preorder()
        return sample.path_sums(v * 0.5).exp() * size, rank

    compiled = torch.compile(prefix_scores, fullgraph=True, backend=backend)
    values = node_values(sample, 2)
    results = []
    for function in (prefix_scores, compiled):
        v = values.clone().requires_grad_()
        scores, rank = function(v)
        scores.sum().backward()
        results.append((scores.detach(), rank, v.grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# bad input


def rejects(op: str, problem: str):
    return pytest.raises(ValueError, match=rf"^flower_ext\.{op}: .*{problem}")


VALUE_SHAPE = r"values must have shape \[num_nodes\] or \[batch, num_nodes\] with num_nodes = 9"


@pytest.mark.parametrize(
    "values, problem",
    [
        (torch.zeros(NUM_NODES + 1), rf"{VALUE_SHAPE}, got \(10,\)"),
        (torch.zeros(2, NUM_NODES - 1), rf"{VALUE_SHAPE}, got \(2, 8\)"),
        (torch.zeros(2, 3, NUM_NODES), rf"{VALUE_SHAPE}, got \(2, 3, 9\)"),
        (torch.zeros(()), rf"{VALUE_SHAPE}, got \(\)"),
        (torch.zeros(NUM_NODES, dtype=torch.float16), "values must be float32 or float64"),
        (torch.zeros(NUM_NODES, dtype=torch.int64), "values must be float32 or float64"),
    ],
)
@pytest.mark.parametrize("op", ["path_sums", "subtree_sums"])
def test_tree_passes_reject(sample, op, values, problem):
    with rejects(op, problem):
        getattr(ops, op)(sample.data, sample.layout, values.to(sample.device))


@pytest.mark.parametrize("other", ["meta"] + (["cuda"] if "cuda" in DEVICES else []))
def test_path_sums_rejects_other_device(other):
    trie = Trie.from_sequences(SAMPLE)
    with rejects("path_sums", f"values is on {other}.* but the trie is on cpu"):
        trie.path_sums(torch.zeros(NUM_NODES, device=other))


@pytest.mark.parametrize(
    "layout, problem",
    [
        (lambda t: t.level_ptr, r"layout must be \[num_items, \*level_ptr\]"),
        (lambda t: [t.num_items + 1, *t.level_ptr], "does not hold a trie of"),
        (lambda t: [t.num_items, 0, 1, 100], "does not hold a trie of"),
    ],
)
@pytest.mark.parametrize("op", ["preorder", "path_sums"])
def test_reject_malformed_packed_trie(op, layout, problem):
    """A layout that does not belong to the data must not let the kernels read outside it."""
    trie = Trie.from_sequences(SAMPLE)
    values = () if op == "preorder" else (torch.zeros(NUM_NODES),)
    with rejects(op, problem):
        getattr(ops, op)(trie.data, layout(trie), *values)
