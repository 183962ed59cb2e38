"""The Flower losses (flower_ext/losses.py) against their definitions: the closed-form
sub-trajectory balance against the O(T^2) all-pairs sum, flow matching and per-state rewards
against the reference, a hand-computed example, gradcheck and torch.compile."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flower_ext import Trie, losses
from flower_ext import reference as ref_ops
from strategies import (
    SEEDS,
    SMALL_VOCAB,
    build,
    catalogs,
    item_paths,
    paths_and_flows,
    seeded,
)

DTYPES = st.sampled_from([torch.float32, torch.float64])
# Logits may be half precision too: the losses compute in float32 (float64 for float64 logits).
LOGIT_DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
TOLERANCE = {
    # Gradients w.r.t. half-precision logits are rounded to it: one ulp is ~0.4 % in bfloat16.
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}


@st.composite
def trajectories(draw, dtype=torch.float64, max_batch: int = 6, max_actions: int = 10):
    """Log-probabilities and rewards of a batch of trajectories with variable lengths (T = 0
    rows and B = 0 included): ``(action_log_probs [B, T], termination_log_probs [B, T+1],
    log_rewards [B, T+1], lengths [B])``. Entries past a row's length are NaN, which the losses
    must ignore."""
    batch = draw(st.integers(0, max_batch))
    num_actions = draw(st.integers(0, max_actions))
    lengths = torch.tensor(
        draw(st.lists(st.integers(0, num_actions), min_size=batch, max_size=batch)),
        dtype=torch.int64,
    )
    seed = draw(SEEDS)
    states = torch.arange(num_actions + 1)
    valid = states.unsqueeze(0) <= lengths.unsqueeze(1)
    actions = -seeded(seed, (batch, num_actions), dtype).abs()  # log-probabilities are <= 0
    termination = -seeded(seed + 1, (batch, num_actions + 1), dtype).abs()
    rewards = seeded(seed + 2, (batch, num_actions + 1), dtype) - 20.0
    nan = float("nan")
    return (
        actions.masked_fill(~valid[:, 1:], nan),
        termination.masked_fill(~valid, nan),
        rewards.masked_fill(~valid, nan),
        lengths,
    )


def requiring_grad(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def grads(loss, inputs):
    """Gradients of ``loss`` w.r.t. the inputs that require them; an input the loss does not
    depend on (e.g. every input of a batch without pairs) gets zeros."""
    floating = [t for t in inputs if t.requires_grad]
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in floating]
    found = torch.autograd.grad(loss, floating, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(floating, found)]


# ---------------------------------------------------------------------------------------------
# sub-trajectory balance


@given(dtype=DTYPES, data=st.data())
def test_subtb_closed_form_equals_all_pairs(dtype, data):
    inputs = requiring_grad(*data.draw(trajectories(dtype)))
    closed = losses.subtb_loss_from_log_probs(*inputs)
    all_pairs = ref_ops.subtb_loss_all_pairs(*inputs)
    assert closed.dtype == dtype
    torch.testing.assert_close(closed, all_pairs, **TOLERANCE[dtype])
    for got, expected in zip(grads(closed, inputs), grads(all_pairs, inputs)):
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_subtb_closed_form_is_centred_in_float32():
    """Per-state values near the -1e4 reward floor: an uncentred sum of squares (n sum H^2 -
    (sum H)^2) would cancel catastrophically in float32; the centred form keeps the float64
    answer to float32 precision."""
    batch, num_actions = 4, 12
    actions = -seeded(1, (batch, num_actions)).abs()
    termination = -seeded(2, (batch, num_actions + 1)).abs()
    rewards = seeded(3, (batch, num_actions + 1)) - 1e4
    # Rounded to float32 first, so that the float64 reference sees the same inputs.
    inputs = [t.float() for t in (actions, termination, rewards)]
    lengths = torch.tensor([12, 7, 1, 0])
    exact = ref_ops.subtb_loss_all_pairs(*(t.double() for t in inputs), lengths)
    closed = losses.subtb_loss_from_log_probs(*inputs, lengths)
    assert closed.dtype == torch.float32
    torch.testing.assert_close(closed.double(), exact, rtol=1e-4, atol=0)


def test_subtb_without_pairs_is_zero():
    actions, termination, rewards = torch.zeros(3, 0), torch.zeros(3, 1), torch.zeros(3, 1)
    assert (
        losses.subtb_loss_from_log_probs(
            actions, termination, rewards, torch.zeros(3, dtype=torch.int64)
        )
        == 0
    )
    empty = (
        torch.zeros(0, 5),
        torch.zeros(0, 6),
        torch.zeros(0, 6),
        torch.zeros(0, dtype=torch.int64),
    )
    assert losses.subtb_loss_from_log_probs(*empty) == 0


@st.composite
def sampled_logits(draw, dtype=torch.float64, vocab_size: int = 11):
    """``(logits [B, T+1, V], actions [B, T], lengths [B], termination_token)``; actions are
    any token but the termination token, and padding actions hold arbitrary (even
    out-of-vocabulary) ids that the loss must mask."""
    batch, num_actions = draw(st.integers(0, 5)), draw(st.integers(0, 8))
    seed = draw(SEEDS)
    termination_token = draw(st.integers(0, vocab_size - 1))
    logits = seeded(seed, (batch, num_actions + 1, vocab_size), dtype)
    actions = torch.randint(
        0, vocab_size - 1, (batch, num_actions), generator=torch.Generator().manual_seed(seed)
    )
    actions += actions >= termination_token  # skips the termination token
    lengths = torch.tensor(
        draw(st.lists(st.integers(0, num_actions), min_size=batch, max_size=batch)),
        dtype=torch.int64,
    )
    padding = torch.arange(num_actions).unsqueeze(0) >= lengths.unsqueeze(1)
    return logits, actions.masked_fill(padding, 10**6), lengths, termination_token


@given(dtype=LOGIT_DTYPES, data=st.data())
def test_subtb_loss_from_logits(dtype, data):
    logits, actions, lengths, termination_token = data.draw(sampled_logits(dtype))
    rewards_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rewards = seeded(data.draw(SEEDS), (logits.shape[0], logits.shape[1]), rewards_dtype) - 5
    (logits,) = requiring_grad(logits)
    got = losses.subtb_loss(logits, actions, rewards, lengths, termination_token)
    expected = ref_ops.subtb_loss(logits, actions, rewards, lengths, termination_token)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(grads(got, [logits]), grads(expected, [logits]), **TOLERANCE[dtype])


def test_subtb_loss_gradcheck():
    logits, actions, lengths, termination_token = _fixed_logits()
    rewards = seeded(5, logits.shape[:2]) - 5
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: losses.subtb_loss(x, actions, rewards, lengths, termination_token), (logits,)
    )


def _fixed_logits():
    """Three trajectories of 4, 2 and 0 actions over a vocabulary of 7; termination token 6."""
    logits = seeded(4, (3, 5, 7))
    actions = torch.tensor([[1, 2, 3, 4], [0, 5, 9, 9], [9, 9, 9, 9]])
    return logits, actions, torch.tensor([4, 2, 0]), 6


def test_subtb_loss_compiles():
    torch._dynamo.reset()
    logits, actions, lengths, termination_token = _fixed_logits()
    rewards = seeded(5, logits.shape[:2]) - 5
    eager = losses.subtb_loss(logits, actions, rewards, lengths, termination_token)
    compiled = torch.compile(losses.subtb_loss, fullgraph=True)
    torch.testing.assert_close(
        compiled(logits, actions, rewards, lengths, termination_token), eager
    )


# ---------------------------------------------------------------------------------------------
# per-state log-rewards


def test_state_log_rewards_by_hand():
    """Items a b ⊤ (reward 1), a ⊤ (3) and c d ⊤ (4), so Z = 8; tokens a..d = 1..4, ⊤ = 0.
    A complete title s gets log(R_o(s) / Z); any other state its path probability times e^-15."""
    trie = Trie.from_sequences([[1, 2, 0], [1, 0], [3, 4, 0]])
    flows = trie.log_flows(torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64).log())
    root = torch.zeros(3, 1, dtype=torch.int64)
    actions = torch.tensor([[1, 2], [3, 4], [3, 0]])
    path = torch.cat([root, trie.walk(actions, torch.tensor([2, 2, 1])).long()], dim=1)
    got = losses.state_log_rewards(trie, flows, path, termination_token=0)
    log, incomplete = math.log, -15.0
    expected = torch.tensor(
        [
            [incomplete, log(3 / 8), log(1 / 8)],  # root; "a" is a title; "a b" is a title
            [incomplete, log(4 / 8) + incomplete, log(4 / 8)],  # root; "c" is not; "c d" is
            [incomplete, log(4 / 8) + incomplete, 0.0],  # root; "c"; padding (ignored)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got[:, :2], expected[:, :2])
    torch.testing.assert_close(got[:2, 2], expected[:2, 2])


@given(
    catalog=catalogs(terminated=True),
    batch=st.integers(0, 6),
    dtype=DTYPES,
    per_row_flows=st.booleans(),
    data=st.data(),
)
def test_state_log_rewards(device, catalog, batch, dtype, per_row_flows, data):
    trie, ref = build(catalog, device)
    path_nodes, lengths, flows = data.draw(
        paths_and_flows(catalog, ref, batch, dtype, per_row_flows)
    )
    got = losses.state_log_rewards(
        trie, flows.to(device), path_nodes.to(device), catalog.termination_token
    )
    expected = ref_ops.state_log_rewards(ref, flows, path_nodes, catalog.termination_token)
    # The package floors zero-reward states (an exact -inf) so that squared residuals stay finite.
    expected = expected.clamp(min=losses._LOG_REWARD_FLOOR)
    valid = torch.arange(path_nodes.shape[1]) <= lengths.unsqueeze(1)
    torch.testing.assert_close(got.cpu()[valid], expected[valid], **TOLERANCE[dtype])


def _terminated_sample() -> tuple[Trie, torch.Tensor, int]:
    """A terminated catalog and the teacher-forced state paths of four of its items."""
    sequences = [[1, 2, 0], [1, 0], [3, 4, 0], [3, 5, 6, 0], [3, 5, 0]]
    trie = Trie.from_sequences(sequences)
    actions = torch.tensor([[1, 2, 0], [3, 5, 6], [1, 0, 0], [3, 0, 0]])
    root = torch.zeros(4, 1, dtype=torch.int64)
    path = torch.cat([root, trie.walk(actions, torch.tensor([2, 3, 1, 1])).long()], dim=1)
    return trie, path, 0


@pytest.mark.parametrize("per_row_flows", [False, True])
@pytest.mark.parametrize("zero_rewards", [False, True], ids=["finite", "with -inf"])
def test_state_log_rewards_gradcheck(per_row_flows, zero_rewards):
    trie, path, termination_token = _terminated_sample()
    rewards = seeded(7, (4, trie.num_items) if per_row_flows else (trie.num_items,))
    if zero_rewards:
        rewards[..., [1, 4]] = float("-inf")  # "a" and "c e" get no termination flow
    flows = trie.log_flows(rewards).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: losses.state_log_rewards(trie, f, path, termination_token), (flows,)
    )


# ---------------------------------------------------------------------------------------------
# flow matching


@given(
    catalog=catalogs(huge=False),
    batch=st.integers(0, 6),
    dtype=DTYPES,
    logits_dtype=LOGIT_DTYPES,
    per_row_flows=st.booleans(),
    data=st.data(),
)
def test_flow_matching_loss(device, catalog, batch, dtype, logits_dtype, per_row_flows, data):
    trie, ref = build(catalog, device)
    path_nodes, _, flows = data.draw(
        paths_and_flows(catalog, ref, batch, dtype, per_row_flows)
    )
    logits = seeded(data.draw(SEEDS), (*path_nodes.shape, SMALL_VOCAB), logits_dtype)
    logits, flows = requiring_grad(logits, flows)
    got = losses.flow_matching_loss(
        logits.to(device), trie, flows.to(device), path_nodes.to(device)
    )
    expected = ref_ops.flow_matching_loss(logits, ref, flows, path_nodes)
    # The loss runs in the logits' working dtype: float32 unless both are float64.
    tolerance = TOLERANCE[
        torch.float64 if logits_dtype == dtype == torch.float64 else torch.float32
    ]
    torch.testing.assert_close(got.cpu(), expected, **tolerance)
    got_logits, got_flows = grads(got, [logits, flows])
    expected_logits, expected_flows = grads(expected, [logits, flows])
    half = logits_dtype in (torch.float16, torch.bfloat16)
    logits_tolerance = TOLERANCE[logits_dtype] if half else tolerance
    torch.testing.assert_close(got_logits.cpu(), expected_logits, **logits_tolerance)
    # A -inf flow has no derivative; the reference's exp(-inf - -inf) makes it NaN there.
    finite = torch.isfinite(flows.detach())
    torch.testing.assert_close(got_flows.cpu()[finite], expected_flows[finite], **tolerance)


@pytest.mark.parametrize("per_row_flows", [False, True])
def test_flow_matching_loss_gradcheck(per_row_flows):
    trie, path, _ = _terminated_sample()
    rewards = seeded(8, (4, trie.num_items) if per_row_flows else (trie.num_items,))
    flows = trie.log_flows(rewards).requires_grad_()
    logits = seeded(9, (*path.shape, 7)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, f: losses.flow_matching_loss(x, trie, f, path), (logits, flows)
    )


def test_flow_matching_and_state_rewards_compile(dynamic_output_shapes):
    torch._dynamo.reset()
    trie, path, termination_token = _terminated_sample()
    flows = trie.log_flows(seeded(8, (trie.num_items,)))
    logits = seeded(9, (*path.shape, 7))

    def both(x, f):
        return (
            losses.flow_matching_loss(x, trie, f, path),
            losses.state_log_rewards(trie, f, path, termination_token),
        )

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(logits, flows), both(logits, flows)):
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# SFT and the combination


def test_sft_loss_is_token_mean_cross_entropy_of_the_next_token():
    """Transformers-style inputs, unshifted: the logits at position t score label t + 1."""
    logits = seeded(10, (2, 4, 6))
    labels = torch.tensor([[-100, 2, 5, -100], [0, 1, -100, 3]])
    scored = labels[:, 1:]
    kept = scored != -100
    log_probs = logits[:, :-1].log_softmax(-1)[kept]
    expected = -log_probs.gather(1, scored[kept].unsqueeze(1)).mean()
    torch.testing.assert_close(losses.sft_loss(logits, labels), expected)


def test_sft_loss_equals_transformers_loss():
    """A transformers causal LM's own loss (``model(input_ids, labels=labels).loss``) on the
    same logits and labels: prompt and padding masked with -100, right padding included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    input_ids = torch.tensor([[5, 3, 7, 2, 9, 1], [4, 8, 2, 6, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 2, 9, 1], [-100, 8, 2, 6, -100, -100]])
    output = model(input_ids, labels=labels)
    torch.testing.assert_close(losses.sft_loss(output.logits, labels), output.loss)


