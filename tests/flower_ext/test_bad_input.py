"""Bad input raises a Python exception (ValueError where the input is at fault) whose message
names the problem, and never crashes the process (docs/design.md sections 3 and 6)."""

import numpy as np
import pytest
import torch

from flower_ext import Trie, losses, ops
from strategies import DEVICES

# Items 0 and 3 are duplicates; item 1 is a prefix of item 0; token 0 terminates. Nodes: 0 root,
# 1 [1], 2 [3], 3 [1 0], 4 [1 2], 5 [3 0], 6 [1 2 0].
SAMPLE = [[1, 2, 0], [1, 0], [3, 0], [1, 2, 0]]
NUM_NODES = 7
TOO_BIG = 2**31  # the first token id that int32 cannot hold
# int64 ids that a truncation to int32 would turn into valid ones (the root node 0, token 1).
WRAPS_TO_ROOT, WRAPS_TO_TOKEN_1 = 2**32, 2**32 + 1

# A device the trie is not on: "meta" always exists; with a GPU, CUDA versus CPU as well.
OTHER_DEVICES = ["meta"] + (["cuda"] if "cuda" in DEVICES else [])


@pytest.fixture
def trie(device) -> Trie:
    """The sample trie on each device: the checks that read the data run in the device's kernels."""
    return Trie.from_sequences(SAMPLE, device=device)


@pytest.fixture(scope="module")
def cpu_trie() -> Trie:
    return Trie.from_sequences(SAMPLE)


def nodes(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def rejects(op: str, problem: str):
    """Expects the ValueError of ``flower_ext.<op>`` whose message matches ``problem``."""
    return pytest.raises(ValueError, match=rf"flower_ext\.{op}: .*{problem}")


# ---------------------------------------------------------------------------------------------
# build


@pytest.mark.parametrize(
    "sequences, kwargs, problem",
    [
        ([], {}, "catalog is empty"),
        ([[1, 2], []], {}, "sequence 1 is empty"),
        ([[1, -1]], {}, r"token id -1 .* outside \[0, 2\^31\)"),
        ([[1], [TOO_BIG]], {}, r"token id 2147483648 .* outside \[0, 2\^31\)"),
        ([[2**63]], {}, "integer token ids within int64"),
        ([[1.5, 2]], {}, "integer token ids"),  # a float must not be truncated to token 1
        ([torch.tensor([1.0, 2.0])], {}, "integer token ids"),
        ([["a"]], {}, "integer token ids"),
        ([[1], [2]], {"item_ids": [0, 0]}, "item id 0 is given to more than one sequence"),
        ([[1], [2]], {"item_ids": [0, 2]}, r"item id 2 of sequence 1 is outside \[0, 2\)"),
        ([[1], [2]], {"item_ids": [-1, 0]}, r"item id -1 of sequence 0 is outside \[0, 2\)"),
        ([[1], [2]], {"item_ids": [0]}, "item_ids has 1 entries for 2 sequences"),
        ([[1], [2]], {"item_ids": [0.0, 1.0]}, "item_ids must hold integers"),
        (np.array([1.0, 2.0]), {"offsets": [0, 2]}, "tokens must hold integers"),
        (np.array([1, 2]), {"offsets": []}, "offsets must have num_items"),
        (np.array([1, 2]), {"offsets": [1, 2]}, "offsets must start at 0"),
        (np.array([1, 2]), {"offsets": [0, 3]}, "offsets must end at the number of tokens"),
        (np.array([1, 2, 3]), {"offsets": [0, 2, 1, 3]}, "offsets must be non-decreasing"),
        (np.array([1, 2, 3]), {"offsets": [0, 10**12, 3]}, "offsets must be non-decreasing"),
        (np.array([1, -2, 3]), {"offsets": [0, 3]}, r"token id -2 .* outside"),
        (np.array([], dtype=np.int64), {"offsets": [0]}, "catalog is empty"),
    ],
)
def test_build_rejects(sequences, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        Trie.from_sequences(sequences, **kwargs)


# ---------------------------------------------------------------------------------------------
# log_flows


@pytest.mark.parametrize(
    "rewards, problem",
    [
        (torch.zeros(4, dtype=torch.float16), "log_rewards must be float32 or float64"),
        (torch.zeros(4, dtype=torch.int64), "log_rewards must be float32 or float64"),
        (
            torch.zeros(5),
            r"shape \[num_items\] or \[batch, num_items\] with num_items = 4, got \(5,\)",
        ),
        (torch.zeros(2, 3, 4), r"got \(2, 3, 4\)"),
        (torch.zeros(()), r"got \(\)"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0]), "must not be NaN or \\+inf"),
        (
            torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, float("inf")]]),
            "must not be NaN or \\+inf",
        ),
    ],
)
def test_log_flows_rejects(trie, rewards, problem):
    with rejects("log_flows", problem):
        trie.log_flows(rewards.to(trie.device))


