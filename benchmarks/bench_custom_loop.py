"""A training step of the hand-written loop of ``examples/custom_loop.py`` (its
``training_step``: ``flower_rec.loop``'s rollout and shared-prompt teacher forcing,
``flower_ext.losses``, gradient clipping, AdamW) beside the bundled trainer's Flower step
(``FlowerObjective``, then the same clipping and AdamW plus the learning-rate schedule, as
``bench_training_step.Run`` takes it), on the same model, batch and personalised rewards.
Embedding Flower in one's own loop should cost what the trainer's step costs: the target is a
loop step of at most 1.2x the trainer's, i.e. trainer / loop >= 1 / 1.2 in the report's terms.

Set-up of ``bench_training_step.build_setup``: the default synthetic dataset, the tiny default
model (hidden 128, 2 layers, 4 heads), a batch of 16 training samples, reward ``logp_div_s``
with a fixed random ``p_u``; both sides compute the batch's item rewards and flows inside the
step. Check before timing: from the same weights and rollout seed, the loop's loss equals the
trainer's (the same trajectories, logits and losses).

Run (one thread, as the training-step benchmark)::

    OMP_NUM_THREADS=1 pytest benchmarks/bench_custom_loop.py --benchmark-min-rounds=20
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch

import bench_training_step as training_step_bench
from harness import Case, baseline, ours

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_loop.py"
LOOP = "custom_loop"
TRAINER = "flower_trainer"
TARGET = 1 / 1.2


def _example():
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoopRun:
    """The example's loop on a copy of the set-up's model: :meth:`step` is one optimizer step,
    its rollout seeded as the trainer seeds its own (run seed, step, samples)."""

    def __init__(self, setup, example):
        from flower_rec.loop import with_termination

        self.setup, self.example = setup, example
        self.eos = setup.tokenizer.eos_token_id
        self.trie = example.catalog_trie(setup.catalog.item_tokens.sequences, self.eos)
        self.with_termination = with_termination
        self.model = copy.deepcopy(setup.model).train()
        config = setup.config
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.steps = 0

    def step(self, batch) -> torch.Tensor:
        from flower_rec.training import rollout_seed

        setup = self.setup
        generator = torch.Generator().manual_seed(
            rollout_seed(setup.config.seed, self.steps, batch["sample_index"])
        )
        targets, target_lengths = self.with_termination(
            batch["target_ids"], batch["target_lengths"], self.eos
        )
        item_log_rewards = setup.rewards.item_log_rewards(
            setup.config.reward, setup.probabilities(batch["sample_index"])
        )
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "targets": targets,
            "target_lengths": target_lengths,
        }
        loss = self.example.training_step(
            self.model, self.optimizer, self.trie, self.eos, inputs, item_log_rewards,
            theta=setup.config.theta, generator=generator,
        )
        self.steps += 1
        return loss


def assert_same_first_step(setup, example, batch) -> None:
    """The loop's first loss equals the trainer's objective on the same weights and seed."""
    from flower_rec.training import rollout_seed

    loop = LoopRun(setup, example)
    trainer = training_step_bench.Run(setup, "flower", total_steps=1)
    seed = rollout_seed(setup.config.seed, 0, batch["sample_index"])
    expected = trainer.objective(trainer.model, batch, seed=seed).loss
    torch.testing.assert_close(loop.step(batch), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="session")
def step_case() -> Case:
    with tempfile.TemporaryDirectory(prefix="bench_custom_loop_") as folder:
        setup = training_step_bench.build_setup(Path(folder))
    (batch,) = training_step_bench.make_batches(setup, 1)
    example = _example()
    loop = LoopRun(setup, example)
    trainer = training_step_bench.Run(setup, "flower", total_steps=1000)
    return Case(
        "flower_step",
        f"synthetic, B={training_step_bench.BATCH_SIZE}",
        [
            ours(LOOP, lambda: loop.step(batch)),
            baseline(TRAINER, lambda: trainer.step(batch), target=TARGET),
        ],
        lambda results: assert_same_first_step(setup, example, batch),
    )


@pytest.mark.parametrize("implementation", [LOOP, TRAINER])
def test_flower_step(benchmark, step_case, implementation):
    step_case.measure(benchmark, implementation)
