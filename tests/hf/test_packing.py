"""Packed documents (`hf/packing.py`): several documents per row of a patched Longformer model, told apart by
restarting `position_ids`. Each document's hidden states, logits and parameter gradients, packed, equal what it gives
alone (no dropout): the plain model, prefix-tuning, prefix-propagation and the per-document classifier, on the
reference backend (fp64), the `cpu` backend (fp32) and the Triton kernels under the interpreter (fp32; compiled on a
GPU, marked `gpu`).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_scaled, make_inputs
from tiny_models import build

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.core.checks import check_inputs  # noqa: E402
from prefix_kernels.core.reference import dense_attention  # noqa: E402
from prefix_kernels.core.static import static_attention  # noqa: E402
from prefix_kernels.hf.packing import PackingCollator, document_ids  # noqa: E402

PAD = 1  # the tiny models' pad token and padding_idx
# Document lengths per row; 0 is a run of padding inside a row (a padded gap), and rows end padded to the longest.
LAYOUTS = {
    "plain": [[10, 1, 17, 5], [23, 14]],
    "padding_inside": [[9, 0, 1, 12], [1, 1, 30]],
}
BACKENDS = [("reference", torch.float64, 1e-10), ("cpu", torch.float32, 2e-5), ("triton", torch.float32, 2e-5)]


def _documents(layout, seed=0):
    """Random token ids of every document (length > 0) of `layout`, in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (n,), generator=g) for row in layout for n in row if n]


def _packed(layout, docs):
    """The packed batch of `docs` per `layout` (a padded gap of 3 tokens for each 0), the collator's conventions, and
    each document's (row, start)."""
    rows, places, it = [], [], iter(docs)
    for r, lengths in enumerate(layout):
        ids, pos, glob, mask = [], [], [], []
        for n in lengths:
            if n == 0:
                ids += [PAD] * 3
                pos += [PAD] * 3
                glob += [0] * 3
                mask += [0] * 3
                continue
            places.append((r, len(ids)))
            ids += next(it).tolist()
            pos += list(range(PAD + 1, PAD + 1 + n))
            glob += [1] + [0] * (n - 1)
            mask += [1] * n
        rows.append((ids, pos, glob, mask))
    length = max(len(r[0]) + 2 for r in rows)  # padding after every row
    fills = (PAD, PAD, 0, 0)
    cols = [torch.tensor([r[i] + [fills[i]] * (length - len(r[i])) for r in rows]) for i in range(4)]
    names = ("input_ids", "position_ids", "global_attention_mask", "attention_mask")
    return dict(zip(names, cols, strict=True)), places


def _alone(doc):
    glob = torch.zeros(1, len(doc), dtype=torch.long)
    glob[0, 0] = 1
    return {"input_ids": doc[None], "global_attention_mask": glob}


