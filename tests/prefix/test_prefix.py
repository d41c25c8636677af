"""Prefix-propagation and prefix-tuning against dense re-implementations of the authors' formulation.

The references below loop over the layers by hand, calling the models' own Linear / LayerNorm submodules on
explicitly prefixed hidden states, with dense `(B, N, N)` attention masks; they share no code with the package.
Most tests run the reference backend on the CPU; the fused-kernel cases run the Triton kernels through the
interpreter without CUDA, and the Triton kernels and the CUDA library on CUDA tensors where there is a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FUSED, skip_unless_runs
from tiny_models import LED_CLASSES, LONGFORMER_CLASSES, batch, build, enable_checkpointing, main_output, scalar_loss

transformers = pytest.importorskip("transformers")

from prefix_kernels import apply_prefix_propagation, apply_prefix_tuning, load_prefix, save_prefix  # noqa: E402
from prefix_kernels.hf.patching import is_patched, patch_longformer  # noqa: E402

TOL = 1e-5
P = 4
PAD = 1


# ------------------------------------------------------------------------------------------------------------
# Dense reference
# ------------------------------------------------------------------------------------------------------------


def dense_self_attention(attn, h, pad, glob, prefix_kv=None):
    """Longformer self-attention of `h (B, N, C)` with dense masks; `prefix_kv`: `(P, C)` keys and values."""
    b, n, c = h.shape
    heads, d, w = attn.num_heads, attn.head_dim, attn.one_sided_attn_window_size

    def split(x):  # (B, N, C) -> (B, H, N, D)
        return x.view(x.shape[0], -1, heads, d).transpose(1, 2)

    pos = torch.arange(n)
    band = (pos[:, None] - pos[None, :]).abs() <= w
    local_ok = ((band[None] & ~glob[:, None, :]) | glob[:, None, :]) & ~pad[:, None, :]
    global_ok = (~pad)[:, None, :].expand(b, n, n)

    def attend(q, k, v, ok):
        scores = (split(q) / d**0.5) @ split(k).transpose(-1, -2)
        scores = scores.masked_fill(~ok[:, None], float("-inf"))
        values = split(v)
        if prefix_kv is not None:
            pk, pv = (split(t[None]).expand(b, -1, -1, -1) for t in prefix_kv)
            scores = torch.cat([(split(q) / d**0.5) @ pk.transpose(-1, -2), scores], dim=-1)
            values = torch.cat([pv, values], dim=2)
        return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ values

    out = attend(attn.query(h), attn.key(h), attn.value(h), local_ok)
    out_global = attend(attn.query_global(h), attn.key_global(h), attn.value_global(h), global_ok)
    out = torch.where(glob[:, None, :, None], out_global, out).masked_fill(pad[:, None, :, None], 0.0)
    return out.transpose(1, 2).reshape(b, n, c)


def dense_layer(layer, h, pad, glob, prefix_kv=None):
    """One Longformer or LED encoder layer (post-LN) around the dense attention."""
    if hasattr(layer, "attention"):  # LongformerLayer
        a = dense_self_attention(layer.attention.self, h, pad, glob, prefix_kv)
        x = layer.attention.output(a, h)
        return layer.output(layer.intermediate(x), x)
    a = dense_self_attention(layer.self_attn.longformer_self_attn, h, pad, glob, prefix_kv)
    x = layer.self_attn_layer_norm(h + layer.self_attn.output(a))
    return layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))


def encoder_parts(model):
    """`(kind, embeddings-or-encoder, layers)` of the base model inside `model`."""
    if isinstance(model, transformers.LongformerPreTrainedModel):
        base = model if isinstance(model, transformers.LongformerModel) else model.longformer
        return "longformer", base.embeddings, base.encoder.layer
    enc = model.get_encoder()
    return "led", enc, enc.layers


def reference(model, inputs, *, propagation=None, tuning=None):
    """The authors' formulation: returns `(text rows, prefix rows)` of the last layer, `(B, N, C)`, `(B, P, C)`.

    propagation: `prefix (L, P, C)`; tuning: `(prefix_key, prefix_value)`, each `(L, P, C)`.
    """
    ids, mask, glob = inputs["input_ids"], inputs["attention_mask"], inputs["global_attention_mask"]
    b, n = ids.shape
    kind, emb, layers = encoder_parts(model)
    p = P if propagation is not None else 0
    # The text follows the P prefix positions (the batch pads only at the tail, so position = index).
    if kind == "longformer":
        text_pos = torch.where(ids == PAD, PAD, PAD + P + 1 + torch.arange(n))
        words = emb.word_embeddings(ids)
        if p:
            words = torch.cat([torch.zeros(b, p, words.shape[-1]), words], dim=1)
            text_pos = torch.cat([torch.arange(p).expand(b, p), text_pos], dim=1)
        types = emb.token_type_embeddings(torch.zeros(b, n + p, dtype=torch.long))
        h = emb.LayerNorm(words + emb.position_embeddings(text_pos) + types)
    else:
        words = emb.embed_tokens(ids)
        if p:
            words = torch.cat([torch.zeros(b, p, words.shape[-1]), words], dim=1)
        h = emb.layernorm_embedding(words + emb.embed_positions.weight[P - p : P + n])
    pad = torch.cat([torch.zeros(b, p, dtype=torch.bool), mask == 0], dim=1)
    is_global = torch.cat([torch.ones(b, p, dtype=torch.bool), glob.bool()], dim=1) & ~pad
    for i, layer in enumerate(layers):
        if p:
            h = torch.cat([h[:, :p] + propagation[i], h[:, p:]], dim=1)
        kv = None if tuning is None else (tuning[0][i], tuning[1][i])
        h = dense_layer(layer, h, pad, is_global, kv)
    return h[:, p:], h[:, :p]


def randomize(prefix, scale=0.5):
    """Make a fresh prefix large enough to matter."""
    with torch.no_grad():
        for t in prefix.parameters():
            t.normal_(0.0, scale)


def text_rows(model, out):
    if isinstance(model, transformers.LongformerForSequenceClassification):
        return out.logits
    return out.encoder_last_hidden_state if "encoder_last_hidden_state" in out else out.last_hidden_state


# ------------------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDForConditionalGeneration"])
def test_propagation_matches_dense_reference(name):
    model = build(name)
    plain = copy.deepcopy(model)
    prefix = apply_prefix_propagation(model, num_prefix=P, backend="reference")
    randomize(prefix)
    inputs = batch(name)
    with torch.no_grad():
        got = text_rows(model, model(**inputs))
        want, _ = reference(model, inputs, propagation=prefix.prefix)
        if name.startswith("Longformer"):
            want = model.classifier(want)
        before = text_rows(plain, plain(**inputs))
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert not torch.allclose(got, before, atol=1e-3)  # the prefix does change the result


def test_propagation_pool_prefix():
    model = build("LongformerForSequenceClassification")
    prefix = apply_prefix_propagation(model, num_prefix=P, pool_prefix=True, backend="reference")
    randomize(prefix)
    inputs = batch("LongformerForSequenceClassification")
    with torch.no_grad():
        _, prefix_rows = reference(model, inputs, propagation=prefix.prefix)
        torch.testing.assert_close(model(**inputs).logits, model.classifier(prefix_rows), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="pool_prefix"):
        apply_prefix_propagation(build("LongformerForTokenClassification"), pool_prefix=True)


@pytest.mark.parametrize("name", ["LongformerModel", "LEDModel"])
def test_tuning_matches_dense_reference(name):
    model = build(name)
    prefix = apply_prefix_tuning(model, num_prefix=P, backend="reference")
    randomize(prefix)
    inputs = batch(name)
    with torch.no_grad():
        got = text_rows(model, model(**inputs))
        want, _ = reference(model, inputs, tuning=(prefix.prefix_key, prefix.prefix_value))
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("apply", [apply_prefix_propagation, apply_prefix_tuning])
def test_fused_kernels_match_the_dense_reference(apply, backend, device):
    """Prefix slots as global tokens (propagation) and prefix keys / values (tuning) through the fused kernels:
    the authors' formulation forward, and the same prefix gradients as the reference backend on the same device."""
    skip_unless_runs(backend, device)
    model = build("LongformerModel", head_dim=16 if backend == "cuda" else 8)  # the CUDA library's smallest is 16
    prefix = apply(model, num_prefix=P, backend=backend)
    randomize(prefix)
    inputs = batch("LongformerModel")
    kind = {"propagation": prefix.prefix} if apply is apply_prefix_propagation else {
        "tuning": (prefix.prefix_key, prefix.prefix_value)}
    with torch.no_grad():
        want, _ = reference(model, inputs, **kind)  # on the CPU, where the dense reference builds its masks
    model.to(device)
    inputs = batch("LongformerModel", device=device)
    got = model(**inputs)
    torch.testing.assert_close(got.last_hidden_state.cpu(), want, atol=TOL, rtol=0)
    scalar_loss(got).backward()
    grads = {n: t.grad.clone() for n, t in prefix.named_parameters()}
    model.zero_grad(set_to_none=True)
    patch_longformer(model, backend="reference")
    scalar_loss(model(**inputs)).backward()
    for n, t in prefix.named_parameters():
        torch.testing.assert_close(grads[n], t.grad, atol=TOL * max(1.0, t.grad.abs().max().item()), rtol=0, msg=n)


