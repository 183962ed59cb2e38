"""One training step of each method, timed in one run: SFT, Flower (sub-trajectory balance with
its on-policy rollout) and teacher-forced flow matching, the share of each step spent in trie
work, and the trie work of the published per-step approach on the same batches.

Usage::

    python benchmarks/bench_training_step.py [--steps 30] [--warmup 5] [--threads 1] [--json OUT]

Set-up, as ``flower-rec train`` builds it: the default synthetic dataset
(``prepare_synthetic(seed=0)`` into a temporary folder), the tiny default model and its BPE
tokenizer (``ModelArguments`` defaults: hidden 128, 2 layers, 4 heads, a BPE vocabulary of at
most 2,000 tokens, which the synthetic titles fill to 853; built by
``flower_rec.training.run._load_model``), the catalog, the encoded training samples and batches of 16
from ``RecommendationCollator``. The Flower runs use the paper's default reward ``logp_div_s``
with ``p_u`` a fixed random table (softmax of seeded Gaussian scores, one row per training sample)
instead of a trained SASRec: the reward's cost does not depend on where ``p_u`` comes from, and
no auxiliary model has to be trained first.

A step is what :class:`flower_rec.training.FlowerTrainer` runs per batch: the loss of
:class:`flower_rec.training.FlowerObjective` (Flower: rollout, then one teacher-forced forward for the
SFT target and the trajectory together), backward, gradient clipping at 1, an AdamW step and the
linear learning-rate schedule. The three methods start from the same initial weights, see the
same batches in the same order and take their steps interleaved (the order rotating each step),
so that a slow spell of the machine hits all three alike. The first ``--warmup`` steps are not
timed; each row is the median over ``--steps`` steps.

Trie work is measured in separate, instrumented steps after the timed ones (the next batches):
every flower_ext trie op a step calls (``Trie.log_flows``, ``walk``, ``advance``,
``mask_logits_``, ``token_bitmask``, ``children``, ``transition_log_probs``) and
``flower_ext.losses.state_log_rewards`` as a whole are wrapped with timers; the share is trie time
over the instrumented step's time (median over the instrumented steps). SFT calls none.

The published approach (``baselines.PrefixKeyTrie``): the rollouts of the instrumented Flower
steps are replayed for their trie part only. Per rollout step and still-generating row, a
prefix-string key (``"12-873-5"``), a dict lookup of the allowed tokens and ``torch.isin`` over
the vocabulary for the row's mask, then ``masked_fill``; after the rollout, per row and state the
flows read by prefix key. Two reward forms: *exact* (each user's flow of a prefix as the
``logsumexp`` of that user's item rewards under the prefix, from a string-keyed dict of item
lists: the same numbers as ours) and *as published* (the popularity transitions ``log P̂`` from
a string-keyed table, divided by the sampled item's ``s_ui``: cheaper, but not the exact
personalised flows). Ours is replayed on the same paths: ``mask_logits_`` and ``advance`` per
rollout step, then ``walk``, ``log_flows`` of the batch's item rewards and ``state_log_rewards``.
Before timing, the masks of both are checked identical and the per-state log-rewards close (the
exact form against ours with ``logp_div_s``; the published form against ours with ``logp``,
where the two definitions coincide). Each replay is timed as the fastest of ``--repeats`` runs
per batch, median over the batches. Timed alone like this, our ops take less than inside a
training step (where each call follows the model's own work), so the replayed "ours" row is
smaller than the in-step trie time; the ratio compares the two approaches timed the same way.

Targets (from the issue): Flower step <= 2x the SFT step, flow-matching step <= 1.2x, trie work
< 2% of a Flower step. This is a CPU benchmark (``torch.set_num_threads(--threads)``); run it
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines

TARGETS = {"flower_vs_sft": 2.0, "flow_matching_vs_sft": 1.2, "trie_share": 0.02}
BATCH_SIZE = 16
SEED = 0
# The Trie methods that run trie kernels; losses.state_log_rewards is timed as a whole.
TRIE_METHODS = (
    "log_flows",
    "walk",
    "advance",
    "token_bitmask",
    "mask_logits_",
    "children",
    "transition_log_probs",
)
METHODS = {
    "sft": {"method": "sft"},
    "flower": {"method": "flower", "flow_loss": "subtb"},
    "flow_matching": {"method": "flower", "flow_loss": "flow_matching"},
}


# ---------------------------------------------------------------------------------------------
# set-up


@dataclass
class Setup:
    config: object  # FlowerConfig
    model_config: object  # ModelArguments
    dataset: object
    tokenizer: object
    model: torch.nn.Module  # the initial weights every method starts from
    catalog: object
    encoded: object
    rewards: object  # PopularityRewards
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    collator: object


def build_setup(data_dir: Path) -> Setup:
    from flower_rec.data import load_dataset, prepare_synthetic
    from flower_rec.prompts import build_prompt
    from flower_rec.rewards import PopularityRewards
    from flower_rec.training import (
        FlowerConfig,
        ModelArguments,
        RecommendationCollator,
        encode_samples,
    )
    from flower_rec.training.run import _load_model, _probability_source

    prepare_synthetic(data_dir, seed=SEED, progress=False)
    dataset = load_dataset(data_dir)
    # p_u: a fixed random table instead of a trained SASRec (see the module docstring).
    generator = torch.Generator().manual_seed(SEED)
    scores = torch.randn(len(dataset.train), dataset.num_items, generator=generator)
    table = torch.softmax(scores, dim=1)
    config = FlowerConfig(
        output_dir=data_dir / "run",
        method="flower",
        reward="logp_div_s",
        per_device_train_batch_size=BATCH_SIZE,
        seed=SEED,
    )
    model_config = ModelArguments()
    model, tokenizer = _load_model(model_config, config, dataset, data_dir / "run",
                                   saved_tokenizer=False)
    catalog_prompt = build_prompt([], config.domain)
    from flower_rec.decoding import Catalog

    catalog = Catalog.from_titles(dataset.titles, tokenizer, catalog_prompt)
    return Setup(
        config=config,
        model_config=model_config,
        dataset=dataset,
        tokenizer=tokenizer,
        model=model,
        catalog=catalog,
        encoded=encode_samples(dataset, "train", tokenizer, catalog, config.domain),
        rewards=PopularityRewards.from_dataset(dataset, config.floor_count),
        probabilities=_probability_source(table, len(dataset.train), dataset.num_items),
        collator=RecommendationCollator(tokenizer.pad_token_id),
    )


def make_objective(setup: Setup, reward: str | None = None, **options):
    """The objective of ``options`` (FlowerObjective arguments: method, flow_loss, theta, ...;
    ``reward`` as a variant names it, the set-up's by default) over the set-up's catalog,
    rewards and p_u."""
    from flower_rec.training import FlowerObjective

    config = setup.config
    return FlowerObjective(
        setup.catalog,
        eos_token_id=setup.tokenizer.eos_token_id,
        **{"theta": config.theta, **options},
        rewards=setup.rewards,
        reward_variant=config.reward if reward is None else reward,
        probabilities=setup.probabilities,
    )


def make_batches(setup: Setup, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of 16 training samples in a seeded random order, as the Trainer's
    shuffled sampler draws them."""
    order = torch.randperm(
        len(setup.encoded.prompts), generator=torch.Generator().manual_seed(SEED)
    )
    encoded = setup.encoded
    batches = []
    for b in range(count):
        chosen = order[(b * BATCH_SIZE) % len(order) :][:BATCH_SIZE].tolist()
        features = [
            {"sample_index": i, "prompt": encoded.prompts[i], "target": encoded.targets[i]}
            for i in chosen
        ]
        batches.append(setup.collator(features))
    return batches


class Run:
    """One method's model, optimizer and schedule: :meth:`step` is one optimizer step.
    ``options``: the objective's (default: :data:`METHODS` ``[name]``)."""

    def __init__(self, setup: Setup, name: str, total_steps: int, options: dict | None = None):
        from transformers import get_linear_schedule_with_warmup

        config = setup.config
        self.name = name
        self.objective = make_objective(setup, **(METHODS[name] if options is None else options))
        self.model = copy.deepcopy(setup.model).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.schedule = get_linear_schedule_with_warmup(
            self.optimizer, config.warmup_steps, total_steps
        )
        self.max_grad_norm = config.max_grad_norm
        self.seed = config.seed
        self.steps = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on ``batch``; returns its wall time in seconds."""
        from flower_rec.training import rollout_seed

        start = time.perf_counter()
        seed = None
        if self.objective.sampled:
            seed = rollout_seed(self.seed, self.steps, batch["sample_index"])
        terms = self.objective(self.model, batch, seed=seed)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.steps += 1
        return elapsed


# ---------------------------------------------------------------------------------------------
# trie-work instrumentation


class TrieTimer:
    """While active, wraps the flower_ext trie ops (the :class:`flower_ext.Trie` methods and
    ``flower_ext.losses.state_log_rewards``) with wall-clock timers. Nested calls count once,
    to the outermost op."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _wrap(self, label: str, function):
        def timed(*args, **kwargs):
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1
                self._depth -= 1

        return timed

    @contextmanager
    def active(self):
        from flower_ext import Trie, losses

        originals = {name: getattr(Trie, name) for name in TRIE_METHODS}
        original_rewards = losses.state_log_rewards
        try:
            for name, function in originals.items():
                setattr(Trie, name, self._wrap(name, function))
            losses.state_log_rewards = self._wrap("state_log_rewards", original_rewards)
            yield self
        finally:
            for name, function in originals.items():
                setattr(Trie, name, function)
            losses.state_log_rewards = original_rewards


# ---------------------------------------------------------------------------------------------
# the published approach, replayed on a batch's rollout


@dataclass
class Replay:
    """The trie-relevant record of one Flower step: its rollout's paths, the batch's personalised
    item log-rewards, each row's ``s_ui`` and, per rollout step, stand-in logits (seeded Gaussian:
    masking costs the same whatever the values) of the rows still generating."""

    actions: torch.Tensor  # [B, T] item tokens (no EOS), padded
    lengths: torch.Tensor  # [B]
    item_log_rewards: torch.Tensor  # [B, I] float32, logp_div_s
    scale: list[float]  # s_ui of each row's sampled item (the published per-path divisor)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (logits, rows, tokens) per step


def record_replay(setup: Setup, objective, batch, actions, lengths) -> Replay:
    from flower_rec.rewards import centred_scale

    probabilities = setup.probabilities(batch["sample_index"])
    item_log_rewards = setup.rewards.item_log_rewards(setup.config.reward, probabilities)
    leaves = objective.catalog.trie.walk(actions, lengths).gather(1, (lengths - 1)[:, None])
    sampled_items = objective.catalog.node_item[leaves.squeeze(1).long()]
    scale = centred_scale(probabilities.float()).gather(1, sampled_items.unsqueeze(1)).squeeze(1)
    generator = torch.Generator().manual_seed(SEED)
    vocab = len(setup.tokenizer)
    steps = []
    for t in range(int(lengths.max())):
        rows = (lengths > t).nonzero().squeeze(1)
        logits = torch.randn(rows.numel(), vocab, generator=generator)
        steps.append((logits, rows, actions[rows, t]))
    return Replay(actions, lengths, item_log_rewards, scale.tolist(), steps)


def _path(loss_trie, replay: Replay) -> torch.Tensor:
    """``[B, T+1]`` loss-trie nodes of the states, as ``FlowerObjective`` builds them."""
    root = torch.zeros_like(replay.lengths[:, None], dtype=torch.int32)
    return torch.cat([root, loss_trie.walk(replay.actions, replay.lengths)], dim=1)


def ours_trie_part(objective, replay: Replay) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The trie ops of a Flower step on the replayed rollout: per rollout step the decoding
    trie's ``mask_logits_`` and ``advance`` over the rows still generating (as a rollout
    calls them), then the loss trie's ``walk``, ``log_flows`` of
    the batch's item rewards and ``state_log_rewards``."""
    from flower_ext import losses

    decoding = objective.catalog.trie
    loss_trie = objective._on(torch.device("cpu"))["trie"]
    masked = []
    nodes = torch.zeros(replay.lengths.shape[0], dtype=torch.int32)
    for logits, rows, tokens in replay.steps:
        active = nodes[rows]
        masked.append(decoding.mask_logits_(logits.clone(), active))
        nodes[rows] = decoding.advance(active, tokens)
    path = _path(loss_trie, replay)
    flows = loss_trie.log_flows(replay.item_log_rewards)
    return masked, losses.state_log_rewards(loss_trie, flows, path, objective.eos)


