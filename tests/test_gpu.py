"""The fused backends ("triton", "cuda") through the public op on a GPU; skipped without CUDA.

One suite for both backends: output and all eight gradients against a float64 reference computed from the same
(rounded) inputs, with the rule "error <= 2x the error of the same computation in PyTorch on the low-precision
inputs (fp32 softmax, results and gradients rounded to the dtype), plus a small atol". Shapes: longformer-base
heads (H=12, D=64, w=256) up to N=16384, D=32/128, odd N, random global tokens per row (some rows none),
padding, prefixes. The dense reference is used up to N=2048; beyond, the chunked reference (same semantics,
never N x N). Outputs are NaN-poisoned (`PREFIX_KERNELS_POISON=1`), so anything no kernel writes fails.
Also: dropout determinism and replay in the backward, the Triton dropout bits against an independent Philox,
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_inputs, random_masks

import prefix_kernels as pk
from prefix_kernels.checks import check_inputs
from prefix_kernels.reference import chunked_attention, dense_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

BACKENDS = ("triton", "cuda")
GRAD_NAMES = ("q", "k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v")
# atol, relative to max(1, |reference|): covers rounding of results whose PyTorch baseline error happens to be ~0.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")


def _need(backend: str) -> None:
    why = pk.available_backends()[backend]
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


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
    b, n, h, d, w, n_global, pad_max, prefix, batch_prefix = SHAPES[name]
    t = random_inputs(b, n, h, d, prefix=prefix, batch_prefix=batch_prefix, dtype=dtype, device="cuda", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if isinstance(n_global, int):  # prefix-propagation layout: the first tokens are global
        is_global, pad = random_masks(b, n, n_global=(0, 0), pad_max=pad_max, generator=g, device="cuda")
        is_global[:, :n_global] = True
    else:
        is_global, pad = random_masks(b, n, n_global=n_global, pad_max=pad_max, generator=g, device="cuda")
    if name == "padding_row":
        pad[1] = True
        is_global[1] = False
    return t, {"is_global": is_global, "key_padding_mask": pad}, w


def _run(fn, t, masks, window, dtype, grad_out):
    leaves = {k: x.detach().to(dtype).requires_grad_() for k, x in t.items()}
    out = fn(**leaves, **masks, window=window)
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype)), strict=True))
    return out, [grads.get(name) for name in GRAD_NAMES]


def _chunked(**kw):
    return chunked_attention(check_inputs(**kw))


def _check_against_reference(backend, name, dtype, atol, *, ieee_fp32):
    t, masks, window = _case(name, dtype)
    n = t["q"].shape[1]
    reference = dense_attention if n <= 2048 else _chunked
    go = torch.randn(t["q"].shape, device="cuda", generator=torch.Generator("cuda").manual_seed(7)).to(dtype)
    out, grads = _run(lambda **kw: pk.longformer_attention(**kw, backend=backend), t, masks, window, dtype, go)
    ref, ref_grads = _run(reference, t, masks, window, torch.float64, go)
    if ieee_fp32:
        base, base_grads = ref, [None] * 8  # IEEE fp32 kernels: compare to fp64 with the fp32 atol alone
    else:
        base, base_grads = _run(reference, t, masks, window, dtype, go)
    assert out.dtype == dtype
    pad = masks["key_padding_mask"]
    assert (out[pad] == 0).all()
    for label, a, b, r in [("out", out, base, ref), *zip(GRAD_NAMES, grads, base_grads, ref_grads, strict=True)]:
        if r is None:
            continue
        assert torch.isfinite(a).all(), f"{label}: non-finite (unwritten / NaN)"
        scale = max(1.0, r.abs().max().item())
        err = (a.double() - r).abs().max().item()
        base_err = 0.0 if b is None else (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + atol * scale, f"{label}: err {err:.3g}, PyTorch {base_err:.3g}"
    for g in grads[:6]:
        assert (g[pad] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_output_and_gradients_match_reference(backend, name, dtype):
    _need(backend)
    _check_against_reference(backend, name, dtype, ATOL[dtype], ieee_fp32=dtype == torch.float32)


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
    _check_against_reference("triton", name, torch.float32, 2e-3, ieee_fp32=False)


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
    gen = torch.Generator("cuda").manual_seed(3)
    direction = {k: torch.randn(v.shape, device="cuda", generator=gen) for k, v in x.items()}
    go = torch.randn(a.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad(a, list(x.values()), go)
    analytic = sum((g.double() * direction[k]).sum() for k, g in zip(x, grads, strict=True)).item()
    eps = 1e-2

    def f(sign):
        shifted = {k: (v.detach() + sign * eps * direction[k]) for k, v in x.items()}
        return (call(1, shifted).double() * go.double()).sum().item()

    numeric = (f(1) - f(-1)) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_triton_dropout_bits_follow_the_documented_philox_stream():
    """Compiled for the GPU (where `tl.join` / `tl.reshape` get real layouts), both forms of the Triton kernels'
    dropout draw give the bits of the NumPy Philox of the documented scheme."""
    _need("triton")
    from dropout_masks import kernel_keep, philox_keep

    seed, p = 2**40 + 12345, 0.3
    for col0 in (0, 68, 16388):
        positions = range(col0, col0 + 64)
        want = torch.stack([philox_keep(seed, bh, range(64), positions, p) for bh in range(2)])
        assert torch.equal(kernel_keep(seed, 2, [col0], p, tile=True, block=64, device="cuda"), want), col0
        assert torch.equal(kernel_keep(seed, 2, positions, p, block=64, device="cuda"), want), col0


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    _need(backend)
    t, masks, window = _case("odd_prefix_d32", torch.bfloat16)
    torch._dynamo.reset()

    def fn(q, k, v):
        return pk.longformer_attention(q, k, v, **{n: t[n] for n in GRAD_NAMES[3:]}, **masks, window=window,
                                       backend=backend)

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
