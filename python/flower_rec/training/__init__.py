"""Fine-tuning an LLM recommender: SFT (the BIGRec baseline) and Flower (docs/method.md section 3),
on :class:`transformers.Trainer`.

The configuration follows TRL's layout: :class:`FlowerConfig` is
:class:`transformers.TrainingArguments` with the method's own options, beside
:class:`ModelArguments` and :class:`DataArguments`::

    train(FlowerConfig(output_dir=RUN, method="flower", num_train_epochs=3),
          DataArguments(data=DATA, aux=SASREC), ModelArguments(model="Qwen/Qwen3-0.6B"))

trains and returns the run folder ``RUN`` (``output_dir``)::

    RUN/train_config.json        the configuration: its model, data and training sections (JSON)
    RUN/metrics.jsonl            one line per Trainer log: step, loss, sft, subtb | flow_matching, ...;
                                 with ``eval_steps``, also eval_loss, eval_sft, eval_subtb | ...
    RUN/config.json, model.safetensors, tokenizer files      the final model (save_pretrained;
                                 a LoRA run is merged into its base model), what `evaluate` loads;
                                 with early stopping, the checkpoint of the best eval_loss
    RUN/checkpoint-N             Trainer checkpoints (model, optimizer, scheduler, RNG states);
                                 runs made before FlowerConfig keep theirs in RUN/checkpoints/

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
its old or its new version; the configuration is checked (:data:`FIELD_RULES`) when it is made,
before anything runs. A resumption refuses a configuration whose :data:`SHAPING_OPTIONS` differ
from the saved one (a ``train_config.json`` of the flat configuration before FlowerConfig is
read by its old names).

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

from .config import (
    CONFIG_CLASSES,
    CONFIG_FILE,
    FIELD_RULES,
    FLOW_LOSSES,
    LEGACY_NAMES,
    METHOD_OPTIONS,
    METHODS,
    METRICS_FILE,
    POLICIES,
    ROLLOUTS,
    SHAPING_OPTIONS,
    DataArguments,
    FlowerConfig,
    ModelArguments,
    TrainConfigError,
    configs_from_options,
    epoch_protocol,
)
from .objective import FlowerObjective, LossTerms, rollout_seed
from .run import is_trained, train
from .samples import RecommendationCollator, encode_samples
from .trainer import FlowerTrainer, MetricsFileCallback

__all__ = [
    "CONFIG_CLASSES",
    "CONFIG_FILE",
    "DataArguments",
    "FIELD_RULES",
    "FLOW_LOSSES",
    "LEGACY_NAMES",
    "METHOD_OPTIONS",
    "METHODS",
    "POLICIES",
    "ROLLOUTS",
    "METRICS_FILE",
    "SHAPING_OPTIONS",
    "FlowerConfig",
    "FlowerObjective",
    "FlowerTrainer",
    "LossTerms",
    "MetricsFileCallback",
    "ModelArguments",
    "RecommendationCollator",
    "TrainConfigError",
    "configs_from_options",
    "encode_samples",
    "epoch_protocol",
    "is_trained",
    "rollout_seed",
    "train",
]
