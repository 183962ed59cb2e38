"""Shared test configuration: the hypothesis profiles and the ``device`` parametrisation.

The hypothesis strategies and trie-building helpers shared by the test modules live in
``strategies.py`` beside this file (pytest puts this rootless ``tests/`` directory on
``sys.path``, so modules import it as ``strategies``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from strategies import DEVICES

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
