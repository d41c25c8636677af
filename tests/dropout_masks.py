"""The Triton kernels' dropout bits, two ways: an independent NumPy Philox4x32-10 of the documented scheme, and a
small kernel that calls `triton_common._dropout_keep` (either form) so tests can compare the two.

Scheme (`_dropout_keep` in `prefix_kernels/backends/triton/common.py`): element (query `i`, key position `j`) of
batch-head `bh` is kept when the uniform float of word `j % 4` of Philox4x32-10(key = seed, counter =
(j // 4, i, bh, 0)) is `>= p`.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from prefix_kernels.backends.triton import common as triton_common

_M32 = np.uint64(0xFFFFFFFF)


def philox_keep(seed: int, bh: int, rows, positions, dropout_p: float) -> torch.Tensor:
    """`(len(rows), len(positions))` bool, computed in NumPy (no Triton)."""
    i = np.asarray(rows, dtype=np.uint64)[:, None]
    j = np.asarray(positions, dtype=np.uint64)[None, :]
    c = [j // np.uint64(4) + 0 * i, i + 0 * j, np.full(np.broadcast(i, j).shape, bh, np.uint64), 0 * i * j]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # 32 x 32 -> 64-bit products: exact in uint64
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    word = (j % np.uint64(4)).astype(np.int64) + 0 * i.astype(np.int64)
    r = np.choose(word, c).astype(np.uint32).view(np.int32).astype(np.int64)
    r = np.where(r < 0, -r - 1, r)
    uniform = r.astype(np.float32) * np.float32(4.6566127342e-10)  # Triton's uint_to_uniform_float
    return torch.from_numpy(uniform >= np.float32(dropout_p))


@triton.jit
def _keep_mask_kernel(OUT, COLS, seed, dropout_p, n_cols, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """`OUT[bh, i, c]` = the kernels' keep bit for query `i` and key position `COLS[c]` (with `TILE`: `COLS[0] + c`)."""
    bh = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if TILE:
        keep = triton_common._dropout_keep(seed, bh, offs, tl.load(COLS), dropout_p, COLS_TILE=True, NCOLS=BLOCK)
    else:
        cols = tl.load(COLS + offs, mask=offs < n_cols, other=0)
        keep = triton_common._dropout_keep(seed, bh, offs, cols, dropout_p, COLS_TILE=False, NCOLS=BLOCK)
    tl.store(OUT + bh * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :], keep.to(tl.int8))


def kernel_keep(seed: int, bh: int, positions, dropout_p: float, *, tile=False, block=128, device="cpu"):
    """`(bh, block, block)` bool from `_dropout_keep`: rows `0..block-1`; columns the key `positions` (with `tile`:
    `positions[0] + c`, `positions[0]` a multiple of 4)."""
    out = torch.empty(bh, block, block, dtype=torch.int8, device=device)
    cols = torch.as_tensor(list(positions), dtype=torch.int32, device=device)
    _keep_mask_kernel[(bh,)](out, cols, seed, dropout_p, len(cols), TILE=tile, BLOCK=block)
    return out.bool().cpu()
