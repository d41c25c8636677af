"""Triton backend: output and all eight gradients against `reference.dense_attention`, dropout, the custom ops
under `torch.compile`, the cache of the token tables. Its dispatch is in `tests/test_dispatch.py`.

Tests that take the `triton_device` fixture run on CPU tensors through Triton's interpreter where there is no CUDA
(`TRITON_INTERPRET=1`, set by `conftest.py`), and on CUDA tensors with the kernels compiled for the GPU where
there is. The interpreter runs the kernels with `BLOCK_M=32, BLOCK_N=16` (forward), `16 x 32` (backward) and key
chunks of 32 for the global rows, so sequences of 33-100 tokens cross every kind of tile edge and use several
chunks; on a GPU the same small problems sit inside one or two of its larger tiles (`tests/test_gpu.py` runs long
sequences there). Outputs and gradients are NaN-poisoned before the kernels run, so anything never written fails.
bf16 is not tested here (the interpreter computes it wrongly); `tests/test_gpu.py` covers it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from dropout_masks import kernel_keep, philox_keep  # noqa: E402
from helpers import (  # noqa: E402
    check_against_reference,
    exact_or_atomic,
    make_inputs,
    op,
    random_like,
    run_with_grads,
    triton_interpreted,
)

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.backends.triton import launch as triton_attention  # noqa: E402
from prefix_kernels.core import custom_op, reference
from prefix_kernels.core.checks import check_inputs  # noqa: E402
from prefix_kernels.core.masks import global_index  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_outputs")

CASES = {
    # band only, N not a multiple of any tile
    "band": dict(b=2, n=45, h=2, d=16, global_projections=False),
    # globals inside/outside the windows, adjacent (7, 8), first and last token; a row without globals but with
    # padding; a row with 20 globals (> BLOCK_G = 16) and leading padding; shared prefix (batch stride 0)
    "mixed": dict(b=3, n=70, h=2, d=32, prefix=3,
                  n_global={0: [0, 7, 8, 40, 69], 2: list(range(5, 65, 3))},
                  pad={1: list(range(60, 70)), 2: [0, 1, 2, 3, 4]}),
    # per-batch prefix, a global token in one row only
    "prefix_batched": dict(b=2, n=37, h=1, d=16, prefix=5, batch_prefix=True, n_global={0: [36]}),
    # a row that is all padding: no query has any admissible key there (output 0, finite gradients)
    "empty_row": dict(b=2, n=20, h=2, d=16, n_global={0: [3]}, pad={1: list(range(20))}),
    # non-contiguous (B, H, N, D)-major inputs
    "strided": dict(b=1, n=33, h=2, d=16, strided=True, n_global={0: [16]}, pad={0: [31, 32]}),
    # N a multiple of every tile: the kernels' unmasked full-tile loads
    "even": dict(b=2, n=64, h=1, d=16, prefix=2, n_global={0: [0, 33]}, pad={1: list(range(50, 64))}),
}
WINDOWS = {"band": (0, 1, 16, 50), "mixed": (5, 33), "prefix_batched": (4,), "empty_row": (3,), "strided": (7,),
           "even": (5, 40)}
PARAMS = [(name, w) for name, ws in WINDOWS.items() for w in ws]


def case(name: str, device, dtype=torch.float64):
    return make_inputs(**CASES[name], dtype=dtype, device=device)


@pytest.mark.program_order
@pytest.mark.parametrize("name,window", PARAMS)
def test_fp32_matches_dense_reference(triton_device, name, window):
    t, masks = case(name, triton_device)
    assert t["q"].is_contiguous() != (name == "strided")
    go = random_like(t["q"].shape, seed=1, device=triton_device)
    out, _ = check_against_reference(op("triton"), t, masks, window, torch.float32, go)
    assert out.shape == t["q"].shape


@pytest.mark.program_order
@pytest.mark.parametrize("name,window", [("band", 16), ("mixed", 5), ("empty_row", 3)])
def test_fp16_error_within_twice_pytorch_fp16(triton_device, name, window):
    """Error vs fp64 at most 2x that of the same computation in PyTorch on the fp16 inputs (fp32 softmax, fp16
    results and gradients), plus a few fp16 ulps."""
    t, masks = case(name, triton_device)
    go = random_like(t["q"].shape, seed=1, device=triton_device)
    check_against_reference(op("triton"), t, masks, window, torch.float16, go)


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
from prefix_kernels.backends.triton.launch import _dot_precision
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


@pytest.mark.program_order
@pytest.mark.skipif(not triton_interpreted(), reason="emulates a GPU's tiles in Triton's interpreter; where CUDA "
                    "is, tests/test_gpu.py runs these tiles compiled")
@pytest.mark.parametrize("dtype,precision,d,n,step", [(torch.float32, "highest", 32, 530, 27),
                                                      (torch.float32, "high", 32, 530, 27),
                                                      (torch.float32, "high", 128, 530, 27),
                                                      (torch.float16, "highest", 32, 530, 27),
                                                      (torch.float16, "highest", 32, 512, 27),
                                                      (torch.float16, "highest", 32, 512, 7)])
def test_gpu_tile_configuration_matches_dense_reference(monkeypatch, fp32_matmul_precision, dtype, precision, d, n,
                                                        step):
    """The tiles an sm_90 GPU uses (fp32 IEEE: 32 x 32, backward 32 x 16, 8 warps; fp32 TF32: 64 x 64 (64 x 32 at
    D = 128), backward 32 x 32; fp16 / bf16: 64 x 64, backward 64 x 64 when N is a multiple of 64, else 32 x 64;
    key chunks of 512) through the interpreter (which computes TF32 dots in full fp32, hence the IEEE fp32 bound
    for both fp32 settings): several query tiles, band tiles inside and across the band's edge, 20 globals in row
    1 (a 32-slot global block) or, with `step` 7, 73 (more than 64: the forward's 64-slot blocks and the
    backward's 32-query blocks), one or two key chunks, a prefix, padding."""
    monkeypatch.setattr(triton_attention, "SMALL_TILES", False)
    fp32_matmul_precision(precision)
    t, masks = make_inputs(2, n, 1, d, dtype=torch.float64, prefix=2,
                           n_global={0: [0, 100, 101, n - 1], 1: list(range(3, n, step))},
                           pad={1: list(range(n - 30, n))})
    if step == 7:
        cfg = triton_attention._config(d, n, int(masks["is_global"].sum(1).max()), "tf32", 2, False)
        assert (cfg["BLOCK_G"], cfg["BWD_G"]) == (64, 32)
    check_against_reference(op("triton"), t, masks, 70, dtype, random_like(t["q"].shape, seed=1))


@pytest.mark.program_order
def test_padding_only_row_is_zero_and_finite_in_fp16(triton_device):
    t, masks = case("empty_row", triton_device)
    go = random_like(t["q"].shape, seed=1, device=triton_device)
    out, grads = run_with_grads(op("triton"), t, masks, 3, torch.float16, go)
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads if g is not None)


