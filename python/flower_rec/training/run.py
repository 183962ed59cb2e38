"""A training run: the model, the p_u sources, the run folder and its checkpoints, and
:func:`train`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import EarlyStoppingCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from ..data import Dataset, load_dataset
from ..decoding import Catalog
from ..files import atomic_files, atomic_open, check_whole, read_json, reading
from ..prompts import PromptCutoffError, build_prompt, item_token_sequences
from ..rewards import PopularityRewards
from .config import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RESUMABLE_FIELDS,
    ProbabilitySource,
    TrainConfig,
    TrainConfigError,
)
from .objective import FlowerObjective
from .published import PublishedFlow
from .samples import RecommendationCollator, SampleSet, encode_samples
from .trainer import FlowerTrainer, MetricsFileCallback, SaveBestCallback

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# model, probabilities, run folder


def is_trained(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds its final model (what :func:`train` saves last)."""
    run = Path(run_dir)
    return (run / "config.json").is_file() and any(run.glob("model*.safetensors"))


def _load_model(config: TrainConfig, dataset: Dataset, run_dir: Path, saved_tokenizer: bool):
    """The model and tokenizer to train. The tiny default's tokenizer is trained on the dataset
    unless ``saved_tokenizer`` says to read the one in the run folder (a resumption, or a DDP
    process other than the main one, which trained and saved it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import corpus, tiny_llama, train_tokenizer

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


def _published_flow(
    config: TrainConfig, dataset: Dataset, tokenizer, rewards: PopularityRewards | None
) -> PublishedFlow | None:
    """The released SubTB step's items and rewards (``rollout: published``), else None."""
    if config.rollout != "published" or config.method != "flower":
        return None
    try:
        items = item_token_sequences(dataset.titles, tokenizer, build_prompt([], config.domain),
                                     termination="split")
    except ValueError as error:
        raise TrainConfigError(f"rollout 'published': {error}") from None
    return PublishedFlow(items, tokenizer.eos_token_id, rewards.item_log_rewards("logp"))


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


def _option_defaults() -> dict[str, Any]:
    return {
        field.name: field.default
        for field in dataclasses.fields(TrainConfig)
        if field.default is not dataclasses.MISSING
    }


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
        # A run saved before an option existed ran with that option's default.
        previous = {**_option_defaults(), **previous}
        current = config.to_dict()
        changed = sorted(
            k for k in current
            if k not in RESUMABLE_FIELDS and previous.get(k) != current[k]
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
    """The Trainer's arguments: those the configuration's fields set, which ``trainer_options``
    may not change, over our defaults for the rest, which it may (with any other
    :class:`transformers.TrainingArguments` option)."""
    from transformers import TrainingArguments

    accelerated = _has_accelerator()
    early_stopping = config.early_stopping_patience is not None
    from_fields = dict(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
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
        disable_tqdm=not config.progress,
        remove_unused_columns=False,  # the collator's tensors are not model arguments
    )
    defaults = dict(
        lr_scheduler_type="linear",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=accelerated,
        use_cpu=not accelerated,  # bf16 autocast on a CPU-only machine needs it said
        ddp_find_unused_parameters=False,
        log_level="warning",
    )
    extra = config.trainer_options or {}
    fixed = sorted(set(extra) & set(from_fields))
    if fixed:
        raise TrainConfigError(
            f"trainer_options: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set by "
            "the training configuration's own options (batch_size, epochs, learning_rate, ...)"
        )
    known = {field.name for field in dataclasses.fields(TrainingArguments) if field.init}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise TrainConfigError(
            f"trainer_options: unknown transformers.TrainingArguments option(s): "
            f"{', '.join(map(repr, unknown))}"
        )
    try:
        return TrainingArguments(**{**defaults, **extra, **from_fields})
    except (ValueError, TypeError) as error:
        if not extra:
            raise
        raise TrainConfigError(f"trainer_options: {error}") from None


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
    encoded, valid = _encoded_splits(config, dataset, tokenizer, catalog)
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
        published=_published_flow(config, dataset, tokenizer, rewards),
    )

    trainer = FlowerTrainer(
        model=model,
        args=args,
        train_dataset=SampleSet(encoded),
        eval_dataset=valid,
        data_collator=RecommendationCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=_callbacks(config, run_dir, main, callbacks),
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


def _encoded_splits(
    config: TrainConfig, dataset: Dataset, tokenizer, catalog: Catalog
) -> tuple[list, SampleSet | None]:
    """The training samples as token ids, and the validation set where ``eval_steps`` asks for
    one; a prompt that no cutoff can fit is a configuration error."""
    try:
        encoded = encode_samples(
            dataset, "train", tokenizer, catalog, config.domain, config.max_prompt_tokens
        )
        valid = None
        if config.eval_steps is not None:
            valid = SampleSet(encode_samples(
                dataset, "valid", tokenizer, catalog, config.domain, config.max_prompt_tokens,
                config.valid_limit,
            ))
    except PromptCutoffError as error:
        raise TrainConfigError(f"max_prompt_tokens: {error}") from None
    return encoded, valid


def _callbacks(
    config: TrainConfig, run_dir: Path, main: bool, callbacks: Sequence[Any]
) -> list[Any]:
    """The metrics file, early stopping with the best checkpoint kept, and TensorBoard (on the
    main process), where the configuration asks for them, before the caller's ``callbacks``."""
    all_callbacks = [MetricsFileCallback(run_dir / METRICS_FILE), *callbacks]
    if config.early_stopping_patience is not None:
        all_callbacks += [EarlyStoppingCallback(config.early_stopping_patience), SaveBestCallback()]
    if config.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback
        except ImportError:
            raise TrainConfigError("tensorboard=True needs the tensorboard package") from None
        all_callbacks.append(TensorBoardCallback(SummaryWriter(str(run_dir / "tensorboard"))))
    return all_callbacks
