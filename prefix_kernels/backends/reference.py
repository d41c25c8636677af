"""The "reference" backend: `core.reference.chunked_attention`, differentiable PyTorch on any device and dtype.

Unlike the fused backends it has no launchers: autograd differentiates it directly (`attention`), and it serves
every call, fp64 included.
"""

from __future__ import annotations

import torch

from ..core.checks import AttentionArgs
from ..core.reference import chunked_attention


def unavailable_reason() -> str | None:
    return None


def cannot_serve(args: AttentionArgs) -> str | None:
    return None


def attention(args: AttentionArgs) -> torch.Tensor:
    # The reference picks its own compute dtype (fp32/fp64); autocast would recast its matmuls to bf16/fp16.
    with torch.autocast(device_type=args.device.type, enabled=False):
        return chunked_attention(args)
