"""The fused backends ("triton", "cuda") through the public op on a GPU; skipped without CUDA.

One suite for both backends: output and all eight gradients against a float64 reference computed from the same
(rounded) inputs, with the rule of `helpers.py` ("error <= 2x the error of the same computation in PyTorch on the
low-precision inputs (fp32 softmax, results and gradients rounded to the dtype), plus a small atol"; IEEE fp32
against fp64 with the fp32 atol). Shapes: longformer-base
heads (H=12, D=64, w=256) up to N=16384, D=32/128, odd N, random global tokens per row (some rows none),
padding, prefixes. The dense reference is used up to N=2048; beyond, the chunked reference (same semantics,
never N x N). Outputs are NaN-poisoned (`PREFIX_KERNELS_POISON=1`), so anything no kernel writes fails.
Also: dropout determinism and replay in the backward, `torch.compile(fullgraph=True)`. The small-problem Triton
tests (tile edges, dropout bits, custom op, caches) of `backends/test_triton.py`, and the dispatch of
`test_dispatch.py`, also run on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_against_reference, make_inputs, op, random_like, skip_unless_runs

import prefix_kernels as pk
from prefix_kernels.core.checks import check_inputs
from prefix_kernels.core.reference import chunked_attention, dense_attention

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_outputs")]

BACKENDS = ("triton", "cuda")


def _need(backend: str) -> None:
    skip_unless_runs(backend, "cuda")


# name: (B, N, H, D, window, globals per row (lo, hi) or explicit count at the start, pad_max, prefix, batch_prefix)
SHAPES = {
    "base_2k": (2, 2048, 12, 64, 256, (0, 17), 300, 0, False),
    "odd_prefix_d32": (2, 1000, 4, 32, 64, (0, 5), 200, 8, False),
    "d128_batch_prefix": (2, 777, 2, 128, 100, (1, 4), 50, 4, True),
    "d128_full_tiles": (1, 1024, 4, 128, 128, (0, 4), 100, 4, False),  # N a multiple of every tile
    "window_over_n": (1, 600, 2, 64, 1024, (2, 2), 0, 3, False),
    "padding_row": (2, 300, 2, 64, 32, (0, 2), 0, 0, False),  # row 1 is all padding: no admissible key
    "base_16k": (1, 16384, 12, 64, 256, 17, 100, 0, False),
}
# fp32 (IEEE dots) compiles slowly: one fp32 shape here, one in the dropout test.
CASES = [
    ("base_2k", torch.bfloat16), ("base_2k", torch.float32),
    ("odd_prefix_d32", torch.bfloat16), ("odd_prefix_d32", torch.float16),
    ("d128_batch_prefix", torch.bfloat16), ("d128_batch_prefix", torch.float16), ("d128_full_tiles", torch.bfloat16),
    ("window_over_n", torch.float16),
    ("padding_row", torch.float16),
    ("base_16k", torch.bfloat16),
]


def _case(name: str, dtype: torch.dtype, seed: int = 0):
    """`(inputs, masks, window)` of shape `name` on the GPU."""
    b, n, h, d, w, n_global, pad_max, prefix, batch_prefix = SHAPES[name]
    t, masks = make_inputs(b, n, h, d, dtype=dtype, device="cuda", seed=seed, prefix=prefix,
                           batch_prefix=batch_prefix, n_global=n_global, pad=pad_max,
                           empty_rows=[1] if name == "padding_row" else ())
    return t, masks, w


def _chunked(**kw):
    return chunked_attention(check_inputs(**kw))


def _check_against_reference(backend, name, dtype, *, tf32=False):
    t, masks, window = _case(name, dtype)
    # The dense reference holds (B, N, N) scores: beyond 2048 tokens the chunked one (same semantics).
    reference = dense_attention if t["q"].shape[1] <= 2048 else _chunked
    go = random_like(t["q"].shape, seed=7)
    # Under TF32 matmuls the baseline is PyTorch's own fp32 computation (then also TF32), with TF32's rounding.
    kw = dict(baseline=reference, atol=2e-3) if tf32 else {}
    check_against_reference(op(backend), t, masks, window, dtype, go, reference=reference, label=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_output_and_gradients_match_reference(backend, name, dtype):
    _need(backend)
    _check_against_reference(backend, name, dtype)


@pytest.fixture
def tf32_matmuls():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("name", ["base_2k", "d128_batch_prefix"])
def test_triton_fp32_follows_float32_matmul_precision(tf32_matmuls, name):
    """Under `torch.set_float32_matmul_precision("high")` the Triton kernels use TF32 as PyTorch's matmuls do: the
    error stays within 2x that of the same computation in PyTorch (TF32 matmuls), plus TF32's rounding."""
    _need("triton")
    _check_against_reference("triton", name, torch.float32, tf32=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_seeded_and_replayed_in_backward(backend):
    _need(backend)
    t, masks, window = _case("odd_prefix_d32", torch.float32)
    x = {k: v.detach().requires_grad_() for k, v in t.items()}

    def call(seed, inputs):
        torch.manual_seed(seed)
        return pk.longformer_attention(**inputs, **masks, window=window, dropout_p=0.25, backend=backend)

    a, b, c = call(1, x), call(1, x), call(2, x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_drop = pk.longformer_attention(**x, **masks, window=window, backend=backend)
    assert torch.equal(pk.longformer_attention(**x, **masks, window=window, dropout_p=0.0, backend=backend), no_drop)
    assert not torch.equal(a, no_drop)
    # Fixed seed: the output is smooth in the inputs; the backward must replay the forward's mask.
    direction = {k: random_like(v.shape, seed=3 + i, dtype=v.dtype, device="cuda")
                 for i, (k, v) in enumerate(x.items())}
    go = random_like(a.shape, seed=2, dtype=a.dtype, device="cuda")
    grads = torch.autograd.grad(a, list(x.values()), go)
    analytic = sum((g.double() * direction[k]).sum() for k, g in zip(x, grads, strict=True)).item()
    eps = 1e-2

    def f(sign):
        shifted = {k: (v.detach() + sign * eps * direction[k]) for k, v in x.items()}
        return (call(1, shifted).double() * go.double()).sum().item()

    numeric = (f(1) - f(-1)) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    _need(backend)
    t, masks, window = _case("odd_prefix_d32", torch.bfloat16)
    torch._dynamo.reset()

    def fn(q, k, v):
        rest = {n: x for n, x in t.items() if n not in ("q", "k", "v")}
        return pk.longformer_attention(q, k, v, **rest, **masks, window=window, backend=backend)

    leaves = [t[n].detach().clone().requires_grad_() for n in ("q", "k", "v")]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    compiled = torch.compile(fn, fullgraph=True)
    c_out = compiled(*leaves)
    c_grads = torch.autograd.grad(c_out.float().sum(), leaves)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    # The Triton backward sums dQ with fp32 atomics, whose order (so the last bit before the bf16 cast) varies
    # from run to run; dK and dV are written once per key and stay bitwise equal.
    dq_tol = dict(rtol=1.6e-2, atol=1e-5) if backend == "triton" else dict(rtol=0, atol=0)
    for a, b, tol in zip(c_grads, grads, (dq_tol, {"rtol": 0, "atol": 0}, {"rtol": 0, "atol": 0}), strict=True):
        torch.testing.assert_close(a, b, **tol)
