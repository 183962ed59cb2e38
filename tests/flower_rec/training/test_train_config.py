"""The training configuration's validator (ModelArguments, DataArguments and FlowerConfig as
they are made, configs_from_options, and `flower-rec train`'s YAML and flags): every bad value of
every option is refused before any work, with a one-line message naming the option; YAML
mistakes name the file.

No training runs here: every case fails (or passes the field checks) in milliseconds."""

import dataclasses
import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import TrainingArguments

from flower_rec.cli import main
from flower_rec.config_checks import field_default, first_problem
from flower_rec.training import (
    CONFIG_CLASSES,
    FIELD_RULES,
    METHOD_OPTIONS,
    TrainConfigError,
    configs_from_options,
    train,
)
from flower_rec.training.config import OPTION_DEFAULTS

# The options by the kind of value they take (the specification the validator is tested
# against, written out independently of FIELD_RULES).
COUNTS = ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_vocab_size", "lora_r",
          "per_device_train_batch_size", "per_device_eval_batch_size",
          "gradient_accumulation_steps", "save_steps", "logging_steps")
OPTIONAL_COUNTS = ("max_prompt_tokens", "save_total_limit", "eval_steps", "valid_limit",
                   "early_stopping_patience")
POSITIVE_NUMBERS = ("learning_rate", "floor_count", "lora_alpha", "rollout_temperature")
NON_NEGATIVE_NUMBERS = ("weight_decay", "max_grad_norm", "num_train_epochs", "leakage_weight",
                        "popularity_exponent")
BOOLEANS = ("lora", "bf16", "resume")
CHOICES = {"method": ("sft", "flower"),
           "reward": ("logp", "logp_div_s", "logp_add_logs", "p_div_pop"),
           "flow_loss": ("subtb", "flow_matching"), "policy": ("full", "masked"),
           "rollout": ("ours", "published"),
           "domain": ("items", "movies", "video_games", "cds")}
PATHS = ("data", "output_dir")
OPTIONAL_PATHS = ("model", "reward_counts", "aux")

