"""Fixtures, and Triton's CPU interpreter on machines without CUDA.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter: `TRITON_INTERPRET` must be set
before `triton` is first imported (`@triton.jit` reads it at decoration time), so it is set here, before any test
module imports `prefix_kernels`. On a CUDA machine nothing changes (the Triton kernels compile for the GPU);
`torch.cuda.is_available()` does not initialize the device. What the tests share lives in `helpers.py`.
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


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every fused backend NaN-fills its outputs and gradients before writing them, so anything never written
    fails the finiteness checks."""
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")


@pytest.fixture(params=["cpu", "cuda"], ids=["cpu-interpreter", "cuda"])
def triton_device(request):
    """The device of the Triton backend's tensors: CPU tensors under the interpreter (no CUDA here), CUDA tensors
    compiled for the GPU where there is one; the other case skips, saying why."""
    from helpers import skip_unless_runs

    skip_unless_runs("triton", request.param)
    return request.param


def random_masks(b: int, n: int, *, n_global=(0, 3), pad_max: int = 0, generator=None, device="cpu"):
    """`(is_global, key_padding_mask)` with a different number of global tokens per row (possibly none).

    `n_global` is an inclusive `(lo, hi)` range per row; padding is a random tail of up to `pad_max` tokens.
    """
    g = generator
    is_global = torch.zeros(b, n, dtype=torch.bool)
    pad = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        tail = int(torch.randint(0, pad_max + 1, (1,), generator=g)) if pad_max else 0
        tail = min(tail, n - 1)
        if tail:
            pad[i, n - tail :] = True
        count = int(torch.randint(n_global[0], n_global[1] + 1, (1,), generator=g))
        count = min(count, n - tail)
        if count:
            is_global[i, torch.randperm(n - tail, generator=g)[:count]] = True
    return is_global.to(device), pad.to(device)


def random_inputs(
    b, n, h, d, *, prefix=0, batch_prefix=False, dtype=torch.float32, device="cpu", requires_grad=False, seed=0
):
    """Dict of `q, k, v, q_global, k_global, v_global` `(B, N, H, D)` and optionally `prefix_k, prefix_v`."""
    g = torch.Generator().manual_seed(seed)
    names = ["q", "k", "v", "q_global", "k_global", "v_global"]
    out = {name: torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for name in names}
    if prefix:
        shape = (b, prefix, h, d) if batch_prefix else (prefix, h, d)
        out["prefix_k"] = torch.randn(*shape, generator=g, dtype=torch.float64)
        out["prefix_v"] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return {k: t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for k, t in out.items()}

