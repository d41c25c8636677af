"""`patch_longformer`: patched models compute what Hugging Face computes, with the same parameters.

Every comparison is fp32 against the unpatched model (HF's own eager attention), forward and backward. Most run
through the reference backend on the CPU; the fused-kernel cases run the Triton kernels through the interpreter
without CUDA, and the Triton kernels and the CUDA library on CUDA tensors where there is a GPU.
"""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch
from helpers import FUSED, assert_close_scaled, skip_unless_runs
from tiny_models import (
    LED_CLASSES,
    LONGFORMER_CLASSES,
    assert_same_grads,
    batch,
    build,
    enable_checkpointing,
    main_output,
    run_model,
    scalar_loss,
)

transformers = pytest.importorskip("transformers")

from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.core import masks  # noqa: E402
from prefix_kernels.hf.packing import _PackedModel  # noqa: E402
from prefix_kernels.hf.patching import (  # noqa: E402
    _ExportableModel,
    _TraceableEncoder,
    is_patched,
    patch_longformer,
    patch_longformer_classes,
    unpatch_longformer,
    unpatch_longformer_classes,
)
from prefix_kernels.hf.self_attention import fused_self_attention  # noqa: E402

TOL = 1e-5
MODELS = [c for c in LONGFORMER_CLASSES if c != "LongformerForMaskedLM"] + ["LEDForConditionalGeneration"]


def patched_copy(model, backend="reference"):
    return patch_longformer(copy.deepcopy(model), backend=backend)


@pytest.mark.parametrize("name", MODELS)
def test_patched_matches_hf_forward_and_backward(name):
    hf = build(name)
    ours = patched_copy(hf)
    assert is_patched(ours) and not is_patched(hf)
    inputs = batch(name)
    want, want_grads = run_model(hf, inputs)
    got, got_grads = run_model(ours, inputs)
    torch.testing.assert_close(main_output(got), main_output(want), atol=TOL, rtol=0)
    assert_same_grads(got_grads, want_grads)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDModel"])
def test_patched_with_fused_kernels_matches_hf(name, backend, device):
    """The fused kernels behind the patched module: HF's numbers (HF's eager attention on the same device),
    forward and backward, with global tokens, padding and HF's per-layer windows."""
    skip_unless_runs(backend, device)
    hf = build(name, head_dim=16 if backend == "cuda" else 8).to(device)  # the CUDA library's smallest is 16
    ours = patched_copy(hf, backend=backend)
    inputs = batch(name, device=device)
    want, want_grads = run_model(hf, inputs)
    got, got_grads = run_model(ours, inputs)
    torch.testing.assert_close(main_output(got), main_output(want), atol=TOL, rtol=0)
    assert_same_grads(got_grads, want_grads)


@pytest.fixture
def global_index_reads(monkeypatch):
    """The `(B, N)` masks whose compact global index the package computes (`core.masks.global_positions`, whose
    global count `G` is read back to the host), counted wherever a `prefix_kernels` module calls it."""
    reads = []
    original = masks.global_positions

    def counted(is_global):
        reads.append(is_global)
        return original(is_global)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "prefix_kernels" and getattr(module, "global_positions", None) is original:
            monkeypatch.setattr(module, "global_positions", counted)
    return reads