def _weights(docs, width, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(len(d), width, generator=g, dtype=dtype) for d in docs]


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(model, layout, dtype, tol, output=lambda out: out[0], seed=0):
    """Each document packed against alone: the outputs `output(model(...))` per token, and the gradients of the same
    random projection of them."""
    docs = _documents(layout, seed)
    batch, places = _packed(layout, docs)
    model.zero_grad(set_to_none=True)
    out = output(model(**batch))
    ws = _weights(docs, out.shape[-1], out.dtype)
    packed_rows = [out[r, s : s + len(d)] for (r, s), d in zip(places, docs, strict=True)]
    sum((rows * w).sum() for rows, w in zip(packed_rows, ws, strict=True)).backward()
    packed_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    for doc, rows, w in zip(docs, packed_rows, ws, strict=True):
        alone = output(model(**_alone(doc)))[0]
        assert_close_scaled(rows, alone, tol, f"document of {len(doc)} tokens")
        (alone * w).sum().backward()
    alone_grads = _grads(model)
    assert any(g is not None for g in alone_grads.values()), "no gradient to compare"
    for name, want in alone_grads.items():
        assert (packed_grads[name] is None) == (want is None), name
        if want is not None:
            assert_close_scaled(packed_grads[name], want, tol, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_plain_model_packed_equals_alone(layout, backend, dtype, tol):
    model = build("LongformerForTokenClassification").to(dtype)
    pk.patch_longformer(model, backend)
    _compare(model, LAYOUTS[layout], dtype, tol, output=lambda out: out.logits)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_hidden_states_packed_equal_alone(backend, dtype, tol):
    model = build("LongformerModel").to(dtype)
    pk.patch_longformer(model, backend)
    _compare(model, LAYOUTS["padding_inside"], dtype, tol, output=lambda out: out.last_hidden_state)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("method", ["tuning", "propagation"])
def test_prefix_methods_packed_equal_alone(method, backend, dtype, tol):
    model = build("LongformerForTokenClassification").to(dtype)
    apply = pk.apply_prefix_tuning if method == "tuning" else pk.apply_prefix_propagation
    prefix = apply(model, num_prefix=3, backend=backend, dropout=0.0)
    with torch.no_grad():  # a prefix far from its init, so a misplaced slot shows
        prefix.prefix_key.normal_() if method == "tuning" else prefix.prefix.normal_()
    _compare(model, LAYOUTS["padding_inside"], dtype, tol, output=lambda out: out.logits)


def test_prefix_tuning_separate_packed_equals_alone():
    model = build("LongformerForTokenClassification").double()
    pk.apply_prefix_tuning(model, num_prefix=2, backend="reference", dropout=0.0, prefix_attention="separate",
                           kernel="rbf")
    _compare(model, LAYOUTS["plain"], torch.float64, 1e-10, output=lambda out: out.logits)


def test_prefix_propagation_separate_declines_packing():
    model = build("LongformerForTokenClassification")
    pk.apply_prefix_propagation(model, num_prefix=2, backend="cpu", prefix_attention="separate")
    batch, _ = _packed(LAYOUTS["plain"], _documents(LAYOUTS["plain"]))
    with pytest.raises(ValueError, match="does not support packed documents"):
        model(**batch)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_document_classifier_packed_equals_alone(backend, dtype, tol):
    model = build("LongformerForSequenceClassification").to(dtype)
    pk.patch_longformer(model, backend)
    clf = pk.DocumentClassifier(model)
    layout = LAYOUTS["padding_inside"]
    docs = _documents(layout)
    batch, places = _packed(layout, docs)
    labels = torch.arange(len(docs)) % 3
    out = clf(**batch, document_index=torch.tensor(places), labels=labels)
    assert out.logits.shape == (len(docs), 3)
    out.loss.backward()
    packed_grads = _grads(clf)
    clf.zero_grad(set_to_none=True)
    losses = []
    for i, doc in enumerate(docs):
        alone = model(**_alone(doc), labels=labels[i : i + 1])
        assert_close_scaled(out.logits[i], alone.logits[0], tol, f"document {i}")
        losses.append(alone.loss)
    (sum(losses) / len(docs)).backward()  # the packed loss is the mean over documents
    assert_close_scaled(out.loss.detach(), sum(losses).detach() / len(docs), tol)
    for name, want in _grads(clf).items():
        if want is not None:
            assert_close_scaled(packed_grads[name], want, tol, name)


def test_triton_serves_packed_calls():
    """The Triton kernels serve `document_ids` (the CUDA library's refusal: `test_op_features.py`)."""
    x, masks = make_inputs(1, 24, 2, 8, documents=[10, 14])
    args = check_inputs(**x, window=3, **masks)
    from prefix_kernels.attention import _why_not

    if pk.available_backends()["triton"] is not None:
        pytest.skip(f"triton: {pk.available_backends()['triton']}")
    assert _why_not("triton", args) is None


def test_static_formulation_honours_documents():
    """The exporters' formulation keeps windows and global tokens inside each document."""
    x, masks = make_inputs(2, 30, 2, 8, dtype=torch.float64, n_global=(1, 3), pad=4, documents=[7, 1, 12],
                           prefix=2)
    kwargs = dict(window=3, **x, **masks)
    torch.testing.assert_close(static_attention(check_inputs(**kwargs)), dense_attention(**kwargs), atol=1e-12,
                               rtol=0)


def test_document_ids_from_positions():
    pos = torch.tensor([[2, 3, 4, 2, 3, 1, 1, 2, 2, 3], [1, 2, 3, 4, 5, 6, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    # A restart after a padded gap starts a document; a position equal to the one before starts one; padding never.
    want = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 4, 4], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(document_ids(pos, mask), want)


def test_zero_based_restarts_are_refused():
    model = build("LongformerModel")
    pk.patch_longformer(model, "cpu")
    batch, _ = _packed(LAYOUTS["plain"], _documents(LAYOUTS["plain"]))
    real = batch["attention_mask"].bool()
    batch["position_ids"] = torch.where(real, batch["position_ids"] - PAD - 1, PAD)
    with pytest.raises(ValueError, match=r"padding_idx \+ 1 = 2"):
        model(**batch)
    # One document per row numbered from 0 is not packed: the model behaves as before (no error).
    model(input_ids=torch.randint(3, 64, (1, 12)), position_ids=torch.arange(12)[None])


def test_output_attentions_declines_packing():
    model = build("LongformerModel")
    pk.patch_longformer(model, "cpu")
    batch, _ = _packed(LAYOUTS["plain"], _documents(LAYOUTS["plain"]))
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch, output_attentions=True)


def test_document_classifier_refuses_led_and_pool_prefix():
    with pytest.raises(ValueError, match="LED does not take packed documents"):
        pk.DocumentClassifier(build("LEDModel"))
    model = build("LongformerForSequenceClassification")
    pk.apply_prefix_propagation(model, num_prefix=2, pool_prefix=True, backend="cpu")
    with pytest.raises(ValueError, match="pool_prefix"):
        pk.DocumentClassifier(model)


def test_collator_output():
    features = [{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8] * 5, "label": 0},
                {"input_ids": [9], "label": 2}, {"input_ids": [4, 4], "label": 1, "global_attention_mask": [0, 1]}]
    out = PackingCollator(max_tokens=6, pad_token_id=PAD, pad_to_multiple_of=4)(features)
    # First-fit: [3 tokens, 1 token, 2 tokens] fill row 0; the 5-token document goes to row 1.
    assert torch.equal(out["document_index"], torch.tensor([[0, 0], [1, 0], [0, 3], [0, 4]]))
    assert torch.equal(out["document_lengths"], torch.tensor([3, 5, 1, 2]))
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7, 9, 4, 4, 1, 1], [8, 8, 8, 8, 8, 1, 1, 1]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]))
    assert torch.equal(out["position_ids"], torch.tensor([[2, 3, 4, 2, 2, 3, 1, 1], [2, 3, 4, 5, 6, 1, 1, 1]]))
    assert torch.equal(out["global_attention_mask"],
                       torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]))
    assert torch.equal(out["labels"], torch.tensor([1, 0, 2, 1]))
    token = PackingCollator(max_tokens=8)([{"input_ids": [5, 6], "labels": [3, 4]}, {"input_ids": [7], "labels": [5]}])
    assert torch.equal(token["labels"], torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="max_tokens=6"):
        PackingCollator(max_tokens=6)([{"input_ids": list(range(7))}])
    with pytest.raises(ValueError, match="max_tokens"):
        PackingCollator(max_tokens=0)


