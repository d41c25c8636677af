"""Whether a tracer runs: `torch.compile` and the exporters take paths of their own (no host reads, no custom ops
in an exported graph)."""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """Whether an exporter is tracing: `torch.export` (and ONNX `dynamo=True`, built on it) sets
    `torch.compiler.is_exporting()`; the legacy TorchScript-based ONNX exporter sets `torch.onnx.is_in_onnx_export()`.
    """
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    if exporting is not None and exporting():
        return True
    if torch.compiler.is_compiling():  # torch.compile: nothing to ask torch.onnx (and keep it out of the trace)
        return False
    return torch.onnx.is_in_onnx_export()


def is_tracing() -> bool:
    """Whether `torch.compile` or an exporter is tracing."""
    return torch.compiler.is_compiling() or is_exporting()
