"""NaN-poisoned outputs, for tests: with `PREFIX_KERNELS_POISON=1` every fused backend fills its outputs and
gradients with NaN before its kernels write them, so an element that no kernel writes fails a finiteness check.
The Triton launchers fill their fp32 work buffers (accumulators, partials) the same way, so a kernel that reads
what no kernel wrote (a missed zero-fill, a read before the write) gives NaN results, as uninitialized memory on
a GPU can.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "PREFIX_KERNELS_POISON"


def enabled() -> bool:
    """Whether outputs are poisoned: `PREFIX_KERNELS_POISON` set to anything but "" or "0"."""
    return os.environ.get(ENV_VAR, "0") not in ("", "0")


def new_output(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """`torch.empty(shape)`, NaN-filled when poisoning is on (for an output or a floating-point work buffer)."""
    if enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def poison_(*tensors: torch.Tensor | None) -> None:
    """NaN-fill each tensor in place when poisoning is on (`None` entries are skipped)."""
    if enabled():
        for t in tensors:
            if t is not None:
                t.fill_(float("nan"))