def test_tuning_adds_no_global_tokens():
    """The paper code's bug made the first P real tokens global; here a batch without globals stays so."""
    model = build("LongformerModel")
    prefix = apply_prefix_tuning(model, num_prefix=P, backend="reference")
    randomize(prefix)
    inputs = batch("LongformerModel")
    inputs["global_attention_mask"] = torch.zeros_like(inputs["global_attention_mask"])
    with torch.no_grad():
        want, _ = reference(model, inputs, tuning=(prefix.prefix_key, prefix.prefix_value))
        torch.testing.assert_close(model(**inputs).last_hidden_state, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("apply", [apply_prefix_propagation, apply_prefix_tuning])
def test_inputs_embeds_position_ids_and_token_types(apply):
    model = build("LongformerModel")
    randomize(apply(model, num_prefix=P, backend="reference"))
    inputs = batch("LongformerModel")
    inputs["input_ids"][1] = inputs["input_ids"][0]  # no padding: embeddings carry no pad information
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    ids = inputs["input_ids"]
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        hf_positions = transformers.models.longformer.modeling_longformer.create_position_ids_from_input_ids(ids, PAD)
        same = [
            {"position_ids": hf_positions},
            {"token_type_ids": torch.zeros_like(ids)},
        ]
        for extra in same:
            torch.testing.assert_close(model(**inputs, **extra).last_hidden_state, want, atol=TOL, rtol=0)
        embeds = model.embeddings.word_embeddings(ids)
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        torch.testing.assert_close(model(inputs_embeds=embeds, **rest).last_hidden_state, want, atol=TOL, rtol=0)


def _leaves(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else [t for y in x for t in _leaves(y)]


@pytest.mark.parametrize("name", LONGFORMER_CLASSES + LED_CLASSES)
def test_propagation_keeps_every_output_shape(name):
    plain = build(name)
    model = copy.deepcopy(plain)
    apply_prefix_propagation(model, num_prefix=P, backend="reference")
    inputs = batch(name)
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        want, got = plain(**inputs, **kwargs), model(**inputs, **kwargs)
        got_tuple = model(**inputs, **kwargs, return_dict=False)
    for key, w in want.items():
        g = got[key]
        if not isinstance(w, (torch.Tensor, tuple)):  # the decoder's cache, untouched by the encoder prefix
            continue
        if isinstance(w, torch.Tensor):
            assert g.shape == w.shape, key
            continue
        g, w = _leaves(g), _leaves(w)  # transformers 4.x: the decoder cache is a tuple of tuples
        assert len(g) == len(w), key
        for gi, wi in zip(g, w, strict=True):
            # Attention probabilities keep their rows; the last dim also lists the P global prefix keys.
            cut = -1 if "attentions" in key else None
            assert gi.shape[:cut] == wi.shape[:cut], key
    assert len(got_tuple) == len(got.to_tuple())


# ------------------------------------------------------------------------------------------------------------
# Training: which parameters learn, checkpointing, Trainer
# ------------------------------------------------------------------------------------------------------------

HEADS = {
    "LongformerModel": (),
    "LongformerForSequenceClassification": ("classifier.",),
    "LongformerForQuestionAnswering": ("qa_outputs.",),
    "LongformerForTokenClassification": ("classifier.",),
    "LongformerForMultipleChoice": ("classifier.", "longformer.pooler."),
    "LongformerForMaskedLM": ("lm_head.",),  # its decoder weight is the (frozen) word embedding
    "LEDModel": (),
    "LEDForConditionalGeneration": (),  # the LM head is tied to the frozen shared embedding
    "LEDForQuestionAnswering": ("qa_outputs.",),
    "LEDForSequenceClassification": ("classification_head.",),
}
HEADS = {name: heads for name, heads in HEADS.items() if name in LONGFORMER_CLASSES + LED_CLASSES}


@pytest.mark.parametrize("method", ["propagation", "tuning"])
@pytest.mark.parametrize("name", list(HEADS))
def test_only_prefix_and_head_learn(name, method):
    model = build(name).train()
    apply = apply_prefix_propagation if method == "propagation" else apply_prefix_tuning
    prefix = apply(model, num_prefix=P, backend="reference")
    assert is_patched(model)
    expected = {f"prefix_{method}.{n}" for n, _ in prefix.named_parameters()}
    expected |= {n for n, _ in model.named_parameters() if n.startswith(HEADS[name])}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    scalar_loss(model(**batch(name))).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), n
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("apply", [apply_prefix_propagation, apply_prefix_tuning])
def test_gradient_checkpointing_with_dropout(apply):
    name = "LongformerForSequenceClassification"
    model = build(name, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    apply(model, num_prefix=P, backend="reference")
    inputs = batch(name)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        scalar_loss(model(**inputs)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    enable_checkpointing(model)
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=TOL, rtol=0, msg=n)


def test_trainer_two_steps(tmp_path):
    pytest.importorskip("accelerate")
    name = "LongformerForSequenceClassification"
    model = build(name)
    prefix = apply_prefix_propagation(model, num_prefix=P, backend="reference")
    inputs = batch(name, b=4)
    rows = [{k: v[i] for k, v in inputs.items()} | {"labels": torch.tensor(i % 3)} for i in range(4)]
    frozen_before = model.longformer.encoder.layer[0].output.dense.weight.clone()
    prefix_before = prefix.prefix.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert result.global_step == 2
    assert not torch.equal(prefix.prefix.detach(), prefix_before)
    assert torch.equal(model.longformer.encoder.layer[0].output.dense.weight, frozen_before)


# ------------------------------------------------------------------------------------------------------------
# Saving, copying, misuse
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, apply",
    [("LongformerForSequenceClassification", apply_prefix_propagation), ("LEDModel", apply_prefix_tuning)],
)
def test_save_load_round_trip(tmp_path, name, apply):
    model = build(name)
    prefix = apply(model, num_prefix=P, backend="reference")
    with torch.no_grad():  # stands in for training: prefix and head move away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = tmp_path / "prefix.safetensors"
    save_prefix(model, path)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = build(name)  # same backbone, no prefix yet: load_prefix applies it from the file's metadata
    loaded = load_prefix(fresh, path, backend="reference")
    assert type(loaded) is type(prefix)
    inputs = batch(name)
    with torch.no_grad():
        torch.testing.assert_close(main_output(fresh(**inputs)), main_output(model(**inputs)), atol=0, rtol=0)
    other = build(name)
    apply_prefix_tuning(other, num_prefix=P) if apply is apply_prefix_propagation else apply_prefix_propagation(other)
    with pytest.raises(ValueError):
        load_prefix(other, path)


def test_deepcopy_gets_its_own_prefix():
    model = build("LongformerModel")
    randomize(apply_prefix_propagation(model, num_prefix=P, backend="reference"))
    twin = copy.deepcopy(model)
    inputs = batch("LongformerModel")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        torch.testing.assert_close(twin(**inputs).last_hidden_state, want, atol=0, rtol=0)
        twin.prefix_propagation.prefix.zero_()
        assert not torch.allclose(twin(**inputs).last_hidden_state, want, atol=1e-4)
        torch.testing.assert_close(model(**inputs).last_hidden_state, want, atol=0, rtol=0)


def test_misuse_is_reported():
    model = build("LongformerModel")
    apply_prefix_tuning(model, num_prefix=P, backend="reference")
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix_propagation(model)
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch("LongformerModel"), output_attentions=True)
    with pytest.raises(ValueError, match="num_prefix"):
        apply_prefix_propagation(build("LongformerModel"), num_prefix=0)
    with pytest.raises(ValueError, match="not a Longformer"):
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
        apply_prefix_tuning(transformers.BertModel(config))


