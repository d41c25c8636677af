"""The op's local-rows-only mode (`attention.local_rows_attention`), behind the global rows computed from the hidden
states (the patched module's side is in `hf/test_self_attention.py`).

* every backend that runs it (`reference`, `cpu`, `triton`: through the interpreter without CUDA, compiled on CUDA
  tensors with it) against the dense float64 reference with its global rows zeroed, under the error rule of
  `helpers.py`: output and every local gradient, global rows exactly 0, no gradient through them;
* dropout, every backend: global rows stay 0, a seed gives one result (forward and backward), the local rows
  average out to the undropped result;
* the Triton kernels' dropout bits: the keep mask of the documented Philox scheme applied in the reference gives
  the kernels' output and gradients (under the interpreter with its tiles and a GPU's; on a GPU, compiled);
* the argument checks of the mode, and the CUDA library declining it;
* on a GPU: the Triton kernels at the longformer-base layer shape in bf16 / fp16 / fp32.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import check_against_reference, exact_or_atomic, make_inputs, random_like, skip_unless_runs

import prefix_kernels as pk
from prefix_kernels.attention import local_rows_attention, select_backend
from prefix_kernels.backends import cuda as cuda_attention
from prefix_kernels.core import reference
from prefix_kernels.core.checks import check_inputs
from prefix_kernels.core.reference import dense_attention

pytestmark = pytest.mark.usefixtures("poison_outputs")

# `(backend, device)` of every backend that computes the local rows alone (the CUDA library declines them, see
# `test_local_rows_only_checks`); the cases that cannot run here say why.
BACKENDS = (pytest.param("reference", "cpu", id="reference-cpu"),
            pytest.param("cpu", "cpu", id="cpu-cpu"),
            pytest.param("triton", "cpu", id="triton-cpu-interpreter"),
            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))


def local_op(backend: str):
    """`local_rows_attention` with an explicit `backend`."""
    return functools.partial(local_rows_attention, backend=backend)


def dense_local_rows(q, k, v, *, is_global=None, **kwargs):
    """The dense reference with its global rows zeroed. The global projections only feed the global rows, so any
    will do: `q, k, v` detached (no gradient reaches the inputs through them)."""
    out = dense_attention(q, k, v, is_global=is_global, q_global=q.detach(), k_global=k.detach(),
                          v_global=v.detach(), **kwargs)
    return out if is_global is None else out.masked_fill(is_global[:, :, None, None], 0.0)


# Globals at the ends, adjacent and inside windows; a row without any; padding at the tail and the head; 20 globals
# in one row (more than the Triton interpreter's 16-slot global block).
CASES = {
    "mixed": dict(b=3, n=70, h=2, d=16, prefix=3, window=5,
                  n_global={0: [0, 7, 8, 40, 69], 2: list(range(5, 65, 3))},
                  pad={1: list(range(60, 70)), 2: [0, 1, 2, 3, 4]}),
    "no_prefix": dict(b=2, n=37, h=1, d=16, prefix=0, window=3, n_global={0: [36], 1: [0, 1]}, pad={}),
    "no_global_token": dict(b=2, n=33, h=2, d=16, prefix=2, window=4, n_global={}, pad={1: list(range(25, 33))}),
}


@pytest.mark.program_order
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_local_rows_only_op_matches_dense_reference(backend, device, case):
    """fp32 (the reference backend: fp64 to 1e-10) against fp64: output and the five local gradients. A large
    output gradient on the global rows must not reach any input."""
    skip_unless_runs(backend, device)
    c = dict(CASES[case])
    window = c.pop("window")
    t, masks = make_inputs(**c, dtype=torch.float64, device=device, seed=3, global_projections=False)
    glob = masks["is_global"]
    grad_out = random_like(t["q"].shape, seed=1, device=device)
    grad_out[glob] *= 1e3
    dtype, atol = (torch.float64, 1e-10) if backend == "reference" else (torch.float32, 1e-5)
    out, _ = check_against_reference(local_op(backend), t, masks, window, dtype, grad_out,
                                     reference=dense_local_rows, baseline=None, atol=atol, label=backend)
    assert (out[glob] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_local_rows_only_op_with_dropout(backend, device):
    """Dropout in the local-rows-only mode: global rows stay exactly 0, a seed gives one result (forward and
    backward), and the local rows average out to the undropped result."""
    skip_unless_runs(backend, device)
    t, masks = make_inputs(2, 40, 2, 16, device=device, prefix=2, seed=5, global_projections=False,
                           n_global={0: [0, 17], 1: [39]}, pad={1: [30, 31, 32]}, requires_grad=True)
    glob, pad = masks["is_global"], masks["key_padding_mask"]
    kw = dict(**masks, window=4, backend=backend)

    def forward(seed):
        torch.manual_seed(seed)
        return local_rows_attention(**t, **kw, dropout_p=0.3)

    def run(seed):
        out = forward(seed)
        return out.detach(), torch.autograd.grad(out.square().sum(), list(t.values()))

    out, grads = run(0)
    again, grads_again = run(0)
    assert torch.equal(out, again)
    for a, b in zip(grads, grads_again, strict=True):  # the Triton backward's dQ atomics on a GPU
        torch.testing.assert_close(a, b, **exact_or_atomic(device))
    assert not torch.equal(out, forward(1).detach())
    assert out[glob].abs().max().item() == 0.0 and not out.isnan().any()
    with torch.no_grad():
        plain = local_rows_attention(**t, **kw)
        draws = 16 if backend == "triton" and device == "cpu" else 200
        mean = sum(forward(seed) for seed in range(draws)) / draws
    live = ~(glob | pad)
    # Inverted dropout is unbiased: the error of the mean shrinks as 1 / sqrt(draws).
    assert (mean - plain)[live].abs().mean() < 1.5 * (out - plain)[live].abs().mean() / draws**0.5


def test_local_rows_only_checks():
    t, _ = make_inputs(1, 16, 2, 8)
    glob = torch.zeros(1, 16, dtype=torch.bool)
    glob[0, 3] = True
    with pytest.raises(ValueError, match="q_global, k_global, v_global must be None with local_rows_only"):
        check_inputs(**t, window=2, is_global=glob, local_rows_only=True)
    with pytest.raises(ValueError, match="local_rows_only must be a bool"):
        check_inputs(t["q"], t["k"], t["v"], window=2, local_rows_only=1)
    # The public op stays strict: global tokens need the global projections.
    with pytest.raises(ValueError, match="q_global, k_global and v_global are required"):
        pk.longformer_attention(t["q"], t["k"], t["v"], window=2, is_global=glob)
    args = check_inputs(t["q"], t["k"], t["v"], window=2, is_global=glob, local_rows_only=True)
    assert args.local_rows_only and args.is_global is glob
    # No global token at all: an ordinary call.
    assert not check_inputs(t["q"], t["k"], t["v"], window=2, local_rows_only=True).local_rows_only
    # The CUDA library's launchers cannot take a global index without the global projections: declined with a
    # reason (so `auto` moves on), before any device check.
    assert "local rows only" in cuda_attention.cannot_serve(args)
    assert select_backend(args, "auto") != "cuda"


# ------------------------------------------------------------------------------------------------------------
# The Triton kernels with the documented dropout mask, and on a GPU
# ------------------------------------------------------------------------------------------------------------


def check_triton_local_rows(monkeypatch, t, masks, window, dtype, dropout_p):
    """The Triton kernels' local rows against the dense fp64 reference with the global rows zeroed, under the error
    rule (error <= 2x PyTorch's at the dtype + atol), global rows exactly 0. With dropout, the keep mask of the
    documented counter scheme (`dropout_masks.py`: key positions `0..N-1`, prefix key `p` at `ceil4(N) + p`) is
    applied in the reference: the kernels must drop exactly those probabilities, forward and backward."""
    b, n, h, _ = t["q"].shape
    prefix = t["prefix_k"].shape[-3] if "prefix_k" in t else 0
    device = t["q"].device
    kwargs = {}
    if dropout_p:
        from dropout_masks import philox_keep  # imports triton

        torch.manual_seed(5)
        seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op draws after manual_seed(5)
        positions = [*range(n), *(-(-n // 4) * 4 + i for i in range(prefix))]
        keep = torch.stack([philox_keep(seed, bh, range(n), positions, dropout_p) for bh in range(b * h)])
        keep = keep.view(b, h, n, n + prefix).to(device)
        # Only the reference calls `reference._dropout`; the Triton kernels draw their own bits.
        monkeypatch.setattr(reference, "_dropout", lambda probs, p: probs * keep.to(probs.dtype) / (1 - p))
        kwargs["dropout_p"] = dropout_p

    def triton_local_rows(**kw):
        torch.manual_seed(5)
        return local_rows_attention(**kw, backend="triton")

    go = random_like(t["q"].shape, seed=13, device=device)
    out, _ = check_against_reference(triton_local_rows, t, masks, window, dtype, go, reference=dense_local_rows,
                                     label=f"triton p={dropout_p}", **kwargs)
    assert (out[masks["is_global"]] == 0).all()


@pytest.mark.program_order
@pytest.mark.parametrize("small_tiles", [True, False], ids=["interpreter_tiles", "gpu_tiles"])
def test_local_rows_only_triton_dropout_uses_the_documented_mask(monkeypatch, small_tiles):
    """Under the interpreter, with its own tiles and with a GPU's: fp32, globals, padding, a prefix, p = 0.3."""
    skip_unless_runs("triton", "cpu")
    from prefix_kernels.backends.triton import launch

    monkeypatch.setattr(launch, "SMALL_TILES", small_tiles)
    t, masks = make_inputs(2, 90, 2, 16, dtype=torch.float64, seed=11, prefix=3, global_projections=False,
                           n_global={0: [0, 45, 46], 1: [89]}, pad={1: [80, 81, 82, 88, 89]})
    check_triton_local_rows(monkeypatch, t, masks, 20, torch.float32, 0.3)


# dropout_p: (B, N, H, D, window, row 1 padded from, prefix). Without dropout the longformer-base layer (H=12, D=64,
# w=256) at N=2048; with it fewer heads and keys, as the documented mask is rebuilt in NumPy (a few seconds).
GPU_SHAPES = {0.0: (2, 2048, 12, 64, 256, 1800, 4), 0.1: (2, 1000, 4, 64, 256, 900, 4)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,dropout_p", [
    pytest.param(dtype, p, id=f"{str(dtype)[6:]}-{p}",
                 # the GPU check's first tier: the local-rows-only path once without and once with dropout
                 marks=pytest.mark.gpu_short if (dtype, p) in ((torch.bfloat16, 0.0), (torch.float16, 0.1)) else ())
    for p in GPU_SHAPES for dtype in (torch.bfloat16, torch.float16, torch.float32)])
def test_local_rows_only_triton_on_gpu(monkeypatch, dtype, dropout_p):
    """Compiled for the GPU, 0-17 globals per row, padding, a prefix, without and with dropout: output and the
    local gradients (`check_triton_local_rows`)."""
    skip_unless_runs("triton", "cuda")
    b, n, h, d, w, pad_from, prefix = GPU_SHAPES[dropout_p]
    g = torch.Generator().manual_seed(12)
    t, masks = make_inputs(b, n, h, d, dtype=torch.float64, device="cuda", seed=11, prefix=prefix,
                           global_projections=False, pad={1: range(pad_from, n)},
                           n_global={0: torch.randperm(n, generator=g)[:17].tolist(), 1: [0, 1, 2]})
    check_triton_local_rows(monkeypatch, t, masks, w, dtype, dropout_p)