# Three layers, so one read per forward pass differs from one per layer; head dim 16, which every backend serves.
DEEP = {"LongformerForSequenceClassification": dict(num_hidden_layers=3, attention_window=[8, 16, 8], head_dim=16),
        "LEDModel": dict(encoder_layers=3, attention_window=[8, 16, 8], head_dim=16)}


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu-cpu"), *FUSED[1:]])
@pytest.mark.parametrize("name", list(DEEP))
def test_one_global_index_read_per_forward_pass(global_index_reads, name, backend, device):
    """The fused ops cache the compact global index per mask tensor, and the patched model hands every layer the
    same masks (and the same global-and-not-padding mask): one forward and backward pass of a three-layer model
    computes the index, and reads its size back to the host, once, not once per layer; a new batch once more."""
    skip_unless_runs(backend, device)
    model = patch_longformer(build(name, **DEEP[name]).to(device), backend)
    layers = []
    for module in model.modules():
        if hasattr(module, "_prefix_kernels_backend"):
            module.register_forward_hook(lambda *_: layers.append(1))
    scalar_loss(model(**batch(name, device=device))).backward()
    assert len(layers) == 3
    assert len(global_index_reads) == 1, f"{len(global_index_reads)} global-index reads for one pass of 3 layers"
    with torch.no_grad():
        model(**batch(name, seed=1, device=device))
    assert len(layers) == 6
    assert len(global_index_reads) == 2, f"{len(global_index_reads)} global-index reads for two passes"
    assert all(mask.device.type == device for mask in global_index_reads)


@pytest.mark.parametrize("name", ["LongformerModel", "LEDModel"])
def test_no_globals_and_no_padding(name):
    hf = build(name)
    ours = patched_copy(hf)
    inputs = batch(name)
    inputs.pop("global_attention_mask")
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    torch.testing.assert_close(main_output(ours(**inputs)), main_output(hf(**inputs)), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDForConditionalGeneration"])
def test_gradient_checkpointing(name):
    hf = build(name).train()  # dropout probabilities are 0 in the tiny configs
    ours = patched_copy(hf)
    enable_checkpointing(ours)
    inputs = batch(name)
    want, want_grads = run_model(hf, inputs)
    got, got_grads = run_model(ours, inputs)
    torch.testing.assert_close(main_output(got), main_output(want), atol=TOL, rtol=0)
    assert_same_grads(got_grads, want_grads)


def test_dropout_masks_replay_under_gradient_checkpointing():
    """With attention dropout on, a checkpointed run recomputes the same masks: same loss, same gradients."""
    model = patch_longformer(
        build("LongformerForSequenceClassification", attention_probs_dropout_prob=0.3), "reference"
    )
    model.train()
    inputs = batch("LongformerForSequenceClassification")
    torch.manual_seed(7)
    plain, plain_grads = run_model(model, inputs)
    enable_checkpointing(model)
    torch.manual_seed(7)
    ckpt, ckpt_grads = run_model(model, inputs)
    torch.testing.assert_close(ckpt.logits, plain.logits, atol=TOL, rtol=0)
    assert_same_grads(ckpt_grads, plain_grads)
    model.eval()
    assert not torch.equal(model(**inputs).logits, plain.logits)  # dropout was active in training


@pytest.mark.parametrize("name", ["LongformerForTokenClassification", "LEDModel"])
def test_output_attentions_falls_back_to_hf_layouts(name):
    hf = build(name)
    ours = patched_copy(hf)
    inputs = batch(name)
    kwargs = {"output_attentions": True, "output_hidden_states": True}
    want, got = hf(**inputs, **kwargs), ours(**inputs, **kwargs)
    local = "encoder_attentions" if name.startswith("LED") else "attentions"
    glob = "encoder_global_attentions" if name.startswith("LED") else "global_attentions"
    for key in (local, glob):
        assert len(got[key]) == len(want[key]) == 2
        for g, w in zip(got[key], want[key], strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_layer_head_mask_scales_each_head():
    """transformers 4.x hands the layer `layer_head_mask`; it multiplies each head's probabilities."""
    hf = build("LongformerModel")
    attn = hf.encoder.layer[0].attention.self
    b, n, c = 2, 24, 32
    x = torch.randn(b, n, c)
    mask = torch.zeros(b, n)
    mask[:, 0] = torch.finfo(torch.float32).max
    mask[1, 18:] = torch.finfo(torch.float32).min
    hf_kwargs = dict(is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=True)
    with torch.no_grad():
        (want,) = attn(x, attention_mask=mask, **hf_kwargs)
        head_mask = torch.tensor([1.0, 0.0, 0.5, 2.0])
        got = fused_self_attention(attn, x, attention_mask=mask, layer_head_mask=head_mask, **hf_kwargs)
    want = (want.view(b, n, 4, 8) * head_mask.view(1, 1, 4, 1)).view(b, n, c)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.skipif(
    "head_mask" not in inspect.signature(transformers.LongformerModel.forward).parameters,
    reason="this transformers version has no head_mask",
)
def test_head_mask_through_the_model():
    hf = build("LongformerModel")
    ours = patched_copy(hf)
    inputs = batch("LongformerModel")
    head_mask = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.25]])
    want = hf(**inputs, head_mask=head_mask).last_hidden_state
    torch.testing.assert_close(ours(**inputs, head_mask=head_mask).last_hidden_state, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("value", [torch.finfo(torch.float32).max, 10000.0])
def test_masks_derived_from_the_float_mask(value):
    """A direct call with only HF's float mask (finfo or the old +-10000) derives padding and globals."""
    attn = build("LongformerModel").encoder.layer[1].attention.self
    b, n = 2, 48  # HF's layer needs a multiple of the window
    x = torch.randn(b, n, 32)
    mask = torch.zeros(b, n)
    mask[:, [0, 9]] = value
    mask[0, 40:] = -value
    with torch.no_grad():
        (want,) = attn(
            x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=True
        )
        patch_longformer(attn, "reference")
        (got,) = attn(x, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["LongformerForMultipleChoice", "LEDForConditionalGeneration"])
def test_state_dict_unchanged_and_strict_reload(name):
    hf = build(name)
    keys = list(hf.state_dict())
    buffers = [n for n, _ in hf.named_buffers()]
    ours = patched_copy(hf)
    assert list(ours.state_dict()) == keys
    assert [n for n, _ in ours.named_buffers()] == buffers
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]
    fresh = patch_longformer(build(name, seed=1), "reference")
    fresh.load_state_dict(hf.state_dict(), strict=True)
    hf2 = build(name, seed=2)
    hf2.load_state_dict(ours.state_dict(), strict=True)
    inputs = batch(name)
    torch.testing.assert_close(main_output(fresh(**inputs)), main_output(hf(**inputs)), atol=TOL, rtol=0)


