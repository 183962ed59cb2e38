"""The Flower losses on top of the trie ops (method: ``docs/method.md`` section 3).

Conventions shared by every function here, for a batch of B trajectories over the catalog trie:

- A trajectory is ``y_1 .. y_T`` followed by the termination token (the newline that ends every
  item sequence). Its states are the prefixes ``s_0 .. s_T`` (``s_0`` the empty prefix), so a
  batch holds ``states [B, T+1]`` and ``actions [B, T]``, right-padded, with ``lengths [B]`` = T
  of each row (the number of title tokens, the termination token excluded).
- ``logits [B, T+1, V]`` are the model's next-token logits at each state (at position k the
  logits that score ``y_{k+1}``, or the termination token at ``s_T``). Log-probabilities are the
  full-vocabulary log-softmax, unmasked, as in the method.
- ``path_nodes [B, T+1]`` are the trie nodes of the states: ``[0, *trie.walk(actions)]``, -1
  on padding.

Everything is batched over samples and tokens; no Python loop runs over either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .trie import Trie

__all__ = [
    "sft_loss",
    "state_log_rewards",
    "subtb_loss_from_log_probs",
    "subtb_loss",
    "flow_matching_loss",
    "flower_loss",
    "INCOMPLETE_LOG_REWARD",
]

# c_k of the method for a prefix that is not a complete title: its per-state reward is the
# product of the target transitions so far times e^-15.
INCOMPLETE_LOG_REWARD = -15.0
# Zero-reward states (a path into an empty subtree) are floored here so that the squared
# residuals stay finite; such states are only reachable when some item rewards are zero.
_LOG_REWARD_FLOOR = -1e4


def _state_mask(lengths: Tensor, num_states: int) -> Tensor:
    """``[B, num_states]``: state k of row b exists when k <= lengths[b]."""
    positions = torch.arange(num_states, device=lengths.device)
    return positions.unsqueeze(0) <= lengths.unsqueeze(1)


def _working_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _check_batch(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Token-mean cross-entropy of ``labels [..., L]`` under ``logits [..., L, V]``, aligned
    (position t of the logits scores label t); ``ignore_index`` masks prompt and padding."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree but for "
            "the vocabulary dimension"
        )
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(_working_dtype(logits)),
        labels.reshape(-1),
        ignore_index=ignore_index,
    )


def state_log_rewards(
    trie: Trie,
    log_flows: Tensor,
    path_nodes: Tensor,
    termination_token: int,
    incomplete_log_reward: float = INCOMPLETE_LOG_REWARD,
) -> Tensor:
    """Per-state log-rewards ``log R(s_k ⊤)`` ``[B, T+1]`` of the method (section 3, step 3).

    ``log R(s_k ⊤) = sum_{t<k} log P̂(y_{t+1} | s_t) + c_k`` with ``c_k = log P̂(⊤ | s_k)`` when
    ``s_k`` is a complete title (its termination child has a positive flow) and
    ``incomplete_log_reward`` otherwise. ``log_flows`` is ``[N]`` (one reward for all rows) or
    ``[B, N]`` (per-user rewards, e.g. personalised). A state of zero reward (its path enters a
    subtree whose items all have zero reward) gets -1e4 instead of -inf, so that the squared
    residuals of the losses stay finite. Carries no gradient to the model; it is differentiable
    with respect to ``log_flows``.
    """
    step, termination = trie.transition_log_probs(log_flows, path_nodes, termination_token)
    # Sum of the step log-probabilities before each state; the [B, 1] zeros come from
    # `termination` because `step` has no column to copy when every path is the root alone.
    prefix = torch.cat([torch.zeros_like(termination[:, :1]), torch.cumsum(step, dim=1)], dim=1)
    ending = torch.where(
        torch.isfinite(termination), termination, torch.full_like(termination, incomplete_log_reward)
    )
    return (prefix + ending).clamp(min=_LOG_REWARD_FLOOR)


def subtb_loss_from_log_probs(
    action_log_probs: Tensor,
    termination_log_probs: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
) -> Tensor:
    """Modified sub-trajectory balance (Hu et al., ICLR 2024) in O(B·T) closed form.

    Args:
        action_log_probs: ``[B, T]`` log π(y_{t+1} | s_t).
        termination_log_probs: ``[B, T+1]`` log π(⊤ | s_k).
        log_rewards: ``[B, T+1]`` log R(s_k ⊤) (see :func:`state_log_rewards`).
        lengths: ``[B]`` T of each row; entries past it are ignored.

    Returns the sum over rows and all pairs ``0 <= m < n <= T`` of
    ``Δ(m, n)^2 = (H_m - H_n)^2`` with ``H_k = log R(s_k ⊤) - log π(⊤ | s_k) - sum_{t<k} log
    π(y_{t+1} | s_t)``, divided by the number of pairs in the batch. Over the ``n`` states of a
    row the pair sum is ``n`` times the sum of squared deviations of H from its mean, computed
    centred in float32 (float64 for float64 inputs).
    """
    batch, num_states = log_rewards.shape
    _check_batch("action_log_probs", action_log_probs, (batch, num_states - 1))
    _check_batch("termination_log_probs", termination_log_probs, (batch, num_states))
    _check_batch("lengths", lengths, (batch,))
    dtype = _working_dtype(action_log_probs)
    mask = _state_mask(lengths, num_states)
    actions = torch.where(mask[:, 1:], action_log_probs.to(dtype), 0.0)
    prefix = torch.cat([torch.zeros_like(actions[:, :1]), torch.cumsum(actions, dim=1)], dim=1)
    h = log_rewards.to(dtype) - termination_log_probs.to(dtype) - prefix
    h = torch.where(mask, h, 0.0)
    count = mask.sum(dim=1).to(dtype)
    mean = h.sum(dim=1) / count.clamp(min=1)
    deviation = torch.where(mask, h - mean.unsqueeze(1), 0.0)
    pair_sums = count * deviation.square().sum(dim=1)
    num_pairs = (count * (count - 1) / 2).sum()
    return pair_sums.sum() / num_pairs.clamp(min=1)


def subtb_loss(
    logits: Tensor,
    actions: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
    termination_token: int,
) -> Tensor:
    """:func:`subtb_loss_from_log_probs` from the model's logits ``[B, T+1, V]`` at the states of
    sampled trajectories ``actions [B, T]`` (padding may hold any id; it is masked)."""
    batch, num_states, vocab = logits.shape
    _check_batch("actions", actions, (batch, num_states - 1))
    if not 0 <= termination_token < vocab:
        raise ValueError(f"termination_token {termination_token} is outside the vocabulary [0, {vocab})")
    safe_actions = torch.where(_state_mask(lengths, num_states)[:, 1:], actions, 0).long()
    scores = logits.to(_working_dtype(logits))
    log_z = torch.logsumexp(scores, dim=-1)
    action_log_probs = scores[:, :-1].gather(-1, safe_actions.unsqueeze(-1)).squeeze(-1) - log_z[:, :-1]
    termination_log_probs = scores[..., termination_token] - log_z
    return subtb_loss_from_log_probs(action_log_probs, termination_log_probs, log_rewards, lengths)


def flow_matching_loss(
    logits: Tensor, trie: Trie, log_flows: Tensor, path_nodes: Tensor
) -> Tensor:
    """Teacher-forced flow matching: at every state on the target paths, the cross-entropy
    between the target children distribution ``F(child) / F(node)`` and the model's
    full-vocabulary log-softmax at those children, averaged over the states that have children.

    Args:
        logits: ``[B, S, V]`` model logits at the states.
        trie: the catalog trie.
        log_flows: ``[N]`` or ``[B, N]`` node log-flows (:meth:`Trie.log_flows`).
        path_nodes: ``[B, S]`` trie nodes of the states, -1 on padding.
    """
    batch, num_states, vocab = logits.shape
    _check_batch("path_nodes", path_nodes, (batch, num_states))
    nodes = path_nodes.reshape(-1)
    row_ptr, child_tokens, child_nodes = trie.children(nodes)
    counts = row_ptr.diff()
    state_of_entry = torch.repeat_interleave(
        torch.arange(nodes.shape[0], device=nodes.device), counts, output_size=child_tokens.shape[0]
    )
    flat_logits = logits.reshape(-1, vocab).to(_working_dtype(logits))
    log_z = torch.logsumexp(flat_logits, dim=-1)
    model_log_probs = flat_logits[state_of_entry, child_tokens.long()] - log_z[state_of_entry]

    flows = log_flows.to(flat_logits.dtype)
    if flows.dim() == 1:
        child_flow = flows[child_nodes.long()]
        state_flow = flows[nodes.clamp(min=0).long()]
    else:
        row_of_state = torch.arange(batch, device=nodes.device).repeat_interleave(num_states)
        child_flow = flows[row_of_state[state_of_entry], child_nodes.long()]
        state_flow = flows[row_of_state, nodes.clamp(min=0).long()]
    source_flow = state_flow[state_of_entry]
    target = torch.where(
        source_flow > float("-inf"), torch.exp(child_flow - source_flow), torch.zeros_like(child_flow)
    )
    per_state = torch.zeros_like(log_z).index_add_(0, state_of_entry, -target * model_log_probs)
    num_states_with_children = (counts > 0).sum().clamp(min=1)
    return per_state.sum() / num_states_with_children


def flower_loss(sft: Tensor, flow: Tensor, theta: float) -> Tensor:
    """``theta * sft + (1 - theta) * flow`` (the method's combination; theta in [0, 1])."""
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must lie in [0, 1], got {theta}")
    return theta * sft + (1.0 - theta) * flow
