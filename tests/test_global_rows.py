"""Global rows computed from the hidden states, and the op's local-rows-only mode behind them.

With few global tokens (`2 * G <= D`) the patched module computes the global rows straight from the hidden states
(`core/global_rows.py`, through `hf/self_attention.py`) and the op the local rows only
(`attention.local_rows_attention`), so `key_global` / `value_global` never project the whole sequence. Checked here:

* the local-rows-only op of every backend that runs on a CPU (`reference`, `cpu`, `triton` under the interpreter)
  against the dense reference with the global rows zeroed: output and every local gradient;
* the patched module and patched tiny models against unpatched HF, forward and the gradients of the input and of
  every parameter (`query_global`, `key_global`, `value_global` included), fp32 and fp64, with padding, different
  global counts per row (one row without any), both sides of the `2 * G <= D` rule (which path ran is counted);
* prefix-tuning against a dense oracle written here (HF has no prefix-tuning), prefix-propagation against the
  fused global rows (the path the prefix tests check against a dense re-implementation);
* `layer_head_mask` scaling, dropout (exact zeros as `p -> 1`, unbiased on average, seeded determinism);
* on a GPU (skipped without CUDA): the Triton kernels' local-rows-only mode against the fp64 reference, and the
  patched module on the Triton backend against HF.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import batch, build, scalar_loss

transformers = pytest.importorskip("transformers")

from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.attention import local_rows_attention, select_backend  # noqa: E402
from prefix_kernels.backends import cuda as cuda_attention  # noqa: E402
from prefix_kernels.backends import triton as triton_attention  # noqa: E402
from prefix_kernels.core.checks import check_inputs  # noqa: E402
from prefix_kernels.core.reference import dense_attention  # noqa: E402
from prefix_kernels.hf import patching  # noqa: E402
from prefix_kernels.hf import self_attention as fused_module  # noqa: E402

LOCAL_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CPU_BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_attention.INTERPRET, reason="the Triton backend takes CPU tensors only under TRITON_INTERPRET=1 "
    "(test_local_rows_only_triton_on_gpu runs it on a GPU)"))]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs of the fused backends start as NaN: a global row left unwritten fails every comparison."""
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")


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