def test_log_flows_accepts_zero_rewards(trie):
    flows = trie.log_flows(torch.full((4,), float("-inf"), device=trie.device))
    assert (flows == float("-inf")).all()


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_log_flows_rejects_other_device(cpu_trie, other):
    with pytest.raises(ValueError, match=f"log_rewards is on {other}.* but the trie is on cpu"):
        cpu_trie.log_flows(torch.zeros(4, device=other))


@pytest.mark.parametrize(
    "data, layout, problem",
    [
        (lambda t: t.data.long(), None, "trie_data must be 1-D int32"),
        (lambda t: t.data.reshape(1, -1), None, "trie_data must be 1-D int32"),
        (None, lambda t: [], r"layout must be \[num_items, \*level_ptr\]"),
        (None, lambda t: t.level_ptr, r"layout must be \[num_items, \*level_ptr\]"),
        (None, lambda t: [t.num_items + 1, *t.level_ptr], "does not hold a trie of"),
        (None, lambda t: [t.num_items, 0, 1, 100], "does not hold a trie of"),
        (lambda t: t.data[:-1], None, "does not hold a trie of"),
    ],
)
def test_ops_reject_malformed_packed_trie(cpu_trie, data, layout, problem):
    """The raw ops check that trie_data and layout belong together: a mismatch must not let
    the kernels read outside the buffer."""
    packed = cpu_trie.data if data is None else data(cpu_trie)
    with rejects("log_flows", problem):
        ops.log_flows(packed, cpu_trie.layout if layout is None else layout(cpu_trie), torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# walk / advance


@pytest.mark.parametrize(
    "tokens, lengths, problem",
    [
        (torch.tensor([[1, -1]]), None, r"token ids must lie in \[0, 2\^31\)"),
        (torch.tensor([[1, TOO_BIG]]), None, r"token ids must lie in \[0, 2\^31\)"),
        (torch.tensor([[WRAPS_TO_TOKEN_1]]), None, r"token ids must lie in \[0, 2\^31\)"),
        (torch.tensor([[5, 7, -3]]), None, r"token ids must lie in \[0, 2\^31\)"),  # after leaving
        (torch.tensor([[1, 2]], dtype=torch.float32), None, "tokens must be int32 or int64"),
        (torch.tensor([1, 2]), None, r"tokens must have shape \[batch, length\]"),
        (torch.tensor([[1, 2]]), torch.tensor([1.0]), "lengths must be an integer tensor"),
        (torch.tensor([[1, 2]]), torch.tensor([1, 1]), r"lengths must have shape \[batch\]"),
        (torch.tensor([[1, 2]]), torch.tensor([3]), r"lengths must lie in \[0, L\]"),
        (torch.tensor([[1, 2]]), torch.tensor([-1]), r"lengths must lie in \[0, L\]"),
    ],
)
def test_walk_rejects(trie, tokens, lengths, problem):
    with rejects("walk", problem):
        ops.walk(
            trie.data,
            trie.layout,
            tokens.to(trie.device),
            None if lengths is None else lengths.to(trie.device),
        )


def test_walk_ignores_tokens_past_lengths(trie):
    """Padding past a row's length may hold anything, even ids that are no tokens."""
    tokens = torch.tensor([[1, 2, -7], [3, TOO_BIG, TOO_BIG]], device=trie.device)
    got = trie.walk(tokens, torch.tensor([2, 1], device=trie.device))
    assert got.tolist() == [[1, 4, -1], [2, -1, -1]]


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_walk_and_advance_reject_other_device(cpu_trie, other):
    with rejects("walk", f"tokens is on {other}"):
        cpu_trie.walk(torch.zeros(1, 2, dtype=torch.int64, device=other))
    with rejects("advance", f"node_ids is on {other}"):
        cpu_trie.advance(
            torch.zeros(2, dtype=torch.int64, device=other), torch.zeros(2, dtype=torch.int64)
        )


@pytest.mark.parametrize(
    "node_ids, tokens, problem",
    [
        (nodes(0, NUM_NODES), nodes(1, 1), r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(-2), nodes(1), r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(WRAPS_TO_ROOT), nodes(1), r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(0), nodes(WRAPS_TO_TOKEN_1), r"token ids must lie in \[0, 2\^31\)"),
        (nodes(-1), nodes(-1), r"token ids must lie in \[0, 2\^31\)"),
        (nodes(0), nodes(TOO_BIG), r"token ids must lie in \[0, 2\^31\)"),
        (nodes(0, 1), nodes(1), "must have one shape"),
        (nodes(0).float(), nodes(1), "node_ids must be int32 or int64"),
        (nodes(0), nodes(1).to(torch.int16), "tokens must be int32 or int64"),
    ],
)
def test_advance_rejects(trie, node_ids, tokens, problem):
    with rejects("advance", problem):
        trie.advance(node_ids.to(trie.device), tokens.to(trie.device))


# ---------------------------------------------------------------------------------------------
# token bitmask and logit masking


@pytest.mark.parametrize(
    "node_ids, vocab_size, problem",
    [
        (nodes(0), 3, "vocab_size must exceed every token id in the trie"),  # root has token 3
        (nodes(NUM_NODES), 32, r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(-2), 32, r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(WRAPS_TO_ROOT), 32, r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(0), 0, "vocab_size must be positive"),
        (torch.zeros(1, 1, dtype=torch.int64), 32, "node_ids must be 1-D"),
        (torch.zeros(1, dtype=torch.uint8), 32, "node_ids must be int32 or int64"),
    ],
)
def test_token_bitmask_rejects(trie, node_ids, vocab_size, problem):
    with rejects("token_bitmask", problem):
        trie.token_bitmask(node_ids.to(trie.device), vocab_size)


def test_token_bitmask_allows_a_vocabulary_that_covers_the_rows(trie):
    """Only the tokens of the rows' nodes must fit: node 2 ([3]) has the single child 0."""
    assert trie.token_bitmask(nodes(2, -1).to(trie.device), 1).tolist() == [[1], [0]]


@pytest.mark.parametrize(
    "logits, node_ids, problem",
    [
        (torch.zeros(1, 3), nodes(0), "vocab_size must exceed every token id in the trie"),
        (torch.zeros(2, 8), nodes(0, NUM_NODES), r"node ids must lie in \[-1, num_nodes\)"),
        (torch.zeros(2, 8), nodes(0), "logits have 2 rows, expected 1"),
        (torch.zeros(8), nodes(0), r"logits must have shape \[batch, vocab\]"),
        (torch.zeros(1, 2, 8), nodes(0), r"logits must have shape \[batch, vocab\]"),
        (torch.zeros(1, 8, dtype=torch.int32), nodes(0), "logits must be float16, bfloat16"),
        (torch.zeros(8, 2).t(), nodes(0, 0), "contiguous along the vocabulary"),
    ],
)
def test_mask_logits_rejects_and_leaves_logits_alone(trie, logits, node_ids, problem):
    logits = logits.to(trie.device) + 1  # a fresh tensor of ones
    with rejects("mask_logits_", problem):
        trie.mask_logits_(logits, node_ids.to(trie.device))
    assert (logits == 1).all(), "a rejected call must not have masked anything"


@pytest.mark.parametrize(
    "logits, bitmask, problem",
    [
        (
            torch.zeros(2, 40),
            torch.zeros(2, 2, dtype=torch.int64),
            "bitmask must be a 2-D int32 tensor",
        ),
        (
            torch.zeros(2, 40),
            torch.zeros(2, dtype=torch.int32),
            "bitmask must be a 2-D int32 tensor",
        ),
        (torch.zeros(2, 40), torch.zeros(2, 1, dtype=torch.int32), r"ceil\(vocab / 32\) = 2 words"),
        (
            torch.zeros(3, 40),
            torch.zeros(2, 2, dtype=torch.int32),
            "logits have 3 rows, expected 2",
        ),
        (
            torch.zeros(2, 40, dtype=torch.int64),
            torch.zeros(2, 2, dtype=torch.int32),
            "logits must be float16",
        ),
        (
            torch.zeros(40, 2).t(),
            torch.zeros(2, 2, dtype=torch.int32),
            "contiguous along the vocabulary",
        ),
    ],
)
def test_apply_token_bitmask_rejects(logits, bitmask, problem):
    with rejects("apply_token_bitmask_", problem):
        ops.apply_token_bitmask_(logits, bitmask)


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_masking_rejects_other_device(cpu_trie, other):
    with rejects("apply_token_bitmask_", f"bitmask is on {other}"):
        ops.apply_token_bitmask_(
            torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.int32, device=other)
        )
    with rejects("mask_logits_", f"logits is on {other}"):
        cpu_trie.mask_logits_(torch.zeros(1, 8, device=other), nodes(0))


