"""The "cpu" backend (block-batched PyTorch matmuls) against the dense float64 reference.

* fp32: corner cases (N = 1, w = 0, windows beyond N, a row of padding only, every token global); output and all
  eight gradients within ~1e-5 of float64. Random problems (hypothesis, with block and group sizes from one row
  up) are in `tests/test_properties.py`.
* bf16 / fp16: error within 2x that of the same computation done by PyTorch in that dtype (matmuls in the
  dtype, softmax in fp32), plus a small atol.
* dropout: output and all eight gradients equal the dense reference run with the masks the backend documents
  (rebuilt here from its generator), so the forward and the backward use the same masks, scaled by 1 / (1 - p);
  the keep rate; determinism under `torch.manual_seed`; replay under gradient checkpointing.
* memory linear in N, measured inside the op; `torch.library.opcheck`; `torch.compile(fullgraph=True)`;
  patched tiny HF models against unpatched HF, forward and backward.
Outputs are NaN-poisoned before they are written, so anything never written fails. Its dispatch is in
`tests/test_dispatch.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dropout_masks import cpu_keep_masks
from helpers import check_against_reference, dense_in_dtype, make_inputs, op, random_like, run_with_grads

import prefix_kernels as pk
from prefix_kernels.backends import cpu as cpu_attention
from prefix_kernels.core import custom_op, reference
from prefix_kernels.core.checks import check_inputs

pytestmark = pytest.mark.usefixtures("poison_outputs")

_cpu = op("cpu")


def _problem(b, n, h, d, *, n_global, pad_max, prefix, batch_prefix, seed, empty_rows=()):
    """float64 inputs, both masks, and an output gradient."""
    x, masks = make_inputs(b, n, h, d, dtype=torch.float64, seed=seed, prefix=prefix, batch_prefix=batch_prefix,
                           n_global=n_global, pad=pad_max, empty_rows=empty_rows)
    return x, masks, random_like((b, n, h, d), seed=seed + 2)


def test_corner_cases_match_dense_reference():
    """N = 1, w = 0, a window beyond N, a batch row that is all padding, G = 0 with the global projections given,
    every token global."""
    cases = [
        dict(b=1, n=1, window=0, n_global=(0, 0), pad_max=0, prefix=0),
        dict(b=2, n=1, window=5, n_global=(1, 1), pad_max=0, prefix=2),
        # a whole batch row of padding: output and gradients 0
        dict(b=2, n=70, window=0, n_global=(0, 3), pad_max=10, prefix=0, empty_rows=[1]),
        dict(b=2, n=50, window=200, n_global=(0, 2), pad_max=0, prefix=3),
        dict(b=1, n=9, window=2, n_global=(9, 9), pad_max=0, prefix=1),
    ]
    for i, case in enumerate(cases):
        window = case.pop("window")
        x, masks, grad_out = _problem(h=2, d=8, batch_prefix=False, seed=i, **case)
        check_against_reference(_cpu, x, masks, window, torch.float32, grad_out, atol=1e-5, label=f"case {i}")


# (B, N, H, D, window, globals per row, pad_max, prefix, batch_prefix)
LOW_PRECISION_CASES = {
    "prefix_d32": (2, 300, 2, 32, 40, (0, 4), 60, 4, False),
    "batch_prefix_d64": (1, 257, 2, 64, 64, (1, 3), 0, 3, True),
    "window_over_n": (2, 100, 1, 16, 150, (0, 2), 30, 0, False),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(LOW_PRECISION_CASES))
def test_low_precision_within_twice_the_same_dtype_error(name, dtype):
    b, n, h, d, window, n_global, pad_max, prefix, batch_prefix = LOW_PRECISION_CASES[name]
    x, masks, grad_out = _problem(b, n, h, d, n_global=n_global, pad_max=pad_max, prefix=prefix,
                                  batch_prefix=batch_prefix, seed=3)
    _, grads = check_against_reference(_cpu, x, masks, window, dtype, grad_out, baseline=dense_in_dtype, atol=1e-3)
    assert all(g.dtype == dtype for g in grads if g is not None)


# ------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [3, 64])
def test_dropout_matches_dense_reference_with_the_documented_masks(monkeypatch, block):
    p = 0.3
    x, masks, grad_out = _problem(2, 40, 2, 8, n_global=(0, 3), pad_max=8, prefix=3, batch_prefix=True, seed=11)
    window = 5
    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", block)
    monkeypatch.setattr(cpu_attention, "GROUP_BYTES", 8000)  # several groups, several draws
    torch.manual_seed(123)
    seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op will draw after manual_seed(123)
    keeps = iter(cpu_keep_masks(x, masks, window, p, seed))
    monkeypatch.setattr(reference, "_dropout", lambda probs, dp: probs * next(keeps).to(probs.dtype) / (1 - dp))
    torch.manual_seed(123)
    out, _ = check_against_reference(_cpu, x, masks, window, torch.float32, grad_out, atol=1e-5, dropout_p=p)
    no_drop = run_with_grads(_cpu, x, masks, window, torch.float32, grad_out)[0]
    assert not torch.allclose(out, no_drop)


def test_dropout_keep_rate_and_scale():
    p = 0.1
    kept = cpu_attention._DropoutMasks(p, 2**40 + 7, torch.float32).next((1000, 1000))
    assert abs(1 - kept.mean().item() - p) < 4 * (p * (1 - p) / 1e6) ** 0.5
    assert torch.equal(kept, cpu_attention._DropoutMasks(p, 2**40 + 7, torch.float32).next((1000, 1000)))
    # Every key of a row has the same value 1: each output element is (sum of the row's kept probabilities) /
    # (1 - p), whose mean over many rows is 1 when kept entries are scaled by 1 / (1 - p).
    b, n, h, d = 1, 2048, 4, 8
    ones = torch.ones(b, n, h, d)
    q = torch.randn(b, n, h, d, generator=torch.Generator().manual_seed(0))
    out = _cpu(q=q, k=torch.randn_like(q), v=ones, window=64, dropout_p=p)
    assert abs(out.mean().item() - 1.0) < 0.01
    assert out.min() >= 0 and out.max() <= 1 / (1 - p) + 1e-5


def test_dropout_is_seeded():
    x, masks, _ = _problem(1, 30, 2, 8, n_global=(1, 2), pad_max=0, prefix=0, batch_prefix=False, seed=5)
    x = {k: t.float() for k, t in x.items()}

    def call(seed):
        torch.manual_seed(seed)
        return _cpu(**x, **masks, window=4, dropout_p=0.25)

    assert torch.equal(call(1), call(1)) and not torch.equal(call(1), call(2))
    assert torch.equal(_cpu(**x, **masks, window=4, dropout_p=0.0), _cpu(**x, **masks, window=4))


def test_gradient_checkpointing_replays_the_dropout_masks():
    x, masks, grad_out = _problem(2, 50, 2, 8, n_global=(0, 2), pad_max=5, prefix=2, batch_prefix=False, seed=9)
    leaves = {k: t.float().requires_grad_() for k, t in x.items()}

    def fn(*tensors):
        return _cpu(**dict(zip(leaves, tensors, strict=True)), **masks, window=6, dropout_p=0.2) * 2

    torch.manual_seed(0)
    plain = fn(*leaves.values())
    want = torch.autograd.grad(plain, list(leaves.values()), grad_out.float())
    torch.manual_seed(0)
    ckpt = torch.utils.checkpoint.checkpoint(fn, *leaves.values(), use_reentrant=False)
    got = torch.autograd.grad(ckpt, list(leaves.values()), grad_out.float())
    assert torch.equal(ckpt, plain)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_memory_stays_linear_in_n(mode):
    """Measured inside the custom op (the CPU tracker runs the package's ops under its mode): no allocation
    reaches a quarter of one `(B, H, N, 2w + 1 + G + P)` fp32 band-score tensor and the peak (the eight input
    gradients included) stays below three of them; one `N x N` fp32 score tensor would be 40x that bound."""
    from prefix_kernels.cli.memory import peak_memory

    b, n, h, d, w, g, p = 1, 16384, 2, 16, 64, 3, 4
    x, masks = make_inputs(b, n, h, d, prefix=p, n_global=g, pad={0: range(n - n // 16, n)},
                           requires_grad=mode == "fwdbwd")
    is_global, pad = masks["is_global"], masks["key_padding_mask"]
    band_bytes = 4 * b * h * n * (2 * w + 1 + g + p)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: slow with intra-op threads on a shared runner
    try:
        with peak_memory("cpu") as mem:
            if mode == "fwd":
                with torch.no_grad():
                    _cpu(**x, window=w, is_global=is_global, key_padding_mask=pad)
            else:
                out = _cpu(**x, window=w, is_global=is_global, key_padding_mask=pad)
                torch.autograd.grad(out, list(x.values()), torch.randn_like(out))
                del out
    finally:
        torch.set_num_threads(threads)
    assert 0 < mem.largest <= band_bytes / 4, f"largest allocation {mem.largest / 2**20:.1f} MB"
    assert mem.peak <= 3 * band_bytes, f"peak {mem.peak / 2**20:.1f} MB > 3 x {band_bytes / 2**20:.1f} MB"


# ------------------------------------------------------------------------------------------------------------
# Custom op, torch.compile, Hugging Face
# ------------------------------------------------------------------------------------------------------------


def test_custom_op_opcheck():
    assert pk.available_backends()["cpu"] is None  # loads the backend: its launchers are registered with the op
    x, masks, _ = _problem(2, 20, 1, 8, n_global=(0, 2), pad_max=3, prefix=2, batch_prefix=False, seed=4)
    a = check_inputs(**{k: v.float().requires_grad_() for k, v in x.items()}, **masks, window=3)
    for dropout_p, seed in ((0.0, None), (0.2, torch.tensor(2**40, dtype=torch.int64))):
        args = (a.q, a.k, a.v, a.q_global, a.k_global, a.v_global, a.prefix_k, a.prefix_v, None, None, None,
                a.key_padding_mask, a.is_global, None, seed, "cpu", a.window, a.softmax_scale, dropout_p)
        torch.library.opcheck(custom_op.fused_attention_fwd, args)


def test_torch_compile_fullgraph_matches_eager():
    x, masks, _ = _problem(1, 24, 2, 8, n_global=(1, 2), pad_max=0, prefix=0, batch_prefix=False, seed=2)
    leaves = [x[n].float().requires_grad_() for n in ("q", "k", "v", "q_global", "k_global", "v_global")]

    def fn(*tensors):
        return _cpu(**dict(zip(("q", "k", "v", "q_global", "k_global", "v_global"), tensors, strict=True)),
                    **masks, window=3)

    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    c_out = compiled(*leaves)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(c_out.sum(), leaves), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDModel"])
def test_patched_tiny_model_matches_hf(name):
    pytest.importorskip("transformers")
    from tiny_models import assert_same_grads, batch, build, main_output, run_model

    hf = build(name)
    ours = pk.patch_longformer(copy.deepcopy(hf), backend="cpu")
    inputs = batch(name)
    want, want_grads = run_model(hf, inputs)
    got, got_grads = run_model(ours, inputs)
    torch.testing.assert_close(main_output(got), main_output(want), atol=1e-5, rtol=0)
    assert_same_grads(got_grads, want_grads, 1e-5)