def random_inputs(b, n, h, d, *, prefix=0, dtype=torch.float32, requires_grad=False, seed=0):
    """`q, k, v, q_global, k_global, v_global` `(B, N, H, D)` and, with `prefix`, `prefix_k, prefix_v` `(P, H, D)`."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict.fromkeys(("q", "k", "v", "q_global", "k_global", "v_global"), (b, n, h, d))
    if prefix:
        shapes.update(prefix_k=(prefix, h, d), prefix_v=(prefix, h, d))
    return {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for name, shape in shapes.items()}


def assert_close(got, want, dtype, msg=""):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, atol=TOL[dtype] * scale, rtol=0, msg=msg)


# ------------------------------------------------------------------------------------------------------------
# The local-rows-only op
# ------------------------------------------------------------------------------------------------------------


def _masks(b, n, globals_, pad):
    glob = torch.zeros(b, n, dtype=torch.bool)
    kpm = torch.zeros(b, n, dtype=torch.bool)
    for row, pos in globals_.items():
        glob[row, pos] = True
    for row, pos in pad.items():
        kpm[row, pos] = True
    return glob, kpm


# Globals at the ends, adjacent and inside windows; a row without any; padding at the tail and the head; 20 globals
# in one row (more than the Triton interpreter's 16-slot global block).
OP_CASES = {
    "mixed": dict(b=3, n=70, h=2, d=16, prefix=3, window=5,
                  globals_={0: [0, 7, 8, 40, 69], 2: list(range(5, 65, 3))},
                  pad={1: list(range(60, 70)), 2: [0, 1, 2, 3, 4]}),
    "no_prefix": dict(b=2, n=37, h=1, d=16, prefix=0, window=3, globals_={0: [36], 1: [0, 1]}, pad={}),
    "no_global_token": dict(b=2, n=33, h=2, d=16, prefix=2, window=4, globals_={}, pad={1: list(range(25, 33))}),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(OP_CASES))
def test_local_rows_only_op_matches_dense_reference(backend, case):
    c = dict(OP_CASES[case])
    b, n, h, d, window = c["b"], c["n"], c["h"], c["d"], c["window"]
    dtype = torch.float64 if backend == "reference" else torch.float32
    t = random_inputs(b, n, h, d, prefix=c["prefix"], dtype=dtype, requires_grad=True, seed=3)
    glob, pad = _masks(b, n, c["globals_"], c["pad"])
    # The dense reference computes the global rows too (with arbitrary global projections): zero them.
    want = dense_attention(**t, window=window, is_global=glob, key_padding_mask=pad)
    want = want.masked_fill(glob[:, :, None, None], 0.0)
    local = {name: t[name] for name in LOCAL_NAMES if name in t}
    got = local_rows_attention(**local, window=window, is_global=glob, key_padding_mask=pad, backend=backend)
    assert got.dtype == dtype and not got.isnan().any()
    assert_close(got, want, dtype)
    if glob.any():
        assert got[glob].abs().max().item() == 0.0
    # A large output gradient on the global rows must not reach any input.
    grad_out = torch.randn(got.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad_out[glob] *= 1e3
    got_grads = torch.autograd.grad(got, list(local.values()), grad_out)
    want_grads = torch.autograd.grad(want, list(local.values()), grad_out)
    for name, g, w in zip(local, got_grads, want_grads, strict=True):
        assert not g.isnan().any(), name
        assert_close(g, w, dtype, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_local_rows_only_op_with_dropout(backend):
    """Dropout in the local-rows-only mode: global rows stay exactly 0, a seed gives one result (forward and
    backward), and the local rows average out to the undropped result."""
    b, n, h, d, window = 2, 40, 2, 16, 4
    t = random_inputs(b, n, h, d, prefix=2, requires_grad=True, seed=5)
    glob, pad = _masks(b, n, {0: [0, 17], 1: [39]}, {1: [30, 31, 32]})
    local = {name: t[name] for name in LOCAL_NAMES}
    kw = dict(window=window, is_global=glob, key_padding_mask=pad, backend=backend)

    def forward(seed):
        torch.manual_seed(seed)
        return local_rows_attention(**local, **kw, dropout_p=0.3)

    def run(seed):
        out = forward(seed)
        return out.detach(), torch.autograd.grad(out.square().sum(), list(local.values()))

    out, grads = run(0)
    again, grads_again = run(0)
    assert torch.equal(out, again) and all(torch.equal(x, y) for x, y in zip(grads, grads_again, strict=True))
    assert not torch.equal(out, forward(1).detach())
    assert out[glob].abs().max().item() == 0.0 and not out.isnan().any()
    with torch.no_grad():
        plain = local_rows_attention(**local, **kw)
        draws = 16 if backend == "triton" else 200
        mean = sum(forward(seed) for seed in range(draws)) / draws
    live = ~(glob | pad)
    # Inverted dropout is unbiased: the error of the mean shrinks as 1 / sqrt(draws).
    assert (mean - plain)[live].abs().mean() < 1.5 * (out - plain)[live].abs().mean() / draws**0.5


def test_local_rows_only_checks():
    t = random_inputs(1, 16, 2, 8)
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
    mask = torch.zeros(glob.shape, dtype=dtype)
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
    assert_close(out, want_out, dtype, "output")
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert_close(g, want_grads[name], dtype, name)
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
    assert_close(got, want, dtype, "output")
    for i, (a, w) in enumerate(zip(torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves,
                                                                                                   grad_out),
                                   strict=True)):
        assert_close(a, w, dtype, f"leaf {i}")
    assert paths == {"direct": 1, "fused": 0}


def model_run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    scalar_loss(out).backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


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
    got, got_grads = model_run(model, inputs)
    layers = model.config.num_hidden_layers if name.startswith("Longformer") else model.config.encoder_layers
    assert paths == {"direct": layers, "fused": 0}
    monkeypatch.setattr(fused_module, "pays", lambda g, d: False)
    want, want_grads = model_run(model, inputs)
    assert paths == {"direct": layers, "fused": layers}
    key = "logits" if "logits" in want else "last_hidden_state"
    assert_close(got[key], want[key], torch.float64)
    assert got_grads.keys() == want_grads.keys()
    assert any(("prefix" if method != "none" else "key_global") in k for k in got_grads)
    for k, g in got_grads.items():
        assert_close(g, want_grads[k], torch.float64, k)


# ------------------------------------------------------------------------------------------------------------
# Tiny models against HF
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDForConditionalGeneration"])
def test_patched_model_matches_hf(paths, name):
    """fp32, `tiny_models.batch`: globals at different places per row (1 and 2 per row, D = 8), padding in row
    1; the logits and every parameter's gradient."""
    dtype = torch.float32
    hf = build(name)
    ours = pk.patch_longformer(copy.deepcopy(hf), "reference")
    inputs = batch(name)
    got, got_grads = model_run(ours, inputs)
    want, want_grads = model_run(hf, inputs)
    key = "logits"
    assert_close(got[key], want[key], dtype)
    assert got_grads.keys() == want_grads.keys()
    for k, g in got_grads.items():
        assert_close(g, want_grads[k], dtype, k)
    assert any("key_global" in k for k in got_grads) and any("value_global" in k for k in got_grads)
    assert paths["direct"] == 2 and paths["fused"] == 0  # both layers


