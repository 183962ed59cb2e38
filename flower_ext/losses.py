"""The Flower losses on top of the trie ops (method: ``docs/method.md`` section 3).

Conventions shared by every function here, for a batch of B trajectories over the catalog trie:

- The trie holds every item's tokens followed by the termination token, the token that ends
  an item (``Trie.from_sequences([s + [eos] for s in items])`` with EOS, as the bundled trainer
  does).
- A trajectory is ``y_1 .. y_T`` followed by the termination token. Its states are the prefixes
  ``s_0 .. s_T`` (``s_0`` the empty prefix), so a batch holds ``states [B, T+1]`` and
  ``actions [B, T]``, right-padded, with ``lengths [B]`` = T of each row (the number of the
  item's tokens, the termination token excluded: it is not an action).
- ``logits [B, T+1, V]`` are the model's next-token logits at each state (at position k the
  logits that score ``y_{k+1}``, or the termination token at ``s_T``), computed with gradient
  by a teacher-forced forward over prompt and trajectory (``flower_rec.loop.state_logits``), not
  the rollout's masked, gradient-free ones. Log-probabilities are the full-vocabulary
  log-softmax, unmasked, as in the method.
- ``path_nodes [B, T+1]`` are the trie nodes of the states, the root first and -1 on padding:
  :func:`path_nodes`.
- The policy π is the full-vocabulary softmax, as in the method, except in
  :func:`masked_subtb_loss` and in :func:`flow_matching_loss` given ``log_partitions`` from
  :func:`trie_log_partitions`: the *masked* policy, renormalised over each state's trie children
  (the termination token then has probability only where an item ends, and no mass leaves the
  catalog). :func:`leakage_loss` measures the mass the full-vocabulary policy sends outside the
  trie (the penalty of a conservative SubTB).

Everything is batched over samples and tokens; no Python loop runs over either. Arguments that
break these conventions raise ``ValueError`` naming the argument (the checks of values, which
read the tensors, are skipped while ``torch.compile`` traces).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .trie import Trie

__all__ = [
    "sft_loss",
    "path_nodes",
    "state_log_rewards",
    "subtb_loss_from_log_probs",
    "subtb_loss",
    "masked_subtb_loss",
    "flow_matching_loss",
    "trie_log_partitions",
    "leakage_loss",
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


def _check_batch(
    name: str, tensor: Tensor, shape: tuple[int, ...], source: str, source_shape
) -> None:
    """``tensor`` (argument ``name``) has ``shape``, which argument ``source`` implies."""
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} for {source} of shape {tuple(source_shape)}, "
            f"got {tuple(tensor.shape)}"
        )


def _checking_values() -> bool:
    # Checks that read tensor values would break a torch.compile graph; they run eagerly only.
    return not torch.compiler.is_compiling()


def _check_lengths(lengths: Tensor, num_actions: int, source: str) -> None:
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if _checking_values() and lengths.numel() and not (
        (lengths >= 0) & (lengths <= num_actions)
    ).all():
        raise ValueError(
            f"lengths must lie in [0, {num_actions}] (T of {source}), got values in "
            f"[{int(lengths.min())}, {int(lengths.max())}]"
        )


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Token-mean cross-entropy in the transformers convention (``model(input_ids,
    labels=labels).loss``): ``logits [..., L, V]`` of a sequence and ``labels [..., L]``, its
    tokens with ``ignore_index`` where nothing is scored (prompt, padding); the logits at
    position t score label t + 1 (the shift happens here: pass both unshifted)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree but for "
            "the vocabulary dimension"
        )
    return torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).to(_working_dtype(logits)),
        labels[..., 1:].reshape(-1),
        ignore_index=ignore_index,
    )


def path_nodes(trie: Trie, actions: Tensor, lengths: Tensor) -> Tensor:
    """The trie nodes of the states of trajectories ``actions [B, T]`` (``lengths [B]`` tokens
    each): ``[B, T+1]`` int32, the root (node 0) first, -1 past each row's length. Raises when
    an action within a row's length leaves the trie (its state would have no node)."""
    _check_lengths(lengths, actions.shape[1], "actions")
    nodes = trie.walk(actions, lengths)
    path = torch.cat([torch.zeros_like(nodes[:, :1]), nodes], dim=1)
    off_trie = _state_mask(lengths, path.shape[1]) & (path < 0)
    if _checking_values() and off_trie.any():
        row, state = (int(i) for i in off_trie.nonzero()[0])
        raise ValueError(
            f"actions leave the trie: token {int(actions[row, state - 1])} at step {state - 1} "
            f"of row {row} (length {int(lengths[row])}) is not a child of its state"
        )
    return path


