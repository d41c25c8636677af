"""CUDA-backend launchers against the dense fp64 reference, on a GPU (skipped without one).

These call `prefix_kernels.cuda_attention.forward` / `backward` directly (no custom op), so a failure points at
the kernels, not the glue. Outputs are NaN-poisoned before the kernels run (`PREFIX_KERNELS_POISON=1`), so a row
no kernel writes shows up. The backend-independent suite (`test_gpu.py`) runs the public op on both backends.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_masks

from prefix_kernels import cuda_attention
from prefix_kernels.reference import dense_attention, global_positions

pytestmark = pytest.mark.gpu


def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = cuda_attention.unavailable_reason()
    if why is not None:
        pytest.skip(why)


# atol/rtol against fp64 on the same (rounded) inputs: fp32 is IEEE (no tf32)
_TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (3e-2, 1e-1)}


def _case(b, n, h, d, *, window, n_global, pad_max, prefix, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["q", "k", "v", "q_global", "k_global", "v_global"]
    t = {name: torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for name in names}
    if prefix:
        t["prefix_k"] = torch.randn(b, prefix, h, d, generator=g, dtype=torch.float64)
        t["prefix_v"] = torch.randn(b, prefix, h, d, generator=g, dtype=torch.float64)
    t = {k: x.to(dtype).cuda() for k, x in t.items()}
    is_global, pad = random_masks(b, n, n_global=n_global, pad_max=pad_max, generator=g, device="cuda")
    return t, is_global, pad


def _launcher_args(t, is_global, pad):
    if is_global.any():
        idx, count, max_global = global_positions(is_global)
        gl = {"q_global": t["q_global"], "k_global": t["k_global"], "v_global": t["v_global"]}
        gidx = idx.to(torch.int32)
    else:
        gl = {"q_global": None, "k_global": None, "v_global": None}
        gidx = count = None
        max_global = 0
    return gl, gidx, count, max_global


def _run(t, is_global, pad, *, window, dropout_p=0.0, seed=123, grad=None):
    gl, gidx, count, max_global = _launcher_args(t, is_global, pad)
    d = t["q"].shape[-1]
    kw = {"window": window, "scale": d**-0.5, "dropout_p": dropout_p, "seed": seed, "max_global": max_global}
    pk, pv = t.get("prefix_k"), t.get("prefix_v")
    inputs = (t["q"], t["k"], t["v"], gl["q_global"], gl["k_global"], gl["v_global"], pk, pv, pad, gidx, count)
    out, lse = cuda_attention.forward(*inputs, **kw)
    grads = None
    if grad is not None:
        grads = cuda_attention.backward(grad, *inputs, out, lse, **kw)
    return out, lse, grads


def _reference(t, is_global, pad, *, window, grad):
    leaves = {k: x.double().requires_grad_() for k, x in t.items()}
    has_g = bool(is_global.any())
    kwargs = {
        "is_global": is_global if has_g else None,
        "key_padding_mask": pad,
        "prefix_k": leaves.get("prefix_k"),
        "prefix_v": leaves.get("prefix_v"),
    }
    if has_g:
        kwargs.update(q_global=leaves["q_global"], k_global=leaves["k_global"], v_global=leaves["v_global"])
    out = dense_attention(leaves["q"], leaves["k"], leaves["v"], window=window, **kwargs)
    out.backward(grad.double())
    names = ["q", "k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v"]
    grads = [leaves[n].grad if n in leaves and leaves[n].grad is not None else None for n in names]
    if not has_g:
        grads[3:6] = [None, None, None]
    return out.detach(), grads


CASES = [
    # b, n, h, window, n_global, pad_max, prefix
    (2, 1, 2, 0, (0, 0), 0, 0),
    (2, 37, 2, 0, (0, 3), 5, 0),
    (2, 37, 2, 4, (1, 3), 6, 3),
    (2, 130, 3, 17, (0, 4), 40, 2),
    (1, 300, 2, 64, (2, 5), 0, 1),
    (2, 50, 2, 1000, (0, 2), 10, 4),
    (1, 700, 2, 200, (1, 17), 30, 4),
]


def _check_against_dense(case, d, dtype, q_scale=1.0):
    b, n, h, window, n_global, pad_max, prefix = case
    t, is_global, pad = _case(b, n, h, d, window=window, n_global=n_global, pad_max=pad_max, prefix=prefix,
                              dtype=dtype)
    if q_scale != 1.0:
        t["q"] = (t["q"].float() * q_scale).to(dtype)
        t["q_global"] = (t["q_global"].float() * q_scale).to(dtype)
    grad = torch.randn(b, n, h, d, device="cuda", dtype=torch.float64).to(dtype)
    out, lse, grads = _run(t, is_global, pad, window=window, grad=grad)
    ref, ref_grads = _reference(t, is_global, pad, window=window, grad=grad)
    atol, rtol = _TOL[dtype]
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    names = ["dq", "dk", "dv", "dq_global", "dk_global", "dv_global", "dprefix_k", "dprefix_v"]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        if want is None:
            assert got is None or not got.abs().any(), name
            continue
        assert got is not None, name
        assert torch.isfinite(got).all(), name
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double(), want, atol=atol * 4 * scale, rtol=rtol * 2, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}n{}h{}w{}g{}p{}P{}".format(*c))
def test_forward_backward_match_dense(case, d, dtype, monkeypatch):
    _need_gpu()
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")
    _check_against_dense(case, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sharp_softmax(dtype, monkeypatch):
    """Scores spread over a wide range: the forward's running max moves often (its lazy-rescale path)."""
    _need_gpu()
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")
    _check_against_dense((2, 400, 2, 150, (1, 5), 20, 3), 64, dtype, q_scale=6.0)


