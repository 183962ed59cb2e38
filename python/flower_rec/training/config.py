"""The training configuration, after TRL's layout: :class:`FlowerConfig` is
:class:`transformers.TrainingArguments` with the method's own options and our defaults,
:class:`ModelArguments` the model to fine-tune, :class:`DataArguments` the data; the rule of
every option, checked when a configuration is made; the names the run folder uses."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainingArguments

from ..config_checks import (
    BOOLEAN,
    COUNT,
    PATH,
    SEED,
    Rule,
    field_default,
    first_problem,
    integer,
    number,
    one_of,
    optional,
    shown,
)
from ..prompts import DOMAINS
from ..rewards import DEFAULT_FLOOR_COUNT, DEFAULT_POPULARITY_EXPONENT, REWARD_VARIANTS

METHODS = ("sft", "flower")
FLOW_LOSSES = ("subtb", "flow_matching")
POLICIES = ("full", "masked")
ROLLOUTS = ("ours", "published")
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LEGACY_CHECKPOINT_DIR = "checkpoints"
"""Where runs made before :class:`FlowerConfig` kept their checkpoints (the Trainer's output
folder was then ``RUN/checkpoints``; it is the run folder now): a resumption finds them there."""


def checkpoint_parents(run_dir: Path) -> tuple[Path, Path]:
    """The folders that hold a run's checkpoints: the run folder, then the one of runs made
    before :class:`FlowerConfig` (:data:`LEGACY_CHECKPOINT_DIR`)."""
    return run_dir, run_dir / LEGACY_CHECKPOINT_DIR


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
            and not off_policy_share and rollout_temperature == 1
            and reward in ("logp", "logp_div_s"))


def epoch_protocol(num_samples: int, batch_size: int, patience: int, valid_limit: int) -> dict:
    """The paper's training protocol as :class:`FlowerConfig` options, for ``num_samples``
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
    """A training configuration that cannot run (the message says which option and why)."""


_POSITIVE = number(0, above=True, must="be a positive number")
_NON_NEGATIVE = number(0, must="be a non-negative number")
_OPTIONAL_COUNT = optional(COUNT)

FIELD_RULES: dict[str, Rule] = {
    # ModelArguments
    "model": optional(PATH),
    "tiny_hidden_size": COUNT,
    "tiny_layers": COUNT,
    "tiny_heads": COUNT,
    "tiny_vocab_size": COUNT,
    "lora": BOOLEAN,
    "lora_r": COUNT,
    "lora_alpha": _POSITIVE,
    "lora_dropout": number(0, 1, below=True, must="lie in [0, 1)"),
    "lora_target_modules": Rule(
        "be a non-empty list of module names",
        lambda value: isinstance(value, list) and len(value) > 0
        and all(isinstance(name, str) for name in value),
    ),
    # DataArguments
    "data": PATH,
    "aux": optional(PATH),
    # FlowerConfig: the method's own options
    "method": one_of(METHODS),
    "theta": number(0, 1, must="lie in [0, 1]"),
    "reward": one_of(REWARD_VARIANTS),
    "popularity_exponent": _NON_NEGATIVE,
    "flow_loss": one_of(FLOW_LOSSES),
    "policy": one_of(POLICIES),
    "leakage_weight": _NON_NEGATIVE,
    "off_policy_share": number(0, 1, must="lie in [0, 1]"),
    "rollout_temperature": _POSITIVE,
    "rollout": one_of(ROLLOUTS),
    "reward_counts": optional(PATH),
    "floor_count": _POSITIVE,
    "domain": one_of(sorted(DOMAINS)),
    "max_prompt_tokens": _OPTIONAL_COUNT,
    "valid_limit": _OPTIONAL_COUNT,
    "early_stopping_patience": _OPTIONAL_COUNT,
    "resume": BOOLEAN,
    # FlowerConfig: TrainingArguments' options whose values TrainingArguments takes unchecked
    # (an infinite learning rate, a batch of 8.0, a YAML "false")
    "output_dir": PATH,
    "learning_rate": _POSITIVE,
    "warmup_steps": integer(0),
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": number(0, must="be a non-negative number (0: no clipping)"),
    "num_train_epochs": _NON_NEGATIVE,
    "max_steps": Rule(
        "be a positive integer, or -1 to train for `num_train_epochs`",
        lambda value: COUNT.accepts(value) or (type(value) is int and value == -1),
    ),
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "save_steps": COUNT,
    "save_total_limit": _OPTIONAL_COUNT,
    "logging_steps": COUNT,
    "eval_steps": _OPTIONAL_COUNT,
    "seed": SEED,
    "bf16": BOOLEAN,
    # the Trainer would drop the collator's tensors, which are no model arguments
    "remove_unused_columns": Rule("be false (the batches hold no model arguments alone)",
                                  lambda value: value is False),
}
"""The type and range of the options (by name, across the three classes), checked when a
configuration is made."""