def state_log_rewards(
    trie: Trie,
    log_flows: Tensor,
    path_nodes: Tensor,
    termination_token: int,
    incomplete_log_reward: float = INCOMPLETE_LOG_REWARD,
) -> Tensor:
    """Per-state log-rewards ``log R(s_k ⊤)`` ``[B, T+1]`` (docs/method.md section 3, step 3).

    ``log R(s_k ⊤) = sum_{t<k} log P̂(y_{t+1} | s_t) + c_k`` with ``c_k = log P̂(⊤ | s_k)`` when
    ``s_k`` is a complete title (its termination child has a positive flow) and
    ``incomplete_log_reward`` otherwise. ``log_flows`` is ``[N]`` (one reward for all rows) or
    ``[B, N]`` (per-user rewards, e.g. personalised). A state of zero reward (its path enters a
    subtree whose items all have zero reward) gets -1e4 instead of -inf, so that the squared
    residuals of the losses stay finite. Carries no gradient to the model; it is differentiable
    with respect to ``log_flows``.

    ``path_nodes`` must start at the root (:func:`path_nodes` builds them), and the trie's items
    must end with ``termination_token``; ``ValueError`` otherwise.
    """
    step, termination = trie.transition_log_probs(log_flows, path_nodes, termination_token)
    if _checking_values():
        _check_path(trie, path_nodes, termination_token)
    # Sum of the step log-probabilities before each state; the [B, 1] zeros come from
    # `termination` because `step` has no column to copy when every path is the root alone.
    prefix = torch.cat([torch.zeros_like(termination[:, :1]), torch.cumsum(step, dim=1)], dim=1)
    ending = torch.where(
        torch.isfinite(termination), termination, torch.full_like(termination, incomplete_log_reward)
    )
    return (prefix + ending).clamp(min=_LOG_REWARD_FLOOR)


