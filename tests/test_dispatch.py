"""Dispatch of the public op (`attention.py`): which backends are usable here, what `auto` picks for a call, and
the reason an explicitly named backend gives when it cannot serve one. The CUDA library's own reasons, which
need its build, are in `backends/test_cuda_build.py`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, op, skip_unless_runs

import prefix_kernels as pk
from prefix_kernels.attention import select_backend
from prefix_kernels.core.checks import check_inputs


def test_available_backends_and_explicit_backend_reasons(monkeypatch):
    backends = pk.available_backends()
    assert set(backends) == {"cuda", "triton", "cpu", "reference"}
    assert backends["reference"] is None and backends["cpu"] is None
    t, masks = make_inputs(2, 10, 2, 4, dtype=torch.float64, seed=1, global_projections=False, pad=0)
    args = check_inputs(**t, **masks, window=2)
    # fp64 on the CPU: only the reference serves it, auto finds it, explicit fused backends explain why not.
    assert select_backend(args, "auto") == "reference"
    for name in ("cuda", "triton", "cpu"):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot serve this call"):
            select_backend(args, name)
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "reference")
    assert select_backend(args, "cuda") == "reference"
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="PREFIX_KERNELS_BACKEND=.nope. must be one of"):
        select_backend(args, "auto")


def test_dispatch_of_the_cpu_backend():
    """`auto` takes the "cpu" backend for bf16 CPU tensors and the reference for fp64; an explicit "cpu" refuses
    fp64 and other devices' tensors with the reason."""
    assert pk.available_backends()["cpu"] is None
    t, _ = make_inputs(1, 16, 1, 8)
    assert select_backend(check_inputs(**{k: v.bfloat16() for k, v in t.items()}, window=2)) == "cpu"
    assert select_backend(check_inputs(**{k: v.double() for k, v in t.items()}, window=2)) == "reference"
    with pytest.raises(ValueError, match="cpu.*reference backend only"):
        op("cpu")(**{k: v.double() for k, v in t.items()}, window=2)
    with pytest.raises(ValueError, match="cpu.*needs CPU tensors, got meta"):
        op("cpu")(**{k: v.to("meta") for k, v in t.items()}, window=2)


def test_dispatch_under_the_interpreter():
    """Under `TRITON_INTERPRET=1` the Triton backend serves CPU tensors when named, `auto` never picks it, and
    bf16 (which the interpreter computes wrongly) and fp64 are refused with the reason."""
    skip_unless_runs("triton", "cpu")
    from prefix_kernels.backends.triton import launch as triton_attention

    t, _ = make_inputs(1, 16, 1, 16, dtype=torch.float64)
    x = {k: v.float() for k, v in t.items()}
    # `auto` never picks the interpreter; naming the backend does.
    assert select_backend(check_inputs(**x, window=2), "triton") == "triton"
    assert select_backend(check_inputs(**x, window=2)) != "triton"
    out = pk.longformer_attention(**x, window=2, backend="triton")
    torch.testing.assert_close(out, pk.longformer_attention(**x, window=2, backend="reference"), rtol=1e-5,
                               atol=1e-6)
    for dtype, why in ((torch.bfloat16, "interpreter"), (torch.float64, "reference backend only")):
        y = {k: v.to(dtype) for k, v in t.items()}
        assert triton_attention.cannot_serve(check_inputs(**y, window=2)) is not None
        with pytest.raises(ValueError, match=why):
            pk.longformer_attention(**y, window=2, backend="triton")
    assert select_backend(check_inputs(**{k: v.double() for k, v in t.items()}, window=2)) == "reference"


@pytest.mark.gpu
def test_dispatch_on_a_gpu():
    """Compiled for the GPU, `auto` takes the Triton kernels first for CUDA tensors in fp32 and bf16; CPU tensors
    and fp64 are refused by an explicit `backend="triton"` with the reason, and `auto` passes them on."""
    skip_unless_runs("triton", "cuda")
    t, _ = make_inputs(1, 16, 1, 16, dtype=torch.float64)
    cuda = {k: v.cuda() for k, v in t.items()}
    for dtype in (torch.float32, torch.bfloat16):
        assert select_backend(check_inputs(**{k: v.to(dtype) for k, v in cuda.items()}, window=2)) == "triton"
    x = {k: v.float() for k, v in cuda.items()}
    torch.testing.assert_close(pk.longformer_attention(**x, window=2),
                               pk.longformer_attention(**x, window=2, backend="reference"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pk.longformer_attention(**{k: v.float() for k, v in t.items()}, window=2, backend="triton")
    with pytest.raises(ValueError, match="reference backend only"):
        pk.longformer_attention(**cuda, window=2, backend="triton")
    assert select_backend(check_inputs(**cuda, window=2)) == "reference"
    assert select_backend(check_inputs(**{k: v.float() for k, v in t.items()}, window=2)) != "triton"
