"""The patched self-attention against Hugging Face's where they could part: 16-bit scores near fp16's limit, hooks
on the global key / value layers, bf16 hidden states that share a large common component.

* The global rows from the hidden states (`core/global_rows.py`) scale the queries before any product: fp16 scores
  stay finite as far as HF's do.
* Every kind of hook that could observe or change `key_global` / `value_global` (forward, forward pre-, full
  backward, backward pre-, and the global module hooks) turns that path off: the result is HF's with the hook.
* bf16 gradients of the `cpu` backend stay within twice the error of HF's own bf16 computation, against float64.

The float64 oracle is the patched module on the reference backend (HF's own float64 layer returns NaN gradients for
these masks).
"""

from __future__ import annotations

import copy

import pytest
import torch

from prefix_kernels.hf import self_attention as fused_module
from prefix_kernels.hf.patching import patch_longformer

transformers = pytest.importorskip("transformers")

from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402


def layer(dtype=torch.float32, hidden=64, heads=2, window=8, seed=0) -> torch.nn.Module:
    config = transformers.LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    hf = LongformerSelfAttention(config, layer_id=0).to(dtype).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return hf


def patched(hf: torch.nn.Module, backend: str = "reference") -> torch.nn.Module:
    return patch_longformer(copy.deepcopy(hf), backend)


def call(module, x, glob, pad):
    """Output `(B, N, C)` of a self-attention module given HF's float mask built from `glob` and `pad`."""
    mask = torch.zeros(glob.shape, dtype=x.dtype)
    mask[glob] = 10000.0
    mask[pad] = -10000.0
    return module(x, attention_mask=mask, is_index_masked=pad, is_index_global_attn=glob & ~pad,
                  is_global_attn=bool(glob.any()))[0]


def grads(module, x, glob, pad, grad_out):
    """`{name: gradient}` of the input and every parameter."""
    x = x.detach().requires_grad_()
    out = call(module, x, glob, pad)
    names = ["input", *(n for n, _ in module.named_parameters())]
    return out, dict(zip(names, torch.autograd.grad(out, [x, *module.parameters()], grad_out), strict=True))


