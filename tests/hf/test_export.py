"""Export of patched models (eval mode): `torch.export`, ONNX through the dynamo exporter and the legacy
TorchScript-based one, run by onnxruntime. The graphs hold standard ops only, with shapes that follow from the
input shapes, and give PyTorch's numbers for masks other than the ones they were traced with. The static
formulation they trace is checked against the dense reference in `core/test_static.py`.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, build, main_output

pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.hf.patching import patch_longformer  # noqa: E402

NAMES = ("input_ids", "attention_mask", "global_attention_mask")
METHODS = {
    "patched": lambda model: patch_longformer(model, "reference"),
    "propagation": lambda model: pk.apply_prefix_propagation(model, num_prefix=3, backend="reference"),
    "tuning": lambda model: pk.apply_prefix_tuning(model, num_prefix=3, backend="reference"),
}


class MainOutput(torch.nn.Module):
    """`(input_ids, attention_mask, global_attention_mask) -> main output tensor` of `model`, or of its encoder
    (plain tensors in and out, which every exporter takes). The whole model stays a submodule: an LED prefix lives
    on the model, not on its encoder, and the exporters take parameters from the module they trace."""

    def __init__(self, model: torch.nn.Module, encoder_only: bool = False):
        super().__init__()
        self.model = model
        self.encoder_only = encoder_only

    def forward(self, input_ids, attention_mask, global_attention_mask):
        target = self.model.get_encoder() if self.encoder_only else self.model
        return main_output(target(input_ids=input_ids, attention_mask=attention_mask,
                                  global_attention_mask=global_attention_mask))


def exported_model(name: str, method: str) -> torch.nn.Module:
    """A tiny patched model in eval mode (the LED encoder for "LEDEncoder"), wrapped by `MainOutput`."""
    model = build("LEDModel" if name == "LEDEncoder" else name)
    METHODS[method](model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("prefix_"):
                p.normal_(0.0, 0.5)
    return MainOutput(model, encoder_only=name == "LEDEncoder").eval()


def example_and_others(name: str) -> tuple[tuple, list[tuple]]:
    """The traced inputs, and inputs of the same shapes with other masks (other globals, none, other padding)."""
    x = batch("LEDModel" if name == "LEDEncoder" else name)
    example = tuple(x[k] for k in NAMES)
    others = []
    for kind in ("more_globals", "no_globals", "padding"):
        ids, mask, glob = (t.clone() for t in example)
        if kind == "more_globals":
            glob[0, [2, 7, 30]] = 1
            glob[1, 11] = 1
        elif kind == "no_globals":
            glob.zero_()
        else:
            mask.fill_(1)
            mask[0, 30:] = 0
            ids[0, 30:] = 1
        others.append((ids, mask, glob))
    return example, others


CASES = [(name, method) for name in ("LongformerForSequenceClassification", "LEDEncoder") for method in METHODS]


@pytest.mark.parametrize("name, method", CASES)
def test_torch_export(name, method):
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    model = exported_model(name, method)
    example, others = example_and_others(name)
    program = torch.export.export(model, example)
    for node in program.graph.nodes:
        if node.op == "call_function":
            target = node.target
            assert isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" or "getitem" in str(
                target), target
        assert not free_unbacked_symbols(node.meta.get("val")), f"data-dependent shape at {node.format_node()}"
    run = program.module()
    with torch.no_grad():
        for args in (example, *others):
            torch.testing.assert_close(run(*args), model(*args), atol=1e-5, rtol=0)


def onnx_run(path, args) -> torch.Tensor:
    import onnx
    import onnxruntime

    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: t.numpy() for k, t in zip(NAMES, args, strict=True)})[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter says it is deprecated
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("name, method", [("LongformerForSequenceClassification", "patched"),
                                          ("LongformerForSequenceClassification", "propagation"),
                                          ("LEDEncoder", "tuning")])
def test_onnx_export_runs_in_onnxruntime(tmp_path, name, method, dynamo):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = exported_model(name, method)
    example, others = example_and_others(name)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, example, str(path), dynamo=dynamo, input_names=list(NAMES))
    with torch.no_grad():
        for args in (example, *others):
            torch.testing.assert_close(onnx_run(path, args), model(*args), atol=1e-5, rtol=0)


def test_exported_matches_unpatched_hf():
    """The exported patched model computes what HF's own (eager) model computes."""
    hf = build("LongformerForSequenceClassification")
    model = MainOutput(patch_longformer(build("LongformerForSequenceClassification"), "reference")).eval()
    example, others = example_and_others("LongformerForSequenceClassification")
    run = torch.export.export(model, example).module()
    with torch.no_grad():
        for args in (example, *others):
            torch.testing.assert_close(run(*args), MainOutput(hf)(*args), atol=1e-5, rtol=0)
