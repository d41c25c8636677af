"""The patched self-attention's global rows computed from the hidden states (`core/global_rows.py`, through
`hf/self_attention.py`), against Hugging Face and dense oracles.

With few global tokens (`2 * G <= D`) the patched module computes the global rows straight from the hidden states
and the op the local rows only (`attention.local_rows_attention`, checked on its own in `test_local_rows.py`), so
`key_global` / `value_global` never project the whole sequence. Checked here:

* the patched module and patched tiny models against unpatched HF, forward and the gradients of the input and of
  every parameter (`query_global`, `key_global`, `value_global` included), fp32 and fp64, with padding, different
  global counts per row (one row without any), both sides of the `2 * G <= D` rule (which path ran is counted);
* a `key_global` that is not a plain `nn.Linear` (a subclass, a forward hook) takes the projections instead;
* prefix-tuning against a dense oracle written here (HF has no prefix-tuning), prefix-propagation against the
  fused global rows (the path the prefix tests check against a dense re-implementation);
* `layer_head_mask` scaling, dropout (exact zeros as `p -> 1`, unbiased on average, seeded determinism);
* on a GPU: the patched module on the Triton backend against HF.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_scaled, skip_unless_runs
from tiny_models import assert_same_grads, batch, build, run_model

transformers = pytest.importorskip("transformers")

from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.core.reference import dense_attention  # noqa: E402
from prefix_kernels.hf import patching  # noqa: E402
from prefix_kernels.hf import self_attention as fused_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_outputs")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture
def paths(monkeypatch):
    """Counts the calls of each way of computing the global rows: `direct` (from the hidden states) and `fused`
    (through the global projections and the op)."""
    counts = {"direct": 0, "fused": 0}
    direct, fused = fused_module.global_rows_from_hidden, fused_module._global_rows_projection

    def count_direct(*args, **kwargs):
        counts["direct"] += 1
        return direct(*args, **kwargs)

    def count_fused(*args, **kwargs):
        counts["fused"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(fused_module, "global_rows_from_hidden", count_direct)
    monkeypatch.setattr(fused_module, "_global_rows_projection", count_fused)
    return counts


# ------------------------------------------------------------------------------------------------------------
# The patched module against HF
# ------------------------------------------------------------------------------------------------------------


def self_attention(dtype=torch.float32, hidden=64, heads=2, window=8, dropout=0.0, seed=0):
    """An HF `LongformerSelfAttention` (`D = hidden / heads`, one-sided window `window / 2`) and a patched copy."""
    config = transformers.LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                                           attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    hf = LongformerSelfAttention(config, layer_id=0).to(dtype).eval()
    with torch.no_grad():  # HF initializes biases to 0: give them values, so their gradients mean something
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return hf, patching.patch_longformer(copy.deepcopy(hf), "reference")


def hf_mask(glob, pad, dtype):
    """HF's per-layer float mask (finfo.max global, finfo.min padding) and the boolean masks derived from it."""
    mask = torch.zeros(glob.shape, dtype=dtype, device=glob.device)
    mask[glob] = torch.finfo(dtype).max
    mask[pad] = torch.finfo(dtype).min
    return dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                is_global_attn=bool(glob.any()))


def module_run(module, x, kwargs, grad_out, **extra):
    """Output and the gradients of `x` and of every parameter, by name."""
    x = x.detach().requires_grad_()
    if isinstance(module, fused_module._FusedSelfAttention) and extra:
        out = fused_module.fused_self_attention(module, x, **kwargs, **extra)
    else:
        (out,) = module(x, **kwargs)
    names = [name for name, _ in module.named_parameters()]
    grads = torch.autograd.grad(out, [x, *module.parameters()], grad_out)
    return out, dict(zip(["input", *names], grads, strict=True))


def assert_same(got, want, dtype):
    (out, grads), (want_out, want_grads) = got, want
    assert_close_scaled(out, want_out, TOL[dtype], "output")
    assert_same_grads(grads, want_grads, TOL[dtype])
    # The comparison covers gradients that exist (`key_global.bias` adds one constant to a global row's text scores:
    # without prefix keys its gradient is 0 up to rounding).
    for name in ("key_global.weight", "value_global.weight", "value_global.bias", "query_global.weight",
                 "query_global.bias"):
        assert want_grads[name].abs().max() > 1e-3, name