@pytest.fixture
def direct_calls(monkeypatch):
    """How often the global rows came from the hidden states."""
    calls = []
    original = fused_module.global_rows_from_hidden
    monkeypatch.setattr(fused_module, "global_rows_from_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def masks(b=2, n=32):
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[0, [0, 9]] = True
    glob[1, 30] = True
    pad = torch.zeros_like(glob)
    pad[1, 24:30] = True
    return glob, pad


def test_fp16_scores_near_hf_limit_stay_finite(direct_calls):
    """Global scores scaled to 1.2e4 - 3e4 (the unscaled products, `sqrt(32)` times larger, pass fp16's 65504): HF's
    fp16 output is finite, and so is ours, as close to the float64 result."""
    hf = layer()
    glob, pad = masks()
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # large global query/key weights: only the global rows see the large scores
        hf.query_global.weight.mul_(110.0)
        hf.key_global.weight.mul_(110.0)
        scores = call_scores(hf, x, glob)
    assert 1.2e4 < scores < 3e4, scores
    with torch.no_grad():
        ref = call(patched(hf.double()), x.double(), glob, pad)
    want = call(hf.half(), x.half(), glob, pad)
    got = call(patched(hf.half()), x.half(), glob, pad)
    assert torch.isfinite(want).all()
    assert torch.isfinite(got).all() and direct_calls
    assert (got.double() - ref).abs().max() <= 2 * (want.double() - ref).abs().max() + 2e-3 * ref.abs().max()


def call_scores(hf, x, glob) -> float:
    """The largest scaled global-row score of `hf` on `x`: `max |qg . kg| / sqrt(D)`."""
    d = hf.head_dim
    qg = hf.query_global(x).view(*x.shape[:2], -1, d)[glob]
    kg = hf.key_global(x).view(*x.shape[:2], -1, d)
    return max((torch.einsum("ghd,nhd->ghn", qg[i : i + 1], kg[b]).abs().max().item()) * d**-0.5
               for i, b in enumerate(glob.nonzero()[:, 0].tolist()))


HOOKS = {
    "forward": lambda m, f: m.register_forward_hook(lambda mod, args, out: out * 1.5),
    "forward_pre": lambda m, f: m.register_forward_pre_hook(lambda mod, args: (args[0] * 1.5,)),
    "full_backward": lambda m, f: m.register_full_backward_hook(lambda mod, gi, go: (gi[0] * 3.0,)),
    "backward_pre": lambda m, f: m.register_full_backward_pre_hook(lambda mod, go: (go[0] * 3.0,)),
    "global_forward": lambda m, f: f.register_module_forward_hook(
        lambda mod, args, out: out * 1.5 if mod is m else None),
    "global_forward_pre": lambda m, f: f.register_module_forward_pre_hook(
        lambda mod, args: (args[0] * 1.5,) if mod is m else None),
    "global_full_backward": lambda m, f: f.register_module_full_backward_hook(
        lambda mod, gi, go: (gi[0] * 3.0,) if mod is m else None),
    "global_backward_pre": lambda m, f: f.register_module_full_backward_pre_hook(
        lambda mod, go: (go[0] * 3.0,) if mod is m else None),
}


@pytest.mark.parametrize("which", ["key_global", "value_global"])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_every_hook_kind_on_the_global_projections_is_honoured(hook, which, direct_calls):
    """With the hook on the HF layer and on its patched copy, output and every gradient are HF's (the hooks scale
    values or gradients, so a path that bypasses them differs by far more than rounding). HF's layer cannot run
    under a global backward hook (it edits a view of a module's output in place): there the expected result is the
    patched layer's through the global projections, which call the hooked layers."""
    hf = layer()
    ours = patched(hf)
    glob, pad = masks()
    x, grad_out = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    fused_only = hook.startswith("global_") and "backward" in hook
    if fused_only:
        hf = patched(hf)
    handles = [HOOKS[hook](getattr(m, which), torch.nn.modules.module) for m in (hf, ours)]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_module, "pays", lambda g, d: False)  # `hf`, when patched: through the projections
            want = grads(hf, x, glob, pad, grad_out)
        got = grads(ours, x, glob, pad, grad_out)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-4, rtol=1e-4, msg=name)
    assert len(direct_calls) == 0
    grads(ours, x, glob, pad, grad_out)
    assert len(direct_calls) == 1  # without the hook: the direct path again


def test_bf16_gradients_with_a_large_common_component_within_twice_hf_error():
    """Hidden states `c + noise` with `|c|` far above the noise: the softmax backward must be taken in fp32 (rows of
    `dS` sum to zero before rounding), else the query and key weight gradients drift. Summed over seeds, the `cpu`
    backend's bf16 error against float64 is within twice HF's own bf16 error, for every gradient."""
    errs: dict[str, list[float]] = {}
    for seed in range(6):
        hf = layer(dtype=torch.float64, seed=seed)
        oracle = patched(hf)
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(1, 1, 64, generator=g, dtype=torch.float64) * 8
             + 0.5 * torch.randn(2, 32, 64, generator=g, dtype=torch.float64)).bfloat16()
        grad_out = torch.randn(2, 32, 64, generator=g, dtype=torch.float64).bfloat16()
        glob, pad = masks()
        ref = grads(oracle, x.double(), glob, pad, grad_out.double())[1]
        for label, module in (("hf", copy.deepcopy(hf).bfloat16()), ("cpu", patched(hf.bfloat16(), "cpu"))):
            for name, gr in grads(module, x, glob, pad, grad_out)[1].items():
                err = ((gr.double() - ref[name]).abs().max() / ref[name].abs().max()).item()
                errs.setdefault(f"{label} {name}", []).append(err)
    for name in ("input", "query.weight", "key.weight", "value.weight", "query_global.weight", "key_global.weight"):
        ours, theirs = sum(errs[f"cpu {name}"]), sum(errs[f"hf {name}"])
        assert ours <= 2 * theirs, f"{name}: cpu error {ours:.3g}, HF {theirs:.3g} (summed over seeds)"
