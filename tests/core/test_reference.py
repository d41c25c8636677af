"""The reference (chunked and dense) against Hugging Face's LongformerSelfAttention and against each other."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs

import prefix_kernels as pk
from prefix_kernels.core.checks import check_inputs
from prefix_kernels.core.reference import chunked_attention, dense_attention

transformers = pytest.importorskip("transformers")
from transformers.models.longformer.modeling_longformer import (  # noqa: E402
    LongformerConfig,
    LongformerSelfAttention,
)


def hf_float_mask(is_global: torch.Tensor, pad: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The `(B, N)` float mask LongformerModel hands its layers: finfo.min padding, 0 local, finfo.max global."""
    mask = torch.zeros(is_global.shape, dtype=dtype)
    mask[pad] = torch.finfo(dtype).min
    mask[is_global & ~pad] = torch.finfo(dtype).max
    return mask


def ref(*args, **kwargs):
    """The reference backend, explicitly (on CPU, `auto` may pick the Triton interpreter)."""
    return pk.longformer_attention(*args, backend="reference", **kwargs)


def run_hf_and_ours(b, n, heads, head_dim, w, *, n_global, pad_max, seed):
    """One random layer through HF and through the reference backend; returns both `(B, N, C)` outputs."""
    torch.manual_seed(seed)
    c = heads * head_dim
    config = LongformerConfig(
        hidden_size=c, num_attention_heads=heads, attention_window=[2 * w], attention_probs_dropout_prob=0.0
    )
    module = LongformerSelfAttention(config, layer_id=0).eval()
    for p in module.parameters():  # unit-variance projections: scores of O(1) spread
        torch.nn.init.normal_(p, std=c**-0.5)
    x = torch.randn(b, n, c)
    _, masks = make_inputs(b, n, 1, 1, n_global=n_global, pad=pad_max, mask_seed=seed)  # the masks only
    is_global, pad = masks["is_global"], masks["key_padding_mask"]
    mask = hf_float_mask(is_global, pad)
    with torch.no_grad():
        expected = module(
            x,
            attention_mask=mask,
            is_index_masked=mask < 0,
            is_index_global_attn=mask > 0,
            is_global_attn=bool((mask > 0).any()),
        )[0]

        def proj(layer):
            return layer(x).view(b, n, heads, head_dim)

        got = pk.longformer_attention(
            proj(module.query),
            proj(module.key),
            proj(module.value),
            window=w,
            is_global=is_global,
            key_padding_mask=pad,
            q_global=proj(module.query_global),
            k_global=proj(module.key_global),
            v_global=proj(module.value_global),
            backend="reference",
        ).reshape(b, n, c)
    return expected, got, pad


# (B, N, heads, head_dim, w, global-count range per row, max padding)
HF_CASES = [
    (2, 64, 2, 16, 2, (0, 3), 10),
    (1, 32, 1, 32, 4, (1, 1), 0),
    (3, 96, 4, 16, 8, (0, 6), 30),
    (2, 128, 2, 64, 16, (2, 8), 40),
    (2, 256, 2, 128, 32, (0, 4), 100),
    (1, 512, 4, 32, 64, (5, 20), 0),
    (2, 60, 3, 16, 5, (0, 0), 12),  # no global token in the batch
    (2, 48, 2, 24, 3, (10, 12), 5),  # many (hence adjacent) globals
    (1, 2048, 2, 16, 32, (1, 16), 300),
    (2, 1024, 12, 64, 64, (0, 17), 64),
    (4, 40, 2, 16, 10, (0, 2), 39),  # rows that are almost all padding
    (1, 3072, 1, 32, 48, (3, 3), 1000),
]