# ------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------


def _dropout_case(device):
    return make_inputs(1, 64, 2, 16, device=device, prefix=2, n_global={0: [0, 30]}, pad={0: [63]})


def _call(t, masks, dropout_p, seed=None, window=6):
    if seed is not None:
        torch.manual_seed(seed)
    return pk.longformer_attention(**t, **masks, window=window, dropout_p=dropout_p, backend="triton")


def test_dropout_zero_is_no_dropout_and_seeded_masks_are_deterministic(triton_device):
    t, masks = _dropout_case(triton_device)
    torch.testing.assert_close(_call(t, masks, 0.0), _call(t, masks, 0.0, seed=5), rtol=0, atol=0)
    no_drop = _call(t, masks, 0.0)
    a, b, c = _call(t, masks, 0.3, seed=1), _call(t, masks, 0.3, seed=1), _call(t, masks, 0.3, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, no_drop)


def test_dropout_preserves_expectation(triton_device):
    """With `v = 1` every row's undropped output is 1; dropout keeps its mean over many rows."""
    t, masks = _dropout_case(triton_device)
    for name in ("v", "v_global", "prefix_v"):
        t[name] = torch.ones_like(t[name])
    live = ~masks["key_padding_mask"][0]
    means = [_call(t, masks, 0.5, seed=s)[0, live].mean().item() for s in range(3)]
    assert all(abs(m - 1.0) < 0.15 for m in means), means
    assert len(set(means)) == 3