def test_flower_loss_is_convex_combination():
    sft, flow = torch.tensor(2.0), torch.tensor(10.0)
    assert losses.flower_loss(sft, flow, 0.75) == 0.75 * 2.0 + 0.25 * 10.0
    assert losses.flower_loss(sft, flow, 1.0) == sft


# ---------------------------------------------------------------------------------------------
# trajectories as the losses take them, and the arguments that break the conventions


def _terminated_trajectories():
    """The :func:`_terminated_sample` catalog, trajectories "a b" and "c e f", logits [2, 4, 7]
    and the popularity flows; termination token 0."""
    trie, _, termination_token = _terminated_sample()
    actions, lengths = torch.tensor([[1, 2, 0], [3, 5, 6]]), torch.tensor([2, 3])
    flows = trie.log_flows(seeded(11, (trie.num_items,)))
    return trie, actions, lengths, flows, seeded(12, (2, 4, 7)), termination_token


def test_path_nodes_are_the_root_then_the_walk():
    trie, actions, lengths, *_ = _terminated_trajectories()
    expected = torch.cat([torch.zeros(2, 1, dtype=torch.int32), trie.walk(actions, lengths)], 1)
    assert torch.equal(losses.path_nodes(trie, actions, lengths), expected)
    assert losses.path_nodes(trie, actions, lengths)[0, 3] == -1  # past row 0's length


