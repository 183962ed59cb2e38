"""Fixtures of the training tests: one thread, the synthetic data, and the uninterrupted run
the resumption tests compare with."""

from pathlib import Path

import pytest
from runs import FLOWER, config

from flower_rec.data import prepare_synthetic
from flower_rec.training import train


@pytest.fixture(scope="module", autouse=True)
def _every_training_test_on_one_thread(one_thread):
    """tests/conftest.py's ``one_thread`` for every module here."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_synthetic(path, items=60, users=300, seed=0, progress=False)
    return path



@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    """A flower (subtb) run of 6 steps with checkpoints at 3 and 6."""
    return train(**config(data_dir, tmp_path_factory.mktemp("runs") / "whole", **FLOWER))