def test_dropout_backward_replays_the_forward_mask(triton_device):
    """With a fixed seed the output is a smooth function of the inputs: the backward (which regenerates the mask)
    must match a central finite difference along a random direction of all eight inputs."""
    t, masks = _dropout_case(triton_device)
    x = {k: v.detach().requires_grad_() for k, v in t.items()}
    direction = {k: random_like(v.shape, seed=3 + i, dtype=v.dtype, device=v.device)
                 for i, (k, v) in enumerate(x.items())}
    go = random_like(x["q"].shape, seed=2, dtype=torch.float32, device=triton_device)
    torch.manual_seed(11)
    out = pk.longformer_attention(**x, **masks, window=6, dropout_p=0.4, backend="triton")
    grads = torch.autograd.grad(out, list(x.values()), go)
    analytic = sum((g.double() * direction[k]).sum() for k, g in zip(x, grads, strict=True)).item()

    def f(eps):
        shifted = {k: (v.detach().double() + eps * direction[k]).float() for k, v in x.items()}
        return (_call(shifted, masks, 0.4, seed=11).double() * go.double()).sum().item()

    eps = 1e-2
    numeric = (f(eps) - f(-eps)) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)
    # And the mask differs from another seed's: the check above is not vacuous.
    torch.manual_seed(12)
    assert not torch.equal(out, pk.longformer_attention(**x, **masks, window=6, dropout_p=0.4, backend="triton"))


def test_dropout_bits_follow_the_documented_philox_stream(triton_device):
    """Both forms of `_dropout_keep` (one Philox call per element; one per four keys of a tile) give the bits of an
    independent NumPy Philox4x32-10 with counter `(j // 4, i, bh, 0)`, word `j % 4`; compiled for the GPU,
    `tl.join` / `tl.reshape` get real layouts."""
    seed, p = 2**40 + 12345, 0.5
    block = 128 if triton_device == "cpu" else 64
    kw = dict(block=block, device=triton_device)
    for col0 in (0, 4, 68, 16388, 1 << 20):
        positions = range(col0, col0 + block)
        want = torch.stack([philox_keep(seed, bh, range(block), positions, p) for bh in range(3)])
        assert torch.equal(kernel_keep(seed, 3, [col0], p, tile=True, **kw), want), col0
        assert torch.equal(kernel_keep(seed, 3, positions, p, **kw), want), col0
    scattered = [0, 1, 7, 30, 31, 93, 94, 95, 96, 97, 4099]
    got = kernel_keep(seed, 2, scattered, p, **kw)[:, :, : len(scattered)]
    assert torch.equal(got[1], philox_keep(seed, 1, range(block), scattered, p))
    assert 0.45 < want.float().mean().item() < 0.55
    assert not torch.equal(want[0], want[1])  # heads draw different bits


