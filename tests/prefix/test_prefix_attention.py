"""`prefix_attention="separate"` (the paper's kernel-attention study) on both prefix methods, against a dense fp64
re-statement written here.

The re-statement loops over the layers by hand, calling the models' own Linear / LayerNorm submodules on explicitly
prefixed hidden states, with dense `(B, N, N)` masks and the three kernels written from their definitions (the
squared distance of "rbf" as a difference, not expanded); it shares no code with the package. Per row: `A`, the
softmax over the row's text keys (for prefix-propagation the slots are no key of any row), plus `scale[h] * B`, the
row's kernel weights over the prefix (prefix-tuning's keys/values; propagation's slots through the row's kind of
projections), normalised by their sum.

Checked: the output and every trainable parameter's gradient (the prefix, the scales, "poly"'s offset, the head)
on the reference backend (fp64), the `cpu` backend and the Triton kernels under the interpreter (fp32); which path
computed the prefix (the op's own separate softmax, or `B` beside the op); a zero scale makes the prefix invisible
to every user token; the options round-trip through both checkpoint formats; every route of the patched module
honours the option (compile, export) or declines it (`output_attentions`, the direct global rows); "joint" is
unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FUSED, skip_unless_runs
from tiny_models import batch, build, main_output, scalar_loss

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.hf import self_attention as fused_module  # noqa: E402

P = 4
PAD = 1
KERNELS = ("exp", "rbf", "poly")
METHODS = {"propagation": pk.apply_prefix_propagation, "tuning": pk.apply_prefix_tuning}
# "rbf" with a length scale near the tiny models' query/key distances, so that B depends on the keys (the default
# 64 makes it almost the plain mean of the values at these sizes).
LENGTH = 2.0


def apply(model, method: str, kernel: str, backend: str = "reference", **kwargs):
    extra = {"rbf_length_scale": LENGTH} if kernel == "rbf" else {}
    return METHODS[method](model, num_prefix=P, backend=backend, prefix_attention="separate", kernel=kernel,
                           **extra, **kwargs)


def randomize(prefix, seed: int = 0) -> None:
    """A prefix large enough to matter, scales away from 0 (and of both signs per head), offsets away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in prefix.named_parameters():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            t.copy_(noise * 0.7 + 0.3 if name in ("prefix_scale", "poly_offset") else noise * 0.5)


# ------------------------------------------------------------------------------------------------------------
# Dense re-statement
# ------------------------------------------------------------------------------------------------------------


def kernel_weights(qs, keys, kernel: str, offset=None, length: float = LENGTH):
    """`qs (B, H, R, D)` scaled queries, `keys (B, H, P, D)` -> `(B, H, R, P)` normalised weights."""
    if kernel == "exp":
        return torch.softmax(qs @ keys.transpose(-1, -2), dim=-1)
    if kernel == "rbf":
        w = torch.exp(-(qs[:, :, :, None, :] - keys[:, :, None, :, :]).square().sum(-1) / (2 * length**2))
    else:
        w = (qs @ keys.transpose(-1, -2) + offset).square()
    return w / w.sum(-1, keepdim=True)


