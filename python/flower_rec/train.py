"""Fine-tuning an LLM recommender: SFT (the BIGRec baseline) and Flower (docs/method.md section 3),
on :class:`transformers.Trainer`.

``train(TrainConfig(data=..., out=..., method="sft" | "flower"))`` trains and returns the run
folder::

    RUN/train_config.json        the configuration (JSON)
    RUN/metrics.jsonl            one line per Trainer log: step, loss, sft, subtb | flow_matching, ...;
                                 with ``eval_steps``, also eval_loss, eval_sft, eval_subtb | ...
    RUN/config.json, model.safetensors, tokenizer files      the final model (save_pretrained;
                                 a LoRA run is merged into its base model), what `evaluate` loads;
                                 with early stopping, the checkpoint of the best eval_loss
    RUN/checkpoints/checkpoint-N Trainer checkpoints (model, optimizer, scheduler, RNG states)
    RUN/tensorboard/             with ``tensorboard=True``

Because the loss lives in :meth:`FlowerTrainer.compute_loss`, the same code runs on one CPU, one
GPU and several GPUs under ``torchrun`` / ``accelerate launch`` (DDP), and checkpoints and
``resume=True`` come from the Trainer. A resumed run reproduces the uninterrupted one: the
rollouts draw from a generator seeded from (seed, optimizer step, the batch's sample indices),
not from a global RNG stream.

A run killed at any moment resumes: from the newest complete checkpoint (a checkpoint with a
state file missing or cut short, as a kill while it is written leaves it, is passed over with a
warning and overwritten when the run gets there again), to the step the uninterrupted run stops
at and the same metrics file, also from a folder that has moved. The files the run writes
(train_config.json, metrics.jsonl, the final model and tokenizer) are replaced atomically, each
its old or its new version; the configuration is checked (:data:`FIELD_RULES`) before anything
runs.

One tokenisation of every item (docs/method.md section 5, pitfall 3): :func:`flower_rec.prompts.item_token_sequences`
gives the tokens of ``title + "\\n"`` after the prompt. The SFT target is those tokens then EOS;
the Flower loss trie holds the same sequences each followed by EOS, so the termination token ⊤
of the losses is EOS, as in decoding (beam search ends an item with EOS). A trajectory is the
sequence ``y_1 .. y_T`` of one item, its states ``s_0 .. s_T``; ``log π(⊤ | s_k)`` is the
model's EOS probability there.

A training step of ``flower`` with the ``subtb`` flow loss (the paper's), on the public helpers
of :mod:`flower_rec.loop` that a hand-written loop uses too:

1. rollout, without gradient: one trajectory per sample from the current model at temperature 1
   over the KV cache, left-padded prompts with the attention mask, the logits masked to the loss
   trie's children at each step (:func:`flower_rec.loop.rollout`);
2. one teacher-forced forward with gradient over prompt, SFT target (the item's tokens then EOS)
   and trajectory together: the target and the trajectory both follow the prompt, which is
   encoded once (a 4-D attention mask lets each continuation see the prompt and itself only;
   attention implementations that take no such mask run the two continuations as separate rows
   instead). Only the logits from the last prompt position on are computed
   (:func:`flower_rec.loop.continuation_logits`);
3. per-user flows: the item rewards of :mod:`flower_rec.rewards` (personalised per sample for
   ``logp_div_s`` / ``logp_add_logs``), aggregated by ``trie.log_flows`` in one batched call;
4. ``theta * SFT + (1 - theta) * SubTB`` (flower_ext.losses; SFT with transformers-style
   labels, :func:`flower_rec.loop.continuation_labels`).

``flow_loss="flow_matching"`` replaces 1 and the trajectory by teacher-forced flow matching on
the SFT target's path.

Validation (``eval_steps``): the same objective on the ``valid`` split (its first ``valid_limit``
samples) every ``eval_steps`` optimizer steps, logged as ``eval_loss`` (the total) and its parts
``eval_sft`` / ``eval_subtb`` | ``eval_flow_matching``. Its rollouts are seeded by the validation
samples alone, so every evaluation draws from the same random numbers (a reproducible loss whose
changes come from the model, not from new draws), and the personalised rewards take the p_u of
the validation samples (``valid_aux_probabilities``: the training table's rows are other
samples). ``early_stopping_patience`` stops when eval_loss has not improved for that many
evaluations and restores the best checkpoint (transformers' EarlyStoppingCallback and
``load_best_model_at_end``); the saved model is then the best one by eval_loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flower_ext import Trie, losses
from torch import Tensor
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from .config_checks import (
    BOOLEAN,
    COUNT,
    PATH,
    SEED,
    Rule,
    first_problem,
    integer,
    number,
    one_of,
    optional,
    shown,
)
from .data import Dataset, load_dataset
from .decoding import Catalog
from .files import atomic_files, atomic_open, check_whole, read_json, read_text, reading
from .loop import (
    Rollout,
    continuation_labels,
    continuation_logits,
    mixed_rollout,
    padded_items,
    reward_rollout,
    rollout,
    with_termination,
)
from .prompts import DOMAINS, PromptCutoffError, build_prompt, encode, sample_prompts
from .rewards import DEFAULT_FLOOR_COUNT, REWARD_VARIANTS, PopularityRewards

__all__ = [
    "CONFIG_FILE",
    "FIELD_RULES",
    "FLOW_LOSSES",
    "METHODS",
    "POLICIES",
    "METRICS_FILE",
    "FlowerObjective",
    "FlowerTrainer",
    "LossTerms",
    "MetricsFileCallback",
    "RecommendationCollator",
    "TrainConfig",
    "TrainConfigError",
    "encode_samples",
    "train",
]

METHODS = ("sft", "flower")
FLOW_LOSSES = ("subtb", "flow_matching")
POLICIES = ("full", "masked")
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Fields that may differ between a run and its resumption (the run folder may have moved).
_RESUMABLE_FIELDS = ("out", "resume", "progress", "tensorboard")

ProbabilitySource = Callable[[Tensor], Tensor]
"""Per-sample item probabilities: sample indices ``[B]`` (into the training split, or the
validation split for the validation source) -> ``p_u [B, I]``."""

logger = logging.getLogger(__name__)


class TrainConfigError(ValueError):
    """A training configuration that cannot run (the message says which field and why)."""


_POSITIVE = number(0, above=True, must="be a positive number")
_NON_NEGATIVE = number(0, must="be a non-negative number")
_COUNT = COUNT
_OPTIONAL_COUNT = optional(_COUNT)
_PROBABILITIES = Rule(
    "be a tensor, a .pt / .safetensors file, a callable or None",
    lambda value: value is None or isinstance(value, (Tensor, str, os.PathLike)) or callable(value),
)

FIELD_RULES: dict[str, Rule] = {
    "data": PATH,
    "out": PATH,
    "method": one_of(METHODS),
    "model": optional(PATH),
    "tiny_hidden_size": _COUNT,
    "tiny_layers": _COUNT,
    "tiny_heads": _COUNT,
    "tiny_vocab_size": _COUNT,
    "lora": BOOLEAN,
    "lora_r": _COUNT,
    "lora_alpha": _POSITIVE,
    "lora_dropout": number(0, 1, below=True, must="lie in [0, 1)"),
    "lora_target_modules": Rule(
        "be a module name or a list of them",
        lambda value: isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(name, str) for name in value)),
    ),
    "bf16": BOOLEAN,
    "theta": number(0, 1, must="lie in [0, 1]"),
    "reward": one_of(REWARD_VARIANTS),
    "flow_loss": one_of(FLOW_LOSSES),
    "policy": one_of(POLICIES),
    "leakage_weight": _NON_NEGATIVE,
    "off_policy_share": number(0, 1, must="lie in [0, 1]"),
    "rollout_temperature": _POSITIVE,
    "reward_counts": optional(PATH),
    "floor_count": _POSITIVE,
    "aux_probabilities": _PROBABILITIES,
    "valid_aux_probabilities": _PROBABILITIES,
    "domain": one_of(sorted(DOMAINS)),
    "max_prompt_tokens": _OPTIONAL_COUNT,
    "learning_rate": _POSITIVE,
    "warmup_steps": integer(0),
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": number(0, must="be a non-negative number (0: no clipping)"),
    "epochs": _NON_NEGATIVE,
    "max_steps": Rule(
        "be a positive integer, or -1 to train for `epochs`",
        lambda value: _COUNT.accepts(value) or (type(value) is int and value == -1),
    ),
    "batch_size": _COUNT,
    "gradient_accumulation_steps": _COUNT,
    "save_steps": _COUNT,
    "save_total_limit": _OPTIONAL_COUNT,
    "logging_steps": _COUNT,
    "eval_steps": _OPTIONAL_COUNT,
    "valid_limit": _OPTIONAL_COUNT,
    "early_stopping_patience": _OPTIONAL_COUNT,
    "seed": SEED,
    "resume": BOOLEAN,
    "tensorboard": BOOLEAN,
    "progress": BOOLEAN,
}
"""The type and range of every :class:`TrainConfig` field, checked before anything runs."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``train_config.json`` in the run folder).

    Args:
        data: dataset folder (:func:`flower_rec.data.load_dataset`).
        out: the run folder.
        method: ``"sft"`` (BIGRec) or ``"flower"``.
        model: a Hugging Face causal LM, local path or hub id; None builds the embedded tiny
            Llama-style model with a BPE tokenizer trained on the dataset's text.
        tiny_hidden_size, tiny_layers, tiny_heads, tiny_vocab_size: size of that tiny model.
        lora: train LoRA adapters (peft) instead of every weight; the saved model is merged.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA configuration.
        bf16: bfloat16 mixed precision (the Trainer's autocast; weights stay float32).
        theta: weight of SFT in ``theta * SFT + (1 - theta) * flow`` (flower only).
        reward: ``logp``, ``logp_div_s`` (the paper's default; needs ``aux_probabilities``) or
            ``logp_add_logs`` (needs them too); see :mod:`flower_rec.rewards`.
        flow_loss: ``subtb`` (on-policy sub-trajectory balance, the paper's) or
            ``flow_matching`` (teacher-forced on the target path, no sampling).
        policy: ``full`` (the full-vocabulary softmax, the paper's) or ``masked`` (π
            renormalised over the trie children; no free termination term, no leak).
        leakage_weight: lambda of the conservative penalty: the flow loss gets
            ``lambda * (-log sum over the trie children of π)`` at its states (0: none).
        off_policy_share: share of the SubTB trajectories drawn exactly from each user's
            R_u / Z_u instead of the model (0: all on-policy, the paper's).
        rollout_temperature: temperature of the on-policy rollouts (1: the paper's).
        reward_counts: JSON ``{title: count}`` to use as the popularity of the rewards instead
            of the training-history counts (e.g. a target distribution); None: history counts.
        floor_count: popularity count of titles never seen in a training history.
        aux_probabilities: ``p_u`` of every training sample, ``[num_train_samples, I]``: a
            tensor, a file (``.pt`` holding a tensor, or ``.safetensors`` holding one tensor), or
            a callable mapping sample indices ``[B]`` to ``[B, I]``.
        valid_aux_probabilities: the same for the validation samples, ``[num_valid_samples,
            I]``; needed by validation (``eval_steps``) with a personalised reward.
        domain: wording of the prompt (:data:`flower_rec.prompts.DOMAINS`); evaluate with the
            same.
        max_prompt_tokens: prompt cutoff (the paper's 512): longer prompts drop their oldest
            history titles, whole, until they fit (:func:`flower_rec.prompts.fit_prompts`), in
            training and validation alike; None keeps every prompt whole.
        learning_rate, warmup_steps, weight_decay, max_grad_norm: AdamW and its schedule
            (linear decay after the warm-up); ``max_grad_norm`` 0 clips no gradient.
        epochs: training epochs; ``max_steps`` > 0 overrides them (-1: train for ``epochs``).
        batch_size: samples per device per forward; ``gradient_accumulation_steps`` forwards
            per optimizer step.
        save_steps: a checkpoint every this many optimizer steps; ``save_total_limit`` keeps the
            newest ones (None keeps all).
        logging_steps: a metrics line every this many optimizer steps.
        eval_steps: the validation loss every this many optimizer steps (and at the last step);
            None: no validation.
        valid_limit: validate on the first this many validation samples only (a validation
            pass costs a rollout per sample); None: all of them.
        early_stopping_patience: stop when eval_loss has not improved for this many
            evaluations in a row and keep the best checkpoint as the final model; needs
            ``eval_steps``, and ``save_steps`` a multiple of it. None: train to the end.
        seed: model initialisation, data order and rollouts.
        resume: continue the run in ``out`` from its newest complete checkpoint.
        tensorboard: also write TensorBoard event files (needs the tensorboard package).
        progress: progress bars.
    """

    data: str | os.PathLike
    out: str | os.PathLike
    method: str = "sft"
    model: str | None = None
    tiny_hidden_size: int = 128
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_vocab_size: int = 2000
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    bf16: bool = False
    theta: float = 0.9995
    reward: str = "logp_div_s"
    flow_loss: str = "subtb"
    policy: str = "full"
    leakage_weight: float = 0.0
    off_policy_share: float = 0.0
    rollout_temperature: float = 1.0
    reward_counts: str | None = None
    floor_count: float = DEFAULT_FLOOR_COUNT
    aux_probabilities: Any = None
    valid_aux_probabilities: Any = None
    domain: str = "items"
    max_prompt_tokens: int | None = None
    learning_rate: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    eval_steps: int | None = None
    valid_limit: int | None = None
    early_stopping_patience: int | None = None
    seed: int = 0
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """From a mapping (a YAML / JSON file); unknown or missing keys and a value of the wrong
        type or range (:data:`FIELD_RULES`) are errors naming the option."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names, key=str)
        if unknown:
            raise TrainConfigError(f"unknown training option(s): {', '.join(map(shown, unknown))}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            flags = ", ".join(f"{name} (--{name})" for name in missing)
            raise TrainConfigError(f"missing training option(s): {flags}")
        config = cls(**values)
        config._check_fields()
        return config

    @property
    def needs_probabilities(self) -> bool:
        return self.method == "flower" and self.reward != "logp"

    def _check_fields(self) -> None:
        """Every field's type and range, before any of them is used."""
        problem = first_problem({name: getattr(self, name) for name in FIELD_RULES}, FIELD_RULES)
        if problem:
            raise TrainConfigError(problem)

    def validate(self) -> None:
        """Raises :class:`TrainConfigError` naming the first invalid field: each field's type and
        range (:data:`FIELD_RULES`), then the rules between fields."""

        def fail(message: str) -> None:
            raise TrainConfigError(message)

        self._check_fields()
        if self.eval_steps is None:
            for name in ("valid_limit", "early_stopping_patience"):
                if getattr(self, name) is not None:
                    fail(f"{name} needs eval_steps (the validation loss is computed every "
                         "eval_steps optimizer steps)")
        elif self.early_stopping_patience is not None and self.save_steps % self.eval_steps:
            # The best model is restored from a checkpoint; transformers requires checkpoints
            # on evaluation steps for that.
            fail(f"save_steps ({self.save_steps}) must be a multiple of eval_steps "
                 f"({self.eval_steps}) with early stopping, which restores the best checkpoint")
        if self.tiny_hidden_size % self.tiny_heads:
            fail(f"tiny_hidden_size {self.tiny_hidden_size} is not a multiple of tiny_heads "
                 f"{self.tiny_heads}")
        if self.max_steps == -1 and not self.epochs > 0:
            fail(f"epochs must be positive (or max_steps > 0), got {self.epochs!r}")
        if self.needs_probabilities and self.aux_probabilities is None:
            fail(
                f"reward {self.reward!r} needs aux_probabilities (p_u of every training sample "
                "from an auxiliary recommender, e.g. `flower-rec train-aux`); pass them, or use "
                "reward='logp' for popularity-only rewards"
            )
        if self.needs_probabilities and self.eval_steps is not None \
                and self.valid_aux_probabilities is None:
            fail(
                f"validation with reward {self.reward!r} needs valid_aux_probabilities (p_u of "
                "every validation sample, from the same auxiliary recommender; `flower-rec train "
                "--aux` computes both)"
            )
        if self.reward_counts is not None and not Path(self.reward_counts).is_file():
            fail(f"reward_counts file {str(self.reward_counts)!r} does not exist")
        if not Path(self.data).is_dir():
            fail(f"data folder {str(self.data)!r} does not exist (create one with "
                 "`flower-rec prepare`)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; a tensor or callable ``aux_probabilities`` is described, not stored."""
        values = dataclasses.asdict(self)
        for key in ("data", "out"):
            values[key] = str(values[key])
        for key in ("aux_probabilities", "valid_aux_probabilities"):
            aux = getattr(self, key)
            if isinstance(aux, Tensor):
                values[key] = f"<tensor {list(aux.shape)}>"
            elif isinstance(aux, os.PathLike):
                values[key] = str(aux)
            elif callable(aux):
                values[key] = f"<callable {getattr(aux, '__name__', type(aux).__name__)}>"
        return values


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class EncodedSamples:
    """Token ids of each training sample: its prompt (with the tokenizer's special tokens, as
    decoding encodes prompts) and its target item's sequence (without EOS)."""

    prompts: list[list[int]]
    targets: list[list[int]]


def encode_samples(
    dataset: Dataset,
    split: str,
    tokenizer,
    catalog: Catalog,
    domain: str = "items",
    max_prompt_tokens: int | None = None,
    limit: int | None = None,
) -> EncodedSamples:
    """The first ``limit`` samples of ``split`` (all with None), prompts cut to
    ``max_prompt_tokens`` (:func:`flower_rec.prompts.sample_prompts`)."""
    samples = dataset.split(split)[:limit]
    texts = sample_prompts(tokenizer, dataset.titles, samples, max_prompt_tokens, domain)
    prompts = encode(tokenizer, texts, add_special_tokens=True)
    sequences = catalog.item_tokens.sequences
    return EncodedSamples(prompts, [list(sequences[s.target]) for s in samples])


class _SampleSet(torch.utils.data.Dataset):
    """The samples of a split as collator inputs; each carries its index in the split
    (per-sample rewards and rollout seeds key on it)."""

    def __init__(self, encoded: EncodedSamples):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "sample_index": index,
            "prompt": self.encoded.prompts[index],
            "target": self.encoded.targets[index],
        }


@dataclass
class RecommendationCollator:
    """Batches samples: ``input_ids`` / ``attention_mask`` ``[B, P]`` (prompts, left-padded),
    ``target_ids [B, W]`` (item sequences without EOS, right-padded), ``target_lengths [B]``,
    ``sample_index [B]``."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch = len(features)
        prompt_width = max(len(f["prompt"]) for f in features)
        target_width = max(len(f["target"]) for f in features)
        input_ids = torch.full((batch, prompt_width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, prompt_width), dtype=torch.long)
        target_ids = torch.full((batch, target_width), self.pad_token_id, dtype=torch.long)
        for row, feature in enumerate(features):
            prompt, target = feature["prompt"], feature["target"]
            input_ids[row, prompt_width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, prompt_width - len(prompt) :] = 1
            target_ids[row, : len(target)] = torch.tensor(target)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_ids": target_ids,
            "target_lengths": torch.tensor([len(f["target"]) for f in features]),
            "sample_index": torch.tensor([int(f["sample_index"]) for f in features]),
        }


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
        probabilities: ProbabilitySource | None = None,
        policy: str = "full",
        leakage_weight: float = 0.0,
        off_policy_share: float = 0.0,
        rollout_temperature: float = 1.0,
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
        ):
            if not low <= value <= high or value != value or value == float("inf"):
                raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
        if not (rollout_temperature > 0 and rollout_temperature < float("inf")):
            raise ValueError(f"rollout_temperature must be a positive number, got {rollout_temperature!r}")
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
        self.probabilities = probabilities
        self.policy = policy
        self.leakage_weight = float(leakage_weight)
        self.off_policy_share = float(off_policy_share)
        self.rollout_temperature = float(rollout_temperature)
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
        source = self.probabilities if probabilities is None else probabilities
        return self.rewards.item_log_rewards(
            self.reward_variant, source(sample_index).to(device), device=device
        )

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
        if self.method == "flower":
            state = self._on(device)
            trie = state["trie"]
            item_rewards = self.item_log_rewards(inputs["sample_index"], device, probabilities)
            flows = state["flows"] if "flows" in state else trie.log_flows(item_rewards)
        if self.sampled:
            generator = None if seed is None else self._generator(model, seed)
            sample = self.trajectories(model, inputs, item_rewards, generator)
            continuations.append((sample.actions, sample.lengths))
        logits = continuation_logits(model, input_ids, attention_mask, continuations)
        sft = losses.sft_loss(logits[0], continuation_labels(*target))
        if self.method == "sft":
            return LossTerms(sft, sft)

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


# ---------------------------------------------------------------------------------------------
# the Trainer


class FlowerTrainer(Trainer):
    """:class:`transformers.Trainer` whose loss is a :class:`FlowerObjective`. The loss
    parts (``sft``, ``subtb`` / ``flow_matching``) are averaged over the micro-batches since
    the last log (and over processes) and logged beside ``loss``; an evaluation logs
    ``eval_loss`` and ``eval_<part>`` the same way.

    ``eval_probabilities``: the p_u source of the evaluation samples (their ``sample_index``
    indexes the evaluation dataset), needed with a personalised reward and an eval dataset."""

    def __init__(
        self,
        *args,
        objective: FlowerObjective,
        eval_probabilities: ProbabilitySource | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if objective.sampled and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            # The rollout generates with the unwrapped module, whose parameters FSDP and
            # DeepSpeed shard (ZeRO-3) or manage: it would fail or sample from a partial model.
            raise ValueError(
                "on-policy Flower (flow_loss='subtb') runs under one process, DDP (torchrun / "
                "accelerate launch) or LoRA, not under FSDP or DeepSpeed; use DDP, or "
                "flow_loss='flow_matching' / method='sft', which do not sample"
            )
        if objective.personalised and self.eval_dataset is not None and eval_probabilities is None:
            # The training source would silently give other samples' p_u.
            raise ValueError("evaluating a personalised reward needs eval_probabilities")
        self.objective = objective
        self.eval_probabilities = eval_probabilities
        # compute_loss returns a per-micro-batch mean: the Trainer divides it by the number
        # of gradient accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._parts: dict[str, list[Tensor]] = {}
        self._eval_parts: dict[str, list[Tensor]] = {}  # per batch: part x batch size
        self._eval_samples = 0

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs,
                             resume_from_checkpoint, trial):
        """The Trainer's, with two repairs for a resumed run. The best checkpoint (early stopping)
        is looked up in this run folder: the saved path names the folder the run was in, which
        may have moved. And a checkpoint that ends the run (its last step, or the step early
        stopping stopped at: a kill came during the final save) resumes to no training steps:
        the Trainer's loop would take one more step before it looks at the stop."""
        epochs_trained, steps_trained_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None:
            return epochs_trained, steps_trained_in_epoch
        if self.state.best_global_step:
            best = f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            folder = Path(self.args.output_dir) / best
            self.state.best_model_checkpoint = str(folder) if folder.is_dir() else None
        if self.state.global_step >= max_steps or self.control.should_training_stop:
            return num_train_epochs, 0  # past the last epoch: the loop runs no step
        return epochs_trained, steps_trained_in_epoch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seed = None
        if self.objective.sampled:
            seed = rollout_seed(self.args.seed, self.state.global_step, inputs["sample_index"])
        terms = self.objective(model, inputs, seed=seed)
        if model.training:
            for name, value in terms.scalars().items():
                self._parts.setdefault(name, []).append(value)
        return (terms.loss, terms.scalars()) if return_outputs else terms.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The objective's loss on an evaluation batch, nothing else (there are no logits to
        gather). Replaces the Trainer's, which looks for ``labels`` among the inputs and, finding
        none, would call the model on the collator's keys. The rollouts are seeded by the samples
        alone and the p_u come from ``eval_probabilities``."""
        inputs = self._prepare_inputs(inputs)
        seed = None
        if self.objective.sampled:
            seed = rollout_seed(self.args.seed, "valid", inputs["sample_index"])
        with torch.no_grad(), self.compute_loss_context_manager():
            terms = self.objective(model, inputs, seed=seed, probabilities=self.eval_probabilities)
        size = inputs["sample_index"].shape[0]
        self._eval_samples += size
        for name, value in terms.scalars().items():
            self._eval_parts.setdefault(name, []).append(value.float() * size)
        return terms.loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
        metric_key_prefix="eval",
    ):
        self._eval_parts, self._eval_samples = {}, 0
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        # Means over the samples of all processes, like the Trainer's eval_loss (which repeats
        # each batch's loss once per sample); every process takes part in the reductions.
        device = self.args.device
        samples = self.accelerator.reduce(torch.tensor(float(self._eval_samples), device=device),
                                          "sum")
        for name, values in sorted(self._eval_parts.items()):
            total = self.accelerator.reduce(torch.stack(values).sum().to(device), "sum")
            output.metrics[f"{metric_key_prefix}_{name}"] = round(float(total / samples), 6)
        self._eval_parts, self._eval_samples = {}, 0
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:
            for name, values in sorted(self._parts.items()):
                mean = torch.stack(values).float().mean()
                logs[name] = round(float(self.accelerator.reduce(mean, "mean")), 6)
            self._parts = {}
        super().log(logs, start_time)


class _SaveBestCallback(TrainerCallback):
    """Checkpoints every evaluation that improves eval_loss. ``load_best_model_at_end`` can
    only restore a best evaluation that has a checkpoint: with ``save_steps`` a multiple
    k > 1 of ``eval_steps`` the Trainer would otherwise restore the best of the checkpointed
    evaluations, not the best one. (It runs before the Trainer updates ``best_metric``.)"""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_loss")
        if value is not None and (state.best_metric is None or value < state.best_metric):
            control.should_save = True


class MetricsFileCallback(TrainerCallback):
    """Keeps every Trainer log as a line of a JSONL file (main process). Each log rewrites the
    whole file atomically (a temporary file moved over it) instead of appending to it, so a kill
    leaves the previous whole file, never a torn or half-written line; the cost, a copy of the
    file per log, is small beside a training step. On (re)start it keeps the lines up to the step
    the run starts from and drops the final summary, so a resumed run's file reads as an
    uninterrupted run's."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.lines = []
        if self.path.exists():
            for number, line in enumerate(read_text(self.path).splitlines(), start=1):
                with reading(f"{self.path}, line {number}"):
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                if record.get("step", 0) <= state.global_step and "train_runtime" not in record:
                    self.lines.append(line)
        self._write()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.lines.append(json.dumps({"step": state.global_step, **logs}))
        self._write()

    def _write(self) -> None:
        with atomic_open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in self.lines)


# ---------------------------------------------------------------------------------------------
# model, probabilities, run folder


def _load_model(config: TrainConfig, dataset: Dataset, run_dir: Path, saved_tokenizer: bool):
    """The model and tokenizer to train. The tiny default's tokenizer is trained on the dataset
    unless ``saved_tokenizer`` says to read the one in the run folder (a resumption, or a DDP
    process other than the main one, which trained and saved it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import corpus, tiny_llama, train_tokenizer

    if config.model is None:
        if saved_tokenizer:
            with reading(f"the tokenizer saved in {run_dir}"):
                tokenizer = AutoTokenizer.from_pretrained(run_dir)
        else:
            tokenizer = train_tokenizer(corpus(dataset, config.domain), config.tiny_vocab_size)
        model = tiny_llama(
            tokenizer,
            hidden_size=config.tiny_hidden_size,
            num_layers=config.tiny_layers,
            num_heads=config.tiny_heads,
            seed=config.seed,
        )
    else:
        with reading(f"model {config.model}"):
            tokenizer = AutoTokenizer.from_pretrained(config.model)
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    if tokenizer.eos_token_id is None:
        raise TrainConfigError(f"the tokenizer of {config.model!r} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked: any token will do
    tokenizer.padding_side = "left"
    if config.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TrainConfigError("lora=True needs the peft package (pip install peft)") from None
        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


def _popularity_rewards(config: TrainConfig, dataset: Dataset) -> PopularityRewards:
    """The rewards' popularity: the training-history counts, or ``reward_counts``."""
    if config.reward_counts is None:
        return PopularityRewards.from_dataset(dataset, config.floor_count)
    counts = read_json(config.reward_counts)
    with reading(config.reward_counts):
        if not isinstance(counts, dict):
            raise ValueError("not a JSON object {title: count}")
        return PopularityRewards.from_counts(dataset.titles, counts, config.floor_count)


def _probability_source(
    aux, num_samples: int, num_items: int, name: str = "aux_probabilities", split: str = "train"
) -> ProbabilitySource | None:
    """``aux_probabilities`` (or the field ``name``, the p_u of ``split``) as a function of
    sample indices (tables are checked here)."""
    if aux is None:
        return None
    if callable(aux) and not isinstance(aux, Tensor):
        return aux
    if isinstance(aux, (str, os.PathLike)):
        path = Path(aux)
        if not path.is_file():
            raise TrainConfigError(f"{name} file {str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            with reading(path):
                tensors = load_file(path)
            if len(tensors) != 1:
                raise TrainConfigError(
                    f"{path} holds {len(tensors)} tensors; expected one [samples, items] tensor"
                )
            (aux,) = tensors.values()
        else:
            with reading(path):
                aux = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(aux, Tensor):
        raise TrainConfigError(
            f"{name} must be a tensor, a file or a callable, got {type(aux).__name__}"
        )
    if tuple(aux.shape) != (num_samples, num_items):
        raise TrainConfigError(
            f"{name} has shape {tuple(aux.shape)}; expected [{num_samples}, "
            f"{num_items}] ({split} samples x items)"
        )
    table = aux.detach().float().cpu()

    def lookup(sample_index: Tensor) -> Tensor:
        return table[sample_index.cpu()]

    return lookup


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's Trainer checkpoint folders, newest first."""
    steps = {}
    for folder in (run_dir / CHECKPOINT_DIR).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-([0-9]+)", folder.name)
        if match and folder.is_dir():
            steps[folder] = int(match[1])
    return sorted(steps, key=steps.get, reverse=True)


def _state_files(folder: Path, lora: bool, world_size: int) -> list[str]:
    """The files a checkpoint needs for the Trainer to resume from it exactly, in the order the
    Trainer writes them: the model (a LoRA run's adapter), the optimizer, the schedule, every
    process's RNG state and last the trainer state. Without one of them the Trainer would resume
    anyway, from other states (a missing ``scheduler.pt`` skips the optimizer's too)."""
    if lora:
        model = ["adapter_model.safetensors", "adapter_config.json"]
    elif (folder / SAFE_WEIGHTS_INDEX_NAME).exists():  # a large model, saved in shards
        index = read_json(folder / SAFE_WEIGHTS_INDEX_NAME)
        with reading(folder / SAFE_WEIGHTS_INDEX_NAME):
            shards = sorted(set(index["weight_map"].values()))
        model = ["config.json", *shards, SAFE_WEIGHTS_INDEX_NAME]
    else:
        model = ["config.json", "model.safetensors"]
    rng = [f"rng_state_{i}.pth" for i in range(world_size)] if world_size > 1 else ["rng_state.pth"]
    return [*model, "optimizer.pt", "scheduler.pt", *rng, "trainer_state.json"]


def _checkpoint_problem(folder: Path, lora: bool, world_size: int) -> str | None:
    """Why the Trainer cannot resume from checkpoint ``folder`` (a state file missing or cut
    short: a kill while the checkpoint was being written, or while an old one was being deleted),
    or None when it is complete."""
    try:
        for name in _state_files(folder, lora, world_size):
            check_whole(folder / name)
    except ValueError as error:
        return str(error)
    return None


def _prepare_run_dir(
    config: TrainConfig, run_dir: Path, world_size: int, check: bool
) -> Path | None:
    """The checkpoint to resume from: with ``resume``, the run folder's newest complete one
    (None if it has none). Newer incomplete ones are passed over, and left for the resumed run to
    overwrite when it reaches their step. With ``check`` (the main process) it also checks that
    the folder agrees with ``resume`` and the saved configuration, and says on stderr which
    checkpoints it passes over."""
    checkpoints = _checkpoints(run_dir)
    saved = run_dir / CONFIG_FILE
    if check and not config.resume and (saved.exists() or checkpoints):
        raise TrainConfigError(
            f"{run_dir} already holds a run: pass resume=True to continue it, or choose "
            "another output folder"
        )
    if check and config.resume and saved.exists():
        previous = read_json(saved)
        if not isinstance(previous, dict):
            raise TrainConfigError(f"{saved}: not a training configuration (a JSON object)")
        current = config.to_dict()
        changed = sorted(
            k for k in current
            if k not in _RESUMABLE_FIELDS and previous.get(k) != current[k]
        )
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed)
            raise TrainConfigError(f"cannot resume {run_dir} with a different configuration ({details})")
    if not config.resume:
        return None
    for folder in checkpoints:
        problem = _checkpoint_problem(folder, config.lora, world_size)
        if problem is None:
            return folder
        if check:
            warnings.warn(f"resume: passing over the incomplete {folder.name}: {problem}",
                          stacklevel=3)
    if check:
        warnings.warn(f"resume: {run_dir} has no checkpoint to resume from; training starts from "
                      "the beginning", stacklevel=3)
    return None


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: mps, xpu, ...
    return bool(accelerator is not None and accelerator.is_available())


def _training_arguments(config: TrainConfig, run_dir: Path):
    from transformers import TrainingArguments

    accelerated = _has_accelerator()
    early_stopping = config.early_stopping_patience is not None

    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear",
        bf16=config.bf16,
        logging_steps=config.logging_steps,
        logging_strategy="steps",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="no" if config.eval_steps is None else "steps",
        eval_steps=config.eval_steps,
        per_device_eval_batch_size=config.batch_size,
        prediction_loss_only=True,
        # Early stopping keeps the checkpoint of the lowest eval_loss as the final model, and
        # a resumed run continues its patience count (EarlyStoppingCallback's saved state).
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        restore_callback_states_from_checkpoint=early_stopping,
        seed=config.seed,
        report_to="none",
        disable_tqdm=not config.progress,
        remove_unused_columns=False,  # the collator's tensors are not model arguments
        dataloader_num_workers=0,
        dataloader_pin_memory=accelerated,
        use_cpu=not accelerated,  # bf16 autocast on a CPU-only machine needs it said
        ddp_find_unused_parameters=False,
        log_level="warning",
    )


def train(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> Path:
    """Trains a recommender as ``config`` says and returns the run folder (see the module
    docstring). ``callbacks``: extra :class:`transformers.TrainerCallback` objects."""
    config.validate()
    run_dir = Path(config.out)
    dataset = load_dataset(config.data)
    rewards = probabilities = valid_probabilities = None
    if config.method == "flower":
        rewards = _popularity_rewards(config, dataset)
        if config.needs_probabilities:
            probabilities = _probability_source(
                config.aux_probabilities, len(dataset.train), dataset.num_items
            )
            if config.eval_steps is not None:
                valid_probabilities = _probability_source(
                    config.valid_aux_probabilities, len(dataset.valid), dataset.num_items,
                    "valid_aux_probabilities", "valid",
                )
        logger.info("%d titles without a training-history count get the floor count %s",
                    rewards.num_floored, config.floor_count)

    args = _training_arguments(config, run_dir)  # sets up the process group under torchrun
    main = args.process_index == 0
    checkpoint = _prepare_run_dir(config, run_dir, args.world_size, check=main)
    # The main process prepares the run folder first (the configuration; the tiny model's
    # tokenizer, which the other processes then read, so that every process has the same one).
    with args.main_process_first(local=False, desc="preparing the run folder"):
        model, tokenizer = _load_model(
            config, dataset, run_dir, saved_tokenizer=checkpoint is not None or not main
        )
        if main:
            with atomic_open(run_dir / CONFIG_FILE, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(config.to_dict(), indent=2) + "\n")
            if config.model is None:
                with atomic_files(run_dir) as staging:
                    tokenizer.save_pretrained(staging)
    catalog = Catalog.from_titles(dataset.titles, tokenizer, build_prompt([], config.domain))
    try:
        encoded = encode_samples(
            dataset, "train", tokenizer, catalog, config.domain, config.max_prompt_tokens
        )
        valid = None
        if config.eval_steps is not None:
            valid = _SampleSet(encode_samples(
                dataset, "valid", tokenizer, catalog, config.domain, config.max_prompt_tokens,
                config.valid_limit,
            ))
    except PromptCutoffError as error:
        raise TrainConfigError(f"max_prompt_tokens: {error}") from None
    objective = FlowerObjective(
        catalog,
        method=config.method,
        eos_token_id=tokenizer.eos_token_id,
        theta=config.theta,
        flow_loss=config.flow_loss,
        rewards=rewards,
        reward_variant=config.reward,
        probabilities=probabilities,
        policy=config.policy,
        leakage_weight=config.leakage_weight,
        off_policy_share=config.off_policy_share,
        rollout_temperature=config.rollout_temperature,
    )

    all_callbacks = [MetricsFileCallback(run_dir / METRICS_FILE), *callbacks]
    if config.early_stopping_patience is not None:
        all_callbacks += [EarlyStoppingCallback(config.early_stopping_patience), _SaveBestCallback()]
    if config.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback
        except ImportError:
            raise TrainConfigError("tensorboard=True needs the tensorboard package") from None
        all_callbacks.append(TensorBoardCallback(SummaryWriter(str(run_dir / "tensorboard"))))
    trainer = FlowerTrainer(
        model=model,
        args=args,
        train_dataset=_SampleSet(encoded),
        eval_dataset=valid,
        data_collator=RecommendationCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=all_callbacks,
        objective=objective,
        eval_probabilities=valid_probabilities,
    )
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))

    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        final = trainer.accelerator.unwrap_model(trainer.model)
        if config.lora:
            final = final.merge_and_unload()  # a plain model that `evaluate` loads without peft
        with atomic_files(run_dir) as staging:
            final.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()
    return run_dir
