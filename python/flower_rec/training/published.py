"""``rollout: published``: the released code's Flower step, reproduced for parity.

The authors' ``generate_and_return_termination_logprob`` (``with_history/code/utils_*.py``) and
``score_fast`` differ from the method (docs/method.md section 5) in ways that change what is
trained, and this module does what they do, so that anyone with a GPU and a pretrained model can
compare the two:

- the model runs with ``use_cache`` off, so the past the rollout feeds back is empty: the
  prompt's forward sees the prompt, and every later step's forward sees **only the previous
  token**;
- prompts are right-padded with EOS and no attention mask: a shorter prompt's first logits
  follow its padding;
- the termination token is ``"\\n"`` tokenised alone, after the title's tokens;
- SubTB's log-probabilities are those of the same forwards, with gradient (no teacher-forced
  forward): its term trains this context-free policy, not the recommender that beam search
  decodes;
- the personalised reward divides the popularity log-probabilities of every transition, and of
  the termination, by ``s_ui`` of the sampled item (``logp_div_s``); an incomplete state's
  termination term is -15 undivided. With ``logp`` it is our per-state reward exactly.

It is a parity setting, not a recommended one. The SFT term stays ours (the teacher-forced
cross-entropy of the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flower_ext import Trie, losses

from ..decoding import Catalog
from ..loop import Rollout
from ..prompts import ItemTokens
from ..rewards import centred_scale

__all__ = ["PublishedFlow", "published_rollout", "published_state_log_rewards"]


def _right_padded(input_ids: Tensor, attention_mask: Tensor, pad: int) -> Tensor:
    """Left-padded prompts ``[B, P]`` re-padded on the right with ``pad``."""
    lengths = attention_mask.sum(1)
    out = torch.full_like(input_ids, pad)
    for row, length in enumerate(lengths.tolist()):
        out[row, :length] = input_ids[row, input_ids.shape[1] - length :]
    return out


def published_rollout(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    trie: Trie,
    termination_token: int,
    pad_token: int,
    generator: torch.Generator | None = None,
) -> tuple[Rollout, Tensor]:
    """The released rollout: one item per prompt over ``trie`` (items end with
    ``termination_token``), sampled at temperature 1, and the logits of every state **with
    gradient**: ``(Rollout, logits [B, T+1, V])``. The first forward runs over the prompts
    right-padded with ``pad_token`` without an attention mask; each later forward over the
    previous token alone (no past)."""
    batch, device = input_ids.shape[0], input_ids.device
    prompts = _right_padded(input_ids, attention_mask, pad_token)
    logits = [model(input_ids=prompts, use_cache=False).logits[:, -1]]
    nodes = torch.zeros(batch, dtype=torch.int32, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    actions: list[Tensor] = []
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(trie.depth):
        scores = logits[-1].detach().float().clone()
        trie.mask_logits_(scores, torch.where(active, nodes, 0))
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        tokens = torch.where(active, tokens, termination_token)
        acting = active & (tokens != termination_token)
        actions.append(tokens)
        lengths += acting
        nodes = torch.where(active, trie.advance(nodes, tokens), nodes)
        active = acting
        if not active.any():
            break
        logits.append(model(input_ids=tokens.unsqueeze(1), use_cache=False).logits[:, -1])
    width = int(lengths.max()) if batch else 0
    taken = torch.stack(actions, 1)[:, :width] if actions else input_ids.new_zeros(batch, 0)
    taken = torch.where(torch.arange(width, device=device) < lengths.unsqueeze(1), taken,
                        termination_token)
    states = torch.stack(logits, 1)[:, : width + 1]
    return Rollout(taken, lengths, losses.path_nodes(trie, taken, lengths)), states


def published_state_log_rewards(
    trie: Trie, log_flows: Tensor, path_nodes: Tensor, termination_token: int, scale: Tensor
) -> Tensor:
    """The released per-state log-rewards ``[B, T+1]``: the popularity transitions' log
    probabilities summed along the path and divided by each row's ``scale [B]`` (``s_ui`` of
    its sampled item; 1 for popularity-only rewards), plus the termination's divided by it where
    an item ends, else -15."""
    step, termination = trie.transition_log_probs(log_flows, path_nodes, termination_token)
    prefix = torch.cat([torch.zeros_like(termination[:, :1]), torch.cumsum(step, 1)], 1)
    divisor = scale.to(prefix.dtype).unsqueeze(1)
    ending = torch.where(torch.isfinite(termination), termination / divisor,
                         losses.INCOMPLETE_LOG_REWARD)
    return prefix / divisor + ending


@dataclass
class PublishedFlow:
    """The released SubTB term over ``items`` (the catalog's titles tokenised with
    ``termination="split"``: each title's tokens, then ``"\\n"`` alone), rewarded by
    ``popularity_log_rewards`` ``[I]`` (the popularity log(R/Z) of each item)."""

    items: ItemTokens
    pad_token: int
    popularity_log_rewards: Tensor

    def __post_init__(self):
        self.catalog = Catalog.from_item_tokens(self.items)
        self.termination = int(self.items.termination_token_id)
        self._on_device: dict[torch.device, tuple[Trie, Tensor, Tensor]] = {}

    def on(self, device: torch.device) -> tuple[Trie, Tensor, Tensor]:
        """The trie, its popularity flows and the node -> item table on ``device`` (made
        once)."""
        if device not in self._on_device:
            trie = self.catalog.trie.to(device)
            flows = trie.log_flows(self.popularity_log_rewards.to(device))
            self._on_device[device] = (trie, flows, self.catalog.node_item.to(device))
        return self._on_device[device]

    def trie(self, device: torch.device) -> Trie:
        return self.on(device)[0]

    def loss(
        self,
        model,
        input_ids: Tensor,
        attention_mask: Tensor,
        probabilities: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """The SubTB term of a batch: the released rollout, its rewards and the closed form of
        :func:`flower_ext.losses.subtb_loss` (the released all-pairs loop's value).
        ``probabilities``: the samples' p_u for ``logp_div_s``, None for ``logp``."""
        trie, flows, node_item = self.on(input_ids.device)
        sample, logits = published_rollout(model, input_ids, attention_mask, trie,
                                           self.termination, self.pad_token, generator)
        scale = torch.ones(sample.lengths.shape[0], device=input_ids.device)
        if probabilities is not None:
            # The sampled item: the leaf after its last state's termination token.
            last = sample.path.gather(1, sample.lengths.unsqueeze(1)).squeeze(1)
            item = node_item[trie.advance(last, torch.full_like(last, self.termination)).long()]
            scales = centred_scale(probabilities.to(input_ids.device))
            scale = scales.gather(1, item.unsqueeze(1)).squeeze(1)
        log_rewards = published_state_log_rewards(trie, flows, sample.path, self.termination,
                                                  scale)
        return losses.subtb_loss(logits, sample.actions, log_rewards, sample.lengths,
                                 self.termination)