@pytest.mark.parametrize("apply", [apply_prefix_propagation, apply_prefix_tuning])
def test_torch_compile(apply):
    model = build("LongformerForSequenceClassification", num_hidden_layers=1, attention_window=8)
    prefix = apply(model, num_prefix=P, backend="reference")
    randomize(prefix)
    inputs = batch("LongformerForSequenceClassification")
    got = torch.compile(model, backend="eager")(**inputs).logits
    scalar_loss({"logits": got}).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Position limit
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply", [apply_prefix_propagation, apply_prefix_tuning])
@pytest.mark.parametrize("name", ["LongformerModel", "LEDModel"])
def test_position_limit_is_named_before_the_embedding(name, apply, monkeypatch):
    """`max_length` is exact: that many tokens run, one more gets a `ValueError` naming the limit and P (without
    the check the position embedding would fail with an IndexError). The tiny configs have 160 positions, windows
    up to 16 and padding_idx 1."""
    model = build(name)
    prefix = apply(model, num_prefix=P, backend="reference")
    method = "propagation" if apply is apply_prefix_propagation else "tuning"
    want = {("LongformerModel", "propagation"): 160 - 2 - P, ("LongformerModel", "tuning"): 160 - 2 - P,
            ("LEDModel", "propagation"): 160 - P, ("LEDModel", "tuning"): (160 - P) // 16 * 16}
    assert prefix.max_length == want[name, method]

    def inputs(n):
        x = {"input_ids": torch.randint(3, 64, (1, n))}
        if name == "LEDModel":
            x["decoder_input_ids"] = torch.randint(3, 64, (1, 5))
        return x

    with torch.no_grad():
        model(**inputs(prefix.max_length))
        with pytest.raises(ValueError, match=rf"{prefix.max_length + 1} tokens .*P={P} .*limit is {prefix.max_length}"):
            model(**inputs(prefix.max_length + 1))
        monkeypatch.setattr(type(prefix), "check_length", lambda self, n, positions=None: None)
        with pytest.raises(IndexError):
            model(**inputs(prefix.max_length + 1))


@pytest.mark.parametrize("apply", [apply_prefix_propagation, apply_prefix_tuning])
def test_prefix_applied_in_eval_mode_has_no_dropout(apply):
    """The new prefix module follows the model's mode: applied to an eval model, its dropout is off."""
    model = build("LongformerModel").eval()
    prefix = apply(model, num_prefix=P, dropout=0.5, backend="reference")
    assert not prefix.training
    inputs = batch("LongformerModel")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, model(**inputs).last_hidden_state, atol=0,
                                   rtol=0)
