"""Property tests: random shapes, windows, masks and prefixes; the chunked reference and the Triton kernels
(interpreter on CPU) must equal the dense reference, and padding rows must be exactly 0."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefix_kernels as pk
from prefix_kernels.checks import check_inputs
from prefix_kernels.reference import chunked_attention, dense_attention


@st.composite
def problems(draw, max_n=48, head_dims=(1, 3, 8)):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    h = draw(st.integers(1, 2))
    d = draw(st.sampled_from(head_dims))
    window = draw(st.integers(0, n + 2))
    prefix = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    is_global = torch.rand(b, n, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    pad = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        tail = draw(st.integers(0, n))  # up to a fully padded row
        if tail:
            pad[row, n - tail :] = True
    kw = {name: torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
          for name in ("q", "k", "v", "q_global", "k_global", "v_global")}
    if prefix:
        shape = (b, prefix, h, d) if draw(st.booleans()) else (prefix, h, d)
        kw["prefix_k"] = torch.randn(*shape, generator=g, dtype=torch.float64)
        kw["prefix_v"] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return dict(kw, window=window, is_global=is_global, key_padding_mask=pad)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), chunk=st.integers(1, 20))
def test_chunked_equals_dense(problem, chunk):
    dense = dense_attention(**problem)
    got = chunked_attention(check_inputs(**problem), chunk=chunk)
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)
    assert (got[problem["key_padding_mask"]] == 0).all()


@pytest.mark.skipif(pk.available_backends()["triton"] is not None, reason="Triton backend unavailable here")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_n=40, head_dims=(16,)))
def test_triton_equals_dense_with_gradients(problem):
    dense_in = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in problem.items()
                if isinstance(v, torch.Tensor)}
    ours_in = {k: (v.detach().float().requires_grad_() if v.is_floating_point() else v) for k, v in dense_in.items()}
    window = problem["window"]
    dense = dense_attention(window=window, **dense_in)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = pk.longformer_attention(window=window, backend="triton", **{k: v.to(device) for k, v in ours_in.items()})
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.cpu().double(), dense, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(dense)
    dense.backward(grad)
    ours.backward(grad.to(device=device, dtype=ours.dtype))
    for name, t in dense_in.items():
        if t.is_floating_point():
            scale = 1.0 + t.grad.abs().max().item()
            torch.testing.assert_close(ours_in[name].grad.double() / scale, t.grad / scale, atol=2e-5, rtol=0,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