def test_unpatch_restores_hf():
    hf = build("LongformerForQuestionAnswering")
    ours = patched_copy(hf)
    assert isinstance(ours.longformer.encoder, _TraceableEncoder)
    assert isinstance(ours.longformer, _ExportableModel)
    unpatch_longformer(ours)
    assert not is_patched(ours)
    assert type(ours.longformer.encoder) is type(hf.longformer.encoder)
    assert type(ours.longformer) is type(hf.longformer)
    assert all(type(m) is LongformerSelfAttention for m in ours.modules() if isinstance(m, LongformerSelfAttention))
    assert all("_prefix_kernels_backend" not in vars(m) for m in ours.modules())
    inputs = batch("LongformerForQuestionAnswering")
    torch.testing.assert_close(ours(**inputs).start_logits, hf(**inputs).start_logits, atol=0, rtol=0)


def test_class_patch_and_pretrained_round_trip(tmp_path):
    hf = build("LongformerForSequenceClassification")
    patch_longformer(copy.deepcopy(hf), "reference").save_pretrained(tmp_path)
    cls = transformers.LongformerForSequenceClassification
    try:
        with patch_longformer_classes("reference"):
            loaded = cls.from_pretrained(tmp_path).eval()
        plain = cls.from_pretrained(tmp_path).eval()
    finally:
        unpatch_longformer_classes()
    assert is_patched(loaded) and not is_patched(plain)
    assert isinstance(loaded.longformer.encoder, _TraceableEncoder)
    assert isinstance(loaded.longformer, _ExportableModel)
    assert not isinstance(plain.longformer.encoder, _TraceableEncoder)
    assert not isinstance(plain.longformer, _ExportableModel)
    assert {m._prefix_kernels_backend for m in loaded.modules() if hasattr(m, "_prefix_kernels_backend")} == {
        "reference"
    }
    inputs = batch("LongformerForSequenceClassification")
    torch.testing.assert_close(loaded(**inputs).logits, hf(**inputs).logits, atol=TOL, rtol=0)
    torch.testing.assert_close(plain(**inputs).logits, hf(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["LongformerModel", "LEDModel"])
def test_patched_forwards_show_hf_signatures(name):
    """`Trainer` picks dataset columns by the model's `forward` signature, the prefix methods bind positional
    arguments by it: the swapped classes show HF's (`LongformerModel`'s with the keyword-only `document_ids` of
    packed documents added before `**kwargs`)."""
    hf = build(name)
    ours = patched_copy(hf)
    for mine, theirs in zip(ours.modules(), hf.modules(), strict=True):
        if type(mine) is not type(theirs):
            shown = dict(inspect.signature(mine.forward).parameters)
            if isinstance(mine, _PackedModel):
                extra = shown.pop("document_ids")
                assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is None
            expected = inspect.signature(theirs.forward)
            assert list(shown.values()) == list(expected.parameters.values()), type(mine).__name__
            assert inspect.signature(mine.forward).return_annotation == expected.return_annotation


def test_pickle_and_deepcopy(tmp_path):
    ours = patched_copy(build("LEDModel"))
    torch.save(ours, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert is_patched(loaded)
    inputs = batch("LEDModel")
    torch.testing.assert_close(loaded(**inputs).last_hidden_state, ours(**inputs).last_hidden_state, atol=0, rtol=0)


def test_torch_compile():
    # One layer: dynamo's time goes into HF's own graph breaks (`.item()`, logging), per layer.
    hf = build("LongformerForSequenceClassification", num_hidden_layers=1, attention_window=8)
    ours = patched_copy(hf)
    compiled = torch.compile(ours, backend="eager")
    inputs = batch("LongformerForSequenceClassification")
    want, want_grads = run_model(hf, inputs)
    got, got_grads = run_model(compiled, inputs)
    torch.testing.assert_close(got.logits, want.logits, atol=TOL, rtol=0)
    assert_same_grads({k.removeprefix("_orig_mod."): v for k, v in got_grads.items()}, want_grads)


def test_query_global_projects_only_the_global_rows():
    """Like HF, the patched module runs `query_global` on the global rows only: an input of `(B, max globals, C)`,
    not `(B, N, C)`; rows with different counts (3 and 1) give HF's numbers, forward and backward."""
    hf = build("LongformerModel")
    ours = patched_copy(hf)
    shapes = []
    for layer in ours.encoder.layer:
        layer.attention.self.query_global.register_forward_hook(lambda mod, args, out: shapes.append(args[0].shape))
    inputs = batch("LongformerModel")
    inputs["global_attention_mask"].zero_()
    inputs["global_attention_mask"][0, [0, 9, 30]] = 1
    inputs["global_attention_mask"][1, 5] = 1
    want, want_grads = run_model(hf, inputs)
    got, got_grads = run_model(ours, inputs)
    assert shapes == [torch.Size([2, 3, ours.config.hidden_size])] * ours.config.num_hidden_layers
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=TOL, rtol=0)
    assert_same_grads(got_grads, want_grads)


def test_ddp_single_process(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        hf = build("LongformerForSequenceClassification")
        ddp = torch.nn.parallel.DistributedDataParallel(patched_copy(hf))
        inputs = batch("LongformerForSequenceClassification")
        want, want_grads = run_model(hf, inputs)
        for _ in range(2):  # the second step checks DDP's reducer saw every parameter used
            got, got_grads = run_model(ddp, inputs)
        torch.testing.assert_close(got.logits, want.logits, atol=TOL, rtol=0)
        assert_same_grads({k.removeprefix("module."): v for k, v in got_grads.items()}, want_grads)
    finally:
        dist.destroy_process_group()


def test_explicit_backend_that_cannot_serve_raises():
    """Dispatch: an explicit backend fails loudly; a bad name fails at patch time."""
    with pytest.raises(ValueError, match="backend"):
        patch_longformer(build("LongformerModel"), backend="nope")
    reasons = pk.available_backends()
    missing = [name for name, why in reasons.items() if why is not None]
    if not missing:
        pytest.skip("every backend is available here")
    model = patch_longformer(build("LongformerModel"), backend=missing[0])
    with pytest.raises(ValueError, match=missing[0]):
        model(**batch("LongformerModel"))


def test_auto_backend_runs_and_env_override(monkeypatch):
    hf = build("LongformerModel")
    ours = patched_copy(hf, backend="auto")
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "reference")
    inputs = batch("LongformerModel")
    torch.testing.assert_close(ours(**inputs).last_hidden_state, hf(**inputs).last_hidden_state, atol=TOL, rtol=0)


def test_patch_rejects_other_models():
    with pytest.raises(ValueError, match="no LongformerSelfAttention"):
        patch_longformer(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("name", LED_CLASSES[:1] + LONGFORMER_CLASSES[-1:])
def test_patch_twice_changes_backend_only(name):
    ours = patched_copy(build(name))
    classes = [type(m) for m in ours.modules()]
    patch_longformer(ours, backend="auto")
    assert [type(m) for m in ours.modules()] == classes
    assert {m._prefix_kernels_backend for m in ours.modules() if hasattr(m, "_prefix_kernels_backend")} == {"auto"}


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 Triton still counts as usable (explicitly), but `auto` passes it by, says why, and a
    patched model with `auto` never reaches it."""
    from prefix_kernels.attention import select_backend
    from prefix_kernels.backends import triton as triton_attention
    from prefix_kernels.core import custom_op
    from prefix_kernels.core.checks import check_inputs

    why = pk.available_backends()["triton"]
    if why is not None:
        pytest.skip(f"backend 'triton' unavailable: {why}")
    if not triton_attention.INTERPRET:
        pytest.skip("the Triton backend runs compiled kernels here (TRITON_INTERPRET is unset), not the interpreter")
    assert "interpreter" in pk.auto_skips()["triton"]
    x = torch.randn(1, 32, 2, 8)
    args = check_inputs(x, x, x, window=4)
    assert select_backend(args, "triton") == "triton"
    assert select_backend(args, "auto") != "triton"

    def interpreter_reached(*_args, **_kwargs):
        raise AssertionError("auto reached the Triton interpreter")

    monkeypatch.setitem(custom_op._LAUNCHERS, "triton", (interpreter_reached, interpreter_reached))
    hf = build("LongformerModel")
    ours = patched_copy(hf, backend="auto")
    inputs = batch("LongformerModel")
    torch.testing.assert_close(ours(**inputs).last_hidden_state, hf(**inputs).last_hidden_state, atol=TOL, rtol=0)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LEDModel"])
def test_eager_forward_builds_no_square_mask(name):
    """Run eagerly, a patched model builds HF's 2D mask as the one query row HF keeps, not `(B, 1, N, N)`: no tensor of
    its forward pass has `B x N x N` elements (HF's own model builds one where its mask builder expands, so the check
    tells them apart where it does), and the outputs are HF's."""
    n = 120
    model, inputs = build(name), batch(name, n=n)
    with torch.no_grad():
        want = model(**inputs)
        with _LargestTensor() as hf:
            model(**inputs)
        pk.patch_longformer(model, backend="reference")
        with _LargestTensor() as patched:
            got = model(**inputs)
    square = len(inputs["input_ids"]) * n * n  # B x N x N
    assert patched.most < square, patched.most
    builds_square = hf.most >= square
    if name.startswith("LED") or int(transformers.__version__.split(".")[0]) >= 5:
        assert builds_square, "HF's model no longer builds the square mask: this check tells nothing"
    assert_close_scaled(main_output(got), main_output(want), 1e-5, name)
