"""Every trie op (flower_ext/ops.py) against the plain-PyTorch reference on hypothesis catalogs,
plus ``torch.library.opcheck``, ``gradcheck`` of the differentiable ops and
``torch.compile(fullgraph=True)``."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flower_ext import Trie, ops
from flower_ext import reference as ref_ops
from strategies import (
    BATCH_SIZES,
    SAMPLE,
    SEEDS,
    SMALL_VOCAB,
    Catalog,
    build,
    catalogs,
    finite_or_zero,
    log_reward_tensors,
    node_id_lists,
    paths_and_flows,
    seeded,
    token_rows,
)

FLOW_DTYPES = st.sampled_from([torch.float32, torch.float64])
INDEX_DTYPES = st.sampled_from([torch.int32, torch.int64])
LOGIT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# The per-node sums run in a different order than the reference's logsumexp.
FLOW_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}

TERMINATION = 0


def sample_paths(trie: Trie) -> torch.Tensor:
    """States of [1 2 0], [3 4 5], [1 0] and [3], padded with -1, as ``path_nodes [4, 4]``."""
    root = torch.zeros(4, 1, dtype=torch.int64, device=trie.device)
    actions = torch.tensor([[1, 2, 0], [3, 4, 5], [1, 0, 0], [3, 0, 0]], device=trie.device)
    lengths = torch.tensor([3, 3, 2, 1], device=trie.device)
    return torch.cat([root, trie.walk(actions, lengths).long()], dim=1)


def sample_rewards(
    trie: Trie, batch: int | None = None, requires_grad: bool = False
) -> torch.Tensor:
    """Finite float64 item log-rewards, ``[I]`` or ``[batch, I]``."""
    shape = (trie.num_items,) if batch is None else (batch, trie.num_items)
    return seeded(0, shape).to(trie.device).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# against the reference


@given(
    catalog=catalogs(),
    batch=st.sampled_from([None, 0, 1, 3, 64]),
    dtype=FLOW_DTYPES,
    data=st.data(),
)
def test_log_flows(device, catalog, batch, dtype, data):
    trie, ref = build(catalog, device)
    shape = (ref.num_items,) if batch is None else (batch, ref.num_items)
    rewards = data.draw(log_reward_tensors(shape, dtype))
    flows = trie.log_flows(rewards.to(device))
    assert flows.dtype == dtype and flows.shape == (*shape[:-1], ref.num_nodes)
    torch.testing.assert_close(
        flows.cpu(), ref_ops.log_flows(ref, rewards), **FLOW_TOLERANCE[dtype]
    )


@given(catalog=catalogs(), batch=st.sampled_from([None, 1, 3]), dtype=FLOW_DTYPES, data=st.data())
def test_log_flows_gradient(device, catalog, batch, dtype, data):
    """The backward kernel equals autograd through the reference (finite rewards: the
    reference's logsumexp has no gradient over an empty subtree)."""
    trie, ref = build(catalog, device)
    shape = (ref.num_items,) if batch is None else (batch, ref.num_items)
    rewards = data.draw(log_reward_tensors(shape, dtype, allow_zero_rewards=False))
    grad_flows = seeded(data.draw(SEEDS), (*shape[:-1], ref.num_nodes), dtype)
    rewards_here = rewards.to(device).requires_grad_()
    (got,) = torch.autograd.grad(trie.log_flows(rewards_here), rewards_here, grad_flows.to(device))
    rewards.requires_grad_()
    (expected,) = torch.autograd.grad(ref_ops.log_flows(ref, rewards), rewards, grad_flows)
    torch.testing.assert_close(got.cpu(), expected, **FLOW_TOLERANCE[dtype])


@given(catalog=catalogs(), batch=st.sampled_from([1, 3]), data=st.data())
def test_log_flows_gradient_with_zero_rewards_is_finite(device, catalog, batch, data):
    """With -inf rewards and any upstream gradient (also on -inf flows), the gradient stays
    finite and is 0 for every zero reward."""
    trie, _ = build(catalog, device)
    rewards = data.draw(log_reward_tensors((batch, trie.num_items))).to(device).requires_grad_()
    flows = trie.log_flows(rewards)
    (grad,) = torch.autograd.grad(flows, rewards, torch.ones_like(flows))
    assert torch.isfinite(grad).all()
    assert (grad[rewards.detach() == float("-inf")] == 0).all()


@given(
    catalog=catalogs(),
    batch=BATCH_SIZES,
    dtype=INDEX_DTYPES,
    with_lengths=st.booleans(),
    data=st.data(),
)
def test_walk(device, catalog, batch, dtype, with_lengths, data):
    trie, ref = build(catalog, device)
    length = data.draw(st.integers(0, ref.depth + 2))
    tokens = torch.tensor(data.draw(token_rows(catalog, batch, length)), dtype=dtype).reshape(
        batch, length
    )
    lengths = None
    if with_lengths:
        lengths = torch.tensor(
            data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)),
            dtype=torch.int64,
        )
    got = trie.walk(tokens.to(device), None if lengths is None else lengths.to(device))
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), ref_ops.walk(ref, tokens, lengths))


