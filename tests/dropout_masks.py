"""The fused backends' dropout masks, rebuilt from their documented schemes.

The Triton kernels' bits, two ways: an independent NumPy Philox4x32-10 of the documented scheme, and a small kernel
that calls `triton_common._dropout_keep` (either form) so tests can compare the two. The `cpu` backend's masks:
`cpu_keep_masks`.

Scheme (`_dropout_keep` in `prefix_kernels/backends/triton/common.py`): element (query `i`, key position `j`) of
batch-head `bh` is kept when the uniform float of word `j % 4` of Philox4x32-10(key = seed, counter =
(j // 4, i, bh, 0)) is `>= p`.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from prefix_kernels.backends import cpu as cpu_attention
from prefix_kernels.backends.triton import common as triton_common
from prefix_kernels.core.masks import global_index

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


def cpu_keep_masks(x, masks, window, p, seed):
    """Dense `(B, H, N, N + P)` keep masks of the local and the global branch, rebuilt from the `cpu` backend's
    documented scheme (`prefix_kernels/backends/cpu.py`): per group of blocks (in `_groups` order) one draw of
    `(g, H, rows, Lt)` from the generator seeded with `seed`; per batch row one `(H, G, N + P)` draw for the global
    rows from the one seeded with `seed + 1`."""
    b, n, h, d = x["q"].shape
    prefix = x["prefix_k"].shape[-3] if "prefix_k" in x else 0
    gidx, gcnt, g = global_index(masks["is_global"])
    plan = cpu_attention._plan(x["q"], window, g, prefix)
    c, band = plan.block, plan.band
    local = torch.ones(b, h, n, n + prefix, dtype=torch.bool)
    drops = cpu_attention._DropoutMasks(p, seed, torch.float32)
    for bb, j0, j1, rows in cpu_attention._groups(plan):
        keep = drops.next((j1 - j0, h, rows, plan.cols)).bool()
        for jj, j in enumerate(range(j0, j1)):
            pos = torch.arange(band) + j * c - window
            inside = (pos >= 0) & (pos < n)
            for r in range(rows):
                i = j * c + r
                local[bb, :, i, pos[inside]] = keep[jj, :, r, :band][:, inside]
                for s in range(int(gcnt[bb]) if g else 0):  # a global key is attended through its global column
                    local[bb, :, i, int(gidx[bb, s])] = keep[jj, :, r, band + s]
                local[bb, :, i, n:] = keep[jj, :, r, band + g :]
    glob = torch.ones(b, h, n, n + prefix, dtype=torch.bool)
    if g:
        drops = cpu_attention._DropoutMasks(p, seed + 1, torch.float32)
        for bb in range(b):
            keep = drops.next((h, g, n + prefix)).bool()
            for s in range(int(gcnt[bb])):
                glob[bb, :, int(gidx[bb, s])] = keep[:, s]
    return local, glob