def dense_self_attention(attn, h, pad, glob, slots: int, prefix_kv, kernel: str, scale, offset):
    """The layer's attention of `h (B, N, C)` with a separate prefix: prefix-tuning's `prefix_kv` (`(P, C)` keys,
    values), or propagation's first `slots` positions."""
    b, n, c = h.shape
    heads, d, w = attn.num_heads, attn.head_dim, attn.one_sided_attn_window_size

    def split(x):  # (B, N, C) -> (B, H, N, D)
        return x.view(x.shape[0], -1, heads, d).transpose(1, 2)

    pos = torch.arange(n)
    band = (pos[:, None] - pos[None, :]).abs() <= w
    text = (pos >= slots)[None, None, :]  # the slots are no row's key
    local_ok = ((band[None] & ~glob[:, None, :]) | glob[:, None, :]) & ~pad[:, None, :] & text
    global_ok = (~pad)[:, None, :] & text
    q, k, v = split(attn.query(h)), split(attn.key(h)), split(attn.value(h))
    qg, kg, vg = split(attn.query_global(h)), split(attn.key_global(h)), split(attn.value_global(h))
    if slots:
        local_prefix = k[:, :, :slots], v[:, :, :slots]
        global_prefix = kg[:, :, :slots], vg[:, :, :slots]
    else:
        local_prefix = global_prefix = tuple(split(t[None]).expand(b, -1, -1, -1) for t in prefix_kv)
    per_head = scale.expand(heads).view(1, heads, 1, 1)

    def attend(q, k, v, ok, prefix):
        scores = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~ok[:, None], float("-inf"))
        a = torch.softmax(scores, dim=-1) @ v
        bb = kernel_weights(q / d**0.5, prefix[0], kernel, offset) @ prefix[1]
        return a + per_head * bb

    out = torch.where(glob[:, None, :, None], attend(qg, kg, vg, global_ok, global_prefix),
                      attend(q, k, v, local_ok, local_prefix))
    return out.masked_fill(pad[:, None, :, None], 0.0).transpose(1, 2).reshape(b, n, c)


def dense_model(model, prefix, method: str, kernel: str, inputs):
    """The model's main output (Longformer classifier logits, or the LED encoder's last hidden state) with the
    prefix, computed densely with the model's own submodules and parameters."""
    ids, mask, glob = inputs["input_ids"], inputs["attention_mask"], inputs["global_attention_mask"]
    b, n = ids.shape
    p = P if method == "propagation" else 0
    led = not isinstance(model, transformers.LongformerPreTrainedModel)
    if not led:
        emb, layers = model.longformer.embeddings, model.longformer.encoder.layer
        text_pos = torch.where(ids == PAD, PAD, PAD + P + 1 + torch.arange(n))
        words = emb.word_embeddings(ids)
        if p:
            words = torch.cat([words.new_zeros(b, p, words.shape[-1]), words], dim=1)
            text_pos = torch.cat([torch.arange(p).expand(b, p), text_pos], dim=1)
        types = emb.token_type_embeddings(torch.zeros(b, n + p, dtype=torch.long))
        h = emb.LayerNorm(words + emb.position_embeddings(text_pos) + types)
    else:
        enc = model.get_encoder()
        layers = enc.layers
        words = enc.embed_tokens(ids)
        if p:
            words = torch.cat([words.new_zeros(b, p, words.shape[-1]), words], dim=1)
        h = enc.layernorm_embedding(words + enc.embed_positions.weight[P - p : P + n])
    pad = torch.cat([torch.zeros(b, p, dtype=torch.bool), mask == 0], dim=1)
    is_global = torch.cat([torch.ones(b, p, dtype=torch.bool), glob.bool()], dim=1) & ~pad
    for i, layer in enumerate(layers):
        if p:
            h = torch.cat([h[:, :p] + prefix.prefix[i], h[:, p:]], dim=1)
        kv = None if p else (prefix.prefix_key[i], prefix.prefix_value[i])
        offset = prefix.poly_offset[i] if kernel == "poly" else None
        attn = layer.attention.self if not led else layer.self_attn.longformer_self_attn
        a = dense_self_attention(attn, h, pad, is_global, p, kv, kernel, prefix.prefix_scale[i], offset)
        if not led:
            x = layer.attention.output(a, h)
            h = layer.output(layer.intermediate(x), x)
        else:
            x = layer.self_attn_layer_norm(h + layer.self_attn.output(a))
            h = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
    return h[:, p:] if led else model.classifier(h[:, p:])


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.named_parameters() if t.requires_grad}


def output_and_grads(model, run):
    """`run()`'s output and the gradients of the trainable parameters for `scalar_loss`."""
    params = trainable(model)
    out = run()
    grads = torch.autograd.grad(scalar_loss({"logits": out}), list(params.values()))
    return out.detach(), dict(zip(params, grads, strict=True))


