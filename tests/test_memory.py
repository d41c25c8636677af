"""Memory guards (not timed): no path ever materializes `N x N` scores, and the fused kernels not even the band.

* CPU: the reference ("chunked") backend at N = 16384, forward and forward+backward, measured by
  `prefix_kernels.memory.peak_memory` (a dispatch mode that tracks every storage created inside the block).
  The largest single allocation must stay below one `(B, H, N, 2w + 1 + G + P)` fp32 score tensor and the peak
  below a small multiple of it; an `N x N` score tensor alone would be ~60x the peak bound.
* GPU (skipped without CUDA): every fused backend at the longformer-base layer shape, N = 16384, bf16, with
  `torch.cuda.max_memory_allocated`. The peak above the inputs must stay within the tensors that must exist
  (output, fp32 log-sum-exp, the input gradients, counted at fp32 width to allow fp32 accumulators) plus a
  quarter of one `(B, H, N, 2w + 1)` band-score tensor: materializing the band (or `N x N`) cannot fit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, skip_unless_runs

import prefix_kernels as pk
from prefix_kernels.cli.memory import peak_memory

MB = 2**20


def _inputs(b, n, h, d, *, n_global: int, prefix: int, requires_grad: bool, dtype=torch.float32, device="cpu"):
    """Inputs and masks: the first `n_global` tokens global, the last row ending in padding."""
    return make_inputs(b, n, h, d, dtype=dtype, device=device, prefix=prefix, n_global=n_global,
                       pad={b - 1: range(n - n // 16, n)}, requires_grad=requires_grad)


def _call(x: dict, *, window, masks, backend: str) -> torch.Tensor:
    return pk.longformer_attention(**x, **masks, window=window, backend=backend)


@pytest.fixture
def one_thread():
    # Thousands of small ops: with intra-op threads competing against other jobs on a shared runner, this
    # test took 20x longer than single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_reference_never_allocates_n_by_n(mode, one_thread):
    b, n, h, d, w, g, p = 1, 16384, 2, 16, 64, 3, 4
    x, masks = _inputs(b, n, h, d, n_global=g, prefix=p, requires_grad=mode == "fwdbwd")
    band_bytes = 4 * b * h * n * (2 * w + 1 + g + p)  # one fp32 score tensor of every local row's keys
    grad_out = torch.randn(b, n, h, d)
    with peak_memory("cpu") as mem:
        if mode == "fwd":
            with torch.no_grad():
                _call(x, window=w, masks=masks, backend="reference")
        else:
            out = _call(x, window=w, masks=masks, backend="reference")
            torch.autograd.grad(out, list(x.values()), grad_out)
            del out
    assert 0 < mem.largest <= band_bytes, f"largest allocation {mem.largest / MB:.1f} MB > {band_bytes / MB:.1f} MB"
    assert mem.peak <= 8 * band_bytes, f"peak {mem.peak / MB:.1f} MB > 8 x {band_bytes / MB:.1f} MB"
    assert mem.peak < 4 * b * h * n * n / 10  # far from a single N x N fp32 score tensor


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backend_peak_memory(backend, mode):
    skip_unless_runs(backend, "cuda")
    b, n, h, d, w, g, p = 1, 16384, 12, 64, 256, 17, 16
    dev, dt = torch.device("cuda"), torch.bfloat16
    x, masks = _inputs(b, n, h, d, n_global=g, prefix=p, requires_grad=mode == "fwdbwd", dtype=dt, device=dev)
    grad_out = torch.randn(b, n, h, d, device=dev, dtype=dt)
    args = dict(window=w, masks=masks, backend=backend)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                _call(x, **args)
        else:
            torch.autograd.grad(_call(x, **args), list(x.values()), grad_out)

    run()  # compile, autotune and load kernels outside the measurement
    torch.cuda.empty_cache()
    rows = b * n * h * d
    must_exist = 2 * rows + 4 * b * h * n  # output (bf16) and its fp32 log-sum-exp
    if mode == "fwdbwd":
        # Gradients of the six projections and the prefix, at fp32 width; fp32 dO.q row sums.
        must_exist += 4 * (6 * rows + 2 * p * h * d) + 4 * b * h * n
    slack = 2 * b * h * n * (2 * w + 1) // 4  # a quarter of one bf16 band-score tensor
    with peak_memory(dev) as mem:
        run()
    assert mem.peak <= must_exist + slack, (
        f"{backend} {mode}: peak extra {mem.peak / MB:.1f} MB > {must_exist / MB:.1f} MB that must exist "
        f"+ {slack / MB:.1f} MB"
    )