# ---------------------------------------------------------------------------------------------
# children and transition log-probabilities


@pytest.mark.parametrize(
    "node_ids, problem",
    [
        (nodes(0, NUM_NODES), r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(-2), r"node ids must lie in \[-1, num_nodes\)"),
        (nodes(WRAPS_TO_ROOT), r"node ids must lie in \[-1, num_nodes\)"),
        (torch.zeros(2, 2, dtype=torch.int64), "node_ids must be 1-D"),
    ],
)
def test_children_rejects(trie, node_ids, problem):
    with rejects("children", problem):
        trie.children(node_ids.to(trie.device))


BROKEN_PATH = "consecutive path nodes must be parent and child"


@pytest.mark.parametrize(
    "path, flows_shape, termination_token, problem",
    [
        ([[0, 1, 1]], (NUM_NODES,), 0, BROKEN_PATH),  # a node followed by itself
        ([[0, 2, 4]], (NUM_NODES,), 0, BROKEN_PATH),  # 4 ([1 2]) is no child of 2 ([3])
        ([[1, 0]], (NUM_NODES,), 0, BROKEN_PATH),  # upwards
        ([[0, -1, 1]], (NUM_NODES,), 0, BROKEN_PATH),  # a real state after padding
        ([[0, NUM_NODES]], (NUM_NODES,), 0, r"node ids must lie in \[-1, num_nodes\)"),
        ([[-2, -1]], (NUM_NODES,), 0, r"node ids must lie in \[-1, num_nodes\)"),
        ([[0, WRAPS_TO_ROOT + 1]], (NUM_NODES,), 0, r"node ids must lie in \[-1, num_nodes\)"),
        ([[0, 1]], (NUM_NODES + 1,), 0, r"log_flows must have shape \[num_nodes\]"),
        ([[0, 1]], (2, NUM_NODES), 0, r"log_flows must have shape .* = \[1, 7\]"),
        ([[]], (NUM_NODES,), 0, "states >= 1"),
        ([0, 1], (NUM_NODES,), 0, r"path_nodes must have shape \[batch, states\]"),
        ([[0, 1]], (NUM_NODES,), -1, r"termination_token must lie in \[0, 2\^31\)"),
        ([[0, 1]], (NUM_NODES,), TOO_BIG, r"termination_token must lie in \[0, 2\^31\)"),
    ],
)
def test_transition_log_probs_rejects(trie, path, flows_shape, termination_token, problem):
    flows = torch.zeros(flows_shape, device=trie.device)
    with rejects("transition_log_probs", problem):
        trie.transition_log_probs(
            flows, torch.tensor(path, dtype=torch.int64, device=trie.device), termination_token
        )


