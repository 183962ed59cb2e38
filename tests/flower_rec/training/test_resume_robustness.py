"""Resumption that never strands a run: a kill at any moment of a checkpoint's or of the final
model's save resumes from the newest complete checkpoint to the uninterrupted run's weights and
metrics file, stopping exactly at max_steps; a moved run folder resumes; a damaged file the
trainer reads is named in a one-line error; the files it writes are replaced atomically.

The runs are runs.py's (a 1-layer, 32-wide Llama, one thread): 6 flower steps with
checkpoints at 3 and 6. A kill is simulated by leaving the run folder as the kill would (a file
cut short, the files after it never written), and done for real once, with SIGKILL in the middle
of a checkpoint file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

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
from transformers import TrainerCallback

from flower_rec.files import atomic_files
from flower_rec.training import (
    CONFIG_FILE,
    LEGACY_NAMES,
    METRICS_FILE,
    MetricsFileCallback,
    TrainConfigError,
    train,
)

# What the Trainer writes into a checkpoint, in its order (Trainer._save_checkpoint): the model,
# the optimizer, the schedule, the RNG state, the trainer state.
STATE_FILES = ["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt",
               "rng_state.pth", "trainer_state.json"]
# What the final save writes into the run folder after the last checkpoint.
FINAL_MODEL = ["config.json", "generation_config.json", "model.safetensors"]


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without_summary(run: Path) -> None:
    """Drops the metrics file's last line, the summary logged when training ends."""
    metrics = run / METRICS_FILE
    lines = metrics.read_text().splitlines()
    assert "train_runtime" in lines[-1]
    metrics.write_text("".join(f"{line}\n" for line in lines[:-1]))


def killed_while_writing(whole: Path, out: Path, file: str) -> Path:
    """``whole`` as a kill while checkpoint-6's ``file`` was being written leaves it: that file cut
    in half, the later ones not written, no final summary and no final model."""
    shutil.copytree(whole, out)
    checkpoint = out / "checkpoint-6"
    cut_in_half(checkpoint / file)
    for later in STATE_FILES[STATE_FILES.index(file) + 1 :]:
        (checkpoint / later).unlink()
    without_summary(out)
    for name in FINAL_MODEL:
        (out / name).unlink()
    return out


class StartStep(TrainerCallback):
    """Records the step a session starts from, then stops it before any step."""

    def on_train_begin(self, args, state, control, **kwargs):
        raise RuntimeError(f"starts from step {state.global_step}")


def start_step(data_dir: Path, out: Path) -> int:
    with pytest.raises(RuntimeError, match="starts from step") as error:
        train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[StartStep()])
    return int(str(error.value).rsplit(" ", 1)[1])


