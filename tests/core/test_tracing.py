"""`core.tracing`: which tracer runs decides the path (the custom op under `torch.compile`, the export formulation
under the exporters)."""

import torch

from prefix_kernels.core.tracing import is_exporting, is_tracing


def _flags(x):
    return x + 1, is_exporting(), is_tracing()


def test_compile_is_not_export():
    """Under `torch.compile` (which some torch versions' dynamo answers `torch.compiler.is_exporting()` with True
    for), the compiled model keeps the custom op."""
    _, exporting, tracing = torch.compile(_flags, backend="eager", fullgraph=True)(torch.ones(1))
    assert not exporting and tracing
    _, exporting, tracing = _flags(torch.ones(1))
    assert not exporting and not tracing


def test_export_is_export():
    class Branch(torch.nn.Module):
        def forward(self, x):
            return x + 1 if is_exporting() else x - 1

    exported = torch.export.export(Branch(), (torch.ones(1),))
    assert exported.module()(torch.ones(1)).item() == 2.0