def test_an_action_off_the_trie_is_an_error():
    """Token 4 does not follow "a": the state after it has no node, and -1 inside the length
    would get the maximum reward."""
    trie, _, lengths, *_ = _terminated_trajectories()
    with pytest.raises(ValueError, match=r"actions leave the trie: token 4 at step 1 of row 0"):
        losses.path_nodes(trie, torch.tensor([[1, 4, 0], [3, 5, 6]]), lengths)


@pytest.mark.parametrize(
    "lengths, problem",
    [
        (torch.tensor([2, 4]), r"lengths must lie in \[0, 3\] \(T of logits\), got values in \[2, 4\]"),
        (torch.tensor([-1, 3]), r"lengths must lie in \[0, 3\]"),
        (torch.tensor([2.0, 3.0]), r"lengths must be an integer tensor, got torch.float32"),
    ],
)
def test_lengths_outside_the_trajectories_are_an_error(lengths, problem):
    trie, actions, good_lengths, flows, logits, termination = _terminated_trajectories()
    log_rewards = losses.state_log_rewards(
        trie, flows, losses.path_nodes(trie, actions, good_lengths), termination
    )
    with pytest.raises(ValueError, match=problem):
        losses.subtb_loss(logits, actions, log_rewards, lengths, termination)
    log_probs = (torch.zeros(2, 3), torch.zeros(2, 4), log_rewards)
    with pytest.raises(ValueError, match=problem.replace("logits", "log_rewards")):
        losses.subtb_loss_from_log_probs(*log_probs, lengths)
    with pytest.raises(ValueError, match=problem.replace("logits", "actions")):
        losses.path_nodes(trie, actions, lengths)