def test_patched_model_with_the_cpu_backend(paths):
    """The `cpu` backend's local-rows-only op behind a patched model (what `auto` runs on a CPU)."""
    hf = build("LongformerForTokenClassification")
    ours = pk.patch_longformer(copy.deepcopy(hf), "cpu")
    inputs = batch("LongformerForTokenClassification")
    got, got_grads = model_run(ours, inputs)
    want, want_grads = model_run(hf, inputs)
    assert_close(got.logits, want.logits, torch.float32)
    for k, g in got_grads.items():
        assert_close(g, want_grads[k], torch.float32, k)
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

def gpu(test):
    """Marked `gpu` (selected by `pytest -m gpu`, as the GPU check runs them) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))
# atol relative to max(1, |reference|), on top of twice the error of the same computation in PyTorch at the dtype.
GPU_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_local_rows_only_triton_on_gpu(monkeypatch, dtype):
    """Longformer-base heads (H=12, D=64, w=256), N=2048, 0-17 globals per row, padding, a prefix: output and the
    local gradients against the fp64 dense reference with the global rows zeroed (error <= 2x PyTorch's at the
    dtype + atol)."""
    if pk.available_backends()["triton"] is not None:
        pytest.skip(f"backend 'triton' unavailable: {pk.available_backends()['triton']}")
    monkeypatch.setenv("PREFIX_KERNELS_POISON", "1")
    b, n, h, d, w = 2, 2048, 12, 64, 256
    t = {k: x.cuda() for k, x in random_inputs(b, n, h, d, prefix=4, dtype=torch.float64, seed=11).items()}
    g = torch.Generator().manual_seed(12)
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[0, torch.randperm(n, generator=g)[:17]] = True
    glob[1, :3] = True
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, 1800:] = True
    glob, pad = glob.cuda(), pad.cuda()
    go = torch.randn(b, n, h, d, generator=torch.Generator().manual_seed(13), dtype=torch.float64).cuda()

    def run(fn, dt):
        leaves = {k: t[k].to(dt).requires_grad_() for k in LOCAL_NAMES}
        out = fn(leaves, dt)
        return out, torch.autograd.grad(out, list(leaves.values()), go.to(out.dtype))

    def dense(leaves, dt):
        proj = {k: t[k].to(dt) for k in ("q_global", "k_global", "v_global")}
        out = dense_attention(**leaves, **proj, window=w, is_global=glob, key_padding_mask=pad)
        return out.masked_fill(glob[:, :, None, None], 0.0)

    got = run(lambda leaves, dt: local_rows_attention(**leaves, window=w, is_global=glob, key_padding_mask=pad,
                                                      backend="triton"), dtype)
    ref = run(dense, torch.float64)
    base = ref if dtype == torch.float32 else run(dense, dtype)
    assert got[0].dtype == dtype and (got[0][glob] == 0).all()
    for label, a, bb, r in [("out", got[0], base[0], ref[0]),
                            *zip(LOCAL_NAMES, got[1], base[1], ref[1], strict=True)]:
        assert torch.isfinite(a).all(), label
        err = (a.double() - r).abs().max().item()
        base_err = 0.0 if dtype == torch.float32 else (bb.double() - r).abs().max().item()
        assert err <= 2 * base_err + GPU_ATOL[dtype] * max(1.0, r.abs().max().item()), (label, err, base_err)


@gpu
def test_patched_module_on_gpu_matches_hf(paths):
    """fp32 on the GPU: the direct global rows with the Triton backend's local rows against HF."""
    if pk.available_backends()["triton"] is not None:
        pytest.skip(f"backend 'triton' unavailable: {pk.available_backends()['triton']}")
    hf, ours = self_attention(torch.float32)
    hf.cuda()
    patching.patch_longformer(ours, "triton").cuda()
    x, grad_out, glob, pad = module_case((16, 2, 5), torch.float32)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in hf_mask(glob, pad, torch.float32).items()}
    got = module_run(ours, x.cuda(), kwargs, grad_out.cuda())
    want = module_run(hf, x.cuda(), kwargs, grad_out.cuda())
    (out, grads), (want_out, want_grads) = got, want
    for name, a, w in [("output", out, want_out), *((k, grads[k], want_grads[k]) for k in want_grads)]:
        torch.testing.assert_close(a, w, atol=1e-4 * max(1.0, w.abs().max().item()), rtol=0, msg=name)
    assert paths == {"direct": 1, "fused": 0}
