"""Fixtures, the `gpu` marker, and Triton's CPU interpreter on machines without CUDA.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter: `TRITON_INTERPRET` must be set
before `triton` is first imported (`@triton.jit` reads it at decoration time), so it is set here, before any test
module imports `prefix_kernels`. On a CUDA machine nothing changes (the Triton kernels compile for the GPU);
`torch.cuda.is_available()` does not initialize the device.

Every test (or parametrized case) that runs on CUDA tensors is marked `gpu`, and that is its only GPU gate:
without a CUDA device `pytest_collection_modifyitems` below skips it ("no CUDA device"), and `pytest -m gpu`
selects exactly those. A finer reason (a backend unavailable, the interpreter taking CPU tensors only) comes from
`helpers.skip_unless_runs` inside the test. What the tests share lives in `helpers.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `helpers`, `tiny_models`, `dropout_masks` under any --import-mode (the default one adds this directory itself).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device, every test marked `gpu` skips, saying so."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every fused backend NaN-fills its outputs and gradients before writing them, so anything never written
    fails the finiteness checks."""
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")


@pytest.fixture(params=[pytest.param("cpu", id="cpu-interpreter"),
                        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def triton_device(request):
    """The device of the Triton backend's tensors: CPU tensors under the interpreter (where there is no CUDA), CUDA
    tensors compiled for the GPU (marked `gpu`); the case that cannot run here skips, saying why."""
    from helpers import skip_unless_runs

    skip_unless_runs("triton", request.param)
    return request.param