@pytest.mark.program_order
@pytest.mark.parametrize("small_tiles", [True, False])
def test_dropout_output_and_gradients_use_the_documented_mask(triton_device, monkeypatch, small_tiles):
    """Dropout masks rebuilt from the documented counter scheme (key positions `0..N-1`, prefix key `p` at
    `ceil4(N) + p`), applied in the dense fp64 reference: the same output and the same eight gradients."""
    monkeypatch.setattr(triton_attention, "SMALL_TILES", small_tiles)
    b, n, h, prefix, p_drop = 2, 90, 2, 3, 0.3
    t, masks = make_inputs(b, n, h, 16, dtype=torch.float64, device=triton_device, prefix=prefix,
                           n_global={0: [0, 45], 1: [89]}, pad={1: [88, 89]})
    torch.manual_seed(5)
    seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op draws after manual_seed(5)
    positions = [*range(n), *(-(-n // 4) * 4 + i for i in range(prefix))]
    keep = torch.stack([philox_keep(seed, bh, range(n), positions, p_drop) for bh in range(b * h)])
    keep = keep.view(b, h, n, n + prefix).to(triton_device)
    # Only the float64 reference calls `reference._dropout`; the Triton kernels draw their own bits.
    monkeypatch.setattr(reference, "_dropout", lambda probs, p: probs * keep.to(probs.dtype) / (1 - p))
    torch.manual_seed(5)
    check_against_reference(op("triton"), t, masks, 20, torch.float32, random_like(t["q"].shape, seed=1),
                            dropout_p=p_drop)


def test_dropout_under_gradient_checkpointing(triton_device):
    t, masks = _dropout_case(triton_device)

    def grads(checkpointed):
        x = {k: v.detach().clone().requires_grad_() for k, v in t.items()}

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
        torch.testing.assert_close(a, b, **exact_or_atomic(triton_device))


# ------------------------------------------------------------------------------------------------------------
# Custom ops, caches
# ------------------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager(triton_device):
    t, masks = case("mixed", triton_device, torch.float32)

    def fn(q, k, v, q_global):
        kw = {**t, "q": q, "k": k, "v": v, "q_global": q_global}
        return pk.longformer_attention(**kw, **masks, window=5, backend="triton")

    leaves = [t[n].clone().requires_grad_() for n in ("q", "k", "v", "q_global")]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    c_out = compiled(*leaves)
    c_grads = torch.autograd.grad(c_out.sum(), leaves)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    for a, b in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(a, b, **exact_or_atomic(triton_device))


def test_custom_op_opcheck(triton_device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the forward op (whose
    autograd calls the backward op), on the normalized arguments `fused_attention` passes (expanded prefix)."""
    assert pk.available_backends()["triton"] is None  # loads the backend: its launchers are registered with the op
    t, masks = make_inputs(2, 20, 1, 16, device=triton_device, prefix=2, n_global={0: [4]}, pad={1: [18, 19]},
                           requires_grad=True)
    a = check_inputs(**t, **masks, window=3)
    args = (a.q, a.k, a.v, a.q_global, a.k_global, a.v_global, a.prefix_k, a.prefix_v, None, None, None,
            a.key_padding_mask, a.is_global, None, None, "triton", a.window, a.softmax_scale, 0.0)
    torch.library.opcheck(custom_op.fused_attention_fwd, args)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_token_tables_are_built_once_per_mask_and_rebuilt_after_an_edit(device):
    """`KIND`, `SPECIAL` and `SLOT` are cached per (padding mask, compact global index) tensors, as every layer of
    a model passes the same ones; an in-place edit of the mask rebuilds them."""
    pad = torch.zeros(2, 10, dtype=torch.bool, device=device)
    pad[1, 8:] = True
    is_global = torch.zeros(2, 10, dtype=torch.bool, device=device)
    is_global[0, [2, 5]] = True
    is_global[1, 0] = True
    idx, count, _ = global_index(is_global)
    kind, special, slot = triton_attention._token_tables(pad, idx, count, 2, 10, device)
    assert kind.device == pad.device
    assert kind.tolist() == [[0, 0, 1, 0, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 2, 2]]
    assert special.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3]]
    assert slot.tolist() == [[-1, -1, 0, -1, -1, 1, -1, -1, -1, -1], [0] + [-1] * 9]
    again = triton_attention._token_tables(pad, *global_index(is_global)[:2], 2, 10, device)
    assert all(a is b for a, b in zip(again, (kind, special, slot), strict=True))  # no rebuild
    pad[0, 9] = True  # in place: bumps _version
    kind2 = triton_attention._token_tables(pad, idx, count, 2, 10, device)[0]
    assert kind2 is not kind and kind2[0, 9].item() == 2
    assert triton_attention._token_tables(None, None, None, 2, 10, device) is None


def test_no_global_token_with_projections_gives_zero_projection_gradients(triton_device):
    t, masks = make_inputs(1, 24, 1, 16, dtype=torch.float64, device=triton_device, n_global={})
    go = random_like(t["q"].shape, seed=1, device=triton_device)
    _, grads = check_against_reference(op("triton"), t, masks, 4, torch.float32, go)
    assert all((g == 0).all() for g in grads[3:6])
