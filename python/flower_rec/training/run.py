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
    CONFIG_FILE,
    METRICS_FILE,
    OPTION_DEFAULTS,
    SHAPING_OPTIONS,
    DataArguments,
    FlowerConfig,
    ModelArguments,
    ProbabilitySource,
    TrainConfigError,
    checkpoint_parents,
    described,
    saved_options,
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


def _load_model(
    config: ModelArguments, args: FlowerConfig, dataset: Dataset, run_dir: Path,
    saved_tokenizer: bool,
):
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
            tokenizer = train_tokenizer(corpus(dataset, args.domain), config.tiny_vocab_size)
        model = tiny_llama(
            tokenizer,
            hidden_size=config.tiny_hidden_size,
            num_layers=config.tiny_layers,
            num_heads=config.tiny_heads,
            seed=args.seed,
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
                # peft reads the name "all-linear" as a rule, and a list as module names
                target_modules=(config.lora_target_modules[0]
                                if config.lora_target_modules == ["all-linear"]
                                else config.lora_target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


def _published_flow(
    config: FlowerConfig, dataset: Dataset, tokenizer, rewards: PopularityRewards | None
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


def _popularity_rewards(config: FlowerConfig, dataset: Dataset) -> PopularityRewards:
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
    for parent in checkpoint_parents(run_dir):
        for folder in parent.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
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


def saved_configuration(
    args: FlowerConfig, data: DataArguments, model: ModelArguments, aux_probabilities: Any,
    valid_aux_probabilities: Any,
) -> dict[str, Any]:
    """What ``train_config.json`` holds: the three sections (p_u objects described)."""
    return {
        "model": dataclasses.asdict(model),
        "data": {**dataclasses.asdict(data), "aux_probabilities": described(aux_probabilities),
                 "valid_aux_probabilities": described(valid_aux_probabilities)},
        "training": args.to_dict(),
    }


def _prepare_run_dir(
    args: FlowerConfig, configuration: dict[str, Any], world_size: int, check: bool
) -> Path | None:
    """The checkpoint to resume from: with ``resume``, the run folder's newest complete one
    (None if it has none). Newer incomplete ones are passed over, and left for the resumed run to
    overwrite when it reaches their step. With ``check`` (the main process) it also checks that
    the folder agrees with ``resume`` and that the saved configuration has the same
    :data:`SHAPING_OPTIONS` as ``configuration``, and says on stderr which checkpoints it
    passes over."""
    run_dir = Path(args.output_dir)
    checkpoints = _checkpoints(run_dir)
    saved = run_dir / CONFIG_FILE
    if check and not args.resume and (saved.exists() or checkpoints):
        raise TrainConfigError(
            f"{run_dir} already holds a run: pass resume=True to continue it, or choose "
            "another output folder"
        )
    if check and args.resume and saved.exists():
        previous = read_json(saved)
        if not isinstance(previous, dict):
            raise TrainConfigError(f"{saved}: not a training configuration (a JSON object)")
        # A run saved before an option existed ran with that option's default.
        previous = {**OPTION_DEFAULTS, **saved_options(previous)}
        current = saved_options(configuration)
        changed = [name for name in SHAPING_OPTIONS if previous.get(name) != current.get(name)]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise TrainConfigError(f"cannot resume {run_dir} with a different configuration ({details})")
    if not args.resume:
        return None
    lora = configuration["model"]["lora"]
    for folder in checkpoints:
        problem = _checkpoint_problem(folder, lora, world_size)
        if problem is None:
            return folder
        if check:
            warnings.warn(f"resume: passing over the incomplete {folder.name}: {problem}",
                          stacklevel=3)
    if check:
        warnings.warn(f"resume: {run_dir} has no checkpoint to resume from; training starts from "
                      "the beginning", stacklevel=3)
    return None


def _check_inputs(
    args: FlowerConfig, data: DataArguments, aux_probabilities: Any, valid_aux_probabilities: Any
) -> None:
    """The rules between the configuration and the files and objects it names."""
    if not Path(data.data).is_dir():
        raise TrainConfigError(f"data folder {data.data!r} does not exist (create one with "
                               "`flower-rec prepare`)")
    if args.reward_counts is not None and not Path(args.reward_counts).is_file():
        raise TrainConfigError(f"reward_counts file {str(args.reward_counts)!r} does not exist")
    if data.aux is not None and aux_probabilities is not None:
        raise TrainConfigError("give the p_u either as aux (a train-aux folder) or as "
                               "aux_probabilities, not both")
    if not args.needs_probabilities or data.aux is not None:
        return
    if aux_probabilities is None:
        raise TrainConfigError(
            f"reward {args.reward!r} needs aux_probabilities (p_u of every training sample "
            "from an auxiliary recommender, e.g. `flower-rec train-aux`); pass them or aux, or "
            "use reward='logp' for popularity-only rewards"
        )
    if args.evaluates and valid_aux_probabilities is None:
        raise TrainConfigError(
            f"validation with reward {args.reward!r} needs valid_aux_probabilities (p_u of "
            "every validation sample, from the same auxiliary recommender; aux computes both)"
        )


def _aux_tables(data: DataArguments, dataset: Dataset, evaluates: bool) -> tuple[Tensor, Any]:
    """The p_u of the training (and, with ``evaluates``, the validation) samples from the
    SASRec in ``data.aux``."""
    from ..auxiliary import load_sasrec, training_probabilities

    aux = load_sasrec(data.aux)
    valid = training_probabilities(aux, dataset, "valid") if evaluates else None
    return training_probabilities(aux, dataset), valid


def train(
    args: FlowerConfig,
    data: DataArguments,
    model: ModelArguments | None = None,
    *,
    aux_probabilities: Tensor | str | os.PathLike | ProbabilitySource | None = None,
    valid_aux_probabilities: Tensor | str | os.PathLike | ProbabilitySource | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Trains a recommender and returns the run folder ``args.output_dir`` (see the module
    docstring).

    Args:
        args: the training arguments, the method's included.
        data: the dataset folder, and the SASRec folder giving p_u where the reward is
            personalised.
        model: the model to fine-tune (default: the embedded tiny model).
        aux_probabilities: instead of ``data.aux``: ``p_u`` of every training sample,
            ``[num_train_samples, I]``, as a tensor, a file (``.pt`` holding a tensor, or
            ``.safetensors`` holding one tensor), or a callable mapping sample indices ``[B]``
            to ``[B, I]``.
        valid_aux_probabilities: the same for the validation samples (``[num_valid_samples,
            I]``), needed by validation (``eval_steps`` or ``eval_strategy``) with a
            personalised reward.
        callbacks: extra :class:`transformers.TrainerCallback` objects.
    """
    model = ModelArguments() if model is None else model
    _check_inputs(args, data, aux_probabilities, valid_aux_probabilities)
    run_dir = Path(args.output_dir)
    dataset = load_dataset(data.data)
    configuration = saved_configuration(args, data, model, aux_probabilities,
                                        valid_aux_probabilities)
    main = args.process_index == 0  # sets up the process group under torchrun
    checkpoint = _prepare_run_dir(args, configuration, args.world_size, check=main)
    rewards, probabilities, valid_probabilities = _reward_inputs(
        args, data, dataset, aux_probabilities, valid_aux_probabilities
    )

    # The main process prepares the run folder first (the configuration; the tiny model's
    # tokenizer, which the other processes then read, so that every process has the same one).
    with args.main_process_first(local=False, desc="preparing the run folder"):
        network, tokenizer = _load_model(
            model, args, dataset, run_dir, saved_tokenizer=checkpoint is not None or not main
        )
        if main:
            with atomic_open(run_dir / CONFIG_FILE, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(configuration, indent=2) + "\n")
            if model.model is None:
                with atomic_files(run_dir) as staging:
                    tokenizer.save_pretrained(staging)
    catalog = Catalog.from_titles(dataset.titles, tokenizer, build_prompt([], args.domain))
    encoded, valid = _encoded_splits(args, dataset, tokenizer, catalog)
    objective = FlowerObjective(
        catalog,
        method=args.method,
        eos_token_id=tokenizer.eos_token_id,
        theta=args.theta,
        flow_loss=args.flow_loss,
        rewards=rewards,
        reward_variant=args.reward,
        popularity_exponent=args.popularity_exponent,
        probabilities=probabilities,
        policy=args.policy,
        leakage_weight=args.leakage_weight,
        off_policy_share=args.off_policy_share,
        rollout_temperature=args.rollout_temperature,
        published=_published_flow(args, dataset, tokenizer, rewards),
    )

    trainer = FlowerTrainer(
        model=network,
        args=args,
        train_dataset=SampleSet(encoded),
        eval_dataset=valid,
        data_collator=RecommendationCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=_callbacks(args, run_dir, callbacks),
        objective=objective,
        eval_probabilities=valid_probabilities,
    )
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))

    _save_final_model(trainer, tokenizer, run_dir, merge_lora=model.lora)
    return run_dir


def _reward_inputs(
    args: FlowerConfig,
    data: DataArguments,
    dataset: Dataset,
    aux_probabilities: Tensor | str | os.PathLike | ProbabilitySource | None,
    valid_aux_probabilities: Tensor | str | os.PathLike | ProbabilitySource | None,
) -> tuple[PopularityRewards | None, ProbabilitySource | None, ProbabilitySource | None]:
    """A Flower run's popularity rewards, and the p_u sources of its training and validation
    samples where the reward is personalised (from ``data.aux`` when it is given); SFT needs
    none of them."""
    if args.method != "flower":
        return None, None, None
    rewards = _popularity_rewards(args, dataset)
    logger.info("%d titles without a training-history count get the floor count %s",
                rewards.num_floored, args.floor_count)
    if not args.needs_probabilities:
        return rewards, None, None
    if data.aux is not None:
        aux_probabilities, valid_aux_probabilities = _aux_tables(data, dataset, args.evaluates)
    probabilities = _probability_source(aux_probabilities, len(dataset.train), dataset.num_items)
    valid_probabilities = None
    if args.evaluates:
        valid_probabilities = _probability_source(
            valid_aux_probabilities, len(dataset.valid), dataset.num_items,
            "valid_aux_probabilities", "valid",
        )
    return rewards, probabilities, valid_probabilities


def _save_final_model(trainer: FlowerTrainer, tokenizer, run_dir: Path, merge_lora: bool) -> None:
    """The trained model (the best checkpoint's, where early stopping kept one) and its
    tokenizer in the run folder, written by the main process once every process is done."""
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        final = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora:
            final = final.merge_and_unload()  # a plain model that `evaluate` loads without peft
        with atomic_files(run_dir) as staging:
            final.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()


def _encoded_splits(
    args: FlowerConfig, dataset: Dataset, tokenizer, catalog: Catalog
) -> tuple[list, SampleSet | None]:
    """The training samples as token ids, and the validation set where the run evaluates; a
    prompt that no cutoff can fit is a configuration error."""
    try:
        encoded = encode_samples(
            dataset, "train", tokenizer, catalog, args.domain, args.max_prompt_tokens
        )
        valid = None
        if args.evaluates:
            valid = SampleSet(encode_samples(
                dataset, "valid", tokenizer, catalog, args.domain, args.max_prompt_tokens,
                args.valid_limit,
            ))
    except PromptCutoffError as error:
        raise TrainConfigError(f"max_prompt_tokens: {error}") from None
    return encoded, valid


def _callbacks(args: FlowerConfig, run_dir: Path, callbacks: Sequence[Any]) -> list[Any]:
    """The metrics file and early stopping with the best checkpoint kept, where the
    configuration asks for it, before the caller's ``callbacks``."""
    all_callbacks = [MetricsFileCallback(run_dir / METRICS_FILE), *callbacks]
    if args.early_stopping_patience is not None:
        all_callbacks += [EarlyStoppingCallback(args.early_stopping_patience), SaveBestCallback()]
    return all_callbacks
