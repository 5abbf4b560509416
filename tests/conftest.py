"""Shared fixtures: tiny random-init pipelines of the real diffusers classes, on CPU, offline."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests keep their own cache (profiles, timings), never the user's: a folder of the checkout, ignored by git.
os.environ["TIERQUANT_CACHE"] = str(Path(__file__).resolve().parents[1] / ".test-cache")

import pytest

from tierquant.pipelines.tiny import tiny_flux, tiny_flux_call, tiny_sd3, tiny_sd3_call


@pytest.fixture
def tiny_flux_pipe():
    return tiny_flux(seed=0)


@pytest.fixture
def tiny_flux_kwargs():
    return tiny_flux_call(seed=0)


@pytest.fixture
def tiny_sd3_pipe():
    return tiny_sd3(seed=0)


@pytest.fixture
def tiny_sd3_kwargs():
    return tiny_sd3_call(seed=0)
