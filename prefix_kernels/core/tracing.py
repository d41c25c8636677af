"""Whether a tracer runs: `torch.compile` and the exporters take paths of their own (no host reads, no custom ops
in an exported graph)."""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """Whether an exporter is tracing: `torch.export` (and ONNX `dynamo=True`, built on it) sets
    `torch.compiler.is_exporting()`; the legacy TorchScript-based ONNX exporter sets `torch.onnx.is_in_onnx_export()`.
    """
    # `torch.compiler.is_exporting()` reads this flag; the flag itself is read because torch 2.11's dynamo answers
    # the call with True under plain `torch.compile` too (it would send compiled models to the export formulation).
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:
        exporting = getattr(torch.compiler, "is_exporting", None)
        flag = exporting is not None and exporting()
    if flag:
        return True
    if torch.compiler.is_compiling():  # torch.compile: nothing to ask torch.onnx (and keep it out of the trace)
        return False
    return torch.onnx.is_in_onnx_export()


def is_tracing() -> bool:
    """Whether `torch.compile` or an exporter is tracing."""
    return torch.compiler.is_compiling() or is_exporting()
