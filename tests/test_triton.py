"""Triton backend on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set by `conftest.py` when there is
no CUDA device): output and all eight gradients against `reference.dense_attention`, dropout, the custom ops under
`torch.compile`, and dispatch.

The interpreter runs the kernels with `BLOCK_M=32, BLOCK_N=16` (forward), `16 x 32` (backward) and key chunks of
32 for the global rows, so sequences of 33-100 tokens cross every kind of tile edge and use several chunks. Outputs
and gradients are NaN-poisoned before the kernels run (`POISON_OUTPUTS`), so anything never written fails.
bf16 is not tested here (the interpreter computes it wrongly); `test_gpu.py` covers it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from dropout_masks import kernel_keep, philox_keep

import prefix_kernels as pk
from prefix_kernels import custom_op, reference, triton_attention
from prefix_kernels.attention import select_backend
from prefix_kernels.checks import check_inputs
from prefix_kernels.reference import dense_attention

pytestmark = pytest.mark.skipif(
    not triton_attention.INTERPRET, reason="CPU tests of the Triton kernels need TRITON_INTERPRET=1 (test_gpu.py "
    "runs them compiled on a GPU)"
)

GRAD_NAMES = ("q", "k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(triton_attention, "POISON_OUTPUTS", True)


def make_case(b, n, h, d, *, globals_=None, pad=None, prefix=0, batch_prefix=False, strided=False, seed=0):
    """Inputs as float64 (cast by the caller). `globals_` / `pad`: `{row: positions}`."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = {}
    for name in GRAD_NAMES[:6]:
        # `strided`: (B, H, N, D) storage seen as (B, N, H, D), as a head-major projection would give.
        t[name] = rnd(b, h, n, d).transpose(1, 2) if strided else rnd(b, n, h, d)
    if prefix:
        shape = (b, prefix, h, d) if batch_prefix else (prefix, h, d)
        t["prefix_k"], t["prefix_v"] = rnd(*shape), rnd(*shape)
    masks = {}
    if globals_ is not None:
        masks["is_global"] = torch.zeros(b, n, dtype=torch.bool)
        for row, pos in globals_.items():
            masks["is_global"][row, pos] = True
    else:
        for name in GRAD_NAMES[3:6]:
            del t[name]
    if pad is not None:
        masks["key_padding_mask"] = torch.zeros(b, n, dtype=torch.bool)
        for row, pos in pad.items():
            masks["key_padding_mask"][row, pos] = True
    return t, masks


CASES = {
    # band only, N not a multiple of any tile
    "band": dict(b=2, n=45, h=2, d=16),
    # globals inside/outside the windows, adjacent (7, 8), first and last token; a row without globals but with
    # padding; a row with 20 globals (> BLOCK_G = 16) and leading padding; shared prefix (batch stride 0)
    "mixed": dict(b=3, n=70, h=2, d=32, prefix=3,
                  globals_={0: [0, 7, 8, 40, 69], 2: list(range(5, 65, 3))},
                  pad={1: list(range(60, 70)), 2: [0, 1, 2, 3, 4]}),
    # per-batch prefix, a global token in one row only
    "prefix_batched": dict(b=2, n=37, h=1, d=16, prefix=5, batch_prefix=True, globals_={0: [36]}),
    # a row that is all padding: no query has any admissible key there (output 0, finite gradients)
    "empty_row": dict(b=2, n=20, h=2, d=16, globals_={0: [3]}, pad={1: list(range(20))}),
    # non-contiguous (B, H, N, D)-major inputs
    "strided": dict(b=1, n=33, h=2, d=16, strided=True, globals_={0: [16]}, pad={0: [31, 32]}),
    # N a multiple of every tile: the kernels' unmasked full-tile loads
    "even": dict(b=2, n=64, h=1, d=16, prefix=2, globals_={0: [0, 33]}, pad={1: list(range(50, 64))}),
}
WINDOWS = {"band": (0, 1, 16, 50), "mixed": (5, 33), "prefix_batched": (4,), "empty_row": (3,), "strided": (7,),
           "even": (5, 40)}
PARAMS = [(name, w) for name, ws in WINDOWS.items() for w in ws]


