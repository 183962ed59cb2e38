"""Training (flower_rec.training): the objective's pieces, the losses going down, run folders,
resumption after a crash or a SIGKILL, validation and early stopping, the prompt cutoff, bad
configurations, LoRA, bf16 and 2-process DDP.

Everything runs a 1-layer, 32-wide Llama on a 60-item synthetic catalog, one thread (the CI
machines' 2 cores are shared; torch's default of 2 threads is slower there)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runs import (
    EARLY,
    FLOWER,
    Crash,
    Steps,
    assert_same_run,
    config,
    metric_lines,
    weights,
)
from runs import options as run_options
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from flower_ext import losses
from flower_rec.decoding import Catalog
from flower_rec.evaluate import evaluate
from flower_rec.loop import _stacked_logits, continuation_logits
from flower_rec.models import corpus, tiny_llama, train_tokenizer
from flower_rec.prompts import PromptCutoffError, build_prompt, encode, fit_prompts
from flower_rec.rewards import PopularityRewards
from flower_rec.training import (
    CONFIG_FILE,
    FlowerObjective,
    FlowerTrainer,
    RecommendationCollator,
    TrainConfigError,
    configs_from_options,
    encode_samples,
    train,
)


@pytest.fixture(scope="module")
def tokenizer(dataset):
    return train_tokenizer(corpus(dataset))


@pytest.fixture(scope="module")
def catalog(dataset, tokenizer) -> Catalog:
    return Catalog.from_titles(dataset.titles, tokenizer, build_prompt([]))


@pytest.fixture(scope="module")
def batch(dataset, tokenizer, catalog):
    encoded = encode_samples(dataset, "train", tokenizer, catalog)
    features = [
        {"sample_index": i, "prompt": encoded.prompts[i], "target": encoded.targets[i]}
        for i in range(0, 160, 10)
    ]
    return RecommendationCollator(tokenizer.pad_token_id)(features)


def new_model(tokenizer, layers=1, seed=0):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=layers, num_heads=2, seed=seed)


def objective(dataset, tokenizer, catalog, **options) -> FlowerObjective:
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    if options.get("method") == "flower":
        options.setdefault("rewards", PopularityRewards.from_dataset(dataset))
    return FlowerObjective(catalog, **options)


def fake_probabilities(num_samples: int, num_items: int, seed: int = 0) -> torch.Tensor:
    """A peaked p_u per sample, like a sequential recommender's softmax."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(num_samples, num_items, generator=generator), dim=1)


# -- the pieces -------------------------------------------------------------------------------


def test_collator_pads_prompts_left_and_targets_right(batch, tokenizer):
    pad = tokenizer.pad_token_id
    mask, ids = batch["attention_mask"], batch["input_ids"]
    assert (mask.sum(1) > 0).all() and (mask[:, -1] == 1).all()  # left padding
    assert (ids[mask == 0] == pad).all()
    steps = torch.arange(batch["target_ids"].shape[1])
    assert (batch["target_ids"][steps >= batch["target_lengths"][:, None]] == pad).all()
    assert batch["sample_index"].tolist() == list(range(0, 160, 10))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_teacher_forced_logits_equal_single_sequence_forwards(
    dataset, tokenizer, catalog, batch, implementation
):
    model = new_model(tokenizer, layers=2)
    model.set_attn_implementation(implementation)
    loss = objective(dataset, tokenizer, catalog)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    actions, lengths = loss.rollout(model, ids, mask, torch.Generator().manual_seed(0))
    continuations = [(batch["target_ids"], batch["target_lengths"]), (actions, lengths)]
    with torch.no_grad():
        packed = continuation_logits(model, ids, mask, continuations)
        stacked = _stacked_logits(model, model, ids, mask, continuations)
        for j, (tokens, token_lengths) in enumerate(continuations):
            for row in range(ids.shape[0]):
                prompt = ids[row][mask[row].bool()]
                sequence = torch.cat([prompt, tokens[row, : token_lengths[row]]])
                expected = model(sequence[None]).logits[0, len(prompt) - 1 :]
                states = int(token_lengths[row]) + 1
                torch.testing.assert_close(packed[j][row, :states], expected, atol=2e-5, rtol=0)
                torch.testing.assert_close(stacked[j][row, :states], expected, atol=2e-5, rtol=0)


def test_sft_term_is_the_cross_entropy_of_title_and_eos(dataset, tokenizer, catalog, batch):
    model = new_model(tokenizer)
    terms = objective(dataset, tokenizer, catalog)(model, batch)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            target = batch["target_ids"][row, : batch["target_lengths"][row]]
            labels = torch.cat([target, torch.tensor([tokenizer.eos_token_id])])
            logits = model(torch.cat([prompt, target])[None]).logits[0, len(prompt) - 1 :]
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
    assert terms.sft.item() == pytest.approx(total / count, rel=1e-5)
    assert terms.flow is None and terms.loss is terms.sft