def _check_path(trie: Trie, path: Tensor, termination_token: int) -> None:
    if path.numel() and (path[:, 0] != 0).any():
        raise ValueError(
            "path_nodes must start at the root (node 0) in every row: the states are s_0 .. s_T "
            "and s_0 is the empty prefix; build them with losses.path_nodes(trie, actions, lengths)"
        )
    unterminated = trie.is_leaf & (trie.token != termination_token)
    if unterminated.any():
        raise ValueError(
            f"termination_token {termination_token} does not end {int(unterminated.sum())} of "
            "the trie's items (leaves reached by another token), so their states would never be "
            "complete; build the trie from each item's tokens followed by the termination token"
        )


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
    if log_rewards.dim() != 2:
        raise ValueError(f"log_rewards must have shape [B, T+1], got {tuple(log_rewards.shape)}")
    batch, num_states = log_rewards.shape
    source = ("log_rewards", log_rewards.shape)
    _check_batch("action_log_probs", action_log_probs, (batch, num_states - 1), *source)
    _check_batch("termination_log_probs", termination_log_probs, (batch, num_states), *source)
    _check_batch("lengths", lengths, (batch,), *source)
    _check_lengths(lengths, num_states - 1, "log_rewards")
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
    sampled trajectories ``actions [B, T]`` (padding may hold any id; it is masked), with
    ``log_rewards [B, T+1]`` from :func:`state_log_rewards`. The termination token is not an
    action: the logits of every state score it. π is the full-vocabulary softmax, as in the
    method; :func:`masked_subtb_loss` renormalises it over the trie."""
    scores = _check_trajectories(logits, actions, log_rewards, lengths, termination_token)
    log_z = torch.logsumexp(scores, dim=-1)
    return _subtb_of_policy(scores, log_z, actions, log_rewards, lengths, termination_token)


def masked_subtb_loss(
    logits: Tensor,
    trie: Trie,
    path_nodes: Tensor,
    actions: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
    termination_token: int,
    incomplete_log_reward: float = INCOMPLETE_LOG_REWARD,
) -> Tensor:
    """Sub-trajectory balance of the *masked* policy: π renormalised over the trie children of
    each state (:func:`trie_log_partitions`), so no mass leaves the catalog, and the termination
    token has probability only where an item ends. At a state where no item ends, its
    log-probability in the balance takes the state's reward constant ``incomplete_log_reward``
    (the c_k of :func:`state_log_rewards`), so that ``H_k`` there is the sum of
    ``log P̂(y | s) - log π(y | s)`` over the transitions so far: no term of the loss is free,
    and a policy that is deterministic on one item's path no longer balances it (the published
    loss's degenerate zero). Zero loss means π equals the target transitions on the sampled
    paths.

    Arguments as :func:`subtb_loss`, plus the loss trie and ``path_nodes [B, T+1]`` of the
    trajectories (:func:`path_nodes`)."""
    scores = _check_trajectories(logits, actions, log_rewards, lengths, termination_token)
    _check_batch("path_nodes", path_nodes, tuple(scores.shape[:2]), "logits", logits.shape)
    # From the working-dtype scores: half-precision logits then get one cast of the summed
    # gradient, not two rounded parts that cancel.
    log_z = trie_log_partitions(scores, trie, path_nodes)
    existing = _state_mask(lengths, scores.shape[1])
    if _checking_values() and (existing & ~torch.isfinite(log_z)).any():
        raise ValueError(
            "every state of the trajectories must have children in the trie (path_nodes of "
            "another trie, or lengths past an item's end)"
        )
    log_z = torch.where(existing, log_z, 0.0)
    terminable = trie.advance(path_nodes, torch.full_like(path_nodes, termination_token)) >= 0
    return _subtb_of_policy(
        scores, log_z, actions, log_rewards, lengths, termination_token,
        unterminable=(~terminable, incomplete_log_reward),
    )


def _check_trajectories(
    logits: Tensor, actions: Tensor, log_rewards: Tensor, lengths: Tensor, termination_token: int
) -> Tensor:
    """Checks the arguments of the SubTB losses; returns the logits in the working dtype."""
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T+1, V], got {tuple(logits.shape)}")
    batch, num_states, vocab = logits.shape
    source = ("logits", logits.shape)
    _check_batch("actions", actions, (batch, num_states - 1), *source)
    _check_batch("log_rewards", log_rewards, (batch, num_states), *source)
    _check_batch("lengths", lengths, (batch,), *source)
    _check_lengths(lengths, num_states - 1, "logits")
    if not 0 <= termination_token < vocab:
        raise ValueError(f"termination_token {termination_token} is outside the vocabulary [0, {vocab})")
    taken = _state_mask(lengths, num_states)[:, 1:]
    if _checking_values() and (taken & (actions == termination_token)).any():
        raise ValueError(
            f"actions hold the termination token {termination_token} within lengths: lengths "
            "count an item's tokens before it, and the logits at the last state score it"
        )
    return logits.to(_working_dtype(logits))


def _subtb_of_policy(
    scores: Tensor,
    log_z: Tensor,
    actions: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
    termination_token: int,
    unterminable: tuple[Tensor, float] | None = None,
) -> Tensor:
    """SubTB of the policy ``scores - log_z`` (``log_z [B, T+1]`` its normaliser per state);
    ``unterminable = (mask, value)``: the termination log-probability is ``value`` where the
    mask is set."""
    taken = _state_mask(lengths, scores.shape[1])[:, 1:]
    safe_actions = torch.where(taken, actions, 0).long()
    action_log_probs = scores[:, :-1].gather(-1, safe_actions.unsqueeze(-1)).squeeze(-1) - log_z[:, :-1]
    termination_log_probs = scores[..., termination_token] - log_z
    if unterminable is not None:
        mask, value = unterminable
        termination_log_probs = torch.where(mask, value, termination_log_probs)
    return subtb_loss_from_log_probs(action_log_probs, termination_log_probs, log_rewards, lengths)


def flow_matching_loss(
    logits: Tensor,
    trie: Trie,
    log_flows: Tensor,
    path_nodes: Tensor,
    *,
    log_partitions: Tensor | None = None,
) -> Tensor:
    """Teacher-forced flow matching: at every state on the target paths, the cross-entropy
    between the target children distribution ``F(child) / F(node)`` and the model's
    log-probabilities at those children, averaged over the states that have children.

    Args:
        logits: ``[B, S, V]`` model logits at the states.
        trie: the catalog trie.
        log_flows: ``[N]`` or ``[B, N]`` node log-flows (:meth:`Trie.log_flows`).
        path_nodes: ``[B, S]`` trie nodes of the states, -1 on padding.
        log_partitions: ``[B, S]`` the policy's log normaliser per state
            (:func:`trie_log_partitions` for the masked policy); None: the full vocabulary's.
    """
    batch, num_states, vocab = logits.shape
    _check_batch("path_nodes", path_nodes, (batch, num_states), "logits", logits.shape)
    nodes = path_nodes.reshape(-1)
    counts, state_of_entry, child_tokens, child_nodes = _state_children(trie, nodes)
    scores = logits.to(_working_dtype(logits))
    if log_partitions is None:
        log_z = torch.logsumexp(scores, dim=-1).reshape(-1)
    else:
        _check_batch("log_partitions", log_partitions, (batch, num_states), "logits", logits.shape)
        # States without children have no masked policy (and no children to score): any value.
        log_z = torch.where(torch.isfinite(log_partitions), log_partitions, 0.0).to(scores.dtype)
        log_z = log_z.reshape(-1)
    flat_logits = scores.reshape(-1, vocab)
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


def _state_children(trie: Trie, nodes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The children of every state ``nodes [S]`` flattened: ``(counts [S], state_of_entry [E],
    child_tokens [E], child_nodes [E])``, entry e a child of state ``state_of_entry[e]``."""
    row_ptr, child_tokens, child_nodes = trie.children(nodes)
    counts = row_ptr.diff()
    state_of_entry = torch.repeat_interleave(
        torch.arange(nodes.shape[0], device=nodes.device), counts, output_size=child_tokens.shape[0]
    )
    return counts, state_of_entry, child_tokens, child_nodes


