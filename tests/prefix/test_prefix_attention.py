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
    in_the_op = kernel == "exp" and backend in ("reference", "cpu", "triton")
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
    """fp32 models on the fused kernels (the Triton kernels under the interpreter without CUDA). The Triton kernels
    compute "exp" in the op (its separate softmax); the CUDA library declines it, so there the patched module
    computes `B` beside the op, whose rows without prefix keys (`A`) the library computes."""
    skip_unless_runs(backend, device)
    tol = 2e-5 if device == "cpu" else 1e-4  # GPU matmuls may use TF32 in the patched model's projections
    check_against_dense("LongformerForSequenceClassification", method, kernel, backend, torch.float32, tol, beside,
                        device=device, head_dim=16 if backend == "cuda" else 8)


# ------------------------------------------------------------------------------------------------------------
# The scale
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_scale_hides_the_prefix(method, kernel):
    """With every scale 0 the prefix reaches no user token: perturbing the prefix (and "poly"'s offset) leaves every
    user row's output bitwise unchanged; with a non-zero scale it changes every one of them."""
    model = build("LongformerModel")
    prefix = apply(model, method, kernel)
    randomize(prefix)
    inputs = batch("LongformerModel")
    real = inputs["attention_mask"].bool()

    def rows():
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    def perturb():
        with torch.no_grad():
            for name, t in prefix.named_parameters():
                if name != "prefix_scale":
                    t.add_(torch.randn_like(t))

    with torch.no_grad():
        prefix.prefix_scale.zero_()
    before = rows()
    perturb()
    assert torch.equal(rows(), before)
    with torch.no_grad():
        prefix.prefix_scale.fill_(0.5)
    before = rows()
    perturb()
    changed = (rows() - before).abs().amax(-1)
    assert (changed[real] > 1e-4).all()


# ------------------------------------------------------------------------------------------------------------
# Options and checkpoints
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_parameters_and_options(method):
    model = build("LongformerForSequenceClassification")
    prefix = apply(model, method, "poly", kernel_scale="head", kernel_scale_init=0.25)
    assert prefix.prefix_scale.shape == (2, 4) and torch.equal(prefix.prefix_scale, torch.full((2, 4), 0.25))
    assert prefix.poly_offset.shape == (2,) and torch.equal(prefix.poly_offset, torch.ones(2))
    assert prefix.prefix_scale.requires_grad and prefix.poly_offset.requires_grad
    record = model.config.prefix_kernels
    assert {k: record[k] for k in ("prefix_attention", "kernel", "kernel_scale", "kernel_scale_init")} == {
        "prefix_attention": "separate", "kernel": "poly", "kernel_scale": "head", "kernel_scale_init": 0.25}
    scalar = METHODS[method](build("LongformerModel"), num_prefix=P, prefix_attention="separate")
    assert scalar.kernel == "exp" and scalar.prefix_scale.shape == (2,)
    assert torch.equal(scalar.prefix_scale, torch.full((2,), 0.005)) and not hasattr(scalar, "poly_offset")
    rbf = METHODS[method](build("LongformerModel"), num_prefix=P, prefix_attention="separate", kernel="rbf")
    assert rbf.attention_options()["rbf_length_scale"] == 64.0


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix_attention": "kernel"}, "prefix_attention"),
    ({"kernel": "rbf"}, "kernel only apply with prefix_attention='separate'"),
    ({"kernel_scale": "head"}, "kernel_scale only apply"),
    ({"kernel_scale_init": 0.1}, "kernel_scale_init only apply"),
    ({"prefix_attention": "separate", "kernel": "cosine"}, "kernel must be one of"),
    ({"prefix_attention": "separate", "kernel_scale": "vector"}, "kernel_scale must be"),
    ({"prefix_attention": "separate", "kernel_scale_init": float("nan")}, "kernel_scale_init"),
    ({"prefix_attention": "separate", "kernel_scale_init": True}, "kernel_scale_init"),
    ({"prefix_attention": "separate", "rbf_length_scale": 8.0}, "rbf_length_scale applies to kernel='rbf'"),
    ({"prefix_attention": "separate", "kernel": "rbf", "rbf_length_scale": 0.0}, "rbf_length_scale must be"),
])
@pytest.mark.parametrize("method", list(METHODS))
def test_inconsistent_options_are_named(method, kwargs, match):
    model = build("LongformerModel")
    with pytest.raises(ValueError, match=match):
        METHODS[method](model, num_prefix=P, **kwargs)
    assert not pk.hf.patching.is_patched(model)  # refused before the model was touched