def test_rollouts_are_catalog_items_ending_with_eos(dataset, tokenizer, catalog, batch):
    model = new_model(tokenizer)
    loss = objective(dataset, tokenizer, catalog)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    actions, lengths = loss.rollout(model, ids, mask, torch.Generator().manual_seed(1))
    sequences = {tuple(s) for s in catalog.item_tokens.sequences}
    eos = tokenizer.eos_token_id
    with_eos = torch.cat([actions, torch.full_like(actions[:, :1], eos)], dim=1)
    with_eos[torch.arange(len(lengths)), lengths] = eos
    nodes = loss.loss_trie.walk(with_eos, lengths + 1)
    leaves = nodes[torch.arange(len(lengths)), lengths]
    child_count = loss.loss_trie.child_ptr.diff()
    for row in range(len(lengths)):
        assert tuple(actions[row, : lengths[row]].tolist()) in sequences
        assert leaves[row] >= 0 and child_count[leaves[row]] == 0  # a leaf: item + EOS
    assert model.training  # the rollout restores the mode it found
    again, _ = loss.rollout(model, ids, mask, torch.Generator().manual_seed(1))
    assert torch.equal(actions, again)
    assert not any(
        torch.equal(actions, loss.rollout(model, ids, mask, torch.Generator().manual_seed(s))[0])
        for s in (2, 3)
    )


def test_personalised_flows_are_exact_per_sample(dataset, tokenizer, catalog, batch):
    p = fake_probabilities(len(dataset.train), dataset.num_items)
    loss = objective(
        dataset, tokenizer, catalog, method="flower", reward_variant="logp_div_s",
        probabilities=lambda index: p[index],
    )
    flows = loss.loss_trie.log_flows(loss.item_log_rewards(batch["sample_index"], torch.device("cpu")))
    assert flows.shape == (batch["input_ids"].shape[0], loss.loss_trie.num_nodes)
    rewards = loss.rewards.item_log_rewards("logp_div_s", p[batch["sample_index"]])
    torch.testing.assert_close(flows[:, 0], torch.logsumexp(rewards, dim=1))
    # An item with a title of its own: its leaf's flow is exactly its personalised reward.
    item = next(i for i, t in enumerate(dataset.titles) if dataset.titles.count(t) == 1)
    leaf = loss.loss_trie.item_node[item]
    torch.testing.assert_close(flows[:, leaf], rewards[:, item])