def test_the_termination_token_among_the_actions_is_an_error():
    """Counting the termination token as an action (lengths 3 and 4 over "a b ⊤", "c e f ⊤")
    would score it twice."""
    trie, _, _, flows, _, termination = _terminated_trajectories()
    actions, lengths = torch.tensor([[1, 2, 0, 0], [3, 5, 6, 0]]), torch.tensor([3, 4])
    log_rewards = losses.state_log_rewards(
        trie, flows, losses.path_nodes(trie, actions, lengths), termination
    )
    with pytest.raises(ValueError, match=r"actions hold the termination token 0 within lengths"):
        losses.subtb_loss(seeded(13, (2, 5, 7)), actions, log_rewards, lengths, termination)


def test_a_path_without_its_root_is_an_error():
    trie, actions, lengths, flows, _, termination = _terminated_trajectories()
    with pytest.raises(ValueError, match=r"path_nodes must start at the root \(node 0\)"):
        losses.state_log_rewards(trie, flows, trie.walk(actions, lengths), termination)


def test_a_termination_token_that_ends_no_item_is_an_error():
    """With 7 as the termination token no state would ever be a complete item."""
    trie, actions, lengths, flows, _, _ = _terminated_trajectories()
    path = losses.path_nodes(trie, actions, lengths)
    with pytest.raises(ValueError, match=r"termination_token 7 does not end 5 of the trie's items"):
        losses.state_log_rewards(trie, flows, path, 7)