@pytest.mark.parametrize("file", STATE_FILES)
def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_one_before(
    data_dir, tmp_path, uninterrupted, file
):
    out = killed_while_writing(uninterrupted, tmp_path / "killed", file)
    session = Steps()
    with pytest.warns(UserWarning, match=f"passing over the incomplete checkpoint-6: .*/{file}: "):
        train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[session])
    assert session.steps == [4, 5, 6]
    assert (out / "checkpoint-6" / "trainer_state.json").exists()  # rewritten
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("file", STATE_FILES)
def test_a_checkpoint_missing_any_state_file_is_passed_over(data_dir, tmp_path, uninterrupted,
                                                            file):
    """Without scheduler.pt the Trainer would load neither schedule nor optimizer, without
    rng_state.pth other random numbers, and resume silently to other weights."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "checkpoint-6" / file).unlink()
    with pytest.warns(UserWarning, match=f"checkpoint-6/{file}: no such file"):
        assert start_step(data_dir, out) == 3


def test_without_a_complete_checkpoint_the_run_starts_over(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for step in (3, 6):
        cut_in_half(out / f"checkpoint-{step}" / "trainer_state.json")
    with pytest.warns(UserWarning) as warned:
        assert start_step(data_dir, out) == 0
    messages = [str(w.message) for w in warned]
    assert any("passing over the incomplete checkpoint-6" in m for m in messages)
    assert any("passing over the incomplete checkpoint-3" in m for m in messages)
    assert any("no checkpoint to resume from" in m for m in messages)


@pytest.mark.parametrize("summary", ["logged", "not yet logged"])
def test_a_kill_during_the_final_save_resumes_to_no_step(data_dir, tmp_path, uninterrupted,
                                                         summary):
    """The last checkpoint is the last step: the resumed run trains no further (the Trainer
    alone would take a 7th step), logs the summary once and saves the same final model."""
    out = tmp_path / "killed"
    shutil.copytree(uninterrupted, out)
    for name in FINAL_MODEL:
        (out / name).unlink()
    if summary == "not yet logged":
        without_summary(out)
    session = Steps()
    train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[session])
    assert session.steps == []
    assert_same_run(out, uninterrupted)


KILLED_WRITING_OPTIMIZER = textwrap.dedent(
    """
    import io, json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from flower_rec.training import configs_from_options, train

    save = torch.save

    def save_or_die_halfway(obj, path, *args, **kwargs):
        # SIGKILL in the middle of writing checkpoint-6's optimizer state.
        if str(path).endswith(os.path.join("checkpoint-6", "optimizer.pt")):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as handle:
                handle.write(buffer.getbuffer()[: buffer.tell() // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, path, *args, **kwargs)

    torch.save = save_or_die_halfway
    model, data, args = configs_from_options(json.loads(sys.argv[1]))
    train(args, data, model)
    """
)


def test_sigkill_in_the_middle_of_a_checkpoint_file(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    options = run_options(data_dir, out, **FLOWER)
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path (see test_train).
    process = subprocess.run(
        [sys.executable, "-c", KILLED_WRITING_OPTIMIZER, json.dumps(options)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        cwd=tmp_path,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    partial = out / "checkpoint-6"
    assert (partial / "optimizer.pt").exists() and not (partial / "trainer_state.json").exists()
    session = Steps()
    with pytest.warns(UserWarning, match="checkpoint-6/optimizer.pt: File is not a zip file"):
        train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[session])
    assert session.steps == [4, 5, 6]
    assert_same_run(out, uninterrupted)


# -- moved run folders --------------------------------------------------------------------------


def test_a_moved_run_folder_resumes(data_dir, tmp_path, uninterrupted):
    before = tmp_path / "before"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(**config(data_dir, before, **FLOWER), callbacks=[Crash(5)])
    after = before.rename(tmp_path / "after")
    session = Steps()
    train(**config(data_dir, after, resume=True, **FLOWER), callbacks=[session])
    assert session.steps == [4, 5, 6]
    assert json.loads((after / CONFIG_FILE).read_text())["training"]["output_dir"] == str(after)
    assert_same_run(after, uninterrupted)


# The flat configuration before FlowerConfig, by its names (LEGACY_NAMES maps the renamed ones).
FLAT_OPTIONS = (
    "data", "out", "method", "model", "tiny_hidden_size", "tiny_layers", "tiny_heads",
    "tiny_vocab_size", "lora", "lora_r", "lora_alpha", "lora_dropout", "bf16", "theta", "reward",
    "flow_loss", "policy", "leakage_weight", "off_policy_share", "rollout_temperature", "rollout",
    "reward_counts", "floor_count", "aux_probabilities", "valid_aux_probabilities", "domain",
    "max_prompt_tokens", "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm",
    "epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "save_steps",
    "save_total_limit", "logging_steps", "eval_steps", "valid_limit", "early_stopping_patience",
    "seed", "resume",
)


def test_a_run_made_before_flower_config_resumes(data_dir, tmp_path, uninterrupted):
    """A run folder of the version before FlowerConfig: a flat train_config.json (old names,
    lora_target_modules a string, trainer_options) and its checkpoints in RUN/checkpoints/. It
    resumes from there to the uninterrupted run, and a changed option is still refused."""
    out = tmp_path / "old"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(**config(data_dir, out, **FLOWER), callbacks=[Crash(5)])
    (out / "checkpoints").mkdir()
    (out / "checkpoint-3").rename(out / "checkpoints" / "checkpoint-3")
    sections = json.loads((out / CONFIG_FILE).read_text())
    options = {**sections["model"], **sections["data"], **sections["training"]}
    flat = {name: options[LEGACY_NAMES.get(name, name)] for name in FLAT_OPTIONS}
    flat.update(lora_target_modules="all-linear", progress=False, tensorboard=False,
                trainer_options={"lr_scheduler_type": "linear"})
    (out / CONFIG_FILE).write_text(json.dumps(flat))
    with pytest.raises(TrainConfigError, match=r"different configuration \(theta: 0.9 -> 0.8\)"):
        train(**config(data_dir, out, resume=True, **{**FLOWER, "theta": 0.8}))
    session = Steps()
    train(**config(data_dir, out, resume=True, **FLOWER), callbacks=[session])
    assert session.steps == [4, 5, 6]
    assert_same_run(out, uninterrupted)


def test_a_moved_early_stopped_run_keeps_its_best_checkpoint(data_dir, tmp_path):
    """Killed during the final save of a run that early stopping ended, then moved: the resumed
    run takes no step and restores the best checkpoint from the folder it is now in (the saved
    state names the old folder)."""
    before = train(**config(data_dir, tmp_path / "before", save_steps=1, **EARLY))
    best_weights, lines = weights(before), metric_lines(before)
    for name in FINAL_MODEL:
        (before / name).unlink()
    after = before.rename(tmp_path / "after")
    session = Steps()
    train(**config(data_dir, after, save_steps=1, resume=True, **EARLY), callbacks=[session])
    assert session.steps == []
    assert metric_lines(after) == lines
    for name, tensor in weights(after).items():
        torch.testing.assert_close(tensor, best_weights[name], rtol=0, atol=0)


# -- damaged files are named ----------------------------------------------------------------------


def test_a_damaged_saved_configuration_or_tokenizer_is_named(data_dir, tmp_path, uninterrupted):
    for damaged in (CONFIG_FILE, "tokenizer.json"):
        out = tmp_path / damaged
        shutil.copytree(uninterrupted, out)
        cut_in_half(out / damaged)
        with pytest.raises(ValueError) as error:
            train(**config(data_dir, out, resume=True, **FLOWER))
        message = str(error.value)
        assert "\n" not in message
        assert (f"{out / damaged}: " if damaged == CONFIG_FILE
                else f"the tokenizer saved in {out}: ") in message


def test_a_damaged_probability_file_is_named(data_dir, dataset, tmp_path):
    path = tmp_path / "p.pt"
    torch.save(torch.ones(len(dataset.train), dataset.num_items), path)
    cut_in_half(path)
    with pytest.raises(ValueError, match=f"^{path}: "):
        train(**config(data_dir, tmp_path / "run", method="flower", aux_probabilities=str(path)))


def fake_state(step: int) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=True, global_step=step)


def test_a_damaged_metrics_line_is_named(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"^{path}, line 2: Unterminated string"):
        MetricsFileCallback(path).on_train_begin(None, fake_state(3), None)


# -- atomic writes --------------------------------------------------------------------------------


def test_the_metrics_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A log is written as a new file moved over the old one: when the writing fails (or the
    process dies) before the move, the file holds every earlier line and no part of the new."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
                    '{"step": 3, "train_runtime": 1.0}\n')
    callback = MetricsFileCallback(path)
    callback.on_train_begin(None, fake_state(1), None)  # resumed from step 1
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n'
    callback.on_log(None, fake_state(2), None, logs={"loss": 2.0})
    before = path.read_text()

    def die(*args):
        raise KeyboardInterrupt  # a signal arriving as the file is moved into place

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        callback.on_log(None, fake_state(3), None, logs={"loss": 1.0})
    assert path.read_text() == before == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary left


def test_a_folder_save_replaces_each_file_whole(tmp_path):
    (tmp_path / "model.safetensors").write_text("old weights")
    (tmp_path / "config.json").write_text("old config")
    with pytest.raises(RuntimeError), atomic_files(tmp_path) as staging:
        (staging / "config.json").write_text("new config")
        raise RuntimeError("killed while writing the weights")
    assert (tmp_path / "config.json").read_text() == "old config"
    with atomic_files(tmp_path) as staging:
        (staging / "config.json").write_text("new config")
        (staging / "model.safetensors").write_text("new weights")
    assert (tmp_path / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