def test_collator_rows_feed_the_model():
    """The collator's rows through the classifier equal each document alone (reference, fp64)."""
    model = build("LongformerForSequenceClassification").double()
    pk.patch_longformer(model, "reference")
    docs = _documents([[12, 1, 20, 7, 9]], seed=3)
    batch = PackingCollator(max_tokens=32, pad_token_id=PAD, pad_to_multiple_of=16)(
        [{"input_ids": d, "label": i % 3} for i, d in enumerate(docs)])
    assert batch["input_ids"].shape[0] == 2
    logits = pk.DocumentClassifier(model)(**batch).logits
    for i, doc in enumerate(docs):
        assert_close_scaled(logits[i], model(**_alone(doc)).logits[0], 1e-10, f"document {i}")


def test_flattening_collator_with_an_offset():
    """transformers' `DataCollatorWithFlattening` numbers positions from 0 (refused); shifted by `padding_idx + 1`
    and given a global first token per document, its row works: one row, no attention mask needed."""
    model = build("LongformerModel").double()
    pk.patch_longformer(model, "reference")
    docs = _documents([[6, 1, 9]], seed=4)
    flat = transformers.DataCollatorWithFlattening(return_position_ids=True)(
        [{"input_ids": d.tolist()} for d in docs])
    with pytest.raises(ValueError, match="DataCollatorWithFlattening"):
        model(input_ids=flat["input_ids"], position_ids=flat["position_ids"])
    positions = flat["position_ids"] + PAD + 1
    glob = (positions == PAD + 1).long()
    out = model(input_ids=flat["input_ids"], position_ids=positions, global_attention_mask=glob).last_hidden_state
    start = 0
    for doc in docs:
        alone = model(**_alone(doc)).last_hidden_state[0]
        assert_close_scaled(out[0, start : start + len(doc)], alone, 1e-10)
        start += len(doc)


@pytest.mark.parametrize("how", ["compile", "export"])
def test_traced_packed_rows_keep_documents_apart(how):
    """The ids are tensor ops (no host read): `torch.compile(fullgraph=True)` (dynamo, eager backend) and
    `torch.export` (the static formulation) give what the eager model gives."""
    model = build("LongformerForTokenClassification")
    pk.patch_longformer(model, "cpu")
    batch, _ = _packed(LAYOUTS["plain"], _documents(LAYOUTS["plain"]))
    want = model(**batch).logits
    if how == "compile":
        got = torch.compile(model, backend="eager", fullgraph=True)(**batch).logits
    else:
        got = torch.export.export(model, (), dict(batch), strict=False).module()(**batch).logits
    assert_close_scaled(got, want, 1e-5)
