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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (set from the test's skip condition)")


def pytest_collection_modifyitems(config, items):
    # `pytest -m gpu` selects every test that needs a GPU, however it is named (benchmarks/gpu.sh).
    for item in items:
        if any(w in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif") for w in ("CUDA", "GPU")):
            item.add_marker(pytest.mark.gpu)


def pytest_runtest_logreport(report):
    # On the lent GPU a run may be cut off before pytest's summary: write each failure as it happens.
    path = os.environ.get("TIERQUANT_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"\n===== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext[-6000:]}\n")