CASES = {
    "sft": {"method": "sft"},
    "flower-logp": {"method": "flower", "reward_variant": "logp"},
    "flower-logp_div_s": {"method": "flower", "reward_variant": "logp_div_s"},
    "flower-logp_add_logs": {"method": "flower", "reward_variant": "logp_add_logs"},
    "masked-p_div_pop": {"method": "flower", "reward_variant": "p_div_pop", "policy": "masked"},
    "flow_matching": {"method": "flower", "reward_variant": "logp", "flow_loss": "flow_matching"},
    "subtb-alone": {"method": "flower", "reward_variant": "logp_div_s", "theta": 0.0},
    "masked-subtb": {"method": "flower", "reward_variant": "logp_div_s", "policy": "masked"},
    "conservative-subtb": {"method": "flower", "reward_variant": "logp", "leakage_weight": 1.0},
    "off-policy-tempered": {"method": "flower", "reward_variant": "logp_div_s",
                            "off_policy_share": 0.5, "rollout_temperature": 2.0},
    "masked-flow-matching": {"method": "flower", "reward_variant": "logp",
                             "flow_loss": "flow_matching", "policy": "masked",
                             "leakage_weight": 0.5},
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_decreases_on_a_fixed_batch(dataset, tokenizer, catalog, batch, case):
    options = {"theta": 0.5, **CASES[case]}
    p = fake_probabilities(len(dataset.train), dataset.num_items)
    loss = objective(dataset, tokenizer, catalog, probabilities=lambda index: p[index], **options)
    model = new_model(tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def value(terms):
        return (terms.flow if options["theta"] == 0.0 else terms.loss).item()

    with torch.no_grad():
        before = value(loss(model, batch, seed=0))
    for step in range(30):
        terms = loss(model, batch, seed=step + 1)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = value(loss(model, batch, seed=0))
    assert after < 0.8 * before, (before, after)


FITTING = {
    "flow_matching": {"flow_loss": "flow_matching"},
    "flow_matching-p_div_pop": {"flow_loss": "flow_matching", "reward_variant": "p_div_pop"},
    "masked-subtb-off-policy": {"policy": "masked", "off_policy_share": 1.0},
    "masked-subtb-on-policy": {"policy": "masked"},
    "masked-subtb-mixed-p_div_pop": {"policy": "masked", "off_policy_share": 0.5,
                                     "reward_variant": "p_div_pop"},
}


@pytest.mark.parametrize("variant", list(FITTING))
def test_flow_objectives_alone_bring_items_out_in_proportion_to_their_reward(
    dataset, tokenizer, catalog, variant
):
    """The method's promise, end to end through the trie, the flows and the loss: trained on
    the flow term alone (theta = 0, popularity rewards, or the personalised p_div_pop of one
    sample's p_u), the model's trie-constrained item distribution for the prompt becomes R / Z
    (KL well below the untrained model's and below an SFT model trained alike). Flow matching
    over target paths that visit every trie state; the masked SubTB on trajectories drawn from
    R / Z, or from the model itself, or half and half."""
    from flower_rec.decoding import TrieDecoder

    prompt = encode_samples(dataset, "train", tokenizer, catalog).prompts[0]
    features = [
        {"sample_index": 0, "prompt": prompt, "target": list(sequence)}
        for sequence in catalog.item_tokens.sequences
    ]
    batch = RecommendationCollator(tokenizer.pad_token_id)(features)
    options = {"theta": 0.0, "reward_variant": "logp", **FITTING[variant]}
    p = fake_probabilities(len(dataset.train), dataset.num_items)
    p_u = {"probabilities": lambda index: p[index]}  # every row is sample 0's
    flows = objective(dataset, tokenizer, catalog, method="flower", **p_u, **options)
    log_rewards = flows.item_log_rewards(torch.tensor([0]), torch.device("cpu"))
    target = torch.softmax(log_rewards.double().reshape(-1, dataset.num_items)[0], dim=0)

    def divergence(model) -> float:  # KL(R/Z || model's item distribution)
        decoder = TrieDecoder(model.eval(), tokenizer, catalog, progress=False)
        log_q = decoder.exact_item_log_probs([prompt], normalize="trie").double()[0]
        return float((target * (target.log() - log_q)).sum())

    def trained(method: str) -> float:
        loss = objective(dataset, tokenizer, catalog, method=method, **p_u,
                         **(options if method == "flower" else {}))
        model = new_model(tokenizer, layers=2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(200):
            terms = loss(model, batch, seed=step)
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
        return divergence(model)

    untrained = divergence(new_model(tokenizer, layers=2))
    flower, sft = trained("flower"), trained("sft")
    assert flower < 0.15 * untrained and flower < 0.15 * sft, (untrained, flower, sft)


# -- runs -------------------------------------------------------------------------------------


def test_sft_run_folder_reloads_for_evaluation(data_dir, dataset, tmp_path):
    run = train(**config(data_dir, tmp_path / "run"))
    assert json.loads((run / CONFIG_FILE).read_text())["training"]["method"] == "sft"
    lines = metric_lines(run)
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4, 5, 6]
    assert all("sft" in line for line in lines if "loss" in line)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    evaluation = evaluate(model, tokenizer, dataset, limit=4, progress=False)
    assert len(evaluation.recommendations) == 4
    assert all(len(r) == 10 for r in evaluation.recommendations)


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(**config(data_dir, out, **FLOWER), callbacks=[Crash(5)])
    assert max(line["step"] for line in metric_lines(out)) == 4  # logs past the checkpoint
    session = Steps()
    assert train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[session]) == out
    assert session.steps == [4, 5, 6]  # from checkpoint-3
    assert_same_run(out, uninterrupted)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    values = run_options(data_dir, out, **FLOWER)
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from runs import Crash
        from flower_rec.training import configs_from_options, train
        model, data, args = configs_from_options(json.loads(sys.argv[1]))
        train(args, data, model, callbacks=[Crash(5, kill=True)])
        """
    )
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, where the source
    # folder flower_ext/ (no compiled module in a non-editable install) would shadow the package.
    process = subprocess.run(
        [sys.executable, "-c", script, json.dumps(values)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=tmp_path,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert (out / "checkpoint-3").is_dir()
    assert not (out / "model.safetensors").exists()
    session = Steps()
    train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[session])
    assert session.steps == [4, 5, 6]
    assert_same_run(out, uninterrupted)


def test_resume_without_a_checkpoint_starts_over(data_dir, tmp_path):
    out = tmp_path / "early"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(**config(data_dir, out, save_steps=100), callbacks=[Crash(2)])
    with pytest.warns(UserWarning, match="no checkpoint"):
        train(**config(data_dir, out, save_steps=100, resume=True))
    assert [line["step"] for line in metric_lines(out) if "loss" in line] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "options",
    [
        {"method": "flower", "reward": "logp_div_s"},
        {"method": "flower", "reward": "logp_add_logs", "flow_loss": "flow_matching"},
    ],
)
def test_personalised_runs_take_probabilities_from_a_file(data_dir, dataset, tmp_path, options):
    """Training p_u from one file, validation p_u from another; the validation loss and its
    parts are logged every eval_steps."""
    path, valid_path = tmp_path / "p.pt", tmp_path / "p_valid.pt"
    torch.save(fake_probabilities(len(dataset.train), dataset.num_items), path)
    torch.save(fake_probabilities(len(dataset.valid), dataset.num_items, seed=1), valid_path)
    run = train(**config(data_dir, tmp_path / "run", max_steps=2, aux_probabilities=str(path),
                       valid_aux_probabilities=str(valid_path), eval_steps=1, valid_limit=8,
                       **options))
    flow = options.get("flow_loss", "subtb")
    lines = [line for line in metric_lines(run) if "loss" in line]
    assert all(flow in line for line in lines)
    evals = [line for line in metric_lines(run) if "eval_loss" in line]
    assert [line["step"] for line in evals] == [1, 2]
    for line in evals:
        expected = 0.9995 * line["eval_sft"] + 0.0005 * line[f"eval_{flow}"]
        assert line["eval_loss"] == pytest.approx(expected, rel=1e-4)
    saved = json.loads((run / CONFIG_FILE).read_text())["data"]
    assert saved["aux_probabilities"] == str(path)
    assert saved["valid_aux_probabilities"] == str(valid_path)


def test_gradient_accumulation_and_tensorboard(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = train(**config(data_dir, tmp_path / "run", max_steps=2, gradient_accumulation_steps=2,
                       report_to=["tensorboard"], **FLOWER))
    lines = [line for line in metric_lines(run) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2]
    # 2 micro-batches of 8 per step: the loss is their mean, as are its parts.
    for line in lines:
        assert line["loss"] == pytest.approx(0.9 * line["sft"] + 0.1 * line["subtb"], rel=1e-4)
    assert list((run / "runs").rglob("events.out.tfevents.*"))  # the Trainer's own callback


def test_trainer_options_reach_the_trainer(data_dir, tmp_path):
    """Any TrainingArguments option: a constant schedule and activation (gradient)
    checkpointing, under which the on-policy rollout still samples with its KV cache."""
    checkpointing = ("activation_checkpointing" if "activation_checkpointing"
                     in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")
    options = {"lr_scheduler_type": "constant", checkpointing: True}
    run = train(**config(data_dir, tmp_path / "run", max_steps=3, warmup_steps=0,
                       learning_rate=1e-3, **options, **FLOWER))
    lines = [line for line in metric_lines(run) if "loss" in line]
    assert [line["learning_rate"] for line in lines] == [1e-3] * 3
    assert all(math.isfinite(line["subtb"]) for line in lines)
    saved = json.loads((run / "train_config.json").read_text())["training"]
    assert {name: saved[name] for name in options} == options


@pytest.mark.parametrize(
    "options, error, message",
    [({"gradient_checkpoint": True}, TrainConfigError,
      "unknown training option(s): 'gradient_checkpoint'"),
     ({"lr_scheduler_type": "no-such-schedule"}, ValueError, "no-such-schedule")],
)
def test_bad_trainer_options_fail_before_the_run_folder_is_made(data_dir, tmp_path, options,
                                                                error, message):
    out = tmp_path / "run"
    with pytest.raises(error) as raised:
        train(**config(data_dir, out, **options))
    assert message in str(raised.value) and not out.exists()


def test_fine_tunes_a_model_from_a_local_path(data_dir, tmp_path):
    base = train(**config(data_dir, tmp_path / "base", max_steps=1))
    run = train(**config(data_dir, tmp_path / "next", max_steps=2, model=str(base), **FLOWER))
    assert AutoTokenizer.from_pretrained(run).get_vocab() == AutoTokenizer.from_pretrained(
        base
    ).get_vocab()
    assert [line["step"] for line in metric_lines(run) if "loss" in line] == [1, 2]


def test_lora_run_saves_a_merged_model(data_dir, tmp_path):
    pytest.importorskip("peft")
    run = train(**config(data_dir, tmp_path / "lora", max_steps=2, lora=True, lora_r=4,
                       learning_rate=1e-2, **FLOWER))
    assert not (run / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(run)
    assert not any("lora" in name for name in model.state_dict())


def test_bf16_run(data_dir, tmp_path):
    run = train(**config(data_dir, tmp_path / "bf16", max_steps=2, bf16=True, **FLOWER))
    lines = [line for line in metric_lines(run) if "loss" in line]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)


def test_ddp_two_processes(data_dir, dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same code, 4 steps of flower."""
    out = tmp_path / "ddp"
    options = run_options(data_dir, out, max_steps=4, save_steps=2, eval_steps=2,
                          valid_limit=20, **FLOWER)
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\nfrom flower_rec.training import configs_from_options, train\n"
        "model, data, args = configs_from_options(json.loads(sys.argv[1]))\n"
        "train(args, data, model)\n"
    )
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not found")
    process = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), json.dumps(options)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    lines = [line for line in metric_lines(out) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all("subtb" in line for line in lines)
    evals = [line for line in metric_lines(out) if "eval_loss" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert all(math.isfinite(line["eval_subtb"]) for line in evals)
    # 2 processes x batch 8 samples per optimizer step.
    assert lines[-1]["epoch"] == pytest.approx(4 / math.ceil(len(dataset.train) / 16))
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("engine", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_on_policy_flower_refuses_sharded_engines(dataset, tokenizer, catalog, tmp_path, engine,
                                                  monkeypatch):
    """The rollout generates with the unwrapped module: under FSDP or DeepSpeed it would fail or
    sample from a partial model, so the trainer says so up front; SFT is let through."""
    from transformers import Trainer

    create = Trainer.create_accelerator_and_postprocess

    def sharded(self):
        create(self)
        setattr(self, engine, True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", sharded)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    flower = objective(dataset, tokenizer, catalog, method="flower", reward_variant="logp")
    with pytest.raises(ValueError, match="not under FSDP or DeepSpeed"):
        FlowerTrainer(model=new_model(tokenizer), args=args, objective=flower)
    sft = objective(dataset, tokenizer, catalog, method="sft")
    FlowerTrainer(model=new_model(tokenizer), args=args, objective=sft)


# -- validation and early stopping ------------------------------------------------------------


def test_validation_loss_is_reproducible_and_uses_the_validation_p_u(
    dataset, tokenizer, catalog, tmp_path
):
    """The Trainer's eval loop runs the objective on validation batches: the same loss at every
    evaluation of a model (the rollouts are seeded by the samples, not by the global RNG), its
    parts logged beside it, and the personalised rewards from the validation samples' p_u."""
    p_train = fake_probabilities(len(dataset.train), dataset.num_items)
    p_valid = fake_probabilities(len(dataset.valid), dataset.num_items, seed=1)
    loss = objective(dataset, tokenizer, catalog, method="flower", reward_variant="logp_div_s",
                     theta=0.5, probabilities=lambda index: p_train[index])
    encoded = encode_samples(dataset, "valid", tokenizer, catalog, limit=12)
    valid = [
        {"sample_index": i, "prompt": encoded.prompts[i], "target": encoded.targets[i]}
        for i in range(12)
    ]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             per_device_eval_batch_size=8, remove_unused_columns=False)
    options = {"model": new_model(tokenizer), "args": args, "eval_dataset": valid,
               "data_collator": RecommendationCollator(tokenizer.pad_token_id),
               "objective": loss}
    with pytest.raises(ValueError, match="needs eval_probabilities"):
        FlowerTrainer(**options)
    asked = []

    def valid_probabilities(index):
        asked.append(index.tolist())
        return p_valid[index]

    trainer = FlowerTrainer(**options, eval_probabilities=valid_probabilities)
    first = trainer.evaluate()
    assert asked == [list(range(8)), list(range(8, 12))]  # the validation samples' own rows
    torch.manual_seed(1234)  # a global RNG draw must not matter
    torch.rand(10)
    assert trainer.evaluate()["eval_loss"] == first["eval_loss"]
    # means over the samples (batches of 8 and 4), as the Trainer's eval_loss
    assert first["eval_loss"] == pytest.approx(
        0.5 * first["eval_sft"] + 0.5 * first["eval_subtb"], rel=1e-5
    )
    trainer.eval_probabilities = lambda index: p_train[index]  # other p_u: other rewards
    other = trainer.evaluate()
    assert other["eval_sft"] == first["eval_sft"] and other["eval_subtb"] != first["eval_subtb"]


class Evaluated(TrainerCallback):
    """The model's weights at every evaluation, by step."""

    def __init__(self):
        self.weights = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }


# SFT at a learning rate high enough for the validation loss to turn up within a few steps.



def eval_losses(run: Path) -> dict[int, float]:
    return {line["step"]: line["eval_loss"] for line in metric_lines(run) if "eval_loss" in line}


def assert_weights_equal(got: dict, expected: dict) -> None:
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_early_stopping_keeps_the_best_checkpoint(data_dir, tmp_path):
    """Training stops once eval_loss has not improved for `patience` evaluations, before
    max_steps, and the saved model is the one of the lowest eval_loss, not the last one. With
    save_steps = 3 x eval_steps the best evaluation need not fall on a periodic checkpoint."""
    evaluated = Evaluated()
    run = train(**config(data_dir, tmp_path / "run", save_steps=3, **EARLY), callbacks=[evaluated])
    losses = eval_losses(run)
    steps = sorted(losses)
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < EARLY["max_steps"]
    for line in metric_lines(run):
        if "eval_loss" in line:  # SFT: the loss is its SFT term
            assert line["eval_sft"] == pytest.approx(line["eval_loss"], abs=1e-5)
    best = min(steps, key=losses.get)
    patience = EARLY["early_stopping_patience"]
    assert best == steps[-1 - patience]  # stopped by patience: the last evaluations were worse
    assert all(losses[s] >= losses[best] for s in steps[-patience:])
    state = json.loads((run / f"checkpoint-{best}" / "trainer_state.json").read_text())
    assert state["best_global_step"] == best
    final = weights(run)
    assert_weights_equal(final, evaluated.weights[best])
    assert not all(torch.equal(final[k], v) for k, v in evaluated.weights[steps[-1]].items())


def test_validation_every_epoch_with_the_trainers_own_strategy(data_dir, dataset, tmp_path):
    """eval_strategy 'epoch' (a TrainingArguments option) instead of eval_steps: the validation
    set is built, evaluated at each epoch's end, and early stopping keeps the best epoch."""
    run = train(**config(data_dir, tmp_path / "run", max_steps=-1, num_train_epochs=2,
                         per_device_train_batch_size=64, eval_strategy="epoch",
                         save_strategy="epoch", valid_limit=8, early_stopping_patience=1))
    epoch = math.ceil(len(dataset.train) / 64)
    assert sorted(eval_losses(run)) == [epoch, 2 * epoch]


def test_resume_continues_the_early_stopping_count(data_dir, tmp_path):
    """A run killed at the last step of the uninterrupted run resumes from the checkpoint before,
    with its patience count (patience - 1 evaluations without improvement): it stops at the
    same step with the same best model."""
    whole = train(**config(data_dir, tmp_path / "whole", save_steps=1, **EARLY))
    last = max(eval_losses(whole))
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(**config(data_dir, out, save_steps=1, **EARLY), callbacks=[Crash(last)])
    session = Steps()
    train(**config(data_dir, out, save_steps=1, resume=True, **EARLY), callbacks=[session])
    assert session.steps == [last]  # a restarted count would not stop there
    assert_same_run(out, whole)


# -- the prompt cutoff -------------------------------------------------------------------------


def test_prompt_cutoff_drops_the_oldest_whole_titles(dataset, tokenizer, catalog):
    titles = dataset.titles
    histories = [[titles[i] for i in s.history] for s in dataset.train[:200]]

    def length(prompt: str) -> int:
        return len(encode(tokenizer, [prompt], add_special_tokens=True)[0])

    full = [length(build_prompt(h)) for h in histories]
    cutoff = sorted(full)[len(full) // 2]  # about half the prompts are too long
    assert sum(n > cutoff for n in full) >= 50
    prompts = fit_prompts(tokenizer, histories, cutoff)
    assert max(map(length, prompts)) <= cutoff
    for history, prompt, n in zip(histories, prompts, full, strict=True):
        if n <= cutoff:
            assert prompt == build_prompt(history)  # prompts that fit are left alone
            continue
        # the shortest cut that fits: whole titles dropped from the front, the newest kept
        kept = next(k for k in range(len(history)) if prompt == build_prompt(history[k:]))
        assert kept >= 1
        assert length(build_prompt(history[kept - 1 :])) > cutoff
    assert fit_prompts(tokenizer, histories, None) == [build_prompt(h) for h in histories]
    # training encodes the same prompts
    encoded = encode_samples(dataset, "train", tokenizer, catalog, max_prompt_tokens=cutoff,
                             limit=200)
    assert encoded.prompts == encode(tokenizer, prompts, add_special_tokens=True)

    bare = length(build_prompt([]))
    with pytest.raises(PromptCutoffError, match=f"cannot hold the prompt even without history "
                                                f"titles \\({bare} tokens\\)"):
        fit_prompts(tokenizer, histories, bare - 1)
    assert set(fit_prompts(tokenizer, histories, bare)) == {build_prompt([])}


def test_cli_validation_and_cutoff_flags(data_dir, dataset, tmp_path, capsys):
    """`flower-rec train` flags reach the configuration; --aux gives the validation samples their
    own p_u (an untrained SASRec is enough here)."""
    from flower_rec.auxiliary import SASRec, SASRecConfig, save_sasrec
    from flower_rec.cli import main

    flags = ("--eval-steps", "--valid-limit", "--early-stopping-patience", "--max-prompt-tokens")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in flags)

    aux = save_sasrec(SASRec(SASRecConfig(num_items=dataset.num_items)), tmp_path / "aux")
    options = tmp_path / "run.yaml"
    options.write_text("per_device_train_batch_size: 4\ndisable_tqdm: true\ntiny_hidden_size: 32\n"
                       "tiny_layers: 1\n"
                       "tiny_heads: 2\ntiny_vocab_size: 400\nlogging_steps: 1\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(options), "--data", str(data_dir), "--out", str(run),
                 "--method", "flower", "--aux", str(aux), "--max-steps", "2", "--save-steps", "1",
                 "--eval-steps", "1", "--valid-limit", "4", "--early-stopping-patience", "3",
                 "--max-prompt-tokens", "300"]) == 0
    saved = json.loads((run / CONFIG_FILE).read_text())
    training = saved["training"]
    assert (training["eval_steps"], training["valid_limit"], training["early_stopping_patience"],
            training["max_prompt_tokens"], training["per_device_train_batch_size"]) == (1, 4, 3, 300, 4)
    assert saved["data"]["aux"] == str(aux)
    evals = [line for line in metric_lines(run) if "eval_loss" in line]
    assert [line["step"] for line in evals] == [1, 2] and all("eval_subtb" in e for e in evals)
    # the evaluator takes the same cutoff
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data_dir), "--model", str(run), "--mode", "sample",
                 "--k", "1", "--limit", "2", "--max-prompt-tokens", "300", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["max_prompt_tokens"] == 300