def test_shapes_that_disagree_name_both_arguments():
    trie, actions, lengths, flows, logits, termination = _terminated_trajectories()
    log_rewards = losses.state_log_rewards(
        trie, flows, losses.path_nodes(trie, actions, lengths), termination
    )
    with pytest.raises(
        ValueError,
        match=r"log_rewards must have shape \(2, 4\) for logits of shape \(2, 4, 7\), got \(2, 3\)",
    ):
        losses.subtb_loss(logits, actions, log_rewards[:, :3], lengths, termination)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\) for logits of shape"):
        losses.subtb_loss(logits, actions, log_rewards, lengths[:1], termination)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, T\+1, V\], got \(4, 7\)"):
        losses.subtb_loss(logits[0], actions, log_rewards, lengths, termination)


# ---------------------------------------------------------------------------------------------
# the masked policy and the leakage penalty


@st.composite
def trie_trajectories(draw, catalog, ref, batch: int):
    """Whole trajectories of a terminated catalog: ``actions [B, T]`` (each row an item's tokens
    before its termination token, padded with it), ``lengths [B]`` and ``path_nodes [B, T+1]``."""
    items = [draw(st.sampled_from(catalog.sequences))[:-1] for _ in range(batch)]
    width = max((len(item) for item in items), default=0) + draw(st.integers(0, 2))
    actions = torch.full((batch, width), catalog.termination_token, dtype=torch.int64)
    path_nodes = torch.full((batch, width + 1), -1, dtype=torch.int64)
    for b, item in enumerate(items):
        actions[b, : len(item)] = torch.tensor(item, dtype=torch.int64)
        for depth in range(len(item) + 1):
            path_nodes[b, depth] = ref.node_of[tuple(item[:depth])]
    lengths = torch.tensor([len(item) for item in items], dtype=torch.int64)
    return actions, lengths, path_nodes


