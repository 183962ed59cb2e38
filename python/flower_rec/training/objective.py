"""The training loss of a batch: SFT, and Flower's flow terms (SubTB of the full or masked
policy on on-policy or reward-drawn trajectories, flow matching, the leakage penalty)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flower_ext import Trie, losses

from ..decoding import Catalog
from ..loop import (
    Rollout,
    continuation_labels,
    continuation_logits,
    mixed_rollout,
    padded_items,
    reward_rollout,
    rollout,
    with_termination,
)
from ..rewards import DEFAULT_POPULARITY_EXPONENT, PopularityRewards
from .config import (
    FLOW_LOSSES,
    METHODS,
    POLICIES,
    PUBLISHED_ROLLOUT_NEEDS,
    ProbabilitySource,
    published_rollout_fits,
)
from .published import PublishedFlow

# ---------------------------------------------------------------------------------------------
# the objective


@dataclass
class LossTerms:
    """The loss of a batch and its parts (``flow`` is None for SFT)."""

    loss: Tensor
    sft: Tensor
    flow: Tensor | None = None
    flow_name: str | None = None
    leakage: Tensor | None = None  # the conservative penalty, before its weight

    def scalars(self) -> dict[str, Tensor]:
        out = {"sft": self.sft.detach()}
        if self.flow is not None:
            out[self.flow_name] = self.flow.detach()
        if self.leakage is not None:
            out["leakage"] = self.leakage.detach()
        return out


def rollout_seed(seed: int, step: int | str, sample_index: Tensor) -> int:
    """Seed of one batch's rollouts, a function of the run's seed, the optimizer step and the
    samples alone, so that a resumed run (same step, same batches) draws the same trajectories
    and DDP ranks (different samples) draw different ones. Validation passes ``step="valid"``:
    every evaluation then draws from the same seeds, whatever the training step."""
    key = f"{seed}:{step}:{','.join(map(str, sample_index.tolist()))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class FlowerObjective:
    """The training loss of a batch of :class:`RecommendationCollator` inputs.

    Args:
        catalog: the items (:class:`flower_rec.decoding.Catalog`, the decoding trie).
        method: ``"sft"`` or ``"flower"``.
        eos_token_id: the token that ends every item (SFT target and ⊤ of the losses).
        theta: SFT weight of the flower loss.
        flow_loss: ``"subtb"`` or ``"flow_matching"``.
        rewards: popularity rewards (flower).
        reward_variant: see :mod:`flower_rec.rewards`.
        popularity_exponent: ``beta`` of the ``p_div_pop`` reward.
        probabilities: ``p_u`` source for the personalised variants.
        policy: ``"full"`` (the full-vocabulary softmax, the method's) or ``"masked"`` (π
            renormalised over the trie children: :func:`flower_ext.losses.masked_subtb_loss`,
            and flow matching of the masked policy).
        leakage_weight: lambda of the conservative penalty added to the flow loss,
            ``lambda * leakage`` (:func:`flower_ext.losses.leakage_loss`, the mass π sends off
            the trie at the flow loss's states); 0: none.
        off_policy_share: the share of SubTB trajectories drawn from each user's R_u / Z_u
            (:func:`flower_rec.loop.reward_rollout`, no model forward) instead of the model;
            each row is off-policy with this probability.
        rollout_temperature: temperature of the on-policy rollouts.
        published: the released code's SubTB step instead of ours
            (:class:`flower_rec.training.published.PublishedFlow`, ``rollout: published``; with
            the subtb flow loss, the full policy and no penalty or off-policy share).
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        method: str = "sft",
        eos_token_id: int,
        theta: float = 0.9995,
        flow_loss: str = "subtb",
        rewards: PopularityRewards | None = None,
        reward_variant: str = "logp",
        popularity_exponent: float = DEFAULT_POPULARITY_EXPONENT,
        probabilities: ProbabilitySource | None = None,
        policy: str = "full",
        leakage_weight: float = 0.0,
        off_policy_share: float = 0.0,
        rollout_temperature: float = 1.0,
        published: PublishedFlow | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if flow_loss not in FLOW_LOSSES:
            raise ValueError(f"unknown flow_loss {flow_loss!r}; expected one of {FLOW_LOSSES}")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        for name, value, low, high in (
            ("leakage_weight", leakage_weight, 0.0, float("inf")),
            ("off_policy_share", off_policy_share, 0.0, 1.0),
            ("popularity_exponent", popularity_exponent, 0.0, float("inf")),
        ):
            if not low <= value <= high or value != value or value == float("inf"):
                raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
        if not (rollout_temperature > 0 and rollout_temperature < float("inf")):
            raise ValueError(f"rollout_temperature must be a positive number, got {rollout_temperature!r}")
        if published is not None and not published_rollout_fits(
            flow_loss, policy, leakage_weight, off_policy_share, rollout_temperature,
            reward_variant,
        ):
            raise ValueError("the published rollout is the released SubTB step alone: it needs "
                             + PUBLISHED_ROLLOUT_NEEDS)
        if method == "flower" and rewards is None:
            raise ValueError("the flower method needs item rewards")
        if method == "flower" and reward_variant != "logp" and probabilities is None:
            raise ValueError(f"reward variant {reward_variant!r} needs item probabilities p_u")
        sequences = catalog.item_tokens.sequences
        if any(eos_token_id in s for s in sequences):
            raise ValueError(
                f"the EOS token {eos_token_id} occurs inside an item's token sequence: it cannot "
                "terminate items"
            )
        self.catalog = catalog
        self.method = method
        self.eos = int(eos_token_id)
        self.theta = float(theta)
        self.flow_loss = flow_loss
        self.rewards = rewards
        self.reward_variant = reward_variant
        self.popularity_exponent = float(popularity_exponent)
        self.probabilities = probabilities
        self.policy = policy
        self.leakage_weight = float(leakage_weight)
        self.off_policy_share = float(off_policy_share)
        self.rollout_temperature = float(rollout_temperature)
        self.published = published
        # The loss trie: each item's sequence, then ⊤ = EOS; identical sequences share a leaf.
        self.loss_trie = Trie.from_sequences(
            [list(s) + [self.eos] for s in sequences], list(range(len(sequences)))
        )
        self._device_state: dict[torch.device, dict[str, Any]] = {}

    @property
    def personalised(self) -> bool:
        """Whether the rewards need each sample's ``p_u``."""
        return self.method == "flower" and self.reward_variant != "logp"

    @property
    def sampled(self) -> bool:
        """Whether a step samples trajectories (flower with the subtb flow loss)."""
        return self.method == "flower" and self.flow_loss == "subtb"

    def _on(self, device: torch.device) -> dict[str, Any]:
        """The loss trie, the padded item table (and popularity-only rewards and flows) on
        ``device`` (moved once)."""
        state = self._device_state.get(device)
        if state is None:
            trie = self.loss_trie.to(device)
            tokens, lengths = padded_items(self.catalog.item_tokens.sequences, self.eos)
            state = {"trie": trie, "items": (tokens.to(device), lengths.to(device))}
            if self.method == "flower" and self.reward_variant == "logp":
                # Popularity-only rewards and flows are the same for every user: computed once.
                state["rewards"] = self.rewards.item_log_rewards("logp", device=device)
                state["flows"] = trie.log_flows(state["rewards"])
            self._device_state[device] = state
        return state

    # -- trajectories ---------------------------------------------------------------------

    def rollout(
        self, model, input_ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """One trajectory per prompt from the current model over the loss trie
        (:func:`flower_rec.loop.rollout` at ``rollout_temperature``): ``(actions [B, T],
        lengths [B])``, each row an item's token sequence (without EOS), padded with EOS."""
        sample = self._model_rollout(model, input_ids, attention_mask, generator)
        return sample.actions, sample.lengths

    def _model_rollout(self, model, input_ids, attention_mask, generator) -> Rollout:
        trie = self._on(input_ids.device)["trie"]
        return rollout(model, input_ids, attention_mask, trie, self.eos,
                       temperature=self.rollout_temperature, generator=generator)

    def trajectories(
        self, model, inputs: Mapping[str, Tensor], item_log_rewards: Tensor,
        generator: torch.Generator | None,
    ) -> Rollout:
        """The SubTB trajectories of a batch: each row off-policy (an item drawn from R_u / Z_u)
        with probability ``off_policy_share``, else a rollout of the model (run on those rows
        only)."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, device = input_ids.shape[0], input_ids.device
        if self.off_policy_share == 0:
            return self._model_rollout(model, input_ids, attention_mask, generator)
        state = self._on(device)
        drawn = reward_rollout(item_log_rewards, state["items"], state["trie"], num_rows=batch,
                               generator=generator)
        uniform = torch.rand(batch, device=device, generator=generator)
        on_policy = (uniform >= self.off_policy_share).nonzero().squeeze(1)
        if on_policy.numel() == 0:
            return drawn
        sampled = self._model_rollout(
            model, input_ids[on_policy], attention_mask[on_policy], generator
        )
        return mixed_rollout(drawn, on_policy, sampled, self.eos)

    @staticmethod
    def _generator(model, seed: int) -> torch.Generator:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    # -- the loss -------------------------------------------------------------------------

    def item_log_rewards(
        self,
        sample_index: Tensor,
        device: torch.device,
        probabilities: ProbabilitySource | None = None,
    ) -> Tensor:
        """Item log-rewards: ``[I]`` for popularity-only rewards, else ``[B, I]`` from each
        sample's p_u from ``probabilities`` (by default the training samples' source)."""
        state = self._on(device)
        if "rewards" in state:
            return state["rewards"]
        return self.rewards.item_log_rewards(
            self.reward_variant, self._p_u(sample_index, probabilities).to(device),
            popularity_exponent=self.popularity_exponent, device=device,
        )

    def _p_u(self, sample_index: Tensor, probabilities: ProbabilitySource | None) -> Tensor:
        """The samples' p_u from ``probabilities``, by default the training samples' source."""
        return (self.probabilities if probabilities is None else probabilities)(sample_index)

    def __call__(
        self,
        model,
        inputs: Mapping[str, Tensor],
        *,
        seed: int | None = None,
        probabilities: ProbabilitySource | None = None,
    ) -> LossTerms:
        """The loss terms of a batch; ``seed`` seeds its rollouts, ``probabilities`` is the p_u
        source of its samples (by default the training one)."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        device = input_ids.device
        # SFT target: the item's tokens then EOS, which SFT scores too.
        target = with_termination(inputs["target_ids"], inputs["target_lengths"], self.eos)
        continuations = [target]
        # The released step (`published`) scores its own rollout with its own rewards.
        ours = self.method == "flower" and self.published is None
        if ours:
            state = self._on(device)
            trie = state["trie"]
            item_rewards = self.item_log_rewards(inputs["sample_index"], device, probabilities)
            flows = state["flows"] if "flows" in state else trie.log_flows(item_rewards)
        generator = None if seed is None else self._generator(model, seed)
        if ours and self.sampled:
            sample = self.trajectories(model, inputs, item_rewards, generator)
            continuations.append((sample.actions, sample.lengths))
        logits = continuation_logits(model, input_ids, attention_mask, continuations)
        sft = losses.sft_loss(logits[0], continuation_labels(*target))
        if self.method == "sft":
            return LossTerms(sft, sft)

        if self.published is not None:
            p_u = self._p_u(inputs["sample_index"], probabilities) if self.personalised else None
            flow = self.published.loss(model, input_ids, attention_mask, p_u, generator)
            return LossTerms(losses.flower_loss(sft, flow, self.theta), sft, flow,
                             self.flow_loss)
        if self.sampled:
            states, path = logits[1], sample.path
            log_rewards = losses.state_log_rewards(trie, flows, path, self.eos)
            if self.policy == "masked":
                flow = losses.masked_subtb_loss(states, trie, path, sample.actions, log_rewards,
                                                sample.lengths, self.eos)
            else:
                flow = losses.subtb_loss(states, sample.actions, log_rewards, sample.lengths,
                                         self.eos)
            partitions = None
        else:
            # The target's states and the leaf after its EOS, which has no children to match.
            states, path = logits[0], losses.path_nodes(trie, *target)
            partitions = losses.trie_log_partitions(states, trie, path) \
                if self.policy == "masked" or self.leakage_weight else None
            flow = losses.flow_matching_loss(
                states, trie, flows, path,
                log_partitions=partitions if self.policy == "masked" else None,
            )
        leakage = None
        if self.leakage_weight:
            if partitions is None:
                partitions = losses.trie_log_partitions(states, trie, path)
            leakage = losses.leakage_loss(states, partitions)
            flow = flow + self.leakage_weight * leakage
        return LossTerms(losses.flower_loss(sft, flow, self.theta), sft, flow, self.flow_loss,
                         leakage)