@pytest.fixture
def beside(monkeypatch):
    """Counts the layers whose prefix was computed beside the op (`add_prefix_rows`), and those whose op computed
    it (a call with `prefix_normalization="separate"`)."""
    counts = {"beside": 0, "op": 0}
    add, op = fused_module.add_prefix_rows, fused_module.longformer_attention

    def count_add(*args, **kwargs):
        counts["beside"] += 1
        return add(*args, **kwargs)

    def count_op(*args, **kwargs):
        counts["op"] += kwargs.get("prefix_normalization") == "separate"
        return op(*args, **kwargs)

    monkeypatch.setattr(fused_module, "add_prefix_rows", count_add)
    monkeypatch.setattr(fused_module, "longformer_attention", count_op)
    return counts


def check_against_dense(name, method, kernel, backend, dtype, tol, counts, device="cpu", **build_kw):
    model = build(name, **build_kw)
    prefix = apply(model, method, kernel, backend, kernel_scale="head")
    randomize(prefix)
    oracle = copy.deepcopy(model).double()
    inputs = batch(name)
    model.to(device=device, dtype=dtype)
    target = model.get_encoder() if name.startswith("LED") else model  # LED: the encoder's rows
    x = {k: t for k, t in batch(name, device=device).items() if k != "decoder_input_ids"}
    got, got_grads = output_and_grads(model, lambda: main_output(target(**x)).cpu())
    got_grads = {n: g.cpu() for n, g in got_grads.items()}
    want, want_grads = output_and_grads(oracle, lambda: dense_model(oracle, oracle.get_submodule(
        f"prefix_{method}"), method, kernel, inputs))
    assert got_grads.keys() == want_grads.keys()
    names = {n.split(".")[1] for n in got_grads if n.startswith("prefix_")}
    assert names == {"prefix" if method == "propagation" else "prefix_key", "prefix_scale"} | (
        set() if method == "propagation" else {"prefix_value"}) | ({"poly_offset"} if kernel == "poly" else set())
    torch.testing.assert_close(got.double(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=0)
    for n, g in got_grads.items():
        w = want_grads[n]
        assert w.abs().max() > 0, n
        torch.testing.assert_close(g.double(), w, atol=tol * max(1.0, w.abs().max().item()), rtol=0, msg=n)
    layers = 2
    in_the_op = kernel == "exp" and backend in ("reference", "cpu")
    assert counts == ({"beside": 0, "op": layers} if in_the_op else {"beside": layers, "op": 0}), counts


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDModel"])
def test_reference_backend_matches_dense_fp64(beside, name, method, kernel):
    """fp64 models on the reference backend: output and every trainable parameter's gradient to 1e-10."""
    check_against_dense(name, method, kernel, "reference", torch.float64, 1e-10, beside)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", list(METHODS))
def test_cpu_backend_matches_dense_fp64(beside, method, kernel):
    """fp32 models on the `cpu` backend (it serves "exp" in the op) against the fp64 re-statement."""
    check_against_dense("LongformerForSequenceClassification", method, kernel, "cpu", torch.float32, 2e-5, beside)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", list(METHODS))
def test_fused_kernels_match_dense_fp64(beside, method, kernel, backend, device):
    """fp32 models on the fused kernels (the Triton kernels under the interpreter without CUDA). They decline the
    op's separate prefix for now, so for "exp" too the patched module computes `B` beside the op, whose rows
    without prefix keys (`A`) the kernels compute."""
    skip_unless_runs(backend, device)
    tol = 2e-5 if device == "cpu" else 1e-4  # GPU matmuls may use TF32 in the patched model's projections
    check_against_dense("LongformerForSequenceClassification", method, kernel, backend, torch.float32, tol, beside,
                        device=device, head_dim=16 if backend == "cuda" else 8)