def trie_log_partitions(logits: Tensor, trie: Trie, path_nodes: Tensor) -> Tensor:
    """``[B, S]``: log of the sum of ``exp(logits)`` over the trie children of each state's node,
    the log normaliser of the masked policy ``π(c | s) = exp(logit_c) / sum over the children of
    s``; -inf at padding (node -1) and at nodes without children. In the logits' working dtype
    (float32, or float64 for float64 logits); differentiable with respect to the logits.

    Args:
        logits: ``[B, S, V]`` model logits at the states.
        trie: the catalog trie.
        path_nodes: ``[B, S]`` trie nodes of the states, -1 on padding (:func:`path_nodes`).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, S, V], got {tuple(logits.shape)}")
    batch, num_states, vocab = logits.shape
    _check_batch("path_nodes", path_nodes, (batch, num_states), "logits", logits.shape)
    _, state_of_entry, child_tokens, _ = _state_children(trie, path_nodes.reshape(-1))
    flat = logits.reshape(-1, vocab).to(_working_dtype(logits))
    child_logits = flat[state_of_entry, child_tokens.long()]
    # A stable log-sum-exp per state: the largest child logit is taken out before exp.
    empty = torch.full_like(flat[:, 0], float("-inf"))
    peak = empty.scatter_reduce(0, state_of_entry, child_logits.detach(), "amax")
    finite_peak = torch.where(torch.isfinite(peak), peak, 0.0)
    sums = torch.zeros_like(empty).index_add_(
        0, state_of_entry, torch.exp(child_logits - finite_peak[state_of_entry])
    )
    return (torch.log(sums) + finite_peak).reshape(batch, num_states)


def leakage_loss(logits: Tensor, log_partitions: Tensor) -> Tensor:
    """The mass the full-vocabulary policy sends outside the trie: the mean, over the states
    whose node has children (finite ``log_partitions``), of ``-log sum over the children c of
    π(c | s)`` = ``logsumexp(logits) - log_partitions``. 0 when the policy keeps all its mass on
    the trie. The penalty of a conservative SubTB (``subtb + lambda * leakage``).

    Args:
        logits: ``[B, S, V]`` model logits at the states.
        log_partitions: ``[B, S]`` from :func:`trie_log_partitions` (-inf where a state has no
            children or is padding: not counted).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, S, V], got {tuple(logits.shape)}")
    _check_batch("log_partitions", log_partitions, tuple(logits.shape[:2]), "logits", logits.shape)
    scores = logits.to(_working_dtype(logits))
    counted = torch.isfinite(log_partitions)
    partitions = torch.where(counted, log_partitions.to(scores.dtype), 0.0)
    # Rounding can put the trie's share a hair above the whole: clamp at 0.
    leaked = (torch.logsumexp(scores, dim=-1) - partitions).clamp(min=0)
    return torch.where(counted, leaked, 0.0).sum() / counted.sum().clamp(min=1)


def flower_loss(sft: Tensor, flow: Tensor, theta: float) -> Tensor:
    """``theta * sft + (1 - theta) * flow`` (the method's combination; theta in [0, 1])."""
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must lie in [0, 1], got {theta}")
    return theta * sft + (1.0 - theta) * flow
