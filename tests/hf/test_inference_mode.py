"""`torch.inference_mode()` and `torch.no_grad()`, then autograd with the same masks, on every backend that runs
here: the op alone and patched models with both prefix methods.

The per-mask cache (`core/masks.py`) must neither version inference tensors (they have no version counter) nor
hand a value built under inference mode (an inference tensor, which autograd cannot save) to a later autograd call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_inputs, random_like, skip_unless_runs
from tiny_models import batch, build, scalar_loss

import prefix_kernels as pk

transformers = pytest.importorskip("transformers")

BACKENDS = ["reference", "cpu", "triton"]
MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_without_autograd_then_with_it_on_the_same_masks(backend, mode):
    skip_unless_runs(backend, "cpu")
    x, masks = make_inputs(2, 40, 2, 8, prefix=2, n_global=(1, 3), pad=6, seed=3)
    op = lambda **kw: pk.longformer_attention(**kw, **masks, window=3, backend=backend)  # noqa: E731
    with MODES[mode]():
        first = op(**x)
        again = op(**x)  # the cached index and tables, built in this mode
    leaves = {k: t.detach().clone().requires_grad_() for k, t in x.items()}
    out = op(**leaves)
    out.backward(random_like(out.shape, seed=4, dtype=out.dtype))
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves.values())
    torch.testing.assert_close(first, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with MODES[mode]():  # and back: values built with autograd serve inference too
        torch.testing.assert_close(op(**x), first, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["none", "propagation", "tuning"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_model_in_inference_mode_then_a_training_step(backend, method):
    skip_unless_runs(backend, "cpu")
    model = build("LongformerForSequenceClassification")
    if method == "propagation":
        pk.apply_prefix_propagation(model, num_prefix=3, backend=backend)
    elif method == "tuning":
        pk.apply_prefix_tuning(model, num_prefix=3, backend=backend)
    else:
        pk.patch_longformer(model, backend)
    model.eval()
    inputs = batch("LongformerForSequenceClassification")
    with torch.inference_mode():
        a = model(**inputs).logits
    with torch.no_grad():
        b = model(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    trained = copy.deepcopy(model).train()
    trainable = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    before = [p.detach().clone() for p in trainable]
    scalar_loss(trained(**inputs)).backward()
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(trainable, before, strict=True))
    with torch.inference_mode():  # the model still serves inference afterwards
        assert torch.isfinite(trained.eval()(**inputs).logits).all()