@given(
    catalog=catalogs(huge=False),
    batch=st.integers(0, 6),
    dtype=LOGIT_DTYPES,
    data=st.data(),
)
def test_trie_log_partitions(device, catalog, batch, dtype, data):
    trie, ref = build(catalog, device)
    path_nodes, _ = data.draw(item_paths(catalog, ref, batch))
    (logits,) = requiring_grad(seeded(data.draw(SEEDS), (*path_nodes.shape, SMALL_VOCAB), dtype))
    got = losses.trie_log_partitions(logits.to(device), trie, path_nodes.to(device))
    expected = ref_ops.trie_log_partitions(logits, ref, path_nodes)
    working = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == working
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE[working])
    finite = torch.isfinite(expected)
    if finite.any():
        torch.testing.assert_close(
            grads(got[finite.to(device)].sum(), [logits])[0].cpu(),
            grads(expected[finite].sum(), [logits])[0],
            **TOLERANCE[dtype],
        )


@given(catalog=catalogs(terminated=True, huge=False), batch=st.integers(0, 6), dtype=LOGIT_DTYPES,
       data=st.data())
def test_masked_subtb_and_leakage(device, catalog, batch, dtype, data):
    """SubTB of the policy renormalised over the trie children, and the mass leaving the trie,
    against the all-pairs reference with the reference's partitions."""
    trie, ref = build(catalog, device)
    actions, lengths, path_nodes = data.draw(trie_trajectories(catalog, ref, batch))
    seed = data.draw(SEEDS)
    (logits,) = requiring_grad(seeded(seed, (*path_nodes.shape, SMALL_VOCAB), dtype))
    rewards = seeded(seed + 1, path_nodes.shape, torch.float64) - 5
    termination = catalog.termination_token
    on = [t.to(device) for t in (logits, actions, rewards, lengths, path_nodes)]

    def masked_subtb():
        return losses.masked_subtb_loss(on[0], trie, on[4], *on[1:4], termination)

    def leakage():
        return losses.leakage_loss(on[0], losses.trie_log_partitions(on[0], trie, on[4]))

    def expected_subtb():
        return ref_ops.masked_subtb_loss(
            logits, ref, path_nodes, actions, rewards, lengths, termination
        )

    def expected_leakage():
        return ref_ops.leakage_loss(logits, ref_ops.trie_log_partitions(logits, ref, path_nodes))

    working = torch.float64 if dtype == torch.float64 else torch.float32
    for value, reference in ((masked_subtb(), expected_subtb()), (leakage(), expected_leakage())):
        torch.testing.assert_close(value.cpu(), reference.to(value.dtype), **TOLERANCE[working])
        torch.testing.assert_close(
            grads(value, [logits])[0].cpu(), grads(reference, [logits])[0], **TOLERANCE[dtype]
        )


def test_masked_policy_ignores_the_logits_outside_the_trie():
    """Raising every logit off the trie changes neither the masked SubTB nor the masked flow
    matching; it raises the leakage, which is 0 when the logits off the trie are -inf."""
    trie, path, termination = _terminated_sample()
    actions = torch.tensor([[1, 2, 0], [3, 5, 6], [1, 0, 0], [3, 0, 0]])
    lengths = torch.tensor([2, 3, 1, 1])
    rewards = losses.state_log_rewards(trie, trie.log_flows(seeded(3, (5,))), path, termination)
    flows = trie.log_flows(seeded(4, (5,)))
    logits = seeded(5, (*path.shape, 9))
    walled = logits.clone()
    trie.mask_logits_(walled.view(-1, 9), path.view(-1))  # -inf off each state's children
    off_trie = torch.isinf(walled)

    def measured(x):
        partitions = losses.trie_log_partitions(x, trie, path)
        return (
            losses.masked_subtb_loss(x, trie, path, actions, rewards, lengths, termination),
            losses.flow_matching_loss(x, trie, flows, path, log_partitions=partitions),
            losses.leakage_loss(x, partitions),
        )

    subtb, matching, leakage = measured(logits)
    raised_subtb, raised_matching, raised_leakage = measured(logits + 5 * off_trie)
    torch.testing.assert_close(raised_subtb, subtb)
    torch.testing.assert_close(raised_matching, matching)
    assert raised_leakage > leakage > 0
    torch.testing.assert_close(
        losses.leakage_loss(walled, losses.trie_log_partitions(walled, trie, path)),
        torch.tensor(0.0, dtype=walled.dtype),
    )


