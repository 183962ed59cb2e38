"""The flower-rec command line, end to end on a small synthetic dataset and a tiny model."""

import dataclasses
import importlib.metadata
import inspect
import json

import pytest

import flower_ext
from flower_rec import training
from flower_rec.auxiliary import train_sasrec
from flower_rec.cli import build_parser, main
from flower_rec.cli_options import config_from_args, docstring_args, options_from_args
from flower_rec.data import load_dataset, prepare_amazon, prepare_movielens, prepare_synthetic
from flower_rec.demo import DemoConfig
from flower_rec.evaluate import evaluate
from flower_rec.rq1 import RQ1Config
from flower_rec.screen import screen
from flower_rec.stats import dataset_stats
from flower_rec.training import CONFIG_CLASSES, FlowerConfig

#: The commands whose options come from the function they call, each with its required flags.
FUNCTION_COMMANDS = [
    (["evaluate", "--data", "d", "--model", "m", "--out", "o"], evaluate),
    (["train-aux", "--data", "d", "--out", "o"], train_sasrec),
    (["screen", "--data", "d"], screen),
    (["stats", "--data", "d"], dataset_stats),
    (["prepare", "amazon", "--reviews", "r", "--meta", "m", "--out", "o"], prepare_amazon),
    (["prepare", "movielens", "--path", "p", "--out", "o"], prepare_movielens),
    (["prepare", "synthetic", "--out", "o"], prepare_synthetic),
]