@pytest.mark.parametrize(
    "flows, path, problem",
    [
        (
            torch.zeros(NUM_NODES, dtype=torch.float16),
            nodes(0, 1)[None],
            "log_flows must be float32 or float64",
        ),
        (torch.zeros(NUM_NODES), torch.tensor([[0.0, 1.0]]), "path_nodes must be int32 or int64"),
    ],
)
def test_transition_log_probs_rejects_dtypes(cpu_trie, flows, path, problem):
    with rejects("transition_log_probs", problem):
        cpu_trie.transition_log_probs(flows, path, 0)


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_transition_log_probs_rejects_other_device(cpu_trie, other):
    with rejects("transition_log_probs", f"log_flows is on {other}"):
        cpu_trie.transition_log_probs(torch.zeros(NUM_NODES, device=other), nodes(0, 1)[None], 0)


# ---------------------------------------------------------------------------------------------
# losses


def test_subtb_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"action_log_probs must have shape \(2, 3\)"):
        losses.subtb_loss_from_log_probs(
            torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2)
        )
    with pytest.raises(ValueError, match=r"termination_log_probs must have shape \(2, 4\)"):
        losses.subtb_loss_from_log_probs(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2)
        )
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        losses.subtb_loss_from_log_probs(
            torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3)
        )


