"""Flower in any training loop: the on-policy rollout and the teacher-forced state logits that
:mod:`flower_ext.losses` takes, for a Hugging Face causal LM. The bundled trainer
(:mod:`flower_rec.training`) runs on these same functions; ``examples/custom_loop.py`` runs a whole
step with them.

One Flower step, with ``trie = Trie.from_sequences([s + [eos] for s in item_sequences])``, the
prompts left-padded (``input_ids`` / ``attention_mask [B, P]``, as for batched generation) and
each sample's target item right-padded (``targets [B, W]``: its tokens then EOS,
``target_lengths [B]``)::

    sample = rollout(model, input_ids, attention_mask, trie, eos)   # no gradient
    target_logits, sample_logits = continuation_logits(
        model, input_ids, attention_mask, [(targets, target_lengths), (sample.actions, sample.lengths)]
    )                                                                # one forward, with gradient
    sft = losses.sft_loss(target_logits, continuation_labels(targets, target_lengths))
    log_rewards = losses.state_log_rewards(trie, trie.log_flows(item_log_rewards), sample.path, eos)
    subtb = losses.subtb_loss(sample_logits, sample.actions, log_rewards, sample.lengths, eos)
    loss = losses.flower_loss(sft, subtb, theta)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from flower_ext import Trie, losses

from .decoding.runner import new_cache, status_checks

__all__ = [
    "Rollout",
    "continuation_labels",
    "continuation_logits",
    "mixed_rollout",
    "padded_items",
    "reward_rollout",
    "rollout",
    "state_logits",
    "with_termination",
]


class Rollout(NamedTuple):
    """Trajectories sampled by :func:`rollout`, as :mod:`flower_ext.losses` takes them."""

    actions: Tensor  # [B, T] each row's item tokens (termination excluded), padded with it
    lengths: Tensor  # [B] tokens of each row
    path: Tensor  # [B, T+1] trie nodes of the states, the root first (losses.path_nodes)


def _unwrap(model):
    """The module that runs a plain forward: without DDP / DataParallel, and for a peft model its
    base model (which holds the injected LoRA layers)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _forward(model, base, keep: int, cache=None, **inputs) -> Tensor:
    """Logits of the last ``keep`` positions, ``[B, keep, V]``, from ``model`` (whose plain
    module is ``base``). Only those are computed where the model takes ``logits_to_keep``;
    ``cache``, a KV cache, is extended in place."""
    parameters = inspect.signature(base.forward).parameters
    keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in parameters), None)
    if keep_arg is not None:
        inputs[keep_arg] = keep
    if cache is not None:
        # transformers >= 5 names the KV cache argument `cache` (`past_key_values` before).
        inputs["cache" if "cache" in parameters else "past_key_values"] = cache
    return model(**inputs, use_cache=cache is not None).logits[:, -keep:]


# ---------------------------------------------------------------------------------------------
# the rollout


@torch.no_grad()
def rollout(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    trie: Trie,
    termination_token: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """One trajectory per prompt from the current model, an item of ``trie`` each.

    ``trie`` holds every item's tokens followed by ``termination_token`` (the loss trie, e.g.
    ``Trie.from_sequences([s + [eos] for s in items])``), on the model's device. The model
    samples over the KV cache, each prompt prefilled once (left padding with the attention
    mask), at ``temperature``, with dropout off (the training mode is restored after), from its
    logits masked to the children of each row's node. A row ends when it draws the termination
    token, or, without a draw or a forward, where nothing else may follow; finished rows leave
    the batch, so no row is ever sampled from an empty (all -inf) distribution. Every row ends
    within ``trie.depth`` steps.

    Returns the :class:`Rollout`: ``actions``, ``lengths`` and ``path`` for
    :func:`flower_ext.losses.state_log_rewards` and :func:`~flower_ext.losses.subtb_loss`.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    base = _unwrap(model)
    was_training = base.training
    base.eval()
    try:
        with status_checks(input_ids.device):
            actions, lengths = _sample(base, input_ids, attention_mask, trie, termination_token,
                                       temperature, generator)
    finally:
        base.train(was_training)
    return Rollout(actions, lengths, losses.path_nodes(trie, actions, lengths))


def _sample(model, input_ids, attention_mask, trie, termination_token, temperature, generator):
    batch, device = input_ids.shape[0], input_ids.device
    # Nodes where a row ends without drawing: a leaf, or a node whose only child is the
    # termination token (every item that is no prefix of another).
    child_count = trie.child_count
    first_child_token = trie.token[trie.child_ptr[:-1].clamp(max=trie.num_nodes - 1).long()]
    ends = (child_count == 0) | ((child_count == 1) & (first_child_token == termination_token))

    actions = torch.full((batch, trie.depth), termination_token, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # the rows still drawing
    nodes = torch.zeros(batch, dtype=torch.int32, device=device)
    prompt_lengths = attention_mask.sum(1)
    mask, cache = attention_mask, new_cache(model)
    logits = _forward(
        model, model, 1, cache, input_ids=input_ids, attention_mask=mask,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
    )[:, -1]
    for step in range(trie.depth):
        scores = logits.float() / temperature
        trie.mask_logits_(scores, nodes)
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        acting = tokens != termination_token
        actions[rows[acting], step] = tokens[acting]
        lengths[rows] += acting
        nodes = trie.advance(nodes, tokens)
        going = (acting & ~ends[nodes.long()]).nonzero().squeeze(1)
        if going.numel() == 0:
            break
        rows, nodes, tokens = rows[going], nodes[going], tokens[going]
        cache.reorder_cache(going)
        mask = torch.cat([mask[going], mask.new_ones(going.numel(), 1)], dim=1)
        logits = _forward(
            model, model, 1, cache, input_ids=tokens.unsqueeze(1), attention_mask=mask,
            position_ids=(prompt_lengths[rows] + step).unsqueeze(1),
        )[:, -1]
    return actions[:, : int(lengths.max())], lengths


def padded_items(sequences: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Every item's tokens as ``(tokens [I, W], lengths [I])``, right-padded with ``pad`` (the
    termination token): the table :func:`reward_rollout` draws trajectories from."""
    width = max((len(s) for s in sequences), default=0)
    tokens = torch.full((len(sequences), width), pad, dtype=torch.long)
    for item, sequence in enumerate(sequences):
        tokens[item, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in sequences], dtype=torch.long)


