"""CUDA-backend launchers against the dense fp64 reference, on a GPU (skipped without one).

These call `prefix_kernels.backends.cuda.forward` / `backward` directly (no custom op), so a failure points at
the kernels, not the glue. They are held to the same rule as the public op in `tests/test_gpu.py` (`helpers.py`:
error at most 2x that of the same computation in PyTorch in the dtype, plus a small atol; IEEE fp32 against fp64
with the fp32 atol; padding rows zero). Outputs are NaN-poisoned before the kernels run (`PREFIX_KERNELS_POISON=1`),
so a row no kernel writes shows up. The backend-independent suite (`tests/test_gpu.py`) runs the public op on both
backends.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ATOL,
    GLOBAL_NAMES,
    GRAD_NAMES,
    assert_matches_reference,
    make_inputs,
    random_like,
    run_with_grads,
    skip_unless_runs,
)

from prefix_kernels.backends import cuda as cuda_attention
from prefix_kernels.core.masks import global_positions
from prefix_kernels.core.reference import dense_attention

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_outputs")]


def _need_gpu():
    skip_unless_runs("cuda", "cuda")


def _case(b, n, h, d, *, n_global, pad_max, prefix, dtype, seed=0):
    """Inputs (per-batch prefix) and both masks on the GPU; without any global token, no global projections (the
    launchers then take `None`, as the custom op passes them)."""
    t, masks = make_inputs(b, n, h, d, dtype=dtype, device="cuda", seed=seed, prefix=prefix, batch_prefix=True,
                           n_global=n_global, pad=pad_max)
    if not masks["is_global"].any():
        for name in GLOBAL_NAMES:
            del t[name]
    return t, masks


def _run(t, masks, *, window, dropout_p=0.0, seed=123, grad=None):
    """The launchers on `t`: `(out, lse, grads)`, `grads` (eight, `None` for absent inputs) only with `grad`."""
    gidx = count = None
    max_global = 0
    if "q_global" in t:
        idx, count, max_global = global_positions(masks["is_global"])
        gidx = idx.to(torch.int32).contiguous()
    d = t["q"].shape[-1]
    kw = {"window": window, "scale": d**-0.5, "dropout_p": dropout_p, "seed": seed, "max_global": max_global}
    inputs = (*(t.get(name) for name in GRAD_NAMES), masks["key_padding_mask"], gidx, count)
    out, lse = cuda_attention.forward(*inputs, **kw)
    grads = None
    if grad is not None:
        grads = list(cuda_attention.backward(grad, *inputs, out, lse, **kw))
    return out, lse, grads


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
    t, masks = _case(b, n, h, d, n_global=n_global, pad_max=pad_max, prefix=prefix, dtype=dtype)
    if q_scale != 1.0:
        for name in ("q", "q_global"):
            if name in t:
                t[name] = (t[name].float() * q_scale).to(dtype)
    grad = random_like((b, n, h, d), seed=1, dtype=dtype, device="cuda")
    out, lse, grads = _run(t, masks, window=window, grad=grad)
    assert not torch.isnan(lse).any()
    ref = run_with_grads(dense_attention, t, masks, window, torch.float64, grad)
    # The same computation by PyTorch in the dtype (fp32 softmax); IEEE fp32 kernels: none, fp64 with the fp32 atol.
    base = None if dtype == torch.float32 else run_with_grads(dense_attention, t, masks, window, dtype, grad)
    assert_matches_reference((out, grads), ref, base, atol=ATOL[dtype], key_padding_mask=masks["key_padding_mask"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}n{}h{}w{}g{}p{}P{}".format(*c))
def test_forward_backward_match_dense(case, d, dtype):
    _need_gpu()
    _check_against_dense(case, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sharp_softmax(dtype):
    """Scores spread over a wide range: the forward's running max moves often (its lazy-rescale path)."""
    _need_gpu()
    _check_against_dense((2, 400, 2, 150, (1, 5), 20, 3), 64, dtype, q_scale=6.0)


def test_dropout_is_deterministic_and_unbiased():
    _need_gpu()
    b, n, h, d = 2, 300, 2, 64
    t, masks = _case(b, n, h, d, n_global=(1, 3), pad_max=0, prefix=2, dtype=torch.float32)
    for name in ("v", "v_global", "prefix_v"):
        t[name] = torch.ones_like(t[name])
    out1, lse1, _ = _run(t, masks, window=16, dropout_p=0.3, seed=7)
    out2, lse2, _ = _run(t, masks, window=16, dropout_p=0.3, seed=7)
    out3, _, _ = _run(t, masks, window=16, dropout_p=0.3, seed=8)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert not torch.equal(out1, out3)
    # with v = 1, every row is sum_j P_ij m_ij / (1 - p), whose mean is 1
    assert abs(float(out1.mean()) - 1.0) < 0.03
    # LSE is the undropped softmax: the same as without dropout
    _, lse0, _ = _run(t, masks, window=16, dropout_p=0.0)
    torch.testing.assert_close(lse1, lse0)


def test_dropout_backward_matches_finite_differences():
    """The backward must draw the forward's mask: check <grad, dx> against a central difference in fp32."""
    _need_gpu()
    b, n, h, d = 1, 80, 2, 32
    t, masks = _case(b, n, h, d, n_global=(2, 2), pad_max=4, prefix=2, dtype=torch.float32)
    grad = random_like((b, n, h, d), seed=1, dtype=torch.float32, device="cuda")
    _, _, grads = _run(t, masks, window=8, dropout_p=0.4, seed=99, grad=grad)
    eps = 1e-2
    for i, (name, g_an) in enumerate(zip(GRAD_NAMES, grads, strict=True)):
        direction = random_like(t[name].shape, seed=10 + i, dtype=torch.float32, device="cuda")

        def f(sign, name=name, direction=direction):
            t2 = dict(t)
            t2[name] = t[name] + sign * eps * direction
            out, _, _ = _run(t2, masks, window=8, dropout_p=0.4, seed=99)
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