def test_dropout_is_deterministic_and_unbiased():
    _need_gpu()
    b, n, h, d = 2, 300, 2, 64
    t, is_global, pad = _case(b, n, h, d, window=16, n_global=(1, 3), pad_max=0, prefix=2, dtype=torch.float32)
    for name in ("v", "v_global", "prefix_v"):
        t[name] = torch.ones_like(t[name])
    out1, lse1, _ = _run(t, is_global, pad, window=16, dropout_p=0.3, seed=7)
    out2, lse2, _ = _run(t, is_global, pad, window=16, dropout_p=0.3, seed=7)
    out3, _, _ = _run(t, is_global, pad, window=16, dropout_p=0.3, seed=8)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert not torch.equal(out1, out3)
    # with v = 1, every row is sum_j P_ij m_ij / (1 - p), whose mean is 1
    assert abs(float(out1.mean()) - 1.0) < 0.03
    # LSE is the undropped softmax: the same as without dropout
    _, lse0, _ = _run(t, is_global, pad, window=16, dropout_p=0.0)
    torch.testing.assert_close(lse1, lse0)


def test_dropout_backward_matches_finite_differences():
    """The backward must draw the forward's mask: check <grad, dx> against a central difference in fp32."""
    _need_gpu()
    b, n, h, d = 1, 80, 2, 32
    t, is_global, pad = _case(b, n, h, d, window=8, n_global=(2, 2), pad_max=4, prefix=2, dtype=torch.float32)
    grad = torch.randn(b, n, h, d, device="cuda")
    _, _, grads = _run(t, is_global, pad, window=8, dropout_p=0.4, seed=99, grad=grad)
    names = ["q", "k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    eps = 1e-2
    for name, g_an in zip(names, grads, strict=True):
        direction = torch.randn(t[name].shape, device="cuda", generator=gen)

        def f(sign, name=name, direction=direction):
            t2 = dict(t)
            t2[name] = t[name] + sign * eps * direction
            out, _, _ = _run(t2, is_global, pad, window=8, dropout_p=0.4, seed=99)
            return float((out.double() * grad.double()).sum())

        numeric = (f(1) - f(-1)) / (2 * eps)
        analytic = float((g_an.double() * direction.double()).sum())
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (name, numeric, analytic)


def test_errors_are_raised_not_silent():
    _need_gpu()
    q = torch.randn(1, 8, 1, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim"):
        cuda_attention.forward(q, q, q, None, None, None, None, None, None, None, None,
                               window=2, scale=0.1, dropout_p=0.0, seed=0, max_global=0)