def test_stats_json(dataset_dir, capsys):
    assert main(["stats", "--data", str(dataset_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == len(load_dataset(dataset_dir).titles)
    assert len(stats["groups"]["GH"]) == 8 and sum(stats["groups"]["GH"]) == pytest.approx(1)


@pytest.mark.parametrize("mode", ["beam", "sampled-top-k"])
def test_evaluate_writes_metrics_recommendations_and_plot(dataset_dir, model_dir, tmp_path, mode):
    out = tmp_path / mode
    args = ["evaluate", "--data", str(dataset_dir), "--model", str(model_dir), "--limit", "6",
            "--k", "5", "--mode", mode, "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert report["config"]["mode"] == mode
    assert metrics["num_samples"] == 6 and metrics["invalid_outputs"] == 0
    for name in ("HR@10", "NDCG@10", "MGU", "type_token_ratio"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert 0.0 <= metrics["DGU"] <= 2.0 and metrics["word_entropy"] > 0.0
    assert sum(metrics["GP"]) + metrics["GP_outside"] == pytest.approx(1.0)
    titles = set(load_dataset(dataset_dir).titles)
    lines = [json.loads(line) for line in (out / "recommendations.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert all(len(row["recommended"]) == 5 and set(row["recommended"]) <= titles for row in lines)
    assert all(len(set(row["recommended"])) == 5 for row in lines)
    assert (out / "groups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["stats", "--data", str(tmp_path / "missing")]) == 2
    assert "not a dataset folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, problem",
    [("{not json", "Expecting property name"), ("[1, 2]", "not a JSON object {title: count}")],
)
@pytest.mark.parametrize("option", ["--guidance-prior", "--target-distribution"])
def test_evaluate_names_a_bad_json_file(dataset_dir, tmp_path, capsys, option, content, problem):
    bad = tmp_path / "counts.json"
    bad.write_text(content)
    argv = ["evaluate", "--data", str(dataset_dir), "--model", str(tmp_path / "no-model"),
            "--out", str(tmp_path / "out"), option, str(bad)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{bad}: " in error and problem in error and "Traceback" not in error


@pytest.mark.parametrize(
    "option, value, problem",
    [("--limit", "-2", "limit must be a positive integer"),
     ("--limit", "0", "limit must be a positive integer"),
     ("--temperature", "nan", "temperature must be a positive number"),
     ("--guidance", "auto", "guidance 'auto' chooses beta for beam search")],
)
def test_evaluate_checks_its_options_before_loading_anything(tmp_path, capsys, option, value,
                                                             problem):
    """Neither the dataset nor the model exists: the bad option is what the error names."""
    argv = ["evaluate", "--data", str(tmp_path / "no-data"), "--model", str(tmp_path / "no-model"),
            "--out", str(tmp_path / "out"), "--mode", "sample", option, value]
    assert main(argv) == 2
    assert problem in capsys.readouterr().err


def test_version_is_the_installed_wheel_s(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    version = importlib.metadata.version("flower-ext")
    assert capsys.readouterr().out.strip() == f"flower-rec {version}"
    assert flower_ext.__version__ == version


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    commands = ("prepare", "stats", "evaluate", "train", "demo", "rq1", "screen", "train-aux")
    assert all(command in help_text for command in commands)


def test_train_from_yaml_with_overrides_then_evaluate(dataset_dir, tmp_path):
    """`train` reads a YAML config, flags override it, and the run folder evaluates offline."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {dataset_dir}\nmethod: sft\nmax_steps: 50\nper_device_train_batch_size: 4\n"
        "disable_tqdm: true\n"
        "tiny_hidden_size: 32\ntiny_layers: 1\ntiny_heads: 2\ntiny_vocab_size: 400\n"
    )
    run = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(run), "--method", "flower",
            "--reward", "logp", "--max-steps", "2", "--save-steps", "1"]
    assert main(args) == 0
    saved = json.loads((run / "train_config.json").read_text())["training"]
    assert (saved["method"], saved["max_steps"], saved["per_device_train_batch_size"]) == \
        ("flower", 2, 4)
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1

    out = tmp_path / "eval"
    target = tmp_path / "target.json"
    titles = load_dataset(dataset_dir).titles
    target.write_text(json.dumps({titles[0]: 3, titles[1]: 1}))
    assert main(["evaluate", "--data", str(dataset_dir), "--model", str(run), "--mode", "sample",
                 "--k", "1", "--limit", "4", "--target-distribution", str(target),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["invalid_outputs"] == 0 and metrics["JS"] >= 0.0


def test_train_rejects_bad_configuration(dataset_dir, tmp_path, capsys):
    args = ["train", "--data", str(dataset_dir), "--out", str(tmp_path / "run"), "--theta", "2"]
    assert main(args) == 2
    assert "theta" in capsys.readouterr().err


@pytest.mark.parametrize("config", [DemoConfig, RQ1Config])
def test_every_option_has_its_help_in_the_docstring(config):
    helps = docstring_args(config)
    assert [f.name for f in dataclasses.fields(config) if not helps.get(f.name)] == []


@pytest.mark.parametrize("config", CONFIG_CLASSES)
def test_every_training_option_has_its_help(config):
    assert [f.name for f in dataclasses.fields(config) if not f.metadata.get("help")] == []


@pytest.mark.parametrize("function", [function for _, function in FUNCTION_COMMANDS])
def test_every_parameter_has_its_help_in_the_docstring(function):
    helps = docstring_args(function)
    assert [name for name in inspect.signature(function).parameters if not helps.get(name)] == []


@pytest.mark.parametrize("argv, function", FUNCTION_COMMANDS)
def test_function_options_default_to_the_function_defaults(argv, function):
    """Every option not given on the command line is the function's default."""
    options = options_from_args(function, build_parser().parse_args(argv))
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(function).parameters.items()
                if parameter.default is not parameter.empty}
    given = {name: value for name, value in options.items()
             if name in defaults and "--" + name.replace("_", "-") not in argv}
    assert len(given) >= 2 and given == {name: defaults[name] for name in given}


def test_train_aux_keeps_its_include_history_flag():
    parser = build_parser()
    assert parser.parse_args(["train-aux", "--data", "d", "--out", "o"]).exclude_history
    for flag in ("--include-history", "--no-exclude-history"):
        args = parser.parse_args(["train-aux", "--data", "d", "--out", "o", flag])
        assert args.exclude_history is False


def test_options_default_to_the_configuration_defaults():
    parser = build_parser()
    assert config_from_args(DemoConfig, parser.parse_args(["demo"])) == DemoConfig()
    args = parser.parse_args(["rq1", "--data", "d", "--out", "o"])
    assert config_from_args(RQ1Config, args) == RQ1Config("d", "o")


def test_train_help_lists_the_method_before_the_trainer(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    headings = [line for line in text.splitlines() if line.startswith("the ")]
    assert [heading.split(" (")[0].rstrip(":") for heading in headings] == \
        ["the model", "the data", "the method", "the Trainer"]
    method = text[text.index("the method"):text.index("the Trainer")]
    assert "--popularity-exponent" in method and "--per-device-train-batch-size" not in method
    assert "samples per device per forward (default: 16)" in text


def test_train_flags_and_their_old_names_reach_the_configuration(monkeypatch, capsys):
    """`flower-rec train` takes every FlowerConfig option (TrainingArguments' own included) and
    the flags of before (--out, --epochs, --batch-size, --lr); options not given keep
    FlowerConfig's defaults."""
    seen = {}
    monkeypatch.setattr(training, "train", lambda args, data, model: seen.update(
        args=args, data=data, model=model) or args.output_dir)
    assert main(["train", "--data", "d", "--out", "o", "--lr", "0.1", "--epochs", "2",
                 "--batch-size", "4", "--max-steps", "3", "--optim", "sgd", "--method", "flower",
                 "--lora", "--lora-target-modules", "q_proj", "v_proj"]) == 0
    assert capsys.readouterr().out == "wrote o\n"
    args, data, model = seen["args"], seen["data"], seen["model"]
    assert (args.output_dir, args.learning_rate, args.num_train_epochs,
            args.per_device_train_batch_size, args.max_steps, args.optim, args.method) == \
        ("o", 0.1, 2.0, 4, 3, "sgd", "flower")
    assert (data.data, model.lora, model.lora_target_modules) == ("d", True, ["q_proj", "v_proj"])
    defaults = FlowerConfig(output_dir="o")
    for name in ("theta", "reward", "warmup_steps", "logging_steps", "save_steps", "seed",
                 "save_total_limit", "report_to", "remove_unused_columns"):
        assert getattr(args, name) == getattr(defaults, name), name