@pytest.mark.parametrize("method, kernel", [("propagation", "rbf"), ("tuning", "poly")])
def test_save_load_round_trips(tmp_path, method, kernel):
    """`save_prefix` / `load_prefix` onto a bare model, and `save_pretrained` / `from_pretrained_with_prefix`: the same
    options, the same parameters, bitwise the same output; a file of other options is refused."""
    name = "LongformerForSequenceClassification"
    model = build(name)
    prefix = apply(model, method, kernel, kernel_scale="head")
    randomize(prefix)
    inputs = batch(name)
    with torch.no_grad():
        want = model(**inputs).logits
    path = tmp_path / "prefix.safetensors"
    pk.save_prefix(model, path)
    model.save_pretrained(tmp_path / "model")
    bare = build(name)
    pk.load_prefix(bare, path, backend="reference")
    full = pk.from_pretrained_with_prefix(getattr(transformers, name), tmp_path / "model", backend="reference")
    for rebuilt in (bare, full):
        got = rebuilt.get_submodule(f"prefix_{method}")
        assert got.attention_options() == prefix.attention_options()
        assert [n for n, _ in got.named_parameters()] == [n for n, _ in prefix.named_parameters()]
        for (n, t), (_, w) in zip(got.named_parameters(), prefix.named_parameters(), strict=True):
            assert torch.equal(t, w), n
        with torch.no_grad():
            assert torch.equal(rebuilt(**inputs).logits, want)
    other = build(name)
    METHODS[method](other, num_prefix=P, backend="reference")  # "joint"
    with pytest.raises(ValueError, match="attention options"):
        pk.load_prefix(other, path)


# ------------------------------------------------------------------------------------------------------------
# The routes of the patched module
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_output_attentions_and_unpatching_are_refused(method):
    model = build("LongformerModel")
    apply(model, method, "exp")
    with pytest.raises(ValueError, match="output_attentions=True is not supported with prefix_attention='separate'"):
        model(**batch("LongformerModel"), output_attentions=True)
    with pytest.raises(ValueError, match="keep it patched"):
        pk.unpatch_longformer(model)


@pytest.mark.parametrize("method", list(METHODS))
def test_direct_global_rows_step_aside(monkeypatch, method):
    """With few global tokens a joint model computes the global rows from the hidden states; a separate prefix has no
    place there, so the module takes the global projections (and still matches the dense re-statement, above)."""
    calls = []
    direct = fused_module.global_rows_from_hidden
    monkeypatch.setattr(fused_module, "global_rows_from_hidden", lambda *a, **k: calls.append(1) or direct(*a, **k))
    for options in ({}, {"prefix_attention": "separate"}):
        calls.clear()
        model = build("LongformerModel", head_dim=16)  # D / 2 = 8 globals take the direct path when joint
        METHODS[method](model, num_prefix=2, backend="reference", **options)
        with torch.no_grad():
            model(**batch("LongformerModel"))
        assert len(calls) == (0 if options else 2), options


@pytest.mark.parametrize("backend, method, kernel", [
    pytest.param("cpu", "propagation", "exp", id="cpu-propagation-exp"),  # the cpu backend's separate softmax
    pytest.param("triton", "tuning", "poly", id="triton-interpreter-tuning-poly"),  # B beside the Triton op
])
def test_torch_compile_fullgraph(backend, method, kernel):
    """`torch.compile(fullgraph=True)` of a whole model with a separate prefix, forward and backward, against the
    same model run eagerly on the reference backend."""
    skip_unless_runs(backend, "cpu")
    torch._dynamo.reset()
    name = "LongformerForSequenceClassification"
    model = build(name, num_hidden_layers=1, attention_window=[16]).train()
    randomize(apply(model, method, kernel, backend))
    eager = pk.patch_longformer(copy.deepcopy(model), "reference")
    inputs = batch(name)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, got_grads = output_and_grads(model, lambda: compiled(**inputs).logits)
    want, want_grads = output_and_grads(eager, lambda: eager(**inputs).logits)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for n, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[n], atol=1e-5 * max(1.0, want_grads[n].abs().max().item()),
                                   rtol=0, msg=n)