# -- bad configurations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "rl"}, "unknown method 'rl'"),
        ({"method": "flower", "theta": 1.5}, r"theta must lie in \[0, 1\]"),
        ({"method": "flower", "reward": "logp_div_s"}, "needs aux_probabilities"),
        ({"reward": "popularity"}, "unknown reward"),
        ({"flow_loss": "tb"}, "unknown flow_loss"),
        ({"method": "flower", "policy": "greedy"}, "unknown policy 'greedy'"),
        ({"method": "flower", "leakage_weight": -1}, "leakage_weight must be a non-negative"),
        ({"method": "flower", "popularity_exponent": -1}, "popularity_exponent must be a non-neg"),
        ({"method": "flower", "reward": "p_div_pop", "rollout": "published"},
         "rollout 'published' is the released SubTB step alone"),
        ({"method": "flower", "off_policy_share": 1.2}, r"off_policy_share must lie in \[0, 1\]"),
        ({"rollout_temperature": 0}, "rollout_temperature must be a positive number"),
        ({"method": "flower", "reward": "logp", "rollout": "published", "policy": "masked"},
         "rollout 'published' is the released SubTB step alone"),
        ({"method": "flower", "reward": "logp", "reward_counts": "missing.json"},
         "reward_counts file"),
        ({"floor_count": 0}, "floor_count must be a positive number"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive "
                                              "integer"),
        ({"remove_unused_columns": True}, "remove_unused_columns must be false"),
        ({"method": "flower", "reward": "logp_div_s", "aux": "aux", "aux_probabilities": "p.pt"},
         "either as aux"),
        ({"domain": "books"}, "unknown domain"),
        ({"early_stopping_patience": 2}, "early_stopping_patience needs eval_steps, or "
                                         "eval_strategy 'epoch'"),
        ({"valid_limit": 10}, "valid_limit needs eval_steps"),
        ({"eval_steps": 0}, "eval_steps must be a positive integer or None, got 0"),
        ({"eval_steps": 1, "valid_limit": -5}, "valid_limit must be a positive integer"),
        ({"eval_steps": 1, "early_stopping_patience": 0}, "early_stopping_patience must be a"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens must be a positive integer"),
        ({"eval_steps": 2, "save_steps": 3, "early_stopping_patience": 1},
         r"save_steps \(3\) must be a multiple of eval_steps \(2\)"),
        ({"method": "flower", "reward": "logp_div_s", "aux_probabilities": "p.pt",
          "eval_steps": 2}, "needs valid_aux_probabilities"),
        ({"max_prompt_tokens": 8}, "max_prompt_tokens: a prompt cutoff of 8 tokens cannot hold"),
    ],
)
def test_bad_configs(data_dir, tmp_path, options, message):
    with pytest.raises(TrainConfigError, match=message):
        train(**config(data_dir, tmp_path / "run", **options))