def test_masked_losses_gradcheck():
    trie, path, termination = _terminated_sample()
    actions = torch.tensor([[1, 2, 0], [3, 5, 6], [1, 0, 0], [3, 0, 0]])
    lengths = torch.tensor([2, 3, 1, 1])
    rewards = seeded(6, path.shape) - 5
    flows = trie.log_flows(seeded(4, (5,)))

    def all_three(x):
        partitions = losses.trie_log_partitions(x, trie, path)
        return (
            losses.masked_subtb_loss(x, trie, path, actions, rewards, lengths, termination),
            losses.flow_matching_loss(x, trie, flows, path, log_partitions=partitions),
            losses.leakage_loss(x, partitions),
        )

    assert torch.autograd.gradcheck(all_three, (seeded(5, (*path.shape, 9)).requires_grad_(),))


def test_masked_losses_compile(dynamic_output_shapes):
    torch._dynamo.reset()
    trie, path, termination = _terminated_sample()
    actions = torch.tensor([[1, 2, 0], [3, 5, 6], [1, 0, 0], [3, 0, 0]])
    lengths = torch.tensor([2, 3, 1, 1])
    rewards = seeded(6, path.shape) - 5
    logits = seeded(5, (*path.shape, 9))

    def both(x):
        partitions = losses.trie_log_partitions(x, trie, path)
        return (
            losses.masked_subtb_loss(x, trie, path, actions, rewards, lengths, termination),
            losses.leakage_loss(x, partitions),
        )

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(logits), both(logits)):
        torch.testing.assert_close(got, expected)


def test_masked_policy_bad_input():
    trie, path, termination = _terminated_sample()
    actions = torch.tensor([[1, 2, 0], [3, 5, 6], [1, 0, 0], [3, 0, 0]])
    lengths = torch.tensor([2, 3, 1, 1])
    rewards = seeded(6, path.shape) - 5
    logits = seeded(5, (*path.shape, 9))
    partitions = losses.trie_log_partitions(logits, trie, path)
    with pytest.raises(ValueError, match=r"log_partitions must have shape \(4, 4\)"):
        losses.flow_matching_loss(logits, trie, trie.log_flows(seeded(4, (5,))), path,
                                  log_partitions=partitions[:, :3])
    with pytest.raises(ValueError, match="every state of the trajectories must have children"):
        leaf_inside = path.clone()  # row 0's state 2 replaced by the leaf after "a ⊤"
        leaf_inside[0, 2] = trie.advance(path[:1, 1], torch.zeros(1, dtype=torch.int64))[0]
        losses.masked_subtb_loss(logits, trie, leaf_inside, actions, rewards, lengths, termination)
    with pytest.raises(ValueError, match=r"path_nodes must have shape \(4, 4\)"):
        losses.trie_log_partitions(logits, trie, path[:, :2])
    with pytest.raises(ValueError, match=r"logits must have shape \[B, S, V\]"):
        losses.leakage_loss(logits[0], partitions)


def test_masked_subtb_is_zero_exactly_at_the_target_policy():
    """Logits equal to the children's log-flows make the masked policy the target transitions
    F(c) / F(s): the masked SubTB is 0 there, and positive for a policy deterministic on the
    sampled paths (which the published loss can balance with its free termination terms)."""
    trie, path, termination = _terminated_sample()
    actions = torch.tensor([[1, 2, 0], [3, 5, 6], [1, 0, 0], [3, 0, 0]])
    lengths = torch.tensor([2, 3, 1, 1])
    flows = trie.log_flows(seeded(4, (5,)))
    rewards = losses.state_log_rewards(trie, flows, path, termination)
    row_ptr, child_tokens, child_nodes = trie.children(path.reshape(-1))
    target = torch.full((path.numel(), 9), -30.0, dtype=torch.float64)
    state = torch.repeat_interleave(torch.arange(path.numel()), row_ptr.diff())
    target[state, child_tokens.long()] = flows[child_nodes.long()]
    target = target.view(*path.shape, 9)
    at_target = losses.masked_subtb_loss(target, trie, path, actions, rewards, lengths, termination)
    torch.testing.assert_close(at_target, torch.tensor(0.0, dtype=torch.float64))
    taken = torch.full_like(target, -30.0)
    taken[:, :-1].scatter_(-1, actions.unsqueeze(-1), 0.0)
    taken[..., termination] = 0.0
    assert losses.masked_subtb_loss(taken, trie, path, actions, rewards, lengths, termination) > 1
