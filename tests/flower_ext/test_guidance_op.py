"""``guide_logits_`` (flow-guided logit masking) against the plain-PyTorch reference on
hypothesis catalogs, plus its exactness at beta = 0, ``torch.library.opcheck``,
``torch.compile(fullgraph=True)``, CUDA against CPU, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flower_ext import Trie, ops
from flower_ext import reference as ref_ops
from strategies import (
    BATCH_SIZES,
    DEVICES,
    SAMPLE,
    SEEDS,
    SMALL_VOCAB,
    Catalog,
    build,
    catalogs,
    node_id_lists,
    prior_log_flows,
    seeded,
)

LOGIT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
FLOW_DTYPES = st.sampled_from([torch.float32, torch.float64])
INDEX_DTYPES = st.sampled_from([torch.int32, torch.int64])
BETA_KINDS = st.sampled_from(["number", "0-d", "per row"])

# The logits of a test: a fresh contiguous tensor, or the last position of a [B, S, V + 5] buffer
# (strided rows, and memory beside them that must stay untouched).
STRIDED = (slice(None), -1, slice(0, SMALL_VOCAB))

NUM_NODES = 9  # of strategies.SAMPLE


def sample_flows(trie: Trie, batch: int | None = None) -> torch.Tensor:
    shape = (trie.num_items,) if batch is None else (batch, trie.num_items)
    return trie.log_flows(seeded(0, shape).to(trie.device))


def draw_beta(data, kind: str, batch: int, dtype: torch.dtype):
    if kind == "number":
        return data.draw(st.floats(-4, 4))
    if kind == "0-d":
        return seeded(data.draw(SEEDS), (), dtype)
    return seeded(data.draw(SEEDS), (batch,), dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(BITS[tensor.dtype])


# ---------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided rows"])
@given(
    catalog=catalogs(huge=False),
    batch=BATCH_SIZES,
    index_dtype=INDEX_DTYPES,
    flow_dtype=FLOW_DTYPES,
    per_row_flows=st.booleans(),
    beta_kind=BETA_KINDS,
    finished_token=st.none() | st.integers(0, SMALL_VOCAB - 1),
    data=st.data(),
)
def test_guide_logits(
    device, dtype, strided, catalog, batch, index_dtype, flow_dtype, per_row_flows, beta_kind,
    finished_token, data,
):
    trie, ref = build(catalog, device)
    nodes = torch.tensor(data.draw(node_id_lists(ref.num_nodes, batch)), dtype=index_dtype)
    flows = data.draw(prior_log_flows(ref, batch if per_row_flows else None, flow_dtype))
    beta = draw_beta(data, beta_kind, batch, flow_dtype)
    buffer = seeded(data.draw(SEEDS), (batch, 3, SMALL_VOCAB + 5), dtype).to(device)
    original = buffer.clone()
    logits = buffer[STRIDED] if strided else buffer[:, 0, :SMALL_VOCAB].contiguous()
    expected = ref_ops.guide_logits(ref, logits.cpu(), nodes, flows, beta, finished_token)
    if isinstance(beta, torch.Tensor):
        beta = beta.to(device)
    guided = trie.guide_logits_(
        logits, nodes.to(device), flows.to(device), beta, finished_token=finished_token
    )
    assert guided is logits
    assert torch.equal(logits.cpu(), expected)
    if strided:  # written through the view, and nowhere else
        outside = torch.ones_like(buffer, dtype=torch.bool)
        outside[STRIDED] = False
        assert torch.equal(buffer[outside], original[outside])


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@given(catalog=catalogs(huge=False), batch=BATCH_SIZES, per_row_flows=st.booleans(), data=st.data())
def test_beta_zero_is_mask_logits_bit_for_bit(device, dtype, catalog, batch, per_row_flows, data):
    """With finite flows, beta = 0 leaves every child's logit as mask_logits_ does, bit for
    bit (-0 included): guided decoding at beta = 0 is unguided decoding."""
    trie, ref = build(catalog, device)
    nodes = torch.tensor(data.draw(node_id_lists(ref.num_nodes, batch)), dtype=torch.int64)
    nodes = nodes.to(device)
    flows = data.draw(
        prior_log_flows(ref, batch if per_row_flows else None, allow_zero_rewards=False)
    ).to(device)
    logits = seeded(data.draw(SEEDS), (batch, SMALL_VOCAB), dtype).to(device)
    logits[:, ::3] = -0.0
    beta = data.draw(st.sampled_from([0.0, torch.zeros(()), torch.zeros(batch)]))
    beta = beta.to(device) if isinstance(beta, torch.Tensor) else beta
    guided = trie.guide_logits_(logits.clone(), nodes, flows, beta)
    masked = trie.mask_logits_(logits.clone(), nodes)
    assert torch.equal(bits(guided), bits(masked))


def test_zero_priors_and_missing_rows(sample):
    """Children with a -inf flow become -inf whatever beta (even 0); node -1 masks its whole
    row; a finite child is shifted by beta * log(F(c) / F(n))."""
    device = sample.device
    rewards = seeded(1, (sample.num_items,)).to(device)
    rewards[[0, 3]] = float("-inf")  # items of [1 2 0]: the subtree of node 4 ([1 2]) is empty
    flows = sample.log_flows(rewards)
    nodes = torch.tensor([1, 1, -1], device=device)
    logits = seeded(2, (3, 8)).to(device)
    beta = torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64, device=device)
    guided = sample.guide_logits_(logits.clone(), nodes, flows, beta)
    assert (guided[:, 2] == float("-inf")).all()  # token 2 leads to node 4
    assert torch.equal(guided[0, 0], logits[0, 0])
    assert guided[1, 0] == logits[1, 0] - 2.0 * (flows[3] - flows[1])  # token 0 leads to node 3
    assert (guided[2] == float("-inf")).all()
    finite = torch.zeros(8, dtype=torch.bool)
    finite[0] = True
    assert torch.equal(torch.isfinite(guided[:2]).cpu(), finite.expand(2, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rounding_matches_torch(device, dtype):
    """The kernel's own float <-> float16 / bfloat16 conversions round as torch's .to() does,
    across the whole range: random bit patterns (subnormals, the largest values, infinities)
    shifted by amounts from 1e-10 to 1e10, so that results also underflow and overflow."""
    vocab_size, rows = 2048, 32
    trie = Trie.from_sequences([[v] for v in range(vocab_size)], device=device)
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(2**15), 2**15, (rows, vocab_size), generator=generator)
    logits = patterns.to(torch.int16).view(dtype)
    logits = logits.masked_fill(torch.isnan(logits), 0.0)  # NaN payloads are not compared
    flows = torch.randn(trie.num_nodes, generator=generator)
    flows *= torch.exp(torch.randn(trie.num_nodes, generator=generator) * 8)
    flows[0] = 0.0  # the root: each child's shift is beta * flows[child]
    beta = torch.randn(rows, generator=generator)
    shift = beta[:, None] * flows[1:]  # the child of token v is node v + 1
    expected = torch.where(shift == 0, logits, (logits.float() - shift).to(dtype))
    guided = trie.guide_logits_(
        logits.to(device),
        torch.zeros(rows, dtype=torch.int64, device=device),
        flows.to(device),
        beta.to(device),
    )
    assert torch.equal(torch.isnan(guided.cpu()), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(bits(guided.cpu())[finite], bits(expected)[finite])


def test_threaded_cpu_launcher(four_threads):
    """A batch large enough to be split between threads gives the reference's result."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(1, 40, (300, 6), generator=generator).tolist()
    trie, ref = build(Catalog(sequences, termination_token=0, huge=False))
    nodes = torch.randint(-1, trie.num_nodes, (3000,), generator=generator)
    flows = trie.log_flows(seeded(1, (trie.num_items,)))
    logits = seeded(2, (3000, SMALL_VOCAB), torch.float32)
    beta = seeded(3, (3000,))
    expected = ref_ops.guide_logits(ref, logits, nodes, flows, beta)
    assert torch.equal(trie.guide_logits_(logits, nodes, flows, beta), expected)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_cuda_matches_cpu(dtype):
    """The CUDA grid and the CPU loop run the same element kernel: identical bits, on a catalog
    with a wide root and a vocabulary of many words, at every kind of node."""
    generator = torch.Generator().manual_seed(0)
    vocab_size = 3000
    sequences = torch.randint(0, vocab_size, (2000, 5), generator=generator).tolist()
    trie = Trie.from_sequences(sequences)
    nodes = torch.randint(-1, trie.num_nodes, (256,), generator=generator)
    nodes[:8] = 0
    rewards = seeded(1, (256, trie.num_items))
    rewards[:, ::5] = float("-inf")
    flows = trie.log_flows(rewards)
    logits = seeded(2, (256, vocab_size), dtype)
    beta = seeded(3, (256,), torch.float32)
    on_cpu = trie.guide_logits_(logits.clone(), nodes, flows, beta)
    on_cuda = trie.to("cuda").guide_logits_(
        logits.cuda(), nodes.cuda(), flows.cuda(), beta.cuda()
    )
    assert torch.equal(bits(on_cuda.cpu()), bits(on_cpu))


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile


