"""The fused backends ("triton", "cuda") through the public op on a GPU; skipped without CUDA.

One suite for both backends: output and all eight gradients against a float64 reference computed from the same
(rounded) inputs, with the rule of `helpers.py` ("error <= 2x the error of the same computation in PyTorch on the
low-precision inputs (fp32 softmax, results and gradients rounded to the dtype), plus a small atol"; IEEE fp32
against fp64 with the fp32 atol). Shapes: longformer-base
heads (H=12, D=64, w=256) up to N=16384, D=32/128, odd N, random global tokens per row (some rows none),
padding, prefixes. The dense reference is used up to N=2048; beyond, the chunked reference (same semantics,
never N x N). Outputs are NaN-poisoned (`PREFIX_KERNELS_POISON=1`), so anything no kernel writes fails.
Also: more than 64 global tokens (the Triton backward's loop over global blocks), the headline specialization
(bf16, D = 64, 17 globals, 16 prefix keys) at N = 16384, dropout determinism and replay in the backward, fp16 /
bf16 dropout (the Triton kernels against the documented mask; both backends seeded and unbiased), head dims above
128 (refused by both fused backends, `auto` moving on), inputs on `cuda:1` while `cuda:0` is current (two GPUs),
`torch.compile(fullgraph=True)`. The small-problem Triton tests (tile edges, dropout bits, custom op, caches) of
`backends/test_triton.py`, and the dispatch of `test_dispatch.py`, also run on CUDA tensors.

Tests and cases marked `gpu_short` are the GPU check's first tier (`benchmarks/gpu_check.sh`): every kernel path
of both fused backends once, at small shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_against_reference, make_inputs, op, random_like, skip_unless_runs

import prefix_kernels as pk
from prefix_kernels.attention import select_backend
from prefix_kernels.core import reference
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
    # 65-100 globals per row: more than the largest global block (64), so the backward loops over global blocks
    "many_globals": (2, 1024, 4, 64, 128, (65, 100), 100, 4, False),
    "many_globals_d128": (1, 777, 2, 128, 100, 70, 50, 4, True),
    # the headline specialization: 17 globals (a 32-slot global block), 16 prefix keys, full tiles
    "headline_16k": (1, 16384, 12, 64, 256, 17, 100, 16, False),
}
# fp32 (IEEE dots) compiles slowly: one fp32 shape here, one in the dropout test. All but the long shape are the
# GPU check's first tier.
CASES = [
    ("base_2k", torch.bfloat16), ("base_2k", torch.float32),
    ("odd_prefix_d32", torch.bfloat16), ("odd_prefix_d32", torch.float16),
    ("d128_batch_prefix", torch.bfloat16), ("d128_batch_prefix", torch.float16), ("d128_full_tiles", torch.bfloat16),
    ("window_over_n", torch.float16),
    ("padding_row", torch.float16),
    ("many_globals", torch.bfloat16), ("many_globals", torch.float16), ("many_globals_d128", torch.float16),
    ("headline_16k", torch.bfloat16),
]
LONG = {"headline_16k"}


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
@pytest.mark.parametrize("name,dtype", [pytest.param(n, d, id=f"{n}-{str(d)[6:]}",
                                                     marks=() if n in LONG else pytest.mark.gpu_short)
                                        for n, d in CASES])
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


@pytest.mark.gpu_short
@pytest.mark.parametrize("n_global", [17, 70], ids=["17_globals", "70_globals"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit_dropout_uses_the_documented_mask(monkeypatch, dtype, n_global):
    """fp16 / bf16 with dropout (its own backward tile): the keep mask of the documented counter scheme
    (`dropout_masks.py`: key positions `0..N-1`, prefix key `p` at `ceil4(N) + p`) applied in the reference gives
    the kernels' output and all eight gradients, under the error rule; 17 globals (one 32-slot global block) and
    70 (more than one 64-slot block), 16 prefix keys, padding, N a multiple of the tiles."""
    _need("triton")
    from dropout_masks import philox_keep  # imports triton

    b, n, h, d, window, prefix, p_drop = 2, 1024, 2, 64, 256, 16, 0.1
    t, masks = make_inputs(b, n, h, d, dtype=torch.float64, device="cuda", seed=4, prefix=prefix, n_global=n_global,
                           pad={1: range(900, n)})
    torch.manual_seed(5)
    seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op draws after manual_seed(5)
    positions = [*range(n), *(-(-n // 4) * 4 + i for i in range(prefix))]
    keep = torch.stack([philox_keep(seed, bh, range(n), positions, p_drop) for bh in range(b * h)])
    keep = keep.view(b, h, n, n + prefix).cuda()
    # Only the reference calls `reference._dropout`; the Triton kernels draw their own bits.
    monkeypatch.setattr(reference, "_dropout", lambda probs, p: probs * keep.to(probs.dtype) / (1 - p))
    torch.manual_seed(5)
    check_against_reference(op("triton"), t, masks, window, dtype, random_like(t["q"].shape, seed=9),
                            dropout_p=p_drop, label=f"triton {dtype}")


@pytest.mark.gpu_short
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_dropout_is_seeded_and_unbiased(backend, dtype):
    """fp16 / bf16 with dropout, both fused backends: a seed gives one output and one set of gradients (the Triton
    dQ up to its atomics' order), another seed another output, the gradients are finite, and the mean over seeds
    approaches the undropped output."""
    _need(backend)
    t, masks = make_inputs(2, 512, 2, 64, dtype=dtype, device="cuda", seed=6, prefix=4, n_global=(3, 20), pad=50,
                           requires_grad=True)

    def run(seed, **kw):
        torch.manual_seed(seed)
        return pk.longformer_attention(**t, **masks, window=64, backend=backend, **kw)

    out = run(1, dropout_p=0.2)
    grads = torch.autograd.grad(out.float().square().sum(), list(t.values()))
    again = run(1, dropout_p=0.2)
    grads_again = torch.autograd.grad(again.float().square().sum(), list(t.values()))
    assert torch.equal(out, again) and not torch.equal(out, run(2, dropout_p=0.2))
    # The Triton backward sums dQ with fp32 atomics, whose order (so the last bit before the cast) varies.
    tol = dict(rtol=1.6e-2, atol=1e-5) if backend == "triton" else dict(rtol=0, atol=0)
    for a, b_ in zip(grads, grads_again, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b_, **tol)
    with torch.no_grad():
        plain = run(0).float()
        draws = 64
        mean = sum(run(s, dropout_p=0.2).float() for s in range(draws)) / draws
    live = ~masks["key_padding_mask"]
    # Inverted dropout is unbiased: the error of the mean shrinks as 1 / sqrt(draws).
    assert (mean - plain)[live].abs().mean() < 1.5 * (out.float() - plain)[live].abs().mean() / draws**0.5


@pytest.mark.gpu_short
@pytest.mark.parametrize("head_dim", [160, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dims_above_128_are_refused_and_auto_moves_on(backend, head_dim):
    """No fused backend serves D > 128 (the Triton tiles stop at 128, the CUDA library is built for 16-128): an
    explicit backend raises `ValueError` with the reason instead of failing at launch (the Triton backward used to
    raise `OutOfResources` on sm_90), and `auto` moves on to a backend that serves it."""
    _need(backend)
    t, masks = make_inputs(1, 300, 2, head_dim, dtype=torch.bfloat16, device="cuda", prefix=4, n_global=(1, 5),
                           pad=20)
    with pytest.raises(ValueError, match=f"head_dim {head_dim} > 128|head dim {head_dim} not compiled"):
        pk.longformer_attention(**t, **masks, window=32, backend=backend)
    assert select_backend(check_inputs(**t, **masks, window=32)) not in BACKENDS
    check_against_reference(op("auto"), t, masks, 32, torch.bfloat16, random_like(t["q"].shape, seed=3),
                            label="auto")


@pytest.mark.gpu_short
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_on_the_second_gpu(backend):
    """Inputs on `cuda:1` while `cuda:0` is the current device (`device_map="auto"`, manual model parallelism):
    the kernels launch on the inputs' device (a launch on the current one would read another GPU's pointers), and
    the current device is unchanged afterwards."""
    _need(backend)
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, this machine has {torch.cuda.device_count()}")
    t, masks = make_inputs(2, 1000, 2, 64, dtype=torch.float64, device="cuda:1", prefix=4, n_global=(1, 17),
                           pad=100)
    with torch.cuda.device(0):
        out, _ = check_against_reference(op(backend), t, masks, 128, torch.bfloat16, random_like(t["q"].shape, seed=2),
                                         label=f"{backend} on cuda:1")
        assert out.device == torch.device("cuda", 1)
        assert torch.cuda.current_device() == 0