def reward_rollout(
    item_log_rewards: Tensor,
    items: tuple[Tensor, Tensor],
    trie: Trie,
    *,
    num_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Off-policy trajectories without any model forward: each row an item drawn exactly from
    R/Z, the distribution the flows define (ancestral sampling over the trie's flows, each step
    drawn with F(child) / F(node), ends at an item with probability R(item) / Z; drawing the
    item directly is the same and costs one categorical draw).

    Args:
        item_log_rewards: ``[I]`` (one distribution for every row) or ``[B, I]`` (per user) item
            log-rewards, unnormalised; -inf for items that are never drawn.
        items: ``(tokens [I, W], lengths [I])`` of :func:`padded_items`, on the rewards' device.
        trie: the loss trie of the items (for the state paths).
        num_rows: rows to draw for ``[I]`` rewards (``[B, I]`` gives B).
    """
    rewards = item_log_rewards if item_log_rewards.dim() == 2 else item_log_rewards.expand(
        1 if num_rows is None else num_rows, -1
    )
    weights = torch.exp(rewards - rewards.amax(-1, keepdim=True)).float()
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    tokens, item_lengths = items
    lengths = item_lengths[drawn]
    actions = tokens[drawn, : int(lengths.max()) if lengths.numel() else 0]
    return Rollout(actions, lengths, losses.path_nodes(trie, actions, lengths))


def mixed_rollout(base: Rollout, rows: Tensor, replacement: Rollout, pad: int) -> Rollout:
    """``base`` with its rows ``rows [R]`` replaced by the R rows of ``replacement`` (e.g. reward
    samples for every row, model rollouts for some); widths are padded with ``pad`` (actions)
    and -1 (path)."""
    width = max(base.actions.shape[1], replacement.actions.shape[1])

    def widened(rollout: Rollout) -> Rollout:
        extra = width - rollout.actions.shape[1]
        return Rollout(
            torch.nn.functional.pad(rollout.actions, (0, extra), value=pad),
            rollout.lengths.clone(),
            torch.nn.functional.pad(rollout.path, (0, extra), value=-1),
        )

    mixed, new = widened(base), widened(replacement)
    for kept, replacing in zip(mixed, new):
        kept[rows] = replacing
    return mixed


# ---------------------------------------------------------------------------------------------
# teacher forcing


def with_termination(
    tokens: Tensor, lengths: Tensor, termination_token: int
) -> tuple[Tensor, Tensor]:
    """``(tokens [B, W+1], lengths + 1)``: each row's tokens followed by ``termination_token``
    (e.g. an SFT target, an item's tokens then EOS, from the item's tokens alone)."""
    tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], 1), termination_token)], dim=1)
    tokens[torch.arange(tokens.shape[0], device=tokens.device), lengths] = termination_token
    return tokens, lengths + 1


def continuation_labels(tokens: Tensor, lengths: Tensor, ignore_index: int = -100) -> Tensor:
    """Transformers-style labels ``[B, 1 + W]`` of a continuation's logits
    (:func:`continuation_logits`, whose position 0 is the prompt's last token): ``ignore_index``
    there and past each row's length, the continuation's tokens elsewhere, for
    :func:`flower_ext.losses.sft_loss`."""
    labels = torch.cat([torch.full_like(tokens[:, :1], ignore_index), tokens], dim=1)
    steps = torch.arange(labels.shape[1], device=labels.device)
    scored = (steps > 0) & (steps <= lengths.unsqueeze(1))
    return labels.masked_fill(~scored, ignore_index)


def state_logits(
    model, input_ids: Tensor, attention_mask: Tensor, actions: Tensor, lengths: Tensor
) -> Tensor:
    """The model's logits at the states of trajectories ``actions [B, T]`` (``lengths [B]``)
    after the prompts, with gradient and in the model's mode (dropout as in training):
    ``[B, T+1, V]``, position k after the first k actions, as :func:`flower_ext.losses.subtb_loss`
    takes them. :func:`continuation_logits` for one continuation."""
    (logits,) = continuation_logits(model, input_ids, attention_mask, [(actions, lengths)])
    return logits


def continuation_logits(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    continuations: Sequence[tuple[Tensor, Tensor]],
) -> list[Tensor]:
    """The model's logits at the states of each continuation of the prompts, with gradient.

    ``continuations``: ``(tokens [B, W_j], lengths [B])`` each, right-padded token sequences
    that follow the (left-padded) prompts, e.g. the SFT target and the rollout. Returns, per
    continuation, ``[B, 1 + W_j, V]``: position 0 holds the logits after the prompt (state s_0,
    shared by all), position k those after the continuation's first k tokens.

    One forward computes them all, the prompt encoded once: the continuations are laid side by
    side after the prompt and a 4-D mask lets each see the prompt and its own earlier tokens, at
    the positions it would have alone. Attention implementations that take no custom 4-D mask
    (flash attention) get one row per (prompt, continuation) instead. Only the logits from the
    last prompt position on are computed where the model supports ``logits_to_keep``.
    """
    base = _unwrap(model)
    implementation = getattr(base.config, "_attn_implementation", None)
    if len(continuations) > 1 and implementation not in ("sdpa", "eager"):
        return _stacked_logits(model, base, input_ids, attention_mask, continuations)
    prompt_width = input_ids.shape[1]
    device = input_ids.device
    prompt_lengths = attention_mask.sum(1, keepdim=True)
    tokens = [input_ids]
    positions = [(attention_mask.cumsum(1) - 1).clamp(min=0)]
    segments = [torch.zeros(prompt_width, dtype=torch.long, device=device)]
    valid = [attention_mask.bool()]
    for index, (block, lengths) in enumerate(continuations, start=1):
        steps = torch.arange(block.shape[1], device=device)
        tokens.append(block)
        positions.append(prompt_lengths + steps)
        segments.append(torch.full_like(steps, index))
        valid.append(steps.unsqueeze(0) < lengths.unsqueeze(1))
    tokens, positions = torch.cat(tokens, 1), torch.cat(positions, 1)
    segment, valid = torch.cat(segments), torch.cat(valid, 1)
    if len(continuations) == 1:
        mask = valid.long()  # prompt then one continuation: the usual causal + padding mask
    else:
        mask = _continuation_mask(segment, valid, implementation, base)
    logits = _forward(
        model, base, tokens.shape[1] - prompt_width + 1,
        input_ids=tokens, attention_mask=mask, position_ids=positions,
    )
    out, start = [], 1
    for block, _ in continuations:
        width = block.shape[1]
        if start == 1:
            out.append(logits[:, : 1 + width])
        else:
            out.append(torch.cat([logits[:, :1], logits[:, start : start + width]], dim=1))
        start += width
    return out


def _continuation_mask(segment: Tensor, valid: Tensor, implementation: str, base) -> Tensor:
    """``[B, 1, L, L]`` mask: a query sees earlier valid keys of the prompt (segment 0) and of
    its own segment, and always itself (so no row is empty)."""
    length = segment.shape[0]
    index = torch.arange(length, device=segment.device)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)
    same = (segment.unsqueeze(0) == 0) | (segment.unsqueeze(0) == segment.unsqueeze(1))
    allowed = (causal & same).unsqueeze(0) & valid.unsqueeze(1)
    allowed |= torch.eye(length, dtype=torch.bool, device=segment.device).unsqueeze(0)
    allowed = allowed.unsqueeze(1)
    if implementation == "sdpa":
        return allowed  # boolean: scaled_dot_product_attention takes it in any dtype
    # eager attention adds the mask to the scores
    dtype = next(base.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def _stacked_logits(model, base, input_ids, attention_mask, continuations) -> list[Tensor]:
    """:func:`continuation_logits` with one row per (prompt, continuation)."""
    batch = input_ids.shape[0]
    width = max(block.shape[1] for block, _ in continuations)
    rows, masks = [], []
    for block, lengths in continuations:
        padded = torch.nn.functional.pad(block, (0, width - block.shape[1]))  # masked below
        steps = torch.arange(width, device=block.device)
        rows.append(torch.cat([input_ids, padded], 1))
        masks.append(torch.cat([attention_mask, (steps < lengths.unsqueeze(1)).long()], 1))
    mask = torch.cat(masks)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = _forward(
        model, base, width + 1, input_ids=torch.cat(rows), attention_mask=mask,
        position_ids=positions,
    )
    return [
        logits[j * batch : (j + 1) * batch, : 1 + block.shape[1]]
        for j, (block, _) in enumerate(continuations)
    ]