SHAPING_OPTIONS = (
    # the validation loss is a per-sample mean whatever the evaluation batch
    *(name for name in FIELD_RULES
      if name not in ("output_dir", "resume", "per_device_eval_batch_size")),
    "lr_scheduler_type", "optim", "aux_probabilities", "valid_aux_probabilities",
)
"""The options a run cannot change when it resumes: those that shape the trained model."""


def _check(config: Any, names: list[str]) -> None:
    """Raises :class:`TrainConfigError` naming the first of ``names`` whose value in ``config``
    breaks its rule."""
    problem = first_problem({name: getattr(config, name) for name in names},
                            {name: FIELD_RULES[name] for name in names})
    if problem:
        raise TrainConfigError(problem)


def _option(default: Any, description: str, **metadata: Any) -> Any:
    """A dataclass field with its command-line help (and ``choices`` / ``aliases``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": description, **metadata})
    return field(default=default, metadata={"help": description, **metadata})


def _choices(name: str) -> dict[str, Any]:
    return {"choices": list(FIELD_RULES[name].choices)}


@dataclass
class ModelArguments:
    """The model to fine-tune (``train_config.json``'s ``model`` section)."""

    _argument_group_name = "the model"  # HfArgumentParser's --help heading

    model: str | None = _option(
        None, "a Hugging Face causal LM, local path or hub id; none builds the embedded tiny "
        "Llama-style model with a BPE tokenizer trained on the dataset's text")
    tiny_hidden_size: int = _option(128, "hidden size of the tiny model")
    tiny_layers: int = _option(2, "layers of the tiny model")
    tiny_heads: int = _option(4, "attention heads of the tiny model")
    tiny_vocab_size: int = _option(2000, "BPE vocabulary of the tiny model's tokenizer")
    lora: bool = _option(False, "train LoRA adapters (peft) instead of every weight; the saved "
                         "model is merged")
    lora_r: int = _option(8, "LoRA rank")
    lora_alpha: float = _option(16, "LoRA alpha")
    lora_dropout: float = _option(0.05, "LoRA dropout")
    lora_target_modules: list[str] = _option(
        ["all-linear"], "the modules LoRA adapts (peft's target_modules; all-linear: every "
        "linear layer but the output head)")

    def __post_init__(self):
        _check(self, [f.name for f in dataclasses.fields(self)])
        if self.tiny_hidden_size % self.tiny_heads:
            raise TrainConfigError(f"tiny_hidden_size {self.tiny_hidden_size} is not a multiple "
                                   f"of tiny_heads {self.tiny_heads}")


@dataclass
class DataArguments:
    """The data (``train_config.json``'s ``data`` section). The p_u tables of a personalised
    reward come from ``aux``, or as objects: :func:`flower_rec.training.train`'s
    ``aux_probabilities``."""

    _argument_group_name = "the data"

    data: str = _option(dataclasses.MISSING, "dataset folder (flower-rec prepare)")
    aux: str | None = _option(
        None, "a train-aux output folder: SASRec gives the p_u of the personalised rewards")

    def __post_init__(self):
        self.data = _path_text(self.data)
        _check(self, ["data", "aux"])


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator."""
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: mps, xpu, ...
    return bool(accelerator is not None and accelerator.is_available())


@dataclass
class FlowerConfig(TrainingArguments):
    """:class:`transformers.TrainingArguments` of an SFT or Flower run: the method's own options
    (below), our defaults for some of the Trainer's (a 3e-4 learning rate, batches of 16, one
    epoch, seed 0, ...), and every other Trainer option as it is (``optim``,
    ``lr_scheduler_type``, ``report_to``, ``gradient_checkpointing``, ...). ``output_dir`` is
    the run folder: the final model, ``train_config.json``, ``metrics.jsonl`` and the Trainer's
    checkpoints. Some options follow from others: ``eval_steps`` turns on step evaluation,
    ``early_stopping_patience`` keeps the best model by ``eval_loss``, and a machine without an
    accelerator trains on its CPU."""

    output_dir: str = _option(dataclasses.MISSING, "the run folder", aliases=["--out"])
    method: str = _option("sft", "sft (BIGRec) or flower", **_choices("method"))
    theta: float = _option(0.9995, "weight of SFT in theta x SFT + (1 - theta) x flow (flower)")
    reward: str = _option(
        "logp_div_s", "logp; logp_div_s (the paper's) or logp_add_logs, personalised by p_u "
        "(--aux); p_div_pop (ours): p_u divided by popularity to the popularity_exponent",
        **_choices("reward"))
    popularity_exponent: float = _option(
        DEFAULT_POPULARITY_EXPONENT, "beta of the p_div_pop reward, p_u / (R / Z) ** beta")
    flow_loss: str = _option(
        "subtb", "subtb: on-policy sub-trajectory balance (the paper's); flow_matching: "
        "teacher-forced on the target path, no sampling", **_choices("flow_loss"))
    policy: str = _option(
        "full", "full: the full-vocabulary softmax (the paper's); masked: renormalised over the "
        "trie children (no free termination term, no leak)", **_choices("policy"))
    leakage_weight: float = _option(
        0.0, "lambda of the conservative penalty: lambda x (-log of the policy's mass on the "
        "trie children) at each state of the flow loss")
    off_policy_share: float = _option(
        0.0, "share of the SubTB trajectories drawn exactly from each user's R_u / Z_u instead "
        "of the model")
    rollout_temperature: float = _option(1.0, "temperature of the on-policy rollouts")
    rollout: str = _option(
        "ours", "ours, or published: the released code's SubTB step reproduced for parity "
        "(context-free forwards after the prompt, right padding without a mask, a split "
        "termination token); needs subtb, policy full, no penalty or off-policy share, "
        "temperature 1 and the reward logp or logp_div_s. Not a recommended setting",
        **_choices("rollout"))
    reward_counts: str | None = _option(
        None, "JSON file {title: count} to use as the rewards' popularity instead of the "
        "training-history counts (e.g. a target distribution)")
    floor_count: float = _option(
        DEFAULT_FLOOR_COUNT, "popularity count of titles never seen in a training history")
    domain: str = _option("items", "wording of the prompt; evaluate with the same",
                          **_choices("domain"))
    max_prompt_tokens: int | None = _option(
        None, "prompt cutoff (the paper's 512): longer prompts drop their oldest history titles "
        "until they fit; none keeps every prompt whole")
    valid_limit: int | None = _option(
        None, "validate on the first this many validation samples (a validation pass costs a "
        "rollout per sample)")
    early_stopping_patience: int | None = _option(
        None, "stop when eval_loss has not improved for this many evaluations and keep the best "
        "checkpoint as the model; needs eval_steps (save_steps a multiple of it) or "
        "eval_strategy epoch (with save_strategy epoch)")
    resume: bool = _option(False, "continue the run in output_dir from its newest complete "
                           "checkpoint")
    # TrainingArguments' options with our defaults (and the flags they had before this class)
    per_device_train_batch_size: int = _option(16, "samples per device per forward",
                                               aliases=["--batch-size"])
    per_device_eval_batch_size: int = _option(16, "validation samples per device per forward")
    num_train_epochs: float = _option(1.0, "training epochs", aliases=["--epochs"])
    learning_rate: float = _option(3e-4, "AdamW's learning rate", aliases=["--lr"])
    warmup_steps: int = _option(20, "optimizer steps of linear warm-up")
    logging_steps: int = _option(10, "a metrics line every this many optimizer steps")
    save_steps: int = _option(500, "a checkpoint every this many optimizer steps")
    save_total_limit: int | None = _option(2, "keep the newest this many checkpoints")
    eval_steps: int | None = _option(
        None, "the validation loss every this many optimizer steps (and at the last one)")
    seed: int = _option(0, "model initialisation, data order and rollouts")
    prediction_loss_only: bool = _option(True, "evaluation computes the loss only")
    remove_unused_columns: bool = _option(
        False, "keep the collator's tensors, which are no model arguments")
    ddp_find_unused_parameters: bool | None = _option(False, "DDP's find_unused_parameters")
    log_level: str = _option("warning", "the Trainer's log level")

    def __post_init__(self):
        self.output_dir = _path_text(self.output_dir)
        _check(self, [name for name in FIELD_RULES if hasattr(self, name)])
        self._check_combinations()
        if self.eval_steps is not None:
            self.eval_strategy = "steps"
        if self.early_stopping_patience is not None:
            # The best model is restored from a checkpoint, and a resumed run continues its
            # patience count (EarlyStoppingCallback's saved state).
            self.load_best_model_at_end = True
            self.metric_for_best_model = "eval_loss"
            self.greater_is_better = False
            self.restore_callback_states_from_checkpoint = True
        if not has_accelerator():
            self.use_cpu = True  # bf16 autocast on a CPU-only machine needs it said
            self.dataloader_pin_memory = False
        super().__post_init__()

    def _check_combinations(self) -> None:
        def fail(message: str) -> None:
            raise TrainConfigError(message)

        if not self.evaluates:
            for name in ("valid_limit", "early_stopping_patience"):
                if getattr(self, name) is not None:
                    fail(f"{name} needs eval_steps, or eval_strategy 'epoch' (the validation "
                         "loss is computed every eval_steps optimizer steps, or every epoch)")
        elif self.eval_steps is not None and self.early_stopping_patience is not None \
                and self.save_steps % self.eval_steps:
            # The best model is restored from a checkpoint; transformers requires checkpoints
            # on evaluation steps for that.
            fail(f"save_steps ({self.save_steps}) must be a multiple of eval_steps "
                 f"({self.eval_steps}) with early stopping, which restores the best checkpoint")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            fail(f"num_train_epochs must be positive (or max_steps > 0), got "
                 f"{self.num_train_epochs!r}")
        if self.rollout == "published" and not published_rollout_fits(
            self.flow_loss, self.policy, self.leakage_weight, self.off_policy_share,
            self.rollout_temperature, self.reward,
        ):
            fail(f"rollout 'published' is the released SubTB step alone: it needs "
                 f"{PUBLISHED_ROLLOUT_NEEDS}")

    @property
    def evaluates(self) -> bool:
        """Whether the run computes the validation loss (``eval_steps``, or an
        ``eval_strategy`` such as ``epoch``)."""
        return self.eval_steps is not None or self.eval_strategy != "no"

    @property
    def needs_probabilities(self) -> bool:
        """Whether the reward is personalised (needs p_u)."""
        return self.method == "flower" and self.reward != "logp"


CONFIG_CLASSES = (ModelArguments, DataArguments, FlowerConfig)
"""The sections of a training configuration, in the order ``flower-rec train`` parses them."""

METHOD_OPTIONS = tuple(f.name for f in dataclasses.fields(FlowerConfig)
                       if f.name not in TrainingArguments.__dataclass_fields__)
"""The options :class:`FlowerConfig` adds to :class:`transformers.TrainingArguments`."""

OPTION_DEFAULTS: dict[str, Any] = {
    name: default
    for name, default in ((f.name, field_default(f)) for cls in CONFIG_CLASSES
                          for f in dataclasses.fields(cls) if f.init)
    if default is not dataclasses.MISSING
}
"""Every option's default, by name (``data`` and ``output_dir`` have none)."""


