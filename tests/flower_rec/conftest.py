"""Fixtures shared by the flower_rec tests."""

import pytest


@pytest.fixture(scope="module")
def dataset(data_dir):
    """The dataset of the ``data_dir`` fixture in scope (each module or folder makes its own),
    loaded once per module."""
    from flower_rec.data import load_dataset

    return load_dataset(data_dir)