def run(t, masks, window, backend, dtype, grad_out, **kw):
    """Output and the gradients of every input tensor (None for absent ones)."""
    leaves = {k: x.detach().to(dtype).requires_grad_() for k, x in t.items()}
    if backend == "dense":
        out = dense_attention(**leaves, **masks, window=window, **kw)
    else:
        out = pk.longformer_attention(**leaves, **masks, window=window, backend=backend, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    named = dict(zip(leaves, grads, strict=True))
    return out, [named.get(name) for name in GRAD_NAMES]


def grad_out_like(t, seed=1):
    return torch.randn(t["q"].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name,window", PARAMS)
def test_fp32_matches_dense_reference(name, window):
    t, masks = make_case(**CASES[name])
    go = grad_out_like(t)
    out, grads = run(t, masks, window, "triton", torch.float32, go)
    ref, ref_grads = run(t, masks, window, "dense", torch.float64, go)
    assert out.dtype == torch.float32 and out.shape == t["q"].shape
    # IEEE fp32 dots: the error is fp32 rounding of O(1) values, relative to the magnitude of each tensor.
    for label, a, r in [("out", out, ref), *zip(GRAD_NAMES, grads, ref_grads, strict=True)]:
        assert (a is None) == (r is None), label
        if a is None:
            continue
        assert torch.isfinite(a).all(), label
        err = (a.double() - r).abs().max().item()
        assert err <= 2e-5 * max(1.0, r.abs().max().item()), (label, err)
    pad = masks.get("key_padding_mask")
    if pad is not None:
        assert (out[pad] == 0).all()
        for g in grads[:6]:
            if g is not None:
                assert (g[pad] == 0).all()  # padding queries and keys get no gradient


@pytest.mark.parametrize("name,window", [("band", 16), ("mixed", 5), ("empty_row", 3)])
def test_fp16_error_within_twice_pytorch_fp16(name, window):
    """Error vs fp64 at most 2x that of the same computation in PyTorch on the fp16 inputs (fp32 softmax, fp16
    results and gradients), plus a few fp16 ulps."""
    t, masks = make_case(**CASES[name])
    t = {k: x.to(torch.float16).double() for k, x in t.items()}  # exactly representable in fp16
    go = grad_out_like(t).to(torch.float16).double()
    out, grads = run(t, masks, window, "triton", torch.float16, go)
    base, base_grads = run(t, masks, window, "dense", torch.float16, go)
    ref, ref_grads = run(t, masks, window, "dense", torch.float64, go)
    assert out.dtype == torch.float16
    for label, a, b, r in [("out", out, base, ref), *zip(GRAD_NAMES, grads, base_grads, ref_grads, strict=True)]:
        if r is None:
            continue
        assert torch.isfinite(a).all(), label
        err = (a.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + 2e-3 * max(1.0, r.abs().max().item()), (label, err, base_err)


@pytest.fixture
def fp32_matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def test_fp32_dot_precision_follows_torchs_matmul_setting():
    """Through the legacy API (`set_float32_matmul_precision`) and the newer one (`fp32_precision`, which
    `transformers`' `tf32=True` uses), mixed, in a fresh process (mixing them makes
    `torch.get_float32_matmul_precision()` raise for the rest of the process)."""
    script = """
import torch
from prefix_kernels.triton_attention import _dot_precision
m = torch.backends.cuda.matmul
got = [_dot_precision(torch.float32), _dot_precision(torch.bfloat16)]
for p in ("high", "medium", "highest"):
    torch.set_float32_matmul_precision(p)
    got.append(_dot_precision(torch.float32))
if hasattr(m, "fp32_precision"):
    for p in ("tf32", "ieee"):
        m.fp32_precision = p
        got.append(_dot_precision(torch.float32))
    m.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    got.append(_dot_precision(torch.float32))
print(" ".join(got))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = r.stdout.split()
    assert got[:5] == ["ieee", "tf32", "tf32", "tf32", "ieee"]
    assert got[5:] in ([], ["tf32", "ieee", "tf32"])  # the newer API exists from PyTorch 2.9


@pytest.mark.parametrize("dtype,precision,d,n", [(torch.float32, "highest", 32, 530), (torch.float32, "high", 32, 530),
                                                 (torch.float32, "high", 128, 530), (torch.float16, "highest", 32, 530),
                                                 (torch.float16, "highest", 32, 512)])
def test_gpu_tile_configuration_matches_dense_reference(monkeypatch, fp32_matmul_precision, dtype, precision, d, n):
    """The tiles an sm_90 GPU uses (fp32 IEEE: 32 x 32, backward 32 x 16, 8 warps; fp32 TF32: 64 x 64 (64 x 32 at
    D = 128), backward 32 x 32; fp16 / bf16: 64 x 64, backward 64 x 64 when N is a multiple of 64, else 32 x 64;
    key chunks of 512) through the interpreter (which computes TF32 dots in full fp32): several query tiles, band
    tiles inside and across the band's edge, 20 globals (more than one global tile of 16), one or two key chunks,
    a prefix, padding."""
    monkeypatch.setattr(triton_attention, "SMALL_TILES", False)
    fp32_matmul_precision(precision)
    case = dict(b=2, n=n, h=1, d=d, prefix=2, globals_={0: [0, 100, 101, n - 1], 1: list(range(3, n, 27))},
                pad={1: list(range(n - 30, n))})
    t, masks = make_case(**case)
    go = grad_out_like(t)
    if dtype == torch.float16:
        t = {k: x.to(dtype).double() for k, x in t.items()}
        go = go.to(dtype).double()
    out, grads = run(t, masks, 70, "triton", dtype, go)
    base, base_grads = run(t, masks, 70, "dense", dtype, go)
    ref, ref_grads = run(t, masks, 70, "dense", torch.float64, go)
    for label, a, b, r in [("out", out, base, ref), *zip(GRAD_NAMES, grads, base_grads, ref_grads, strict=True)]:
        assert torch.isfinite(a).all(), label
        err = (a.double() - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        if dtype == torch.float32:
            assert err <= 2e-5 * scale, (label, err)
        else:
            base_err = (b.double() - r).abs().max().item()
            assert err <= 2 * base_err + 2e-3 * scale, (label, err, base_err)


def test_padding_only_row_is_zero_and_finite_in_fp16():
    t, masks = make_case(**CASES["empty_row"])
    out, grads = run(t, masks, 3, "triton", torch.float16, grad_out_like(t))
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads if g is not None)


def _dropout_case():
    return make_case(b=1, n=64, h=2, d=16, prefix=2, globals_={0: [0, 30]}, pad={0: [63]})


def _call(t, masks, dropout_p, seed=None, window=6):
    if seed is not None:
        torch.manual_seed(seed)
    x = {k: v.float() for k, v in t.items()}
    return pk.longformer_attention(**x, **masks, window=window, dropout_p=dropout_p, backend="triton")


def test_dropout_zero_is_no_dropout_and_seeded_masks_are_deterministic():
    t, masks = _dropout_case()
    torch.testing.assert_close(_call(t, masks, 0.0), _call(t, masks, 0.0, seed=5), rtol=0, atol=0)
    no_drop = _call(t, masks, 0.0)
    a, b, c = _call(t, masks, 0.3, seed=1), _call(t, masks, 0.3, seed=1), _call(t, masks, 0.3, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, no_drop)


def test_dropout_preserves_expectation():
    """With `v = 1` every row's undropped output is 1; dropout keeps its mean over many rows."""
    t, masks = _dropout_case()
    t["v"] = torch.ones_like(t["v"])
    t["v_global"] = torch.ones_like(t["v_global"])
    t["prefix_v"] = torch.ones_like(t["prefix_v"])
    live = ~masks["key_padding_mask"][0]
    means = [_call(t, masks, 0.5, seed=s)[0, live].mean().item() for s in range(3)]
    assert all(abs(m - 1.0) < 0.15 for m in means), means
    assert len(set(means)) == 3


def test_dropout_backward_replays_the_forward_mask():
    """With a fixed seed the output is a smooth function of the inputs: the backward (which regenerates the mask)
    must match a central finite difference along a random direction of all eight inputs."""
    t, masks = _dropout_case()
    x = {k: v.float().requires_grad_() for k, v in t.items()}
    gen = torch.Generator().manual_seed(3)
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in x.items()}
    go = torch.randn(x["q"].shape, generator=gen)
    torch.manual_seed(11)
    out = pk.longformer_attention(**x, **masks, window=6, dropout_p=0.4, backend="triton")
    grads = torch.autograd.grad(out, list(x.values()), go)
    analytic = sum((g * direction[k]).sum() for k, g in zip(x, grads, strict=True)).item()

    def f(eps):
        shifted = {k: (v.detach() + eps * direction[k]).double().float() for k, v in x.items()}
        return (_call(shifted, masks, 0.4, seed=11).double() * go.double()).sum().item()

    eps = 1e-2
    numeric = (f(eps) - f(-eps)) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)
    # And the mask differs from another seed's: the check above is not vacuous.
    torch.manual_seed(12)
    assert not torch.equal(out, pk.longformer_attention(**x, **masks, window=6, dropout_p=0.4, backend="triton"))


def test_dropout_bits_follow_the_documented_philox_stream():
    """Both forms of `_dropout_keep` (one Philox call per element; one per four keys of a tile) give the bits of an
    independent NumPy Philox4x32-10 with counter `(j // 4, i, bh, 0)`, word `j % 4`."""
    seed, p = 2**40 + 12345, 0.5
    for col0 in (0, 4, 68, 1 << 20):
        positions = range(col0, col0 + 128)
        want = torch.stack([philox_keep(seed, bh, range(128), positions, p) for bh in range(3)])
        assert torch.equal(kernel_keep(seed, 3, [col0], p, tile=True), want), col0
        assert torch.equal(kernel_keep(seed, 3, positions, p), want), col0
    scattered = [0, 1, 7, 30, 31, 93, 94, 95, 96, 97, 4099]
    got = kernel_keep(seed, 2, scattered, p)[:, :, : len(scattered)]
    assert torch.equal(got[1], philox_keep(seed, 1, range(128), scattered, p))
    assert 0.45 < want.float().mean().item() < 0.55
    assert not torch.equal(want[0], want[1])  # heads draw different bits


@pytest.mark.parametrize("small_tiles", [True, False])
def test_dropout_output_and_gradients_use_the_documented_mask(monkeypatch, small_tiles):
    """Dropout masks rebuilt from the documented counter scheme (key positions `0..N-1`, prefix key `p` at
    `ceil4(N) + p`), applied in the dense fp64 reference: the same output and the same eight gradients."""
    monkeypatch.setattr(triton_attention, "SMALL_TILES", small_tiles)
    b, n, h, prefix, p_drop = 2, 90, 2, 3, 0.3
    t, masks = make_case(b=b, n=n, h=h, d=16, prefix=prefix, globals_={0: [0, 45], 1: [89]}, pad={1: [88, 89]})
    torch.manual_seed(5)
    seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op draws after manual_seed(5)
    positions = [*range(n), *(-(-n // 4) * 4 + i for i in range(prefix))]
    keep = torch.stack([philox_keep(seed, bh, range(n), positions, p_drop) for bh in range(b * h)])
    keep = keep.view(b, h, n, n + prefix)
    go = grad_out_like(t)
    torch.manual_seed(5)
    out, grads = run(t, masks, 20, "triton", torch.float32, go, dropout_p=p_drop)
    monkeypatch.setattr(reference, "_dropout", lambda probs, p: probs * keep.to(probs.dtype) / (1 - p))
    ref, ref_grads = run(t, masks, 20, "dense", torch.float64, go, dropout_p=p_drop)
    for label, a, r in [("out", out, ref), *zip(GRAD_NAMES, grads, ref_grads, strict=True)]:
        err = (a.double() - r).abs().max().item()
        assert err <= 2e-5 * max(1.0, r.abs().max().item()), (label, err)


def test_dropout_under_gradient_checkpointing():
    t, masks = _dropout_case()

    def grads(checkpointed):
        x = {k: v.float().requires_grad_() for k, v in t.items()}

        def fn(*tensors):
            kw = dict(zip(x, tensors, strict=True))
            return pk.longformer_attention(**kw, **masks, window=6, dropout_p=0.3, backend="triton")

        torch.manual_seed(21)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(fn, *x.values(), use_reentrant=False)
        else:
            out = fn(*x.values())
        return [out, *torch.autograd.grad(out.square().sum(), list(x.values()))]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_matches_eager():
    t, masks = make_case(**CASES["mixed"])
    x = {k: v.float() for k, v in t.items()}

    def fn(q, k, v, q_global):
        kw = {**x, "q": q, "k": k, "v": v, "q_global": q_global}
        return pk.longformer_attention(**kw, **masks, window=5, backend="triton")

    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "q_global")]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    c_out = compiled(*leaves)
    c_grads = torch.autograd.grad(c_out.sum(), leaves)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    for a, b in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_op_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the forward op (whose
    autograd calls the backward op), on the normalized arguments `fused_attention` passes (expanded prefix)."""
    t, masks = make_case(b=2, n=20, h=1, d=16, prefix=2, globals_={0: [4]}, pad={1: [18, 19]})
    a = check_inputs(**{k: v.float().requires_grad_() for k, v in t.items()}, **masks, window=3)
    args = (a.q, a.k, a.v, a.q_global, a.k_global, a.v_global, a.prefix_k, a.prefix_v, a.key_padding_mask,
            a.is_global, None, "triton", a.window, a.softmax_scale, 0.0)
    torch.library.opcheck(custom_op.fused_attention_fwd, args)


def test_global_index_is_cached_per_tensor_and_version():
    is_global = torch.zeros(2, 10, dtype=torch.bool)
    is_global[0, [2, 5]] = True
    is_global[1, 7] = True
    idx, count, g = custom_op.global_index(is_global)
    assert g == 2 and idx.dtype == torch.int32 and idx.is_contiguous()
    assert idx[0].tolist() == [2, 5] and idx[1, 0].item() == 7 and count.tolist() == [2, 1]
    assert custom_op.global_index(is_global)[0] is idx  # no recomputation, no host read
    is_global[1, 9] = True  # in place: bumps _version
    idx2, count2, _ = custom_op.global_index(is_global)
    assert idx2 is not idx and idx2[1].tolist() == [7, 9] and count2.tolist() == [2, 2]
    assert custom_op.global_index(torch.zeros(2, 10, dtype=torch.bool)) == (None, None, 0)


def test_token_tables_are_built_once_per_mask_and_rebuilt_after_an_edit():
    """`KIND`, `SPECIAL` and `SLOT` are cached per (padding mask, compact global index) tensors, as every layer of
    a model passes the same ones; an in-place edit of the mask rebuilds them."""
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 8:] = True
    is_global = torch.zeros(2, 10, dtype=torch.bool)
    is_global[0, [2, 5]] = True
    is_global[1, 0] = True
    idx, count, _ = custom_op.global_index(is_global)
    kind, special, slot = triton_attention._token_tables(pad, idx, count, 2, 10, "cpu")
    assert kind.tolist() == [[0, 0, 1, 0, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 2, 2]]
    assert special.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3]]
    assert slot.tolist() == [[-1, -1, 0, -1, -1, 1, -1, -1, -1, -1], [0] + [-1] * 9]
    again = triton_attention._token_tables(pad, *custom_op.global_index(is_global)[:2], 2, 10, "cpu")
    assert all(a is b for a, b in zip(again, (kind, special, slot), strict=True))  # no rebuild
    pad[0, 9] = True  # in place: bumps _version
    kind2 = triton_attention._token_tables(pad, idx, count, 2, 10, "cpu")[0]
    assert kind2 is not kind and kind2[0, 9].item() == 2
    assert triton_attention._token_tables(None, None, None, 2, 10, "cpu") is None


def test_no_global_token_with_projections_gives_zero_projection_gradients():
    t, _ = make_case(b=1, n=24, h=1, d=16, globals_={})
    masks = {"is_global": torch.zeros(1, 24, dtype=torch.bool)}
    out, grads = run(t, masks, 4, "triton", torch.float32, grad_out_like(t))
    ref, ref_grads = run(t, masks, 4, "dense", torch.float64, grad_out_like(t))
    assert (out.double() - ref).abs().max() < 1e-5
    assert all((g == 0).all() for g in grads[3:6])


def test_dispatch_under_the_interpreter():
    assert pk.available_backends()["triton"] is None
    t, masks = make_case(b=1, n=16, h=1, d=16)
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