def test_missing_data_folder(tmp_path):
    with pytest.raises(TrainConfigError, match="data folder .* does not exist"):
        train(**config(tmp_path / "nowhere", tmp_path / "run"))


def test_unknown_config_key():
    with pytest.raises(TrainConfigError, match="unknown training option.*'learning_rat'"):
        configs_from_options({"data": "d", "output_dir": "o", "learning_rat": 1e-3})
    with pytest.raises(TrainConfigError, match=r"'epochs' \(now num_train_epochs\)"):
        configs_from_options({"data": "d", "output_dir": "o", "epochs": 2})


def test_existing_run_needs_resume_and_the_same_config(data_dir, tmp_path):
    out = tmp_path / "run"
    train(**config(data_dir, out, max_steps=1))
    with pytest.raises(TrainConfigError, match="already holds a run"):
        train(**config(data_dir, out, max_steps=1))
    with pytest.raises(TrainConfigError, match=r"different configuration \(learning_rate"):
        train(**config(data_dir, out, max_steps=1, resume=True, learning_rate=1e-3))


def test_a_run_saved_before_an_option_existed_resumes_with_its_default(data_dir, tmp_path):
    """An older version wrote no key for a later option; the run used that option's default."""
    out = tmp_path / "run"
    train(**config(data_dir, out, max_steps=1))
    saved = json.loads((out / CONFIG_FILE).read_text())
    del saved["training"]["rollout"], saved["training"]["off_policy_share"]
    (out / CONFIG_FILE).write_text(json.dumps(saved))
    train(**config(data_dir, out, max_steps=1, resume=True))
    saved["training"]["off_policy_share"] = 0.5
    (out / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(TrainConfigError, match=r"different configuration \(off_policy_share"):
        train(**config(data_dir, out, max_steps=1, resume=True))


def test_probability_table_of_the_wrong_shape(data_dir, dataset, tmp_path):
    with pytest.raises(TrainConfigError, match="aux_probabilities has shape"):
        train(**config(data_dir, tmp_path / "run", method="flower",
                     aux_probabilities=torch.ones(3, dataset.num_items)))
    train_table = torch.ones(len(dataset.train), dataset.num_items)
    with pytest.raises(TrainConfigError, match=r"valid_aux_probabilities has shape .* \(valid sam"):
        train(**config(data_dir, tmp_path / "run", method="flower", aux_probabilities=train_table,
                     valid_aux_probabilities=train_table, eval_steps=2))


def test_off_policy_trajectories_need_no_model_rollout(dataset, tokenizer, catalog, batch,
                                                      monkeypatch):
    """With off_policy_share 1 every trajectory is drawn from R_u / Z_u (no rollout runs);
    with 0.5 the model rolls out the other rows only, and a seed repeats the draw."""
    p = fake_probabilities(len(dataset.train), dataset.num_items)
    options = dict(method="flower", reward_variant="logp_div_s", probabilities=lambda i: p[i])
    loss = objective(dataset, tokenizer, catalog, off_policy_share=1.0, **options)
    monkeypatch.setattr(loss, "_model_rollout", lambda *args: pytest.fail("rolled out"))
    model = new_model(tokenizer)
    rewards = loss.item_log_rewards(batch["sample_index"], torch.device("cpu"))
    sample = loss.trajectories(model, batch, rewards, torch.Generator().manual_seed(0))
    assert sample.lengths.shape == batch["sample_index"].shape
    assert torch.isfinite(loss(model, batch, seed=0).loss)

    half = objective(dataset, tokenizer, catalog, off_policy_share=0.5, **options)
    rolled = []
    original = half._model_rollout
    monkeypatch.setattr(half, "_model_rollout",
                        lambda model, ids, *rest: rolled.append(len(ids)) or original(model, ids, *rest))
    first = half.trajectories(model, batch, rewards, torch.Generator().manual_seed(3))
    again = half.trajectories(model, batch, rewards, torch.Generator().manual_seed(3))
    assert 0 < rolled[0] < len(batch["sample_index"])
    assert torch.equal(first.actions, again.actions)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"policy": "greedy"}, "unknown policy 'greedy'"),
        ({"leakage_weight": -0.5}, r"leakage_weight must lie in \[0.0, inf\]"),
        ({"off_policy_share": 1.5}, r"off_policy_share must lie in \[0.0, 1.0\]"),
        ({"rollout_temperature": 0.0}, "rollout_temperature must be a positive number"),
    ],
)
def test_objective_refuses_bad_variants(dataset, tokenizer, catalog, options, message):
    with pytest.raises(ValueError, match=message):
        objective(dataset, tokenizer, catalog, method="flower", reward_variant="logp", **options)


