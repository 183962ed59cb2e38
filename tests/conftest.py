"""Shared test configuration: the hypothesis profiles and the ``device`` parametrisation.

The hypothesis strategies and trie-building helpers shared by the test modules live in
``strategies.py`` beside this file (pytest puts this rootless ``tests/`` directory on
``sys.path``, so modules import it as ``strategies``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from flower_ext import Trie
from strategies import DEVICES, SAMPLE

# "default" keeps the whole suite within a few minutes on two CPU cores; "thorough" is for a
# nightly run: HYPOTHESIS_PROFILE=thorough python -m pytest tests
_SLOW_DATA_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "default", max_examples=100, deadline=None, suppress_health_check=_SLOW_DATA_OK
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=_SLOW_DATA_OK
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> torch.device:
    """Every device the ops can run on here. Session-scoped so that hypothesis tests may use it
    (it is an immutable value, the same for every generated example)."""
    return torch.device(request.param)


@pytest.fixture
def sample(device) -> Trie:
    """The fixed catalog ``strategies.SAMPLE`` on each device."""
    return Trie.from_sequences(SAMPLE, device=device)


def _torch_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def four_threads():
    """Four CPU threads, so that the CPU launchers split large batches between workers."""
    yield from _torch_threads(4)


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a whole module: the model tests' numbers do not depend on how the
    machine splits its matmuls, and two test runs side by side do not fight over cores."""
    yield from _torch_threads(1)


# Dynamo traces an op whose output size depends on the data (`children`, and the masked losses
# that call it) by itself from torch 2.10 on; before (2.9 tried), only with this flag set.
_NEEDS_DYNAMIC_OUTPUT_FLAG = torch.__version__ < "2.10"


@pytest.fixture
def dynamic_output_shapes():
    """Compiles graphs that hold a data-dependent output size, as a user of that torch must."""
    if not _NEEDS_DYNAMIC_OUTPUT_FLAG:
        yield
        return
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """A small synthetic dataset folder (60 items, 300 users), made by the CLI."""
    from flower_rec.cli import main

    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert main(["prepare", "synthetic", "--items", "60", "--users", "300", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def model_dir(dataset_dir, tmp_path_factory):
    """A tiny untrained Llama (seeded) and a BPE tokenizer trained on the dataset, saved like a
    run."""
    from flower_rec.data import load_dataset
    from flower_rec.models import corpus, tiny_llama, train_tokenizer

    out = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(corpus(load_dataset(dataset_dir)), vocab_size=400)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