def published_trie_part(
    trie: baselines.PrefixKeyTrie, replay: Replay, exact: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    masked = trie.rollout_masks(
        [(logits.clone(), rows, tokens) for logits, rows, tokens in replay.steps]
    )
    if exact:
        rewards = trie.state_log_rewards(replay.item_log_rewards, replay.actions, replay.lengths)
    else:
        rewards = trie.published_state_log_rewards(replay.actions, replay.lengths, replay.scale)
    return masked, rewards


def check_replay(setup: Setup, objective, trie: baselines.PrefixKeyTrie, replay: Replay) -> None:
    """Raises unless the published approach gives our masks and our per-state log-rewards."""
    from flower_ext import losses

    masked, ours = ours_trie_part(objective, replay)
    theirs_masked, theirs = published_trie_part(trie, replay, exact=True)
    for step, (mine, other) in enumerate(zip(masked, theirs_masked)):
        if not torch.equal(torch.isfinite(mine), torch.isfinite(other)):
            raise AssertionError(f"rollout step {step}: the isin masks differ from ours")
    states = torch.arange(ours.shape[1]) <= replay.lengths.unsqueeze(1)
    if not torch.allclose(theirs.float()[states], ours[states], rtol=1e-4, atol=1e-3):
        raise AssertionError("exact per-state log-rewards differ from ours")
    # The published form with scale 1 is the popularity reward (logp) of ours.
    loss_trie = objective._on(torch.device("cpu"))["trie"]
    flows = loss_trie.log_flows(setup.rewards.item_log_rewards("logp"))
    path = _path(loss_trie, replay)
    ours_logp = losses.state_log_rewards(loss_trie, flows, path, objective.eos)
    theirs_logp = trie.published_state_log_rewards(replay.actions, replay.lengths)
    if not torch.allclose(theirs_logp.float()[states], ours_logp[states], rtol=1e-4, atol=1e-3):
        raise AssertionError("published (logp) per-state log-rewards differ from ours")


def fastest(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------------------------------
# the benchmark


def time_steps(runs: dict[str, Run], batches, warmup: int) -> dict[str, list[float]]:
    """Every method's step on every batch, the methods' order rotating each step; the seconds of
    the steps after the first ``warmup``."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index, batch in enumerate(batches):
        for offset in range(len(names)):
            name = names[(index + offset) % len(names)]
            seconds = runs[name].step(batch)
            if index >= warmup:
                times[name].append(seconds)
    return times


def instrument_steps(runs: dict[str, Run], batches) -> tuple[dict[str, dict], list[tuple]]:
    """Flower and flow-matching steps with every trie op timed: per method the trie time per
    step, its share of the step and the time per op; for Flower also the rollout and step times.
    Returns that and the Flower rollouts as ``(batch, actions, lengths)`` for the replay."""
    timer = TrieTimer()
    trie_info: dict[str, dict] = {}
    captured: list[tuple[dict, torch.Tensor, torch.Tensor]] = []
    flower = runs["flower"].objective
    trajectories = flower.trajectories  # the step's rollout (all on-policy here)
    rollout_ms: list[float] = []
    current_batch: list[dict] = [{}]

    def capturing_trajectories(*args, **kwargs):
        start = time.perf_counter()
        sample = trajectories(*args, **kwargs)
        rollout_ms.append(1e3 * (time.perf_counter() - start))
        captured.append((current_batch[0], sample.actions, sample.lengths))
        return sample

    flower.trajectories = capturing_trajectories
    flower_step_ms: list[float] = []
    try:
        for name in ("flower", "flow_matching"):
            shares: list[float] = []
            per_step_ms: list[float] = []
            per_op: dict[str, float] = {}
            with timer.active():
                for batch in batches:
                    current_batch[0] = batch
                    timer.reset()
                    seconds = runs[name].step(batch)
                    if name == "flower":
                        flower_step_ms.append(1e3 * seconds)
                    shares.append(timer.total / seconds)
                    per_step_ms.append(1e3 * timer.total)
                    for op, value in timer.seconds.items():
                        per_op[op] = per_op.get(op, 0.0) + 1e3 * value / len(batches)
            trie_info[name] = {
                "trie_ms": statistics.median(per_step_ms),
                "share": statistics.median(shares),
                "ops_ms": {op: round(value, 4) for op, value in sorted(per_op.items())},
                "calls": dict(sorted(timer.calls.items())),  # of the last instrumented step
            }
    finally:
        flower.trajectories = trajectories
    trie_info["flower"]["rollout_ms"] = statistics.median(rollout_ms)
    trie_info["flower"]["step_ms"] = statistics.median(flower_step_ms)
    return trie_info, captured


def replay_published(setup: Setup, objective, captured: list[tuple], repeats: int) -> dict:
    """The trie part of the captured rollouts, ours beside the published approach's two reward
    forms, each checked against ours before it is timed (the fastest of ``repeats`` per batch,
    median over the batches)."""
    trie = baselines.PrefixKeyTrie(
        setup.catalog.item_tokens.sequences,
        objective.eos,
        len(setup.tokenizer),
        setup.rewards.item_log_rewards("logp", dtype=torch.float64),
    )
    ours_ms, exact_ms, published_ms = [], [], []
    for batch, actions, lengths in captured:
        replay = record_replay(setup, objective, batch, actions, lengths)
        check_replay(setup, objective, trie, replay)
        ours_ms.append(1e3 * fastest(lambda r=replay: ours_trie_part(objective, r), repeats))
        exact_ms.append(
            1e3 * fastest(lambda r=replay: published_trie_part(trie, r, exact=True), repeats)
        )
        published_ms.append(
            1e3 * fastest(lambda r=replay: published_trie_part(trie, r, exact=False), repeats)
        )
    ours = statistics.median(ours_ms)
    return {
        "ours_ms": ours,
        "published_exact_ms": statistics.median(exact_ms),
        "published_as_written_ms": statistics.median(published_ms),
        "published_exact_over_ours": statistics.median(exact_ms) / ours,
        "published_as_written_over_ours": statistics.median(published_ms) / ours,
        "mean_item_tokens": statistics.mean(
            float(lengths.float().mean()) for _, _, lengths in captured
        ),
        "mean_rollout_steps": statistics.mean(int(lengths.max()) for _, _, lengths in captured),
    }


def run_benchmark(steps: int, warmup: int, instrumented: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_training_step_") as folder:
        setup = build_setup(Path(folder))
    batches = make_batches(setup, warmup + steps + instrumented)
    runs = {name: Run(setup, name, total_steps=len(batches)) for name in METHODS}
    names = list(runs)
    times = time_steps(runs, batches[: warmup + steps], warmup)
    trie_info, captured = instrument_steps(runs, batches[warmup + steps :])
    flower = runs["flower"].objective
    replay = replay_published(setup, flower, captured, repeats)

    step_ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    return {
        "setup": {
            "dataset": "synthetic (prepare_synthetic, seed 0)",
            "items": setup.dataset.num_items,
            "train_samples": len(setup.dataset.train),
            "loss_trie_nodes": flower.loss_trie.num_nodes,
            "model": {
                "hidden": setup.model_config.tiny_hidden_size,
                "layers": setup.model_config.tiny_layers,
                "heads": setup.model_config.tiny_heads,
                "vocab": len(setup.tokenizer),
                "parameters": sum(p.numel() for p in setup.model.parameters()),
            },
            "batch_size": BATCH_SIZE,
            "reward": setup.config.reward,
            "p_u": "softmax of seeded randn (no SASRec)",
            "steps": steps,
            "warmup": warmup,
            "instrumented_steps": instrumented,
            "replay_repeats": repeats,
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_start": LOAD_AT_START,
            "python": sys.version.split()[0],
        },
        "step_ms": {
            name: {
                "median": step_ms[name],
                "min": 1e3 * min(times[name]),
                "max": 1e3 * max(times[name]),
            }
            for name in names
        },
        "ratio_to_sft": {name: step_ms[name] / step_ms["sft"] for name in names},
        "trie": trie_info,
        "replay": replay,
        "targets": TARGETS,
    }


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def table(result: dict) -> str:
    step, ratio, trie, replay = (
        result["step_ms"],
        result["ratio_to_sft"],
        result["trie"],
        result["replay"],
    )
    flower_share = trie["flower"]["share"]
    lines = [
        "| measurement | ms per step | ratio | target | met |",
        "|---|---|---|---|---|",
        f"| SFT step | {step['sft']['median']:.1f} | 1.00x | | |",
        f"| Flower step (subtb, rollout included) | {step['flower']['median']:.1f} "
        f"| {ratio['flower']:.2f}x SFT | <= {TARGETS['flower_vs_sft']:g}x "
        f"| {_verdict(ratio['flower'] <= TARGETS['flower_vs_sft'])} |",
        f"| flow-matching step | {step['flow_matching']['median']:.1f} "
        f"| {ratio['flow_matching']:.2f}x SFT | <= {TARGETS['flow_matching_vs_sft']:g}x "
        f"| {_verdict(ratio['flow_matching'] <= TARGETS['flow_matching_vs_sft'])} |",
        f"| trie work in a Flower step | {trie['flower']['trie_ms']:.2f} "
        f"| {flower_share:.1%} of the step | < {TARGETS['trie_share']:.0%} "
        f"| {_verdict(flower_share < TARGETS['trie_share'])} |",
        f"| trie work in a flow-matching step | {trie['flow_matching']['trie_ms']:.2f} "
        f"| {trie['flow_matching']['share']:.1%} of the step | | |",
        f"| trie work of a Flower step, replayed: ours | {replay['ours_ms']:.2f} | 1.00x | | |",
        f"| same, published approach (exact per-user flows) | {replay['published_exact_ms']:.2f} "
        f"| {replay['published_exact_over_ours']:.1f}x ours | | |",
        f"| same, published approach as written (log P̂ / s_ui) "
        f"| {replay['published_as_written_ms']:.2f} "
        f"| {replay['published_as_written_over_ours']:.1f}x ours | | |",
    ]
    machine, setup = result["machine"], result["setup"]
    load = machine["load_average_at_start"]
    header = (
        f"CPU: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']} with "
        f"{machine['threads']} thread(s), load average {load:.2f} at the start; tiny model "
        f"({setup['model']['parameters']:,} parameters), {setup['items']} items, batch "
        f"{setup['batch_size']}, reward {setup['reward']}; median of {setup['steps']} steps "
        f"after {setup['warmup']} warm-up steps."
    )
    ops = ", ".join(f"{op} {ms:.2f}" for op, ms in trie["flower"]["ops_ms"].items())
    footer = (
        f"Trie work of a Flower step by op (ms): {ops}. The rollout (prefill and trie-masked "
        f"sampling) takes {trie['flower']['rollout_ms']:.1f} of the instrumented Flower steps' "
        f"{trie['flower']['step_ms']:.1f} ms."
    )
    return f"{header}\n\n" + "\n".join(lines) + f"\n\n{footer}"


LOAD_AT_START = os.getloadavg()[0]


def cpu_name() -> str:
    try:
        import cpuinfo  # py-cpuinfo, installed with pytest-benchmark

        return cpuinfo.get_cpu_info()["brand_raw"]
    except Exception:  # any failure: fall back to the architecture
        return platform.processor() or platform.machine()


def write_report(script: str, result: dict, table: Callable[[dict], str], argv, json_path) -> None:
    """The end of a standalone benchmark's run (this one's and the modules' that import it): the
    command line recorded in ``result`` (with the folder it ran in, where that is not the
    repository root: its paths are relative to it), its table printed, the JSON written where
    ``--json`` asked."""
    root = Path(__file__).resolve().parent.parent
    here = Path.cwd().resolve()
    script_path = os.path.relpath(root / "benchmarks" / script, here)
    prefix = "" if here == root else f"cd {os.path.relpath(here, root)} && "
    result["command"] = f"{prefix}python {script_path} " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(table(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (5)")
    parser.add_argument(
        "--instrumented",
        type=int,
        default=None,
        help="trie-timed steps per method after the timed ones (default: min(steps, 10))",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each replay (fastest)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args(argv)
    if arguments.steps < 1 or arguments.warmup < 0 or arguments.repeats < 1:
        parser.error("--steps and --repeats must be positive, --warmup not negative")
    instrumented = arguments.instrumented or min(arguments.steps, 10)
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(SEED)
    result = run_benchmark(arguments.steps, arguments.warmup, instrumented, arguments.repeats)
    write_report("bench_training_step.py", result, table, argv, arguments.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