INT64_MAX = 2**63 - 1
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf]) | st.integers(min_value=2**1024)
# Values that are no number at all: YAML strings ("3e-4" in YAML 1.1, "false"), booleans
# (True is an int to Python), lists, mappings.
NOT_NUMBERS = (st.text(max_size=6) | st.booleans() | st.lists(st.integers(), max_size=2)
               | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
NOT_INTEGERS = NOT_NUMBERS | st.floats() | NON_FINITE | st.integers(min_value=INT64_MAX + 1)


def bad_values(name: str) -> st.SearchStrategy:
    """Values option ``name`` must refuse."""
    if name in COUNTS or name in OPTIONAL_COUNTS:
        bad = NOT_INTEGERS | st.integers(max_value=0)
        return bad | st.none() if name in COUNTS else bad
    if name == "warmup_steps":
        return NOT_INTEGERS | st.integers(max_value=-1) | st.none()
    if name == "max_steps":
        return NOT_INTEGERS | st.integers(max_value=-2) | st.just(0) | st.none()
    if name == "seed":
        return NOT_INTEGERS | st.integers(max_value=-1) | st.integers(min_value=2**32) | st.none()
    if name in POSITIVE_NUMBERS:
        return (NOT_NUMBERS | NON_FINITE | st.floats(max_value=0.0) | st.integers(max_value=0)
                | st.none())
    if name in NON_NEGATIVE_NUMBERS:
        return (NOT_NUMBERS | NON_FINITE | st.floats(max_value=-1e-300)
                | st.integers(max_value=-1) | st.none())
    if name in ("theta", "off_policy_share"):
        return NOT_NUMBERS | NON_FINITE | st.floats().filter(lambda x: not 0 <= x <= 1)
    if name == "lora_dropout":
        return NOT_NUMBERS | NON_FINITE | st.floats().filter(lambda x: not 0 <= x < 1)
    if name in BOOLEANS:
        return (st.sampled_from(["false", "true", "no", "yes", "", "0"]) | st.integers()
                | st.floats() | st.none() | st.lists(st.booleans(), max_size=2))
    if name in CHOICES:
        other_text = st.text(max_size=8).filter(lambda text: text not in CHOICES[name])
        return other_text | st.integers() | st.none() | st.lists(st.sampled_from(CHOICES[name]))
    if name in PATHS or name in OPTIONAL_PATHS:
        bad = st.integers() | st.just("") | st.booleans() | st.lists(st.text(), max_size=2)
        return bad | st.none() if name in PATHS else bad
    if name == "remove_unused_columns":  # the Trainer would drop the collator's tensors
        return st.just(True) | st.sampled_from(["false", 0, None])
    if name == "lora_target_modules":
        return (st.integers() | st.none() | st.text(max_size=5) | st.just([])
                | st.lists(st.integers(), min_size=1, max_size=2))
    raise AssertionError(f"no bad values written down for {name}")


def good_values(name: str) -> st.SearchStrategy:
    """Values option ``name`` must accept (the field checks alone; the rules between fields,
    such as eval_steps before valid_limit, are tested in tests/test_train.py)."""
    finite = {"allow_nan": False, "allow_infinity": False}
    if name in COUNTS:
        return st.integers(1, INT64_MAX)
    if name in OPTIONAL_COUNTS:
        return st.none() | st.integers(1, INT64_MAX)
    if name == "warmup_steps":
        return st.integers(0, INT64_MAX)
    if name == "max_steps":
        return st.just(-1) | st.integers(1, INT64_MAX)
    if name == "seed":
        return st.integers(0, 2**32 - 1)
    if name in POSITIVE_NUMBERS:
        return st.floats(min_value=1e-300, **finite) | st.integers(1, 2**1000)
    if name in NON_NEGATIVE_NUMBERS:
        return st.floats(min_value=0.0, **finite) | st.integers(0, 2**1000)
    if name in ("theta", "off_policy_share"):
        return st.floats(0.0, 1.0) | st.sampled_from([0, 1])
    if name == "lora_dropout":
        return st.floats(0.0, 1.0, exclude_max=True)
    if name in BOOLEANS:
        return st.booleans()
    if name in CHOICES:
        return st.sampled_from(CHOICES[name])
    if name in PATHS:
        return st.text(min_size=1, max_size=10) | st.builds(Path, st.text(min_size=1, max_size=5))
    if name in OPTIONAL_PATHS:
        return st.none() | st.text(min_size=1, max_size=10)
    if name == "lora_target_modules":
        return st.lists(st.text(max_size=5), min_size=1, max_size=3)
    if name == "remove_unused_columns":
        return st.just(False)
    raise AssertionError(f"no good values written down for {name}")


FIELDS = list(FIELD_RULES)
OPTIONS = {field.name for cls in CONFIG_CLASSES for field in dataclasses.fields(cls)}
INHERITED = set(TrainingArguments.__dataclass_fields__)


def test_every_option_of_ours_has_a_rule():
    """Every option of ModelArguments and DataArguments, and every one FlowerConfig adds to
    TrainingArguments, has a rule; the rules name options only."""
    ours = {field.name for cls in CONFIG_CLASSES for field in dataclasses.fields(cls)
            if field.name not in INHERITED}
    assert ours <= set(FIELD_RULES) <= OPTIONS


def assert_names_the_option(message: str, name: str) -> None:
    assert message.startswith((f"{name} must ", f"unknown {name} ")), message
    assert "\n" not in message and len(message) < 300, message


@given(st.sampled_from(FIELDS).flatmap(lambda name: st.tuples(st.just(name), bad_values(name))))
def test_every_bad_value_of_every_option_is_refused_by_name(case):
    name, value = case
    with pytest.raises(TrainConfigError) as error:
        configs_from_options({"data": "data", "output_dir": "run", name: value})
    assert_names_the_option(str(error.value), name)


@given(st.fixed_dictionaries({name: good_values(name) for name in FIELDS}))
def test_good_values_pass_the_field_checks(values):
    assert first_problem(values, FIELD_RULES) is None


@pytest.mark.parametrize(
    ("option", "value"),
    [("learning_rate", math.inf), ("max_grad_norm", math.nan), ("weight_decay", math.nan),
     ("num_train_epochs", math.inf), ("per_device_train_batch_size", -3), ("max_steps", -5),
     ("resume", "false")],
)
def test_bad_values_fail_before_the_run_folder_is_made(tmp_path, option, value):
    out = tmp_path / "run"
    with pytest.raises(TrainConfigError, match=f"^{option} must "):
        model, data, args = configs_from_options(
            {"data": str(tmp_path), "output_dir": str(out), option: value}
        )
        train(args, data, model)
    assert not out.exists()


def test_missing_options_and_unknown_ones():
    with pytest.raises(TrainConfigError, match=r"missing training option\(s\): data \(--data\), "
                                               r"output_dir \(--out\)"):
        configs_from_options({"method": "sft"})
    with pytest.raises(TrainConfigError, match="unknown training option.*'learning_rat'"):
        configs_from_options({"data": "d", "output_dir": "o", "learning_rat": 1e-3})


def test_option_defaults_are_what_a_config_made_without_them_holds(tmp_path):
    """OPTION_DEFAULTS (what an old run's train_config.json lacks is read as) against the
    configuration built from the two required options alone, for the options of ours (the
    Trainer's own __post_init__ rewrites several of its defaults)."""
    assert {"data", "output_dir"}.isdisjoint(OPTION_DEFAULTS)
    ours = {f.name for cls in CONFIG_CLASSES[:2] for f in dataclasses.fields(cls)} | set(
        METHOD_OPTIONS)
    configs = configs_from_options({"data": "d", "output_dir": str(tmp_path / "o")})
    made = {f.name: getattr(config, f.name) for config in configs
            for f in dataclasses.fields(config) if f.name in ours - {"data", "output_dir"}}
    assert made == {name: OPTION_DEFAULTS[name] for name in made}
    assert len(made) > 25 and OPTION_DEFAULTS["lora_target_modules"] == ["all-linear"]


def test_field_default_calls_the_factory_each_time():
    @dataclasses.dataclass
    class Options:
        data: str
        names: list = dataclasses.field(default_factory=list)
        size: int = 3

    data, names, size = dataclasses.fields(Options)
    assert field_default(names) == [] and field_default(names) is not field_default(names)
    assert field_default(size) == 3
    assert field_default(data) is dataclasses.MISSING


def test_a_huge_value_is_quoted_short():
    with pytest.raises(TrainConfigError) as error:
        configs_from_options({"data": "d", "output_dir": "o", "method": "x" * 1_000_000})
    assert len(str(error.value)) < 200


# -- the command line and its YAML file ----------------------------------------------------------


def run_cli(args, capsys) -> str:
    """`flower-rec train ARGS`: asserts it fails with exit status 2 and one line on stderr."""
    assert main(["train", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flower-rec train: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_grad_norm: .nan\n", "max_grad_norm must be a non-negative number"),
        ("weight_decay: .nan\n", "weight_decay must be a non-negative number"),
        ("resume: 'false'\n", "resume must be true or false, got 'false'"),
        ("resume: no\n", None),  # YAML 1.1's `no` is false: accepted, the data folder fails next
        ("per_device_train_batch_size: -4\n",
         "per_device_train_batch_size must be a positive integer, got -4"),
        ("per_device_train_batch_size: 8.0\n",
         "per_device_train_batch_size must be a positive integer, got 8.0"),
        ("learning_rate: 1e999\n", "learning_rate must be a positive number, got inf"),
        ("learning_rate: 3e-4\n", None),  # a float, as in YAML 1.2 (YAML 1.1 reads a string)
        ("seed: 99999999999999999999999\n", "seed must be an integer in"),
        ("method: [sft]\n", "unknown method ['sft']"),
        ("num_train_epochs: {a: 1}\n", "num_train_epochs must be a non-negative number"),
        ("lr: 0.1\n", "unknown training option(s): 'lr'"),
        ("epochs: 2\n", "unknown training option(s): 'epochs' (now num_train_epochs)"),
    ],
)
def test_yaml_values_are_checked_by_name(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {tmp_path / 'nowhere'}\n{text}")
    err = run_cli(["--config", config, "--out", tmp_path / "run"], capsys)
    assert (message or "data folder") in err
    assert not (tmp_path / "run").exists()


def test_yaml_mistakes_name_the_file(tmp_path, capsys):
    executed = tmp_path / "executed"
    cases = {
        "syntax.yaml": ("batch_size: [1, 2\n", "line 2, column 1: expected ',' or ']'"),
        "tab.yaml": ("\tbatch_size: 1\n", "line 1, column 1: found character '\\t'"),
        "code.yaml": (f"seed: !!python/object/apply:os.system ['touch {executed}']\n",
                      "could not determine a constructor for the tag"),
        "deep.yaml": ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "maximum recursion depth"),
        "list.yaml": ("- data\n- out\n", "expected a mapping of training options"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        err = run_cli(["--config", path, "--data", tmp_path, "--out", tmp_path / "run"], capsys)
        assert f"{path}" in err and message in err, err
    assert not executed.exists()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: \xff\xfe\n")
    assert f"{binary}: 'utf-8' codec can't decode" in run_cli(["--config", binary], capsys)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    for path, message in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                          (tmp_path / "missing.yaml", "no such file")):
        assert f"{path}: {message}" in run_cli(["--config", path], capsys)


def test_flags_are_checked_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    for flags, message in [
        (["--lr", "inf"], "learning_rate must be a positive number, got inf"),
        (["--lr", "nan"], "learning_rate must be a positive number, got nan"),
        (["--theta", "-0.5"], "theta must lie in [0, 1], got -0.5"),
        (["--max-steps", "-2"], "max_steps must be a positive integer, or -1"),
        (["--save-steps", "0"], "save_steps must be a positive integer, got 0"),
        (["--floor-count", "inf"], "floor_count must be a positive number, got inf"),
    ]:
        assert message in run_cli(["--data", tmp_path, "--out", out, *flags], capsys)
    assert not out.exists()


def test_missing_data_or_out_is_a_usage_error(tmp_path, capsys):
    assert "missing training option(s): output_dir (--out)" in run_cli(["--data", tmp_path],
                                                                       capsys)
    assert "missing training option(s): data (--data), output_dir (--out)" in run_cli([], capsys)
    config = tmp_path / "run.yaml"
    config.write_text("")  # an empty file: no options
    assert "missing training option(s): data (--data)" in run_cli(
        ["--config", config, "--out", tmp_path / "run"], capsys
    )