@given(catalog=catalogs(), data=st.data())
def test_walk_one_dimensional(catalog, data):
    trie, ref = build(catalog)
    (row,) = data.draw(token_rows(catalog, 1, ref.depth + 1))
    tokens = torch.tensor(row)
    assert torch.equal(trie.walk(tokens), ref_ops.walk(ref, tokens[None])[0])


@given(
    catalog=catalogs(),
    batch=BATCH_SIZES,
    node_dtype=INDEX_DTYPES,
    token_dtype=INDEX_DTYPES,
    two_dimensional=st.booleans(),
    data=st.data(),
)
def test_advance(device, catalog, batch, node_dtype, token_dtype, two_dimensional, data):
    trie, ref = build(catalog, device)
    nodes = torch.tensor(data.draw(node_id_lists(ref.num_nodes, batch)), dtype=node_dtype)
    # Tokens that are children of the node as often as not.
    alphabet = sorted({token for sequence in catalog.sequences for token in sequence})
    tokens = torch.tensor(
        data.draw(st.lists(st.sampled_from(alphabet), min_size=batch, max_size=batch)),
        dtype=token_dtype,
    )
    if two_dimensional:
        nodes, tokens = nodes.reshape(1, batch), tokens.reshape(1, batch)
    got = trie.advance(nodes.to(device), tokens.to(device))
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), ref_ops.advance(ref, nodes, tokens))