def module_case(counts, dtype):
    """`(x, grad_out, is_global, key_padding_mask)` for 3 rows of 48 tokens, `counts[i]` globals in row `i`, the
    last row padded from position 40."""
    b, n = 3, 48
    g = torch.Generator().manual_seed(sum(counts))
    glob = torch.zeros(b, n, dtype=torch.bool)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[2, 40:] = True
    for row, count in enumerate(counts):
        glob[row, torch.randperm(40, generator=g)[:count]] = True
    x = torch.randn(b, n, 64, generator=g, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(b, n, 64, generator=g, dtype=torch.float64).to(dtype)
    return x, grad_out, glob, pad


# D = 32: 16 globals in a row still take the direct path, 17 do not.
COUNTS = pytest.mark.parametrize("counts", [(3, 0, 1), (16, 2, 5), (17, 1, 0)],
                                 ids=["few", "d_over_2", "over_d_over_2"])


@COUNTS
def test_module_matches_hf(paths, counts):
    """fp32 against HF: rows with different global counts (one row without any), padding at a row's tail, the
    output and every gradient."""
    hf, ours = self_attention(torch.float32)
    x, grad_out, glob, pad = module_case(counts, torch.float32)
    kwargs = hf_mask(glob, pad, torch.float32)
    assert_same(module_run(ours, x, kwargs, grad_out), module_run(hf, x, kwargs, grad_out), torch.float32)
    direct = 2 * max(counts) <= ours.head_dim
    assert paths == {"direct": int(direct), "fused": int(not direct)}


@COUNTS
def test_module_fp64_matches_dense_oracle(paths, counts):
    """fp64 to 1e-10, against every projection computed in full and the dense reference op (HF itself takes
    its softmax in fp32 even in fp64, about 1e-7 off)."""
    _, ours = self_attention(torch.float64)
    x, grad_out, glob, pad = module_case(counts, torch.float64)
    got = module_run(ours, x, hf_mask(glob, pad, torch.float64), grad_out)
    xx = x.clone().requires_grad_()
    out = dense_oracle(ours, xx, glob, pad, None, None)
    grads = torch.autograd.grad(out, [xx, *ours.parameters()], grad_out)
    want = out, dict(zip(["input", *(n for n, _ in ours.named_parameters())], grads, strict=True))
    assert_same(got, want, torch.float64)
    direct = 2 * max(counts) <= ours.head_dim
    assert paths == {"direct": int(direct), "fused": int(not direct)}


def test_key_and_value_global_project_nothing(paths, monkeypatch):
    """On the direct path `key_global` / `value_global` are never called (their weights enter the products with
    the hidden states); `query_global` projects the global rows only. (Calls are recorded at the class level: a
    hook on the instance would itself send the layer through the projections.)"""
    hf, ours = self_attention()
    names = {id(getattr(ours, name)): name for name in ("query_global", "key_global", "value_global")}
    calls = {}
    linear_forward = torch.nn.Linear.forward

    def recording_forward(self, x):
        if id(self) in names:
            calls.setdefault(names[id(self)], x.shape)
        return linear_forward(self, x)

    glob = torch.zeros(2, 32, dtype=torch.bool)
    glob[0, [1, 9]] = True
    glob[1, 30] = True
    x = torch.randn(2, 32, 64)
    kwargs = hf_mask(glob, torch.zeros_like(glob), torch.float32)
    want = module_run(hf, x, kwargs, torch.ones(2, 32, 64))
    monkeypatch.setattr(torch.nn.Linear, "forward", recording_forward)
    assert_same(module_run(ours, x, kwargs, torch.ones(2, 32, 64)), want, torch.float32)
    assert calls == {"query_global": torch.Size([2, 2, 64])} and paths["direct"] == 1


class _ShiftedLinear(torch.nn.Linear):
    """A Linear whose output is not `x @ W.T + b` alone (as with a LoRA adapter): its weights must not be used
    without calling it."""

    def forward(self, x):
        return super().forward(x) + 0.25 * x.roll(1, dims=-1)


@pytest.mark.parametrize("change", ["subclass", "forward_hook"])
def test_wrapped_key_global_takes_the_fused_path(paths, change):
    """A `key_global` that is not a plain `nn.Linear` (a subclass, or a forward hook that changes its output):
    the global rows go through the projections, and the result is HF's with the same layer."""
    hf, _ = self_attention()
    if change == "subclass":
        shifted = _ShiftedLinear(64, 64)
        shifted.load_state_dict(hf.key_global.state_dict())
        hf.key_global = shifted
    else:
        hf.key_global.register_forward_hook(lambda m, args, out: out + 0.25 * args[0].roll(1, dims=-1))
    ours = patching.patch_longformer(copy.deepcopy(hf), "reference")
    x, grad_out, glob, pad = module_case((3, 0, 1), torch.float32)
    kwargs = hf_mask(glob, pad, torch.float32)
    assert_same(module_run(ours, x, kwargs, grad_out), module_run(hf, x, kwargs, grad_out), torch.float32)
    assert paths == {"direct": 0, "fused": 1}


def test_layer_head_mask_scales_global_and_local_rows(paths, monkeypatch):
    """transformers 4.x passes `layer_head_mask` (not in this transformers' signature: checked against HF's output
    scaled per head), on both paths."""
    hf, ours = self_attention()
    glob = torch.zeros(2, 32, dtype=torch.bool)
    glob[0, [0, 5, 6]] = True
    glob[1, 31] = True
    pad = torch.zeros_like(glob)
    pad[1, 24:31] = True
    head_mask = torch.tensor([0.5, -2.0])
    x = torch.randn(2, 32, 64)
    grad_out = torch.randn(2, 32, 64)
    kwargs = hf_mask(glob, pad, torch.float32)
    scale = head_mask.repeat_interleave(32)  # per channel: heads are contiguous blocks of D = 32
    want = module_run(hf, x, kwargs, grad_out * scale)
    want = (want[0] * scale, want[1])
    assert_same(module_run(ours, x, kwargs, grad_out, layer_head_mask=head_mask), want, torch.float32)
    monkeypatch.setattr(fused_module, "pays", lambda g, d: False)
    assert_same(module_run(ours, x, kwargs, grad_out, layer_head_mask=head_mask), want, torch.float32)
    assert paths == {"direct": 1, "fused": 1}


# ------------------------------------------------------------------------------------------------------------
# Prefix-tuning (dense oracle) and prefix-propagation
# ------------------------------------------------------------------------------------------------------------


class _Prefix:
    """Stands in for `apply_prefix_tuning`'s per-layer object: `key_values(like)` gives `(P, H, D)` keys/values."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def key_values(self, like):
        return self.k.to(like.dtype), self.v.to(like.dtype)


def dense_oracle(attn, x, glob, pad, prefix_k, prefix_v):
    """The module's result with every projection computed in full and the dense reference op."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim

    def proj(linear):
        return linear(x).view(b, n, h, d)

    return dense_attention(proj(attn.query), proj(attn.key), proj(attn.value), window=attn.one_sided_attn_window_size,
                           is_global=glob, key_padding_mask=pad, q_global=proj(attn.query_global),
                           k_global=proj(attn.key_global), v_global=proj(attn.value_global), prefix_k=prefix_k,
                           prefix_v=prefix_v).reshape(b, n, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefix_tuning_module_matches_dense_oracle(paths, dtype):
    _, ours = self_attention(dtype)
    g = torch.Generator().manual_seed(4)
    pk_, pv_ = (torch.randn(3, 2, 32, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    ours._prefix_kernels_prefix = _Prefix(pk_, pv_)
    glob = torch.zeros(2, 40, dtype=torch.bool)
    glob[0, [0, 12, 13]] = True
    pad = torch.zeros_like(glob)
    pad[1, 33:] = True
    x = torch.randn(2, 40, 64, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 40, 64, generator=g, dtype=torch.float64).to(dtype)
    leaves = [x, pk_, pv_, *ours.parameters()]
    got = fused_module.fused_self_attention(ours, x, **hf_mask(glob, pad, dtype))
    want = dense_oracle(ours, x, glob, pad, pk_, pv_)
    assert_close_scaled(got, want, TOL[dtype], "output")
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    for i, (a, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close_scaled(a, w, TOL[dtype], f"leaf {i}")
    assert paths == {"direct": 1, "fused": 0}


@pytest.mark.parametrize("method", ["none", "propagation", "tuning"])
@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDModel"])
def test_models_match_the_fused_global_rows_in_fp64(paths, monkeypatch, method, name):
    """fp64 models, plain or with a prefix (P = 2: prefix-propagation adds 2 global tokens, so at most 3 per row,
    within D / 2 = 4): the direct global rows give the fused path's output and gradients to 1e-10 (every
    parameter; with a prefix, the prefix and the head)."""
    model = build(name)
    if method != "none":
        apply = pk.apply_prefix_propagation if method == "propagation" else pk.apply_prefix_tuning
        prefix = apply(model, num_prefix=2, backend="reference")
        with torch.no_grad():
            for p in prefix.parameters():
                p.normal_(0.0, 0.5)
    else:
        pk.patch_longformer(model, "reference")
    model.double()
    inputs = batch(name)
    got, got_grads = run_model(model, inputs)
    layers = model.config.num_hidden_layers if name.startswith("Longformer") else model.config.encoder_layers
    assert paths == {"direct": layers, "fused": 0}
    monkeypatch.setattr(fused_module, "pays", lambda g, d: False)
    want, want_grads = run_model(model, inputs)
    assert paths == {"direct": layers, "fused": layers}
    key = "logits" if "logits" in want else "last_hidden_state"
    assert_close_scaled(got[key], want[key], TOL[torch.float64])
    assert any(("prefix" if method != "none" else "key_global") in k for k, g in got_grads.items() if g is not None)
    assert_same_grads(got_grads, want_grads, TOL[torch.float64])


# ------------------------------------------------------------------------------------------------------------
# Tiny models against HF
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDForConditionalGeneration"])
def test_patched_model_matches_hf(paths, name):
    """fp32, `tiny_models.batch`: globals at different places per row (1 and 2 per row, D = 8), padding in row
    1; the logits and every parameter's gradient."""
    hf = build(name)
    ours = pk.patch_longformer(copy.deepcopy(hf), "reference")
    inputs = batch(name)
    got, got_grads = run_model(ours, inputs)
    want, want_grads = run_model(hf, inputs)
    assert_close_scaled(got.logits, want.logits, TOL[torch.float32])
    assert_same_grads(got_grads, want_grads, TOL[torch.float32])
    with_grad = [k for k, g in got_grads.items() if g is not None]
    assert any("key_global" in k for k in with_grad) and any("value_global" in k for k in with_grad)
    assert paths["direct"] == 2 and paths["fused"] == 0  # both layers


def test_patched_model_with_the_cpu_backend(paths):
    """The `cpu` backend's local-rows-only op behind a patched model (what `auto` runs on a CPU): the same
    parameters get a gradient as in HF, and every one matches."""
    hf = build("LongformerForTokenClassification")
    ours = pk.patch_longformer(copy.deepcopy(hf), "cpu")
    inputs = batch("LongformerForTokenClassification")
    got, got_grads = run_model(ours, inputs)
    want, want_grads = run_model(hf, inputs)
    assert_close_scaled(got.logits, want.logits, TOL[torch.float32])
    assert_same_grads(got_grads, want_grads, TOL[torch.float32])
    assert paths["direct"] == 2


# ------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------


def _dropout_module(p):
    hf, ours = self_attention(dropout=p)
    hf.train()
    ours.train()
    glob = torch.zeros(2, 48, dtype=torch.bool)
    glob[0, [0, 20, 21]] = True
    glob[1, 5] = True
    pad = torch.zeros_like(glob)
    pad[1, 40:] = True
    return hf, ours, glob, hf_mask(glob, pad, torch.float32)


def test_dropout_near_one_zeroes_global_rows(paths):
    """With `p` near 1 a global row usually loses every probability: its output is then exactly 0 (the value
    bias enters through the kept probabilities only). HF does the same."""
    hf, ours, glob, kwargs = _dropout_module(0.995)
    x = torch.randn(2, 48, 64)
    zero = {"hf": 0, "ours": 0}
    for seed in range(20):
        for key, module in (("hf", hf), ("ours", ours)):
            torch.manual_seed(seed)
            with torch.no_grad():
                (out,) = module(x, **kwargs)
            rows = out[glob].view(-1, 2, 32)  # (global rows, heads, D)
            zero[key] += int((rows.abs().amax(-1) == 0).sum())
    total = 20 * int(glob.sum()) * 2
    # Each (row, head) keeps nothing with probability 0.995 ** 48 (about 0.79; fewer keys in row 1).
    assert zero["ours"] > 0.6 * total and zero["hf"] > 0.6 * total
    assert paths["direct"] == 20


def test_dropout_is_unbiased_and_seeded(paths):
    hf, ours, glob, kwargs = _dropout_module(0.3)
    x = torch.randn(2, 48, 64)
    with torch.no_grad():
        (plain,) = copy.deepcopy(hf).eval()(x, **kwargs)

    def run(seed):
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        (out,) = ours(xx, **kwargs)
        grads = torch.autograd.grad(out.square().sum(), [xx, ours.key_global.weight, ours.value_global.bias])
        return out.detach(), grads

    out, grads = run(0)
    again, grads_again = run(0)
    assert torch.equal(out, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))
    assert not torch.equal(out[glob], run(1)[0][glob])
    draws = 100
    mean = sum(run(seed)[0] for seed in range(draws)) / draws
    err = (mean - plain)[glob].abs().mean()
    spread = (out - plain)[glob].abs().mean()
    assert spread > 0.01 and err < 1.5 * spread / draws**0.5


# ------------------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_patched_module_on_gpu_matches_hf(paths):
    """fp32 on the GPU: the direct global rows with the Triton backend's local rows against HF."""
    skip_unless_runs("triton", "cuda")
    hf, ours = self_attention(torch.float32)
    hf.cuda()
    patching.patch_longformer(ours, "triton").cuda()
    x, grad_out, glob, pad = module_case((16, 2, 5), torch.float32)
    kwargs = hf_mask(glob.cuda(), pad.cuda(), torch.float32)
    (out, grads), (want_out, want_grads) = (module_run(m, x.cuda(), kwargs, grad_out.cuda()) for m in (ours, hf))
    assert_close_scaled(out, want_out, 1e-4, "output")
    assert_same_grads(grads, want_grads, 1e-4)
    assert paths == {"direct": 1, "fused": 0}
