"""The :class:`transformers.Trainer` of the objective, and the callbacks of a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import atomic_open, read_text, reading
from .config import ProbabilitySource, checkpoint_parents
from .objective import FlowerObjective, rollout_seed

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
            folders = [parent / best for parent in checkpoint_parents(Path(self.args.output_dir))]
            found = [folder for folder in folders if folder.is_dir()]
            self.state.best_model_checkpoint = str(found[0]) if found else None
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


class SaveBestCallback(TrainerCallback):
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
