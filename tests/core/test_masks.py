"""`core/masks.py`: what is derived from the mask tensors is cached per tensor and rebuilt after an in-place edit.
The patched model's one global-index read per forward pass is checked in `hf/test_patching.py`, the Triton token
tables built on the index in `backends/test_triton.py`.
"""

from __future__ import annotations

import pytest
import torch

from prefix_kernels.core.masks import global_index

# CPU tensors, and CUDA tensors (marked `gpu`).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_global_index_is_cached_per_tensor_and_version(device):
    is_global = torch.zeros(2, 10, dtype=torch.bool, device=device)
    is_global[0, [2, 5]] = True
    is_global[1, 7] = True
    idx, count, g = global_index(is_global)
    assert g == 2 and idx.dtype == torch.int32 and idx.is_contiguous() and idx.device == is_global.device
    assert idx[0].tolist() == [2, 5] and idx[1, 0].item() == 7 and count.tolist() == [2, 1]
    assert global_index(is_global)[0] is idx  # no recomputation, no host read
    is_global[1, 9] = True  # in place: bumps _version
    idx2, count2, _ = global_index(is_global)
    assert idx2 is not idx and idx2[1].tolist() == [7, 9] and count2.tolist() == [2, 2]
    assert global_index(torch.zeros(2, 10, dtype=torch.bool, device=device)) == (None, None, 0)