# -- the released rollout, for parity ---------------------------------------------------------


def published_flow(dataset, tokenizer):
    from flower_rec.prompts import build_prompt, item_token_sequences
    from flower_rec.training.published import PublishedFlow

    items = item_token_sequences(dataset.titles, tokenizer, build_prompt([]), termination="split")
    popularity = PopularityRewards.from_dataset(dataset).item_log_rewards("logp")
    return PublishedFlow(items, tokenizer.eos_token_id, popularity)


def test_published_rollout_forwards_each_step_on_the_previous_token_alone(dataset, tokenizer,
                                                                         batch):
    """The released rollout's logits: the first over the prompt right-padded with EOS (no mask),
    every later one over the previous token alone; with gradient; each row an item ending with
    the bare newline."""
    from flower_rec.training.published import published_rollout

    flow = published_flow(dataset, tokenizer)
    model = new_model(tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    trie = flow.trie(torch.device("cpu"))
    sample, logits = published_rollout(model, ids, mask, trie, flow.termination,
                                       tokenizer.eos_token_id, torch.Generator().manual_seed(0))
    assert logits.requires_grad and logits.shape[:2] == sample.path.shape
    with torch.no_grad():
        for row in range(ids.shape[0]):
            prompt = ids[row, mask[row].bool()]
            padded = torch.cat([prompt, prompt.new_full((ids.shape[1] - len(prompt),),
                                                        tokenizer.eos_token_id)])
            torch.testing.assert_close(logits[row, 0], model(padded[None]).logits[0, -1])
            length = int(sample.lengths[row])
            for step in range(1, length + 1):
                alone = model(sample.actions[row, step - 1].view(1, 1)).logits[0, -1]
                torch.testing.assert_close(logits[row, step], alone)
            item = sample.actions[row, :length].tolist() + [flow.termination]
            assert item in flow.items.sequences


def test_published_rewards_divide_the_path_by_the_scale(dataset, tokenizer):
    from flower_rec.training.published import published_state_log_rewards

    flow = published_flow(dataset, tokenizer)
    trie = flow.trie(torch.device("cpu"))
    flows = trie.log_flows(PopularityRewards.from_dataset(dataset).item_log_rewards("logp"))
    sequences = flow.items.sequences[:4]
    actions = torch.full((4, max(map(len, sequences))), flow.termination)
    for row, sequence in enumerate(sequences):
        actions[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
    lengths = torch.tensor([len(s) - 1 for s in sequences])
    path = losses.path_nodes(trie, actions, lengths)
    ours = losses.state_log_rewards(trie, flows, path, flow.termination)
    theirs = published_state_log_rewards(trie, flows, path, flow.termination, torch.ones(4))
    existing = torch.arange(path.shape[1]) <= lengths.unsqueeze(1)
    torch.testing.assert_close(theirs[existing], ours[existing])  # logp: the same rewards
    halved = published_state_log_rewards(trie, flows, path, flow.termination, torch.full((4,), 2.0))
    last = (torch.arange(4), lengths)
    torch.testing.assert_close(halved[last], ours[last] / 2)  # a complete title: all divided
    assert torch.all(halved[:, 0] == losses.INCOMPLETE_LOG_REWARD)  # the root: -15 undivided


def test_published_objective_trains_and_refuses_other_options(dataset, tokenizer, catalog, batch):
    p = fake_probabilities(len(dataset.train), dataset.num_items)
    loss = objective(dataset, tokenizer, catalog, method="flower", reward_variant="logp_div_s",
                     probabilities=lambda i: p[i], theta=0.5,
                     published=published_flow(dataset, tokenizer))
    model = new_model(tokenizer)
    terms = loss(model, batch, seed=0)
    terms.loss.backward()
    assert torch.isfinite(terms.flow) and terms.flow > 0
    assert all(torch.isfinite(w.grad).all() for w in model.parameters() if w.grad is not None)
    with pytest.raises(ValueError, match="the published rollout is the released SubTB step"):
        objective(dataset, tokenizer, catalog, method="flower", reward_variant="logp",
                  policy="masked", published=published_flow(dataset, tokenizer))


@pytest.mark.parametrize(
    "options",
    [{"rollout": "published"},
     {"policy": "masked", "leakage_weight": 0.5, "off_policy_share": 0.5,
      "rollout_temperature": 1.5}],
    ids=["published", "masked-conservative-mixed"],
)
def test_runs_with_the_new_objectives(data_dir, tmp_path, options):
    run = train(**config(data_dir, tmp_path / "run", method="flower", reward="logp", theta=0.5,
                       max_steps=2, save_steps=2, **options))
    lines = metric_lines(run)
    assert math.isfinite(lines[0]["subtb"]) and ("leakage" in lines[0]) == ("policy" in options)
