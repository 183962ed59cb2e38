"""The small training runs the training tests share: a 1-layer, 32-wide Llama on a 60-item
synthetic catalog, one thread, 6 steps with checkpoints at 3 and 6; the callbacks that crash or
record a session, and the comparisons of two run folders."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from flower_rec.training import METRICS_FILE, configs_from_options

TINY = {"tiny_hidden_size": 32, "tiny_layers": 1, "tiny_heads": 2}
# Keys of the final summary line that depend on wall time or on the session (a resumed run's
# train_loss averages its own steps only).
SESSION_KEYS = {
    "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
    "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
}


P_U = ("aux_probabilities", "valid_aux_probabilities")  # train()'s objects, not options


def options(data_dir, out, **overrides) -> dict:
    """The small run's options by name (JSON-able but for ``overrides``)."""
    return {
        **TINY, "data": str(data_dir), "output_dir": str(out), "per_device_train_batch_size": 8,
        "logging_steps": 1, "save_steps": 3, "max_steps": 6, "warmup_steps": 2,
        "disable_tqdm": True, **overrides,
    }


def config(data_dir, out, **overrides) -> dict:
    """The keyword arguments of :func:`flower_rec.training.train` for the small run."""
    values = options(data_dir, out, **overrides)
    p_u = {name: values.pop(name) for name in P_U if name in values}
    model, data, args = configs_from_options(values)
    return {"args": args, "data": data, "model": model, **p_u}


def metric_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in SESSION_KEYS} for line in lines]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


class Crash(TrainerCallback):
    """Fails (in-process) or SIGKILLs the run at the end of optimizer step ``step``."""

    def __init__(self, step: int, kill: bool = False):
        self.step, self.kill = step, kill

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated crash")


class Steps(TrainerCallback):
    """Records the optimizer steps a session runs."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


FLOWER = {"method": "flower", "reward": "logp", "theta": 0.9}


def assert_same_run(resumed: Path, whole: Path) -> None:
    assert metric_lines(resumed) == metric_lines(whole)
    expected = weights(whole)
    for name, tensor in weights(resumed).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


EARLY = {"method": "sft", "learning_rate": 0.1, "warmup_steps": 0, "max_steps": 30,
         "eval_steps": 1, "valid_limit": 16, "early_stopping_patience": 2}