def configs_from_options(
    options: Mapping[str, Any],
) -> tuple[ModelArguments, DataArguments, FlowerConfig]:
    """The three sections of one mapping of options by name (a YAML file merged with flags);
    an unknown or missing name is an error that names it, and so is a bad value."""
    names = [[f.name for f in dataclasses.fields(cls) if f.init] for cls in CONFIG_CLASSES]
    unknown = sorted(set(options) - {name for group in names for name in group}, key=str)
    if unknown:
        now = {**LEGACY_NAMES, **_RETIRED_NAMES}
        hints = [shown(name) + (f" (now {now[name]})" if name in now else "") for name in unknown]
        raise TrainConfigError(f"unknown training option(s): {', '.join(hints)}")
    missing = [flag for name, flag in (("data", "data (--data)"), ("output_dir", "output_dir "
               "(--out)")) if name not in options]
    if missing:
        raise TrainConfigError(f"missing training option(s): {', '.join(missing)}")
    model, data, args = (cls(**{name: options[name] for name in group if name in options})
                         for cls, group in zip(CONFIG_CLASSES, names))
    return model, data, args


LEGACY_NAMES = {"out": "output_dir", "epochs": "num_train_epochs",
                "batch_size": "per_device_train_batch_size"}
"""Option names of the flat configuration before :class:`FlowerConfig` (their new names)."""
_RETIRED_NAMES = {"progress": "disable_tqdm, its negation", "tensorboard": "report_to tensorboard",
                  "trainer_options": "the options themselves"}


def saved_options(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a saved ``train_config.json`` by name: its three sections, or a flat file
    of the configuration before them (renamed, its ``trainer_options`` spread)."""
    if all(isinstance(saved.get(section), dict) for section in ("model", "data", "training")):
        return {**saved["model"], **saved["data"], **saved["training"]}
    options = {LEGACY_NAMES.get(name, name): value for name, value in saved.items()
               if name != "trainer_options"}
    if isinstance(options.get("lora_target_modules"), str):
        options["lora_target_modules"] = [options["lora_target_modules"]]
    if isinstance(saved.get("trainer_options"), dict):
        options.update(saved["trainer_options"])
    return options


def _path_text(value: Any) -> Any:
    """A path object as text (as train_config.json and the Trainer keep paths); anything else
    unchanged, for the checks to judge."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def described(value: Any) -> Any:
    """A p_u source as train_config.json keeps it: a path as text, a tensor or callable
    described (not stored)."""
    if isinstance(value, Tensor):
        return f"<tensor {list(value.shape)}>"
    if callable(value):
        return f"<callable {getattr(value, '__name__', type(value).__name__)}>"
    return _path_text(value)