@pytest.mark.parametrize("b,n,heads,head_dim,w,n_global,pad_max", HF_CASES)
def test_reference_matches_hf(b, n, heads, head_dim, w, n_global, pad_max):
    expected, got, pad = run_hf_and_ours(b, n, heads, head_dim, w, n_global=n_global, pad_max=pad_max, seed=n + w)
    assert torch.isfinite(got).all()
    assert (got[pad] == 0).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "b,n,h,d,w,prefix,batch_prefix,n_global,pad_max",
    [
        (2, 37, 2, 8, 3, 0, False, (0, 3), 9),  # N not a multiple of the window or the chunk
        (2, 50, 2, 16, 7, 4, False, (0, 4), 12),
        (3, 41, 1, 8, 0, 2, True, (1, 5), 20),  # window 0: only the token itself plus globals and prefix
        (1, 20, 2, 8, 30, 3, False, (2, 2), 5),  # window wider than the sequence
        (2, 130, 2, 8, 33, 5, True, (0, 9), 60),  # several chunks
        (2, 16, 1, 4, 2, 1, False, (16, 16), 0),  # every token global
    ],
)
def test_chunked_matches_dense(b, n, h, d, w, prefix, batch_prefix, n_global, pad_max):
    inputs, masks = make_inputs(b, n, h, d, dtype=torch.float64, seed=n, prefix=prefix, batch_prefix=batch_prefix,
                                n_global=n_global, pad=pad_max, mask_seed=w)
    kw = dict(window=w, **masks, **inputs)
    dense = dense_attention(**kw)
    for chunk in (None, 5):
        args = check_inputs(**kw)
        got = chunked_attention(args, chunk=chunk)
        torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ref(**kw), dense, atol=1e-12, rtol=1e-10)


def test_prefix_changes_every_row_and_padding_rows_stay_zero():
    inputs, masks = make_inputs(2, 24, 2, 8, seed=3, prefix=3, n_global=(1, 2), pad=6, mask_seed=5)
    is_global, pad = masks["is_global"], masks["key_padding_mask"]
    base = {k: v for k, v in inputs.items() if not k.startswith("prefix")}
    with_prefix = ref(window=2, is_global=is_global, key_padding_mask=pad, **inputs)
    without = ref(window=2, is_global=is_global, key_padding_mask=pad, **base)
    differs = (with_prefix - without).abs().amax(dim=(2, 3)) > 1e-6
    assert torch.equal(differs, ~pad)
    assert (with_prefix[pad] == 0).all()


def test_gradcheck_all_inputs_fp64():
    inputs, _ = make_inputs(2, 11, 2, 3, dtype=torch.float64, seed=7, prefix=2, requires_grad=True)
    is_global = torch.zeros(2, 11, dtype=torch.bool)
    is_global[0, [0, 5]] = True
    is_global[1, 9] = True
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True  # also pads the global token 9: padding wins
    names = list(inputs)

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        return pk.longformer_attention(window=2, is_global=is_global, key_padding_mask=pad, backend="reference", **kw)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6)
    dense = lambda *t: dense_attention(**dict(zip(names, t, strict=True)), window=2)  # noqa: E731
    assert torch.autograd.gradcheck(dense, tuple(inputs.values()))


def test_fp16_all_padding_window_stays_finite():
    """HF gives NaN gradients here in fp16: a long padded tail and no global token in the row."""
    b, n, h, d, w = 2, 64, 2, 16, 4
    inputs, _ = make_inputs(b, n, h, d, dtype=torch.float16, seed=11, requires_grad=True)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[:, 20:] = True
    out = ref(inputs["q"], inputs["k"], inputs["v"], window=w, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    assert (out[pad] == 0).all()
    out.float().square().sum().backward()
    for name in ("q", "k", "v"):
        grad = inputs[name].grad
        assert torch.isfinite(grad).all(), name
        assert (grad[pad] == 0).all(), name
        assert grad[~pad].abs().sum() > 0, name


def test_dropout_zero_equals_no_dropout_and_seed_determinism():
    inputs, masks = make_inputs(2, 40, 2, 8, seed=21, prefix=2, n_global=(1, 3), pad=8, mask_seed=2)
    pad = masks["key_padding_mask"]
    kw = dict(window=4, **masks, **inputs)
    plain = ref(**kw)
    assert torch.equal(ref(**kw, dropout_p=0.0), plain)
    torch.manual_seed(0)
    a = ref(**kw, dropout_p=0.3)
    torch.manual_seed(0)
    b = ref(**kw, dropout_p=0.3)
    c = ref(**kw, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, plain)
    assert (a[pad] == 0).all()


def test_dropout_preserves_expectation():
    inputs, _ = make_inputs(1, 24, 1, 4, seed=4, prefix=1)
    is_global = torch.zeros(1, 24, dtype=torch.bool)
    is_global[0, 3] = True
    kw = dict(window=3, is_global=is_global, **inputs)
    plain = ref(**kw)
    torch.manual_seed(123)
    mean = torch.stack([ref(**kw, dropout_p=0.25) for _ in range(800)]).mean(0)
    # Each output is a sum of ~8 kept terms of std ~1/sqrt(8): the 800-sample mean is within a few 0.02.
    torch.testing.assert_close(mean, plain, atol=0.12, rtol=0)
