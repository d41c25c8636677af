"""Whole patched models under `torch.compile(fullgraph=True)`: Longformer and LED, plain and with either prefix
method, forward and backward, through the fused custom ops (the Triton kernels through the interpreter without
CUDA and on CUDA tensors with it; the "cpu" backend on the CPU), with no recompilation when only the masks change.
The oracle is the same model computing eagerly through the reference backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import skip_unless_runs
from tiny_models import batch, build, main_output, scalar_loss

transformers = pytest.importorskip("transformers")
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.hf.patching import patch_longformer  # noqa: E402

# `(backend, device)` of the fused custom ops: the Triton kernels on CPU tensors (its interpreter, where there is no
# CUDA) and on CUDA tensors (compiled, marked `gpu`), the "cpu" backend on CPU tensors. The cases that cannot run
# here skip, saying why.
BACKENDS = (pytest.param("triton", "cpu", id="triton-cpu-interpreter"),
           pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
           pytest.param("cpu", "cpu", id="cpu-cpu"))
METHODS = {
    "patched": lambda model, backend: patch_longformer(model, backend),
    "propagation": lambda model, backend: pk.apply_prefix_propagation(model, num_prefix=3, backend=backend),
    "tuning": lambda model, backend: pk.apply_prefix_tuning(model, num_prefix=3, backend=backend),
}
MODELS = ["LongformerForSequenceClassification", "LEDEncoder"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make(name: str, method: str, backend: str, device="cpu"):
    """`(model, target)`: a one-layer model of class `name` on `device` with `method` applied, and the module to
    call (the model, or for "LEDEncoder" the encoder of an `LEDModel`, whose prefix lives on the model)."""
    led = name == "LEDEncoder"
    layers = {"encoder_layers": 1} if led else {"num_hidden_layers": 1}
    model = build("LEDModel" if led else name, attention_window=[16], **layers).to(device)
    # Training mode (the tiny configs have no dropout), except for the LED encoder under transformers 4.x: in
    # training it draws a LayerDrop number and branches on it even when layerdrop is 0 (HF's graph break).
    model.train(not (led and TRANSFORMERS_4))
    METHODS[method](model, backend)
    with torch.no_grad():  # a prefix large enough to matter
        for n, p in model.named_parameters():
            if n.startswith("prefix_"):
                p.normal_(0.0, 0.5)
    return model, model.get_encoder() if led else model


def reference_copy(model, name: str):
    """`(copy, target)`: the same model computing through the reference backend, eagerly (the oracle: cheaper
    than a second run of the interpreted kernels)."""
    twin = patch_longformer(copy.deepcopy(model), "reference")
    return twin, twin.get_encoder() if name == "LEDEncoder" else twin


def inputs_for(name: str, device="cpu") -> dict:
    if name == "LEDEncoder":
        return {k: v for k, v in batch("LEDModel", device=device).items() if k != "decoder_input_ids"}
    return batch(name, device=device)


def forward_backward(model, target, inputs):
    """Output of `target` and the gradients of `model`'s parameters (by name) for a fixed projection."""
    model.zero_grad(set_to_none=True)
    out = target(**inputs)
    scalar_loss(out).backward()
    return main_output(out).detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, tol=1e-5):
    out, grads = got
    want_out, want_grads = want
    torch.testing.assert_close(out, want_out, atol=tol, rtol=0)
    assert grads.keys() == want_grads.keys() and grads
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], atol=tol * max(1.0, want_grads[n].abs().max().item()), rtol=0,
                                   msg=n)


def other_masks(inputs: dict, kind: str) -> dict:
    """The same shapes with different masks: more globals, none at all, or other padding."""
    inputs = {k: v.clone() for k, v in inputs.items()}
    glob, mask = inputs["global_attention_mask"], inputs["attention_mask"]
    if kind == "more_globals":
        glob[0, [2, 7, 30]] = 1
        glob[1, 11] = 1
    elif kind == "no_globals":
        glob.zero_()
    elif kind == "padding":
        mask.fill_(1)
        mask[0, 30:] = 0
    return inputs


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", MODELS)
def test_fullgraph_forward_backward(name, method, backend, device):
    """One graph for the whole model (HF's encoder `.item()` included), forward and backward equal to eager."""
    skip_unless_runs(backend, device)
    model, target = make(name, method, backend, device)
    eager, eager_target = reference_copy(model, name)
    compiled = torch.compile(target, fullgraph=True, backend="aot_eager")
    inputs = inputs_for(name, device)
    assert_same(forward_backward(model, compiled, inputs), forward_backward(eager, eager_target, inputs))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name, method", [("LongformerForSequenceClassification", "propagation"),
                                          ("LEDEncoder", "tuning"), ("LongformerForSequenceClassification", "patched")])
def test_no_recompilation_when_only_the_masks_change(name, method, backend, device):
    skip_unless_runs(backend, device)
    model, target = make(name, method, backend, device)
    model.eval()
    _, oracle = reference_copy(model, name)
    compiled = torch.compile(target, fullgraph=True, backend="aot_eager")
    inputs = inputs_for(name, device)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for kind in ("first", "more_globals", "no_globals", "padding"):
            x = other_masks(inputs, kind)
            torch.testing.assert_close(main_output(compiled(**x)), main_output(oracle(**x)), atol=1e-5, rtol=0,
                                       msg=kind)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inductor(backend, device):
    """The default compiler (inductor) on a prefix-propagation classifier, forward and backward."""
    skip_unless_runs(backend, device)
    model, _ = make("LongformerForSequenceClassification", "propagation", backend, device)
    eager, _ = reference_copy(model, "LongformerForSequenceClassification")
    inputs = inputs_for("LongformerForSequenceClassification", device)
    got = forward_backward(model, torch.compile(model, fullgraph=True), inputs)
    assert_same(got, forward_backward(eager, eager, inputs), tol=1e-4)


def test_reference_backend_runs_between_graphs():
    """The reference backend sizes its tensors by the global count (a host read; inductor cannot lower such
    sizes): under `torch.compile` it runs eagerly between graphs (eager's numbers, forward and backward), and
    `fullgraph=True` either says so instead of tracing it (newer torch) or runs it as an opaque call with eager's
    numbers (older torch), never something else."""
    model, _ = make("LongformerForSequenceClassification", "propagation", "reference")
    eager = copy.deepcopy(model)
    inputs = inputs_for("LongformerForSequenceClassification")
    want = forward_backward(eager, eager, inputs)
    assert_same(forward_backward(model, torch.compile(model, backend="aot_eager"), inputs), want)
    torch._dynamo.reset()
    try:
        got = forward_backward(model, torch.compile(model, fullgraph=True, backend="aot_eager"), inputs)
    except Exception as exc:  # noqa: BLE001 - dynamo's error types differ across torch versions
        assert "torch.compiler.disable" in str(exc)
    else:
        assert_same(got, want)