class Logits(torch.nn.Module):
    """`(input_ids, attention_mask, global_attention_mask) -> logits`, plain tensors for the exporters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, global_attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          global_attention_mask=global_attention_mask).logits


def exported_case(method: str, kernel: str):
    """A classifier with a separate prefix in eval mode, the traced inputs, and the same shapes with more globals."""
    name = "LongformerForSequenceClassification"
    model = build(name)
    randomize(apply(model, method, kernel))
    x = batch(name)
    example = (x["input_ids"], x["attention_mask"], x["global_attention_mask"])
    glob = example[2].clone()
    glob[0, [2, 7, 30]] = 1
    return Logits(model).eval(), example, [example, (example[0], example[1], glob)]


@pytest.mark.parametrize("method, kernel", [("propagation", "exp"), ("tuning", "rbf")])
def test_torch_export(method, kernel):
    """`torch.export` of a model with a separate prefix: the export formulation computes "exp" itself (its
    `prefix_normalization="separate"`, with prefix-propagation's `prefix_k_global` / `prefix_v_global`); for "rbf"
    the rows without prefix keys, `B` added beside them in standard ops; the graph gives eager's numbers for the
    traced masks and others."""
    model, example, cases = exported_case(method, kernel)
    run = torch.export.export(model, example).module()
    with torch.no_grad():
        for args in cases:
            torch.testing.assert_close(run(*args), model(*args), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter says it is deprecated
@pytest.mark.parametrize("method, kernel, dynamo", [("propagation", "exp", False), ("tuning", "poly", True)],
                         ids=["propagation-exp-legacy", "tuning-poly-dynamo"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, method, kernel, dynamo):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, example, cases = exported_case(method, kernel)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, example, str(path), dynamo=dynamo, input_names=["ids", "mask", "glob"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for args in cases:
            got = session.run(None, {k: t.numpy() for k, t in zip(("ids", "mask", "glob"), args, strict=True)})[0]
            torch.testing.assert_close(torch.from_numpy(got), model(*args), atol=1e-5, rtol=0)


def test_one_global_index_read_per_forward_pass(monkeypatch):
    """Prefix-propagation's op runs over the text masks, cut once per mask tensor: a three-layer model reads the
    global count back twice per forward and backward pass (the whole sequence's, for the compact `query_global`
    projection, and the text's), not once per layer."""
    from prefix_kernels.core import masks

    reads = []
    original = masks.global_positions
    monkeypatch.setattr(masks, "global_positions", lambda g: reads.append(g.shape) or original(g))
    model = build("LongformerForSequenceClassification", num_hidden_layers=3, attention_window=[8, 16, 8])
    apply(model, "propagation", "exp", "cpu")
    scalar_loss(model(**batch("LongformerForSequenceClassification"))).backward()
    text, whole = sorted(n for _, n in reads)  # HF's window padding included
    assert whole == text + P


# ------------------------------------------------------------------------------------------------------------
# "joint" is unchanged
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_joint_is_what_it_was(method):
    """`prefix_attention="joint"` (the default): the same parameters, the same config record and nothing new on the
    attention modules of a propagation model; the same output, bitwise, whether named or not. The prefix tests
    (`test_prefix.py`) hold "joint" to the authors' formulation; the tree before these options gave bitwise these
    numbers on every backend."""
    models = [build("LongformerForSequenceClassification") for _ in range(2)]
    prefixes = [METHODS[method](models[0], num_prefix=P, backend="reference"),
                METHODS[method](models[1], num_prefix=P, backend="reference", prefix_attention="joint")]
    for prefix in prefixes:
        randomize(prefix)
        assert prefix.prefix_attention == "joint" and prefix.attention_options() == {}
        want = {"propagation": ["prefix"], "tuning": ["prefix_key", "prefix_value"]}[method]
        assert [n for n, _ in prefix.named_parameters()] == want
    assert set(models[0].config.prefix_kernels) == {"method", "num_prefix", "dropout"} | (
        {"pool_prefix"} if method == "propagation" else set())
    if method == "propagation":
        assert not any(hasattr(m, "_prefix_kernels_prefix") for m in models[0].modules())
    inputs = batch("LongformerForSequenceClassification")
    with torch.no_grad():
        assert torch.equal(models[0](**inputs).logits, models[1](**inputs).logits)
