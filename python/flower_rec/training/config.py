"""The training configuration: :class:`TrainConfig`, the rule of every field, and the names
the run folder uses."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config_checks import (
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
from ..prompts import DOMAINS
from ..rewards import DEFAULT_FLOOR_COUNT, REWARD_VARIANTS

METHODS = ("sft", "flower")
FLOW_LOSSES = ("subtb", "flow_matching")
POLICIES = ("full", "masked")
ROLLOUTS = ("ours", "published")
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Fields that may differ between a run and its resumption (the run folder may have moved).
RESUMABLE_FIELDS = ("out", "resume", "progress", "tensorboard")

PUBLISHED_ROLLOUT_NEEDS = (
    "flow_loss 'subtb', policy 'full', leakage_weight 0, off_policy_share 0, "
    "rollout_temperature 1 and reward 'logp' or 'logp_div_s'"
)


def published_rollout_fits(
    flow_loss: str, policy: str, leakage_weight: float, off_policy_share: float,
    rollout_temperature: float, reward: str,
) -> bool:
    """Whether the options leave the released SubTB step as it is (``rollout: published``
    reproduces that step alone: :data:`PUBLISHED_ROLLOUT_NEEDS`)."""
    return (flow_loss == "subtb" and policy == "full" and not leakage_weight
            and not off_policy_share and rollout_temperature == 1 and reward != "logp_add_logs")


def epoch_protocol(num_samples: int, batch_size: int, patience: int, valid_limit: int) -> dict:
    """The paper's training protocol as :class:`TrainConfig` options, for ``num_samples``
    training samples in batches of ``batch_size``: the validation loss (on the first
    ``valid_limit`` valid samples) and a checkpoint every epoch, early stopping after
    ``patience`` epochs without a lower validation loss, the best epoch kept as the model."""
    epoch = math.ceil(num_samples / batch_size)
    return {"eval_steps": epoch, "save_steps": epoch, "save_total_limit": 1,
            "early_stopping_patience": patience, "valid_limit": valid_limit}


ProbabilitySource = Callable[[Tensor], Tensor]
"""Per-sample item probabilities: sample indices ``[B]`` (into the training split, or the
validation split for the validation source) -> ``p_u [B, I]``."""



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

def _is_json(value: Any) -> bool:
    """Whether ``value`` is saved in train_config.json as it is (resumption compares it)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError, RecursionError):
        return False


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
    "rollout": one_of(ROLLOUTS),
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
    "trainer_options": Rule(
        "be a mapping of transformers.TrainingArguments option names to JSON values, or None",
        lambda value: value is None or (
            isinstance(value, dict) and all(isinstance(name, str) for name in value)
            and _is_json(value)
        ),
    ),
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
        rollout: ``ours`` (the method) or ``published``: the released code's SubTB step,
            reproduced for parity (:mod:`flower_rec.training.published`: context-free
            forwards after the prompt, right padding without a mask, "\\n" as the termination
            token, the personalised division along the sampled path). Needs the subtb flow
            loss, the full policy, no penalty or off-policy share and the reward ``logp`` or
            ``logp_div_s``. Not a recommended setting.
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
        epochs: training epochs.
        max_steps: stop after this many optimizer steps; > 0 overrides ``epochs`` (-1: train
            for ``epochs``).
        batch_size: samples per device per forward.
        gradient_accumulation_steps: forwards per optimizer step.
        save_steps: a checkpoint every this many optimizer steps.
        save_total_limit: keep the newest this many checkpoints (None keeps all).
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
        trainer_options: further transformers.TrainingArguments options by name, for what the
            options above leave open: e.g. ``{"activation_checkpointing": true, "optim":
            "adamw_torch_fused", "lr_scheduler_type": "cosine", "report_to": "wandb"}`` (a JSON
            object on the command line; ``gradient_checkpointing`` before transformers 5). One that the options above set
            (``per_device_train_batch_size`` is ``batch_size``, ...) is refused, as is an
            unknown one.
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
    rollout: str = "ours"
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
    trainer_options: dict[str, Any] | None = None

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
        if self.rollout == "published" and not published_rollout_fits(
            self.flow_loss, self.policy, self.leakage_weight, self.off_policy_share,
            self.rollout_temperature, self.reward,
        ):
            fail(f"rollout 'published' is the released SubTB step alone: it needs "
                 f"{PUBLISHED_ROLLOUT_NEEDS}")
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
