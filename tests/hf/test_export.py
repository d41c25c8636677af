"""Export of patched models (eval mode): `torch.export`, ONNX through the dynamo exporter and the legacy
TorchScript-based one, run by onnxruntime. Each is exported once with a dynamic batch size and sequence length and
run at other lengths, another batch size and with other masks than the traced ones (more global tokens, none, other
padding); both prefix methods and the LED encoder. The graphs hold standard ops only and no tensor or constant with
`N x N` elements. The formulation they trace is checked against the dense reference in `core/test_static.py`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_square_tensor
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
TRACED_N = 45
# Other lengths than the traced one. The tiny models have 160 positions; at the longest length every static size
# of the graph (hidden 32, FFN 64, the band's 32 x 96 blocks) is smaller than N, so an `N x N` tensor is the only
# one with two dimensions of at least N.
OTHER_N = (23, 130)
MAX_N = 144  # at most the shortest limit of the models (LED with prefix-tuning: 144 tokens)


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
    """The traced inputs (two global tokens per row, row 1 padded), and inputs with other masks: at the traced
    length more global tokens and other padding, then no global token; at other lengths (and another batch size)
    more global tokens than traced, one at the last position."""
    model_name = "LEDModel" if name == "LEDEncoder" else name
    x = batch(model_name, n=TRACED_N)
    example = tuple(x[k] for k in NAMES)
    ids, mask, glob = (t.clone() for t in example)
    glob[0, [2, 7, 30]] = 1
    glob[1, 11] = 1
    mask[0, 40:] = 0  # both rows padded, at other places
    ids[0, 40:] = 1
    glob[0, 40:] = 0
    none = tuple(t.clone() for t in example)
    none[2].zero_()
    others = [(ids, mask, glob), none]
    for i, n in enumerate(OTHER_N):  # the second one with another batch size
        ids, mask, glob = (batch(model_name, b=2 + i, n=n, seed=1 + i)[k] for k in NAMES)
        glob[0, [1, 5, n - 1]] = 1  # five global tokens in row 0
        glob[1, 4] = 1
        others.append((ids, mask, glob))
    return example, others


def dynamic_dims() -> dict:
    """A dynamic batch and length, as `torch.export` and the ONNX dynamo exporter take them (`dynamic_shapes`; the
    legacy exporter takes `DYNAMIC_AXES`)."""
    batch_dim, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("n", min=2, max=MAX_N)
    return {k: {0: batch_dim, 1: length} for k in NAMES}


DYNAMIC_AXES = {k: {0: "batch", 1: "n"} for k in NAMES}


# Each exporter: both prefix methods, the LED encoder and a plain patched Longformer between its cases (the plain one
# of torch.export is `test_exported_matches_unpatched_hf`).
EXPORT_CASES = [("LongformerForSequenceClassification", "tuning"), ("LEDEncoder", "propagation")]
ONNX_CASES = {
    "dynamo": [("LongformerForSequenceClassification", "propagation"), ("LEDEncoder", "tuning")],
    "legacy": [("LongformerForSequenceClassification", "patched"),
               ("LongformerForSequenceClassification", "propagation"), ("LEDEncoder", "tuning")],
}


@pytest.mark.parametrize("name, method", EXPORT_CASES)
def test_torch_export_dynamic_length(name, method):
    model = exported_model(name, method)
    example, others = example_and_others(name)
    program = torch.export.export(model, example, dynamic_shapes=dynamic_dims())
    assert_no_square_tensor(program, "input_ids")
    run = program.module()
    with torch.no_grad():
        for args in (example, *others):
            torch.testing.assert_close(run(*args), model(*args), atol=1e-5, rtol=0)


def onnx_run(path, args, every_value: bool = False):
    """The ONNX file run by onnxruntime on `args`: the output, or with `every_value` `{name: array}` for every
    value the graph computes (each node output made a graph output, no graph optimization)."""
    import onnx
    import onnxruntime

    model = onnx.load(str(path))
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    feed = {k: t.numpy() for k, t in zip(NAMES, args, strict=True)}
    if not every_value:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, feed)[0])
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in outputs)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def assert_no_square_value(path, args) -> None:
    """No constant of the ONNX file and no value it computes on `args` (length `N`) has two dimensions of at
    least `N` (the traced length for the constants)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value).shape
    for name, shape in constants.items():
        assert sum(s >= TRACED_N for s in shape) <= 1, f"constant {name} of shape {shape}"
    n = args[0].shape[1]
    for name, value in onnx_run(path, args, every_value=True).items():
        assert sum(s >= n for s in value.shape) <= 1, f"{name} of shape {value.shape} at N = {n}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter says it is deprecated
@pytest.mark.parametrize("exporter, name, method", [(e, *case) for e, cases in ONNX_CASES.items() for case in cases])
def test_onnx_export_dynamic_length_runs_in_onnxruntime(tmp_path, exporter, name, method):
    dynamo = exporter == "dynamo"
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = exported_model(name, method)
    example, others = example_and_others(name)
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        model(*example)  # run before its export, as a user would: the mask caches hold the traced masks
    if dynamo:
        torch.onnx.export(model, example, str(path), dynamo=True, input_names=list(NAMES),
                          dynamic_shapes=dynamic_dims())
    else:
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=list(NAMES),
                          dynamic_axes=DYNAMIC_AXES)
    with torch.no_grad():
        for args in (example, *others):
            torch.testing.assert_close(onnx_run(path, args), model(*args), atol=1e-5, rtol=0)
    assert_no_square_value(path, others[-1])


def test_exported_matches_unpatched_hf():
    """The exported patched model computes what HF's own (eager) model computes, at other lengths too, and the
    export leaves HF's modules as they were."""
    from transformers.models.longformer import modeling_longformer

    builders = {k: v for k, v in vars(modeling_longformer).items() if callable(v)}
    hf = build("LongformerForSequenceClassification")
    model = MainOutput(patch_longformer(build("LongformerForSequenceClassification"), "reference")).eval()
    example, others = example_and_others("LongformerForSequenceClassification")
    run = torch.export.export(model, example, dynamic_shapes=dynamic_dims()).module()
    assert {k: v for k, v in vars(modeling_longformer).items() if callable(v)} == builders
    with torch.no_grad():
        for args in (example, *others):
            torch.testing.assert_close(run(*args), MainOutput(hf)(*args), atol=1e-5, rtol=0)
