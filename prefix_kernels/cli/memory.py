"""Peak-memory measurement that works on every device: CUDA's allocator statistics, or on the CPU a
dispatch-mode tracker that counts the bytes of live tensor storages created inside the block.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# CPU tensors' kernels: where `prefix_kernels::*` custom ops are re-dispatched, below the Python mode.
_BELOW_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class _StorageTracker(TorchDispatchMode):
    """Counts storages created by ops inside the mode; a storage counts until its last tensor dies."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._refs: dict[int, int] = {}

    def _release(self, ptr: int, nbytes: int) -> None:
        left = self._refs.get(ptr, 0) - 1
        if left <= 0:
            self._refs.pop(ptr, None)
            self.live -= nbytes
        else:
            self._refs[ptr] = left

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == "prefix_kernels":
            # The package's own custom ops run Python implementations whose workspace a mode would not see (it
            # is switched off while it handles an op): run the implementation with the mode on, so every
            # storage it creates, its outputs included, is counted.
            with self:
                return func.redispatch(_BELOW_PYTHON, *args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in self._refs:
                self._refs[ptr] += 1
            else:
                self._refs[ptr] = 1
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            weakref.finalize(t, self._release, ptr, nbytes)
        return out


class PeakMemory:
    """Result of `peak_memory()`: `peak` bytes above the starting point, `largest` single allocation (CPU)."""

    peak: int = 0
    largest: int = 0


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak extra memory of the block: `with peak_memory(dev) as m: ...; m.peak` (bytes)."""
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device) - start
        return
    tracker = _StorageTracker()
    with tracker:
        yield result
    result.peak, result.largest = tracker.peak, tracker.largest