@given(
    catalog=catalogs(huge=False),
    batch=BATCH_SIZES,
    dtype=INDEX_DTYPES,
    vocab_size=st.sampled_from([7, 32, SMALL_VOCAB, 64, 65]),
    use_finished_token=st.booleans(),
    data=st.data(),
)
def test_token_bitmask(device, catalog, batch, dtype, vocab_size, use_finished_token, data):
    trie, ref = build(catalog, device)
    nodes = torch.tensor(data.draw(node_id_lists(ref.num_nodes, batch)), dtype=dtype)
    finished = data.draw(st.integers(0, vocab_size - 1)) if use_finished_token else None
    got = trie.token_bitmask(nodes.to(device), vocab_size, finished_token=finished)
    assert got.dtype == torch.int32 and got.shape == (batch, (vocab_size + 31) // 32)
    assert torch.equal(got.cpu(), ref_ops.token_bitmask(ref, nodes, vocab_size, finished))


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@given(batch=BATCH_SIZES, vocab_size=st.sampled_from([1, 31, 32, 33, 100]), seed=SEEDS)
def test_apply_token_bitmask(device, dtype, batch, vocab_size, seed):
    generator = torch.Generator().manual_seed(seed)
    words = (vocab_size + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31, (batch, words), generator=generator).to(torch.int32)
    logits = seeded(seed, (batch, vocab_size), dtype)
    got = logits.to(device)
    ops.apply_token_bitmask_(got, bitmask.to(device))
    assert torch.equal(got.cpu(), ref_ops.apply_token_bitmask(logits, bitmask))


# Where the logits of a mask_logits_ test sit in a [B, 3, V + 5] buffer: None for a fresh
# contiguous tensor; otherwise an index giving a view whose rows are strided.
LOGIT_LAYOUTS = {
    "contiguous": None,
    "last position of [B, S, V]": (slice(None), -1, slice(None)),
    "columns of a wider buffer": (slice(None), 0, slice(0, SMALL_VOCAB)),
}


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("layout", LOGIT_LAYOUTS.values(), ids=LOGIT_LAYOUTS.keys())
@given(
    catalog=catalogs(huge=False),
    batch=BATCH_SIZES,
    index_dtype=INDEX_DTYPES,
    finished_token=st.none() | st.integers(0, SMALL_VOCAB - 1),
    data=st.data(),
)
def test_mask_logits(device, dtype, layout, catalog, batch, index_dtype, finished_token, data):
    trie, ref = build(catalog, device)
    nodes = torch.tensor(data.draw(node_id_lists(ref.num_nodes, batch)), dtype=index_dtype)
    buffer = seeded(data.draw(SEEDS), (batch, 3, SMALL_VOCAB + 5), dtype).to(device)
    original = buffer.clone()
    logits = buffer[:, 0, :SMALL_VOCAB].contiguous() if layout is None else buffer[layout]
    expected = ref_ops.mask_logits(ref, logits.cpu(), nodes, finished_token)
    assert trie.mask_logits_(logits, nodes.to(device), finished_token=finished_token) is logits
    assert torch.equal(logits.cpu(), expected)
    if layout is not None:  # written through the view, and nowhere else
        outside = torch.ones_like(buffer, dtype=torch.bool)
        outside[layout] = False
        assert torch.equal(buffer[outside], original[outside])


@given(catalog=catalogs(), batch=BATCH_SIZES, dtype=INDEX_DTYPES, data=st.data())
def test_children(device, catalog, batch, dtype, data):
    trie, ref = build(catalog, device)
    nodes = torch.tensor(data.draw(node_id_lists(ref.num_nodes, batch)), dtype=dtype)
    got = trie.children(nodes.to(device))
    expected = ref_ops.children(ref, nodes)
    for name, g, e in zip(["row_ptr", "child_tokens", "child_nodes"], got, expected):
        assert g.dtype == e.dtype and torch.equal(g.cpu(), e), name


@given(
    catalog=catalogs(),
    batch=BATCH_SIZES,
    dtype=FLOW_DTYPES,
    index_dtype=INDEX_DTYPES,
    per_row_flows=st.booleans(),
    data=st.data(),
)
def test_transition_log_probs(device, catalog, batch, dtype, index_dtype, per_row_flows, data):
    trie, ref = build(catalog, device)
    path_nodes, _, flows = data.draw(
        paths_and_flows(catalog, ref, batch, dtype, per_row_flows)
    )
    step, termination = trie.transition_log_probs(
        flows.to(device), path_nodes.to(index_dtype).to(device), catalog.termination_token
    )
    expected_step, expected_termination = ref_ops.transition_log_probs(
        ref, flows, path_nodes, catalog.termination_token
    )
    tolerance = FLOW_TOLERANCE[dtype]
    torch.testing.assert_close(step.cpu(), expected_step, **tolerance)
    torch.testing.assert_close(termination.cpu(), expected_termination, **tolerance)


def test_threaded_cpu_launchers(four_threads):
    """Batches large enough to be split between threads give the rows' single-thread results,
    and the reference's on a few rows."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 50, (600, 10), generator=generator).tolist()
    trie, ref = build(Catalog(sequences, termination_token=0, huge=False))
    rewards = seeded(1, (64, trie.num_items)).requires_grad_()
    flows = trie.log_flows(rewards)
    (grad,) = torch.autograd.grad(flows.sum(), rewards)
    tokens = torch.tensor([sequences[b % 600] * 30 for b in range(64)])  # [64, 300]
    nodes = trie.walk(tokens)
    for b in range(64):
        row = rewards[b].detach().requires_grad_()
        row_flows = trie.log_flows(row)
        torch.testing.assert_close(flows[b], row_flows, rtol=0, atol=0)
        torch.testing.assert_close(grad[b], torch.autograd.grad(row_flows.sum(), row)[0])
        assert torch.equal(nodes[b], trie.walk(tokens[b]))
    few = rewards.detach()[[0, 63]]
    torch.testing.assert_close(flows.detach()[[0, 63]], ref_ops.log_flows(ref, few))
    assert torch.equal(nodes[[0, 63]], ref_ops.walk(ref, tokens[[0, 63]]))


def test_strided_inputs(sample):
    """Non-contiguous index and value tensors give the results of their contiguous copies."""
    device = sample.device
    rewards = seeded(3, (sample.num_items, 3)).to(device).t()  # [3, I], column-major
    flows = sample.log_flows(rewards.contiguous()).t().contiguous().t()
    tokens = torch.tensor([[1, 9, 2, 9, 0], [3, 9, 4, 9, 5]], device=device)[:, ::2]
    nodes = torch.arange(-1, sample.num_nodes, device=device)[::2]
    paths = sample_paths(sample)[:3].t().contiguous().t()
    cases = {
        "log_flows": (sample.log_flows, (rewards,)),
        "walk": (sample.walk, (tokens, torch.tensor([3, 9, 2, 9], device=device)[::2])),
        "advance": (sample.advance, (nodes, tokens[0, :1].expand(nodes.shape))),
        "token_bitmask": (lambda n: sample.token_bitmask(n, 40), (nodes,)),
        "children": (sample.children, (nodes,)),
        "transition_log_probs": (
            lambda f, p: sample.transition_log_probs(f, p, TERMINATION),
            (flows, paths),
        ),
    }
    for name, (function, args) in cases.items():
        assert not all(a.is_contiguous() for a in args), name
        got = function(*args)
        expected = function(*(a.contiguous() for a in args))
        if isinstance(got, torch.Tensor):
            got, expected = (got,), (expected,)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), name


# ---------------------------------------------------------------------------------------------
# opcheck: schemas, fake (meta) kernels, autograd registration and AOT dispatch


def opcheck_cases(trie: Trie) -> dict[str, tuple]:
    """One (op, args) per custom op, on the sample trie."""
    data, layout, device = trie.data, trie.layout, trie.device
    nodes = torch.tensor([0, 1, 3, -1, 8], dtype=torch.int32, device=device)
    rewards = sample_rewards(trie, batch=2, requires_grad=True)
    flows = trie.log_flows(rewards.detach())
    logits = seeded(1, (5, 40), torch.float32).to(device)
    return {
        "log_flows": (ops.log_flows, (data, layout, rewards)),
        "log_flows 1-D": (ops.log_flows, (data, layout, rewards[0].detach().requires_grad_())),
        "log_flows_backward": (
            ops.log_flows_backward,
            (data, layout, rewards.detach(), flows, torch.ones_like(flows)),
        ),
        "walk": (
            ops.walk,
            (data, layout, torch.tensor([[1, 2, 0], [3, 9, 4]], device=device), None),
        ),
        "walk with lengths": (
            ops.walk,
            (
                data,
                layout,
                torch.tensor([[1, 2, 0], [3, 4, 5]], device=device),
                torch.tensor([3, 1], device=device),
            ),
        ),
        "advance": (
            ops.advance,
            (data, layout, nodes, torch.tensor([1, 2, 0, 4, 5], device=device)),
        ),
        "token_bitmask": (ops.token_bitmask, (data, layout, nodes, 40)),
        "apply_token_bitmask_": (
            ops.apply_token_bitmask_,
            (logits, trie.token_bitmask(nodes, 40)),
        ),
        "mask_logits_": (ops.mask_logits_, (data, layout, logits.clone(), nodes)),
        "children": (ops.children, (data, layout, nodes)),
        "transition_log_probs": (
            ops.transition_log_probs,
            (data, layout, flows.clone().requires_grad_(), sample_paths(trie)[:2], TERMINATION),
        ),
    }


OPCHECK_NAMES = list(opcheck_cases(Trie.from_sequences(SAMPLE)))


@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck(sample, name):
    op, args = opcheck_cases(sample)[name]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)


@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("zero_rewards", [False, True], ids=["finite", "with -inf"])
def test_log_flows_gradcheck(sample, batch, zero_rewards):
    rewards = sample_rewards(sample, batch).detach()
    if zero_rewards:
        # Items 1 and 2 alone end at their nodes (whole subtrees become empty), item 3 shares a
        # leaf with item 0 (the leaf's flow stays finite).
        rewards[..., [1, 2, 3]] = float("-inf")
    rewards.requires_grad_()
    assert torch.autograd.gradcheck(lambda r: finite_or_zero(sample.log_flows(r)), (rewards,))


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("zero_rewards", [False, True], ids=["finite", "with -inf"])
def test_transition_log_probs_gradcheck(sample, batch, zero_rewards):
    rewards = sample_rewards(sample, batch)
    if zero_rewards:
        # Items 0 and 3 ([1 2 0]) leave the subtree of [1 2] empty, so the first path runs into
        # zero flow; item 5 ([3 4]) leaves [3 4] without its own reward but not empty.
        rewards[..., [0, 3, 5]] = float("-inf")
    flows = sample.log_flows(rewards).requires_grad_()
    path = sample_paths(sample)

    def transitions(log_flows):
        return finite_or_zero(*sample.transition_log_probs(log_flows, path, TERMINATION))

    assert torch.autograd.gradcheck(transitions, (flows,))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): every op traces without a graph break


def compile_cases(trie: Trie) -> dict[str, tuple]:
    """(function of tensors using the op, its arguments) per op."""
    device = trie.device
    nodes = torch.tensor([0, 1, 3, -1], dtype=torch.int32, device=device)
    tokens = torch.tensor([[1, 2, 0], [3, 4, 5]], device=device)
    rewards = sample_rewards(trie, batch=2, requires_grad=True)
    flows = trie.log_flows(rewards.detach())
    logits = seeded(2, (4, 40), torch.float32).to(device)

    def masked(x, n):
        trie.mask_logits_(x, n)
        return x * 2

    def applied(x, n):
        ops.apply_token_bitmask_(x, trie.token_bitmask(n, x.shape[1]))
        return x

    def transitions(f, p):
        step, termination = trie.transition_log_probs(f, p, TERMINATION)
        return finite_or_zero(step, termination)

    return {
        "log_flows": (lambda r: trie.log_flows(r), (rewards,)),
        "walk": (lambda t, n: trie.walk(t, n), (tokens, torch.tensor([3, 2], device=device))),
        "advance": (
            lambda n, t: trie.advance(trie.advance(n, t), t),
            (nodes, torch.tensor([1, 2, 0, 4], device=device)),
        ),
        "token_bitmask": (lambda n: trie.token_bitmask(n, 40), (nodes,)),
        "apply_token_bitmask_": (applied, (logits.clone(), nodes)),
        "mask_logits_": (masked, (logits.clone(), nodes)),
        "children": (lambda n: trie.children(n), (nodes,)),
        "transition_log_probs": (
            transitions,
            (flows[0].clone().requires_grad_(), sample_paths(trie)),
        ),
    }


def _run(function, args) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The outputs of ``function`` on fresh copies of ``args`` (mutating ops may change them),
    and the gradients of the sum of its floating outputs with respect to the args that require
    them (through the compiled backward when ``function`` is compiled)."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    outputs = function(*args)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    differentiable = [o for o in outputs if o.requires_grad]
    if differentiable:
        sum(o.sum() for o in differentiable).backward()
    return [o.detach() for o in outputs], [a.grad for a in args if a.requires_grad]


@pytest.mark.parametrize("name", list(compile_cases(Trie.from_sequences(SAMPLE))))
def test_compile_fullgraph(sample, name, dynamic_output_shapes):
    torch._dynamo.reset()
    function, args = compile_cases(sample)[name]
    expected_outputs, expected_grads = _run(function, args)
    outputs, grads = _run(torch.compile(function, fullgraph=True, backend="aot_eager"), args)
    for got, expected in zip(outputs + grads, expected_outputs + expected_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_compile_log_flows_inductor(sample):
    """log_flows also compiles under the default backend, inductor, which generates code for
    the arithmetic around the custom op."""
    torch._dynamo.reset()
    rewards = sample_rewards(sample, batch=2)

    def normalised(r):
        flows = sample.log_flows(r * 0.5)
        return flows - flows[:, :1]

    torch.testing.assert_close(
        torch.compile(normalised, fullgraph=True)(rewards), normalised(rewards)
    )