def opcheck_cases(trie: Trie) -> dict[str, tuple]:
    device = trie.device
    nodes = torch.tensor([0, 1, 4, -1, 8], dtype=torch.int32, device=device)
    logits = seeded(1, (5, 40), torch.float32).to(device)
    shared, per_row = sample_flows(trie), sample_flows(trie, 5)
    return {
        "shared flows, 0-d beta": (logits, nodes, shared, torch.tensor(0.5, device=device)),
        "per-row flows and beta": (logits, nodes.long(), per_row, seeded(2, (5,)).to(device)),
        "bfloat16": (logits.bfloat16(), nodes, shared.float(), torch.zeros((), device=device)),
    }


@pytest.mark.parametrize("name", list(opcheck_cases(Trie.from_sequences(SAMPLE))))
def test_opcheck(sample, name):
    logits, nodes, flows, beta = opcheck_cases(sample)[name]
    for finished_token in (None, 3):
        args = (sample.data, sample.layout, logits, nodes, flows, beta, finished_token)
        torch.library.opcheck(ops.guide_logits_, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("beta", [0.75, "tensor"])
def test_compile_fullgraph(sample, backend, beta):
    """The op, with a Python-number or a tensor beta, traces without a graph break and gives
    the eager result, also with arithmetic around it for inductor to generate code for."""
    torch._dynamo.reset()
    device = sample.device
    nodes = torch.tensor([0, 1, 4, 2], device=device)  # no row all -inf: log_softmax stays finite
    flows = sample_flows(sample, 4)
    logits = seeded(3, (4, 40), torch.float32).to(device)
    beta = seeded(4, (4,)).to(device) if beta == "tensor" else beta

    def guided_log_probs(x):
        return torch.log_softmax(sample.guide_logits_(x * 0.5, nodes, flows, beta), dim=-1)

    compiled = torch.compile(guided_log_probs, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(logits), guided_log_probs(logits))


# ---------------------------------------------------------------------------------------------
# bad input


def rejects(problem: str):
    return pytest.raises(ValueError, match=rf"^flower_ext\.guide_logits_: .*{problem}")


NODE_RANGE = r"node ids must lie in \[-1, num_nodes\)"
FLOW_VALUES = r"log_flows must not be NaN or \+inf"


def bad_flows(value: float, node: int) -> torch.Tensor:
    flows = torch.zeros(NUM_NODES)
    flows[node] = value
    return flows


@pytest.mark.parametrize(
    "node_ids, vocab_size, flows, beta, problem",
    [
        ([0, NUM_NODES], 40, torch.zeros(NUM_NODES), 1.0, NODE_RANGE),
        ([-2], 40, torch.zeros(NUM_NODES), 1.0, NODE_RANGE),
        ([2**32], 40, torch.zeros(NUM_NODES), 1.0, NODE_RANGE),  # wraps to the root in int32
        ([0], 3, torch.zeros(NUM_NODES), 1.0, "vocab_size must exceed every token id"),
        ([1], 40, bad_flows(float("nan"), 3), 1.0, FLOW_VALUES),  # a child's flow
        ([1], 40, bad_flows(float("inf"), 1), 0.0, FLOW_VALUES),  # the node's own flow
        ([0], 40, torch.zeros(NUM_NODES), torch.tensor(float("nan")), "beta must be finite"),
        ([0, 1], 40, torch.zeros(NUM_NODES), torch.tensor([0.0, float("-inf")]), "beta must be"),
    ],
)
def test_rejects_bad_values(sample, node_ids, vocab_size, flows, beta, problem):
    """Values are checked in the kernel, on every device."""
    device = sample.device
    logits = torch.zeros(len(node_ids), vocab_size, device=device)
    beta = beta.to(device) if isinstance(beta, torch.Tensor) else beta
    with rejects(problem):
        sample.guide_logits_(logits, torch.tensor(node_ids, device=device), flows.to(device), beta)


def test_accepts_bad_flows_that_no_row_reads(sample):
    """Only the flows of the rows' nodes and their children are checked: node 2 ([3]) has the
    children 5 and 6, node 8 ([3 4 5]) none."""
    flows = torch.full((NUM_NODES,), float("nan"), device=sample.device)
    flows[[2, 5, 6]] = 0.0
    nodes = torch.tensor([2, 8, -1], device=sample.device)
    guided = sample.guide_logits_(torch.zeros(3, 8, device=sample.device), nodes, flows, 1.0)
    assert guided[0, [0, 4]].tolist() == [0.0, 0.0] and torch.isinf(guided[1:]).all()


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_number_beta_at_the_call(beta):
    trie = Trie.from_sequences(SAMPLE)
    logits = torch.ones(1, 8)
    with rejects("beta must be finite, got"):
        trie.guide_logits_(logits, torch.tensor([0]), torch.zeros(NUM_NODES), beta)
    assert (logits == 1).all()


OTHER_DEVICES = ["meta"] + (["cuda"] if "cuda" in DEVICES else [])
SHAPE_CASES = {
    "flows shape": (
        dict(flows=torch.zeros(NUM_NODES + 1)),
        r"log_flows must have shape \[num_nodes\] or \[batch, num_nodes\] = \[2, 9\], got \(10,\)",
    ),
    "flows rows": (dict(flows=torch.zeros(3, NUM_NODES)), r"got \(3, 9\)"),
    "flows dtype": (
        dict(flows=torch.zeros(NUM_NODES, dtype=torch.float16)),
        "log_flows must be float32 or float64, got torch.float16",
    ),
    "beta shape": (
        dict(beta=torch.zeros(3)),
        r"beta must be a number or have shape \[\] or \[batch\] = \[2\], got \(3,\)",
    ),
    "beta 2-D": (dict(beta=torch.zeros(2, 1)), r"got \(2, 1\)"),
    "beta dtype": (dict(beta=torch.zeros(2, dtype=torch.int64)), "beta must be a floating-point"),
    "node_ids dtype": (dict(node_ids=torch.zeros(2)), "node_ids must be int32 or int64"),
    "node_ids 2-D": (dict(node_ids=torch.zeros(2, 1, dtype=torch.int64)), "node_ids must be 1-D"),
    "logits rows": (dict(logits=torch.ones(3, 8)), "logits have 3 rows, expected 2"),
    "logits 1-D": (dict(logits=torch.ones(8)), r"logits must have shape \[batch, vocab\]"),
    "logits dtype": (
        dict(logits=torch.ones(2, 8, dtype=torch.int32)),
        "logits must be float16, bfloat16, float32 or float64",
    ),
    "logits stride": (dict(logits=torch.ones(8, 2).t()), "contiguous along the vocabulary"),
    "empty vocabulary": (dict(logits=torch.ones(2, 0)), "at least one token"),
}


@pytest.mark.parametrize("change, problem", SHAPE_CASES.values(), ids=SHAPE_CASES.keys())
def test_rejects_bad_arguments_and_leaves_logits_alone(change, problem):
    trie = Trie.from_sequences(SAMPLE)
    args = dict(
        logits=torch.ones(2, 8),
        node_ids=torch.tensor([0, 1]),
        flows=torch.zeros(NUM_NODES),
        beta=torch.zeros(2),
    )
    args.update(change)
    with rejects(problem):
        trie.guide_logits_(args["logits"], args["node_ids"], args["flows"], args["beta"])
    assert (args["logits"] == 1).all(), "a rejected call must not have written anything"


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("argument", ["logits", "node_ids", "log_flows", "beta"])
def test_rejects_other_device(other, argument):
    trie = Trie.from_sequences(SAMPLE)
    args = dict(
        logits=torch.ones(2, 8),
        node_ids=torch.tensor([0, 1]),
        log_flows=torch.zeros(NUM_NODES),
        beta=torch.zeros(2),
    )
    args[argument] = args[argument].to(other)
    with rejects(f"{argument} is on {other}.* but the trie is on cpu"):
        trie.guide_logits_(**args)