def test_subtb_loss_rejects_bad_actions_and_termination_token():
    logits, lengths = torch.zeros(2, 4, 10), torch.tensor([3, 1])
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 3\)"):
        losses.subtb_loss(
            logits, torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4), lengths, 0
        )
    with pytest.raises(
        ValueError, match=r"termination_token 10 is outside the vocabulary \[0, 10\)"
    ):
        losses.subtb_loss(
            logits, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4), lengths, 10
        )


def test_flow_matching_loss_rejects_mismatched_paths(cpu_trie):
    trie = cpu_trie
    flows = trie.log_flows(torch.zeros(4))
    with pytest.raises(ValueError, match=r"path_nodes must have shape \(2, 3\)"):
        losses.flow_matching_loss(
            torch.zeros(2, 3, 8), trie, flows, torch.zeros(2, 2, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match=r"node ids must lie in \[-1, num_nodes\)"):
        losses.flow_matching_loss(torch.zeros(1, 1, 8), trie, flows, nodes(NUM_NODES)[None])


def test_sft_and_flower_loss_reject_bad_arguments():
    with pytest.raises(ValueError, match="must agree but for the vocabulary dimension"):
        losses.sft_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.int64))
    for theta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"theta must lie in \[0, 1\]"):
            losses.flower_loss(torch.tensor(1.0), torch.tensor(2.0), theta)


# ---------------------------------------------------------------------------------------------
# deferred status checks


def test_deferred_checks_raise_the_first_problem_when_the_block_ends(trie):
    """Inside ops.deferred_checks() bad input raises nothing until the block ends, then the first
    problem with an immediate check's message; good calls run unchanged; blocks nest."""
    good = trie.advance(nodes(0).to(trie.device), nodes(1).to(trie.device))
    calls = []
    with rejects("advance", r"node ids must lie in \[-1, num_nodes\)"):
        with ops.deferred_checks():
            with ops.deferred_checks():
                inner = trie.advance(nodes(0).to(trie.device), nodes(1).to(trie.device))
            calls.append("inner block ended")  # no problem inside it
            trie.advance(nodes(-2).to(trie.device), nodes(1).to(trie.device))
            trie.log_flows(torch.tensor([float("nan")] * trie.num_items, device=trie.device))
            calls.append("not raised yet")
    assert calls == ["inner block ended", "not raised yet"]
    assert torch.equal(inner, good)
    with pytest.raises(RuntimeError, match="from inside"), ops.deferred_checks():
        trie.advance(nodes(-2).to(trie.device), nodes(1).to(trie.device))
        raise RuntimeError("from inside")  # the block's own exception wins
    trie.advance(nodes(0).to(trie.device), nodes(1).to(trie.device))  # no block left behind
    with pytest.raises(ValueError, match="node ids"):
        trie.advance(nodes(-2).to(trie.device), nodes(1).to(trie.device))
