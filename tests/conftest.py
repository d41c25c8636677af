"""Fixtures, the `gpu` marker, and Triton's CPU interpreter on machines without CUDA.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter: `TRITON_INTERPRET` must be set
before `triton` is first imported (`@triton.jit` reads it at decoration time), so it is set here, before any test
module imports `prefix_kernels`. On a CUDA machine nothing changes (the Triton kernels compile for the GPU);
`torch.cuda.is_available()` does not initialize the device.

Every test (or parametrized case) that runs on CUDA tensors is marked `gpu`, and that is its only GPU gate:
without a CUDA device `pytest_collection_modifyitems` below skips it ("no CUDA device"), and `pytest -m gpu`
selects exactly those. A finer reason (a backend unavailable, the interpreter taking CPU tensors only) comes from
`helpers.skip_unless_runs` inside the test. What the tests share lives in `helpers.py`.

GPU-like interpreter runs: `pytest --program-order reversed` (or `shuffled`, with `--program-order-seed`) runs
every launch's programs in that order under the interpreter (`program_order.py`). The tests marked
`program_order` cover every path of the Triton kernels; CI runs them once in each order
(`pytest -m program_order --program-order ...`). Their outputs and the launchers' fp32 work buffers are
NaN-filled before the kernels run (`poison_outputs`), in every order.
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


def pytest_addoption(parser):
    group = parser.getgroup("prefix_kernels")
    group.addoption("--program-order", choices=("natural", "reversed", "shuffled"), default="natural",
                    help="the order in which Triton's interpreter runs the programs of every launch (GPU-like runs; "
                    "default: grid order)")
    group.addoption("--program-order-seed", type=int, default=0, help="seed of --program-order shuffled")


def pytest_report_header(config):
    order = config.getoption("--program-order")
    if order != "natural":
        seed = f", seed {config.getoption('--program-order-seed')}" if order == "shuffled" else ""
        return [f"Triton interpreter: the programs of every launch run {order}{seed}"]
    return []


@pytest.fixture(autouse=True)
def _interpreter_program_order(request):
    """Applies `--program-order` to the test (under the interpreter; compiled kernels run in the GPU's order)."""
    order = request.config.getoption("--program-order")
    if order == "natural" or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from program_order import program_order

    with program_order(order, seed=request.config.getoption("--program-order-seed")):
        yield


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
