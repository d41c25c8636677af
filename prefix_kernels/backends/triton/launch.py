"""Launchers of the Triton backend: the per-mask token tables, the tile table, `forward` / `backward` (the contract
of `core/custom_op.py`), and the backend-module functions `unavailable_reason`, `cannot_serve`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from ...core import masks as mask_cache
from ...core.poison import new_output
from .backward import _attention_bwd_kernel, _bwd_finalize_kernel, _bwd_preprocess_kernel
from .common import KIND_GLOBAL, KIND_LOCAL, KIND_PAD
from .forward import _attention_fwd_kernel, _global_rows_merge_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter `_config` picks small tiles (fast on a CPU, many tile edges in short tests); tests clear
# this to run the GPU tile configurations through the interpreter too.
SMALL_TILES = INTERPRET
LOG2E = 1.4426950408889634
ROW_STRIDE_LIMIT = 2**24  # row strides (elements) from here on overflow the kernels' 32-bit tile offsets


# ------------------------------------------------------------------------------------------------------------
# Token tables, cached per mask tensor
# ------------------------------------------------------------------------------------------------------------


def _token_tables(key_padding_mask, global_idx, global_count, b: int, n: int, device):
    """`(KIND (B, N) int8, SPECIAL (B, N + 1) int32, SLOT (B, N) int32)` (see the package docstring), or `None`
    when every token is local.

    Built with a few small torch ops, once per mask (`core.masks.cached`): keyed on `key_padding_mask` and the
    compact global index (itself cached per `is_global` tensor by `core.masks.global_index`), so every layer of a
    model reuses one set and an in-place edit of a mask rebuilds it."""
    if key_padding_mask is None and global_idx is None:
        return None

    def build():
        kind = torch.zeros(b, n + 1, dtype=torch.int8, device=device)
        slot = torch.full((b, n + 1), -1, dtype=torch.int32, device=device)
        if global_idx is not None:
            g = global_idx.shape[1]
            slots = torch.arange(g, dtype=torch.int32, device=device)
            # Unused entries of the compact index all go to the spare column `n`, dropped below.
            target = torch.where(slots[None, :] < global_count[:, None], global_idx.long(), n)
            kind.scatter_(1, target, KIND_GLOBAL.value)
            slot.scatter_(1, target, slots.expand(b, g).contiguous())
        kind = kind[:, :n]
        if key_padding_mask is not None:
            kind = kind.masked_fill(key_padding_mask, KIND_PAD.value)
        special = torch.zeros(b, n + 1, dtype=torch.int32, device=device)
        special[:, 1:] = torch.cumsum(kind != KIND_LOCAL.value, 1)
        return kind.contiguous(), special, slot[:, :n].contiguous()

    sources = tuple(t for t in (key_padding_mask, global_idx, global_count) if t is not None)
    return mask_cache.cached("triton_token_tables", sources, build, key=(b, n, str(device)))


def _doc_tables(document_ids, key_padding_mask, global_idx, global_count, b: int, n: int, device):
    """`DOCS (4, B, N)` int32 for `document_ids`: per token, its document's start and end position and its
    document's first and past-last slot in the compact global list (see the package docstring).

    Padding tokens take the document of the nearest non-padding token before them (after them for leading
    padding): their ids are arbitrary, they are neither rows nor keys, and so a padding run inside or after a
    document never splits it. Built once per mask (`core.masks.cached`), like the token tables."""

    def build():
        pos = torch.arange(n, device=device).expand(b, n)
        ids = document_ids.long()
        if key_padding_mask is not None:
            before = torch.cummax(torch.where(key_padding_mask, -1, pos), 1).values
            after = torch.cummin(torch.where(key_padding_mask, n, pos).flip(1), 1).values.flip(1)
            ids = ids.gather(1, torch.where(before >= 0, before, after).clamp(max=max(n - 1, 0)))
        new_doc = torch.ones(b, n, dtype=torch.bool, device=device)
        new_doc[:, 1:] = ids[:, 1:] != ids[:, :-1]
        start = torch.cummax(torch.where(new_doc, pos, 0), 1).values
        last = torch.ones(b, n, dtype=torch.bool, device=device)
        last[:, :-1] = new_doc[:, 1:]
        end = torch.cummin(torch.where(last, pos + 1, n).flip(1), 1).values.flip(1)
        before_pos = torch.zeros(b, n + 1, dtype=torch.long, device=device)  # global slots before each position
        if global_idx is not None:
            is_global = torch.zeros(b, n + 1, dtype=torch.long, device=device)
            slots = torch.arange(global_idx.shape[1], device=device)
            is_global.scatter_(1, torch.where(slots[None, :] < global_count[:, None], global_idx.long(), n), 1)
            before_pos[:, 1:] = torch.cumsum(is_global[:, :n], 1)
        return torch.stack([start, end, before_pos.gather(1, start), before_pos.gather(1, end)]).to(
            torch.int32).contiguous()

    sources = tuple(t for t in (document_ids, key_padding_mask, global_idx, global_count) if t is not None)
    return mask_cache.cached("triton_doc_tables", sources, build, key=(b, n, str(device)))


# ------------------------------------------------------------------------------------------------------------
# Tile table and launchers (contract: `core/custom_op.py`)
# ------------------------------------------------------------------------------------------------------------

# Tiles per matmul precision, head_dim bucket (<= 64, <= 128) and arch (sm_90; sm_80 and anything below sm_90):
# forward (BLOCK_M, BLOCK_N, warps, stages), backward (query tile, key tile, warps, stages). "16bit" is fp16 / bf16
# on tensor cores, "tf32" fp32 on TF32 tensor cores, "ieee" fp32 on the FMA units. Chosen from the compiled
# resources (`benchmarks/kernel_resources.py`: no spills in fp16 / bf16, shared memory within the arch's limit,
# fewest SASS instructions per tile; BENCHMARKS.md has the figures) and, for the 16-bit forward at D = 64, from the
# GPU timings of the earlier kernels (BENCHMARKS.md: 64 x 64 tiles, 4 warps, 3 stages beat 128-row tiles). sm_80's
# `mma.sync` backward spills with 64-row query tiles, hence 32 rows there (and fewer with dropout or a ragged N:
# `_config`); IEEE fp32 dots need about twice the registers of a tensor-core tile, hence 16-key tiles in its backward
# and at D = 128. To be confirmed by measurement on a GPU (`benchmarks/gpu_bench.sh`); no autotuning at run time.
_TILES = {
    "16bit": {64: {90: ((64, 64, 4, 3), (64, 64, 4, 2)), 80: ((64, 64, 4, 3), (32, 64, 4, 2))},
              128: {90: ((64, 64, 8, 2), (64, 64, 8, 2)), 80: ((64, 64, 8, 2), (32, 64, 8, 2))}},
    "tf32": {64: dict.fromkeys((90, 80), ((64, 64, 4, 2), (32, 32, 4, 2))),
             128: dict.fromkeys((90, 80), ((64, 32, 4, 2), (32, 32, 4, 2)))},
    "ieee": {64: dict.fromkeys((90, 80), ((32, 32, 8, 2), (32, 16, 8, 2))),
             128: dict.fromkeys((90, 80), ((32, 16, 8, 2), (32, 16, 8, 2)))},
}
# The largest head dim the tile table serves. Wider heads would need tiles of their own: the D = 128 tiles at
# BLOCK_D = 256 spill registers in the backward on both architectures and, in fp16 / bf16 on sm_90, need more
# shared memory per block than the GPU offers (BENCHMARKS.md), so `cannot_serve` refuses them and `auto` moves on.
MAX_HEAD_DIM = 128
# Shared memory per block (bytes) that every kernel of a tile row stays within, as the compile check holds them
# (`tests/backends/test_triton_compile.py`): sm_90's opt-in maximum for the sm_90 row; for the sm_80 row, that of
# the sm_8x GPUs with the least (sm_86 / sm_89), so every compute capability from 8.0 runs it. A GPU that offers
# less than its row needs is refused.
TILE_SHARED_LIMIT = {90: 227 * 1024, 80: 99 * 1024}


def _tile_row(arch: int) -> int:
    """The tile table's arch row for a compute capability x 10: 90 from sm_90 on, else 80."""
    return 90 if arch >= 90 else 80


def _target_arch() -> int:
    """The tile row of the compile target, as Triton sees it (the current device: the launchers make it the
    inputs' device)."""
    try:
        arch = triton.runtime.driver.active.get_current_target().arch
    except Exception:  # no active GPU driver (e.g. the interpreter)
        return 90
    return _tile_row(arch) if isinstance(arch, int) else 80


# Triton before 3.7 (3.6 is the GPU machine's) allocates the one-pass backward's registers with less room: with
# all of the kernel's loops software-pipelined, some specializations spill inside a tile loop (the global rows' key
# loop in fp16 / bf16 on sm_90 at D <= 64, the shared keys' query loop and the band loop in TF32) or keep a stack
# outside them. For those only the band loop (the hot one, `NUM_STAGES`) is pipelined and the kernel's other loops
# are not, which removes the spills and shortens the loops' SASS. Not where it lengthens them instead: fp16 / bf16
# on sm_80 and at D = 128, the 32-row query tiles of a ragged N, and newer Triton, which keeps every loop
# pipelined. BENCHMARKS.md has the counts.
_PIPELINE_BAND_LOOP_ONLY = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit()) < (3, 7)


def _config(head_dim: int, n: int, num_global: int, dot_prec: str, dtype_bytes: int, dropout: bool) -> dict:
    """Tiles and flags of one call. `BLOCK_G`: global tokens per block, for the forward and the finalize kernel;
    `BWD_G`: the same for the backward kernel. `bwd_stages`: the backward's band loop pipelining depth;
    `bwd_kernel_stages`: its other loops'."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = min(64, max(16, triton.next_power_of_2(max(num_global, 1))))
    if SMALL_TILES:
        # Small, unequal tiles: cheap on the CPU and they make short test sequences cross many tile edges.
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=16, BLOCK_G=16, BWD_G=16, BWD_M=16, BWD_N=32, CHUNK=32,
                    Q_CHUNK=32, num_warps=4, num_stages=1, bwd_warps=4, bwd_stages=1, bwd_kernel_stages=1)
    precision = "ieee" if dot_prec == "ieee" else "tf32" if dtype_bytes == 4 else "16bit"
    arch = _target_arch()
    (bm, bn, warps, stages), (bwd_m, bwd_n, bwd_warps, bwd_stages) = _TILES[precision][
        64 if block_d <= 64 else 128][arch]
    ragged_tiles = False
    if precision == "16bit" and dropout:
        # The dropout bits push the backward past 255 registers with the table's query tiles: half the rows fit.
        bwd_m //= 2
    elif precision == "16bit" and n % bwd_m and bwd_m > 32:
        # So do the row-masked loads of a ragged N with 64-row query tiles in fp16.
        bwd_m, ragged_tiles = 32, True
    # More than 64 global tokens: the backward loops over blocks of global queries inside its key loop, and
    # 64-query blocks spill there on sm_80; 32-query blocks do not (and pad 65-96 globals less).
    bwd_g = 32 if num_global > 64 else block_g
    band_loop_only = precision != "16bit" or (arch == 90 and block_d <= 64 and not ragged_tiles)
    bwd_kernel_stages = 1 if _PIPELINE_BAND_LOOP_ONLY and band_loop_only else bwd_stages
    chunk = 1024 if n > 4096 else 512
    return dict(BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=block_g, BWD_G=bwd_g, BWD_M=bwd_m, BWD_N=bwd_n,
                CHUNK=chunk, Q_CHUNK=chunk, num_warps=warps, num_stages=stages, bwd_warps=bwd_warps,
                bwd_stages=bwd_stages, bwd_kernel_stages=bwd_kernel_stages)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _unit_d(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels address `D` with unit stride; anything else is copied once."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _fp32_matmuls_use_tf32() -> bool:
    """Whether PyTorch's own fp32 CUDA matmuls use TF32 now. PyTorch >= 2.9 answers through
    `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none" = the default, IEEE), which reflects
    both its new API (`torch.backends.fp32_precision = "tf32"`, as `transformers`' `tf32=True` sets it) and the
    legacy one (`torch.set_float32_matmul_precision`, `allow_tf32`); `torch.get_float32_matmul_precision()` raises
    once the two have been mixed, so it is only read on older PyTorch."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def _dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision. fp16 / bf16 products are exact in the tensor cores' fp32 accumulators (the name is then
    immaterial); fp32 follows PyTorch's fp32 matmul setting, as PyTorch's own matmuls do: IEEE fp32 on the FMA
    units by default, TF32 tensor cores (about 1e-3 relative error) when TF32 matmuls are enabled."""
    if dtype == torch.float32 and not _fp32_matmuls_use_tf32():
        return "ieee"
    return "tf32"


class _Launch:
    """What both launchers derive from the inputs: shapes, flags, tile configuration, token tables, and the
    placeholders that stand for absent tensors."""

    def __init__(self, q, prefix_k, key_padding_mask, global_idx, global_count, max_global, dropout_p, has_global,
                 global_rows, prefix_scale=None, document_ids=None):
        self.b, self.n, self.h, self.d = q.shape
        self.device = q.device
        self.has_global = has_global
        self.global_rows = global_rows
        self.has_prefix = prefix_k is not None
        self.p = prefix_k.shape[1] if self.has_prefix else 0
        self.dot_prec = _dot_precision(q.dtype)
        self.cfg = _config(self.d, self.n, max_global if has_global else 0, self.dot_prec, q.element_size(),
                           dropout_p > 0)
        self.tables = _token_tables(key_padding_mask, global_idx if has_global else None,
                                    global_count if has_global else None, self.b, self.n, self.device)
        self.dummy = self.scratch(1)
        self.kind, self.special, self.slot = self.tables if self.tables is not None else (self.dummy,) * 3
        self.gidx = global_idx if has_global else self.dummy
        self.gcnt = global_count if has_global else self.dummy
        self.gstride = global_idx.stride(0) if has_global else 0
        self.g_pad = triton.cdiv(max_global, self.cfg["BLOCK_G"]) * self.cfg["BLOCK_G"] if has_global else 0
        self.separate = prefix_scale is not None
        self.pscale = prefix_scale.float().contiguous() if self.separate else self.dummy
        self.lse_plane = self.b * self.h * self.n  # the prefix softmax's LSE plane ("separate")
        self.docs = self.dummy
        if document_ids is not None:
            self.docs = _doc_tables(document_ids, key_padding_mask, global_idx if has_global else None,
                                    global_count if has_global else None, self.b, self.n, self.device)
        self.doc_plane = self.b * self.n
        self.flags = dict(HEAD_DIM=self.d, BLOCK_D=self.cfg["BLOCK_D"], HAS_KIND=self.tables is not None,
                          HAS_GLOBAL=has_global, GLOBAL_ROWS=global_rows, HAS_PREFIX=self.has_prefix,
                          HAS_DROPOUT=dropout_p > 0, DOT_PREC=self.dot_prec, HAS_DOC=document_ids is not None,
                          SEPARATE=self.separate)

    def or_dummy(self, t):
        return self.dummy if t is None else t

    def scratch(self, *shape):
        """An fp32 work buffer the kernels write before they read it (the placeholder for absent tensors too);
        NaN-filled when outputs are poisoned (`core/poison.py`), so a read of anything no kernel wrote shows."""
        return new_output(shape, torch.float32, self.device)


def _on_device(device: torch.device):
    """The device guard around the launches: Triton launches on its current device and that device's current
    stream, so inputs on another GPU (`cuda:1` under `device_map="auto"`, manual model parallelism) make their
    device the current one first, as the CUDA backend does. CPU tensors (the interpreter): nothing to do."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            *, window: int, scale: float, dropout_p: float, seed: int, max_global: int, prefix_k_global=None,
            prefix_v_global=None, prefix_scale=None, document_ids=None):
    """Returns `out (B, N, H, D)` in `q.dtype` and `lse (B, H, N)` fp32 (log2 domain, `+inf` = no key; with
    `prefix_scale`, `(2, B, H, N)`: the text's and the prefix's softmax)."""
    with _on_device(q.device):
        return _forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
                        global_count, window=window, scale=scale, dropout_p=dropout_p, seed=seed,
                        max_global=max_global, prefix_k_global=prefix_k_global, prefix_v_global=prefix_v_global,
                        prefix_scale=prefix_scale, document_ids=document_ids)


def _forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
             *, window, scale, dropout_p, seed, max_global, prefix_k_global, prefix_v_global, prefix_scale,
             document_ids):
    q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global = map(
        _unit_d, (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global))
    if prefix_k_global is None:
        prefix_k_global, prefix_v_global = prefix_k, prefix_v
    has_global = global_idx is not None and max_global > 0
    global_rows = has_global and q_global is not None  # else local rows only: global rows stay 0
    L = _Launch(q, prefix_k, key_padding_mask, global_idx, global_count, max_global, dropout_p, has_global,
                global_rows, prefix_scale, document_ids)
    b, n, h, d, cfg = L.b, L.n, L.h, L.d, L.cfg
    window = min(window, n)  # the same key sets; a window near 2**31 would overflow the band bounds' int32 sums
    out = new_output((b, n, h, d), q.dtype, L.device)
    lse = new_output((2, b, h, n) if L.separate else (b, h, n), torch.float32, L.device)
    if n == 0:
        return out, lse
    num_splits = triton.cdiv(n, cfg["CHUNK"])
    n_parts = num_splits + int(L.has_prefix)
    part_o = part_l = L.dummy
    n_global_progs = 0
    if global_rows:
        part_o = L.scratch(b * h, L.g_pad, n_parts, d)
        part_l = L.scratch(b * h, L.g_pad, n_parts)
        n_global_progs = n_parts * (L.g_pad // cfg["BLOCK_G"])
    _attention_fwd_kernel[(n_global_progs + triton.cdiv(n, cfg["BLOCK_M"]), b * h)](
        q, k, v, L.or_dummy(q_global), L.or_dummy(k_global), L.or_dummy(v_global), L.or_dummy(prefix_k),
        L.or_dummy(prefix_v), L.or_dummy(prefix_k_global), L.or_dummy(prefix_v_global), L.kind, L.special, L.gidx,
        L.gcnt, L.docs, L.pscale, out, lse, part_o, part_l,
        *_strides(q), *_strides(k), *_strides(v), *_strides(q_global), *_strides(k_global), *_strides(v_global),
        *_strides(prefix_k), *_strides(prefix_v), *_strides(prefix_k_global), *_strides(prefix_v_global),
        *_strides(out), n, h, L.p, L.gstride, L.g_pad, cfg["CHUNK"], num_splits, n_parts, n_global_progs,
        L.doc_plane, L.lse_plane, window, scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), seed,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], NUM_STAGES=cfg["num_stages"],
        EVEN_N=n % cfg["BLOCK_N"] == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **L.flags)
    if global_rows:
        _global_rows_merge_kernel[(max_global, b * h)](
            part_o, part_l, L.gidx, L.gcnt, L.pscale, out, lse, *_strides(out), n, h, L.gstride, L.g_pad, n_parts,
            L.lse_plane, HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(n_parts)),
            SEPARATE=L.separate)
    return out, lse


def backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
             global_count, out, lse, *, window: int, scale: float, dropout_p: float, seed: int, max_global: int,
             **features):
    """Returns `(dq, dk, dv, dq_global, dk_global, dv_global, dprefix_k, dprefix_v)`, `None` where the input is;
    with any of `features` (`prefix_k_global`, `prefix_v_global`, `prefix_scale`, `document_ids`), also
    `dprefix_k_global, dprefix_v_global, dprefix_scale`."""
    with _on_device(q.device):
        grads = _backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask,
                          global_idx, global_count, out, lse, window=window, scale=scale, dropout_p=dropout_p,
                          seed=seed, max_global=max_global, **features)
    return grads if features else grads[:8]


def _backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
              global_count, out, lse, *, window, scale, dropout_p, seed, max_global, prefix_k_global=None,
              prefix_v_global=None, prefix_scale=None, document_ids=None):
    if grad_out.stride(-3) >= ROW_STRIDE_LIMIT:
        # `cannot_serve` checks the inputs' row strides; the output gradient comes from autograd, and its rows too
        # are addressed with 32-bit tile offsets.
        grad_out = grad_out.contiguous()
    grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global, out = map(
        _unit_d, (grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global,
                  prefix_v_global, out))
    own_prefix_global = prefix_k_global is not None
    if not own_prefix_global:
        prefix_k_global, prefix_v_global = prefix_k, prefix_v
    has_global = global_idx is not None and max_global > 0
    global_rows = has_global and q_global is not None  # else local rows only: no gradient through global rows
    L = _Launch(q, prefix_k, key_padding_mask, global_idx, global_count, max_global, dropout_p, has_global,
                global_rows, prefix_scale, document_ids)
    b, n, h, d, p, cfg = L.b, L.n, L.h, L.d, L.p, L.cfg
    window = min(window, n)  # as in the forward
    dq, dk, dv = (new_output((b, n, h, d), q.dtype, L.device) for _ in range(3))
    dq_g = dk_g = dv_g = dpk = dpv = dpk_g = dpv_g = dscale = None
    if q_global is not None:
        dq_g, dk_g, dv_g = (new_output((b, n, h, d), q.dtype, L.device) for _ in range(3))
    if L.has_prefix:
        dpk, dpv = (new_output((b, p, h, d), q.dtype, L.device) for _ in range(2))
    if own_prefix_global:
        dpk_g, dpv_g = (new_output((b, p, h, d), q.dtype, L.device) for _ in range(2))
        if not global_rows:
            dpk_g.zero_()  # no global row is computed: the global rows' prefix gets no gradient
            dpv_g.zero_()
    if L.separate:
        dscale = torch.zeros(h, dtype=torch.float32, device=L.device)
    result = (dq, dk, dv, dq_g, dk_g, dv_g, dpk, dpv, dpk_g, dpv_g, dscale)
    if n == 0 or (q_global is not None and not has_global):
        # Nothing to compute for the global projections (no token is global): zero gradients.
        for t in (dq_g, dk_g, dv_g, dpk, dpv, dpk_g, dpv_g) if n == 0 else (dq_g, dk_g, dv_g):
            if t is not None:
                t.zero_()
        if n == 0:
            return result
    bd = cfg["BLOCK_D"]
    pre_m = max(64, cfg["BWD_M"])
    n_pad = triton.cdiv(n, pre_m) * pre_m  # every query tile of the backward lies inside the fp32 dQ accumulator
    planes = (2,) if L.separate else ()
    delta = L.scratch(*planes, b, h, n)
    lse_local = L.scratch(*planes, b, h, n)
    dq_acc = L.scratch(b * h, n_pad, bd)
    dqg_acc = L.scratch(b * h, L.g_pad, bd) if global_rows else L.dummy
    n_row_progs = n_pad // pre_m
    n_pre_global = triton.cdiv(max_global, pre_m) if L.separate and global_rows else 0
    _bwd_preprocess_kernel[(n_row_progs + n_pre_global, b * h)](
        out, grad_out, lse, L.kind, delta, lse_local, dq_acc, dqg_acc, q, L.or_dummy(q_global),
        L.or_dummy(prefix_k), L.or_dummy(prefix_v), L.or_dummy(prefix_k_global), L.or_dummy(prefix_v_global),
        L.gidx, L.gcnt, L.pscale, *_strides(out), *_strides(grad_out), *_strides(q), *_strides(q_global),
        *_strides(prefix_k), *_strides(prefix_v), *_strides(prefix_k_global), *_strides(prefix_v_global),
        n, h, p, n_pad, L.g_pad, L.gstride, n_row_progs, L.lse_plane, scale * LOG2E, dropout_p,
        1.0 / (1.0 - dropout_p), seed, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_m, BLOCK_N=max(16, cfg["BLOCK_N"]),
        HAS_KIND=L.tables is not None, GLOBAL_ROWS=global_rows, SEPARATE=L.separate, HAS_DROPOUT=dropout_p > 0,
        DOT_PREC=L.dot_prec)

    num_chunks = triton.cdiv(n, cfg["Q_CHUNK"])
    num_splits = triton.cdiv(n, cfg["CHUNK"])
    n_prefix_slots = num_chunks + int(global_rows)  # the global rows' share of the prefix gradient is the last slot
    gpart_k = gpart_v = ppart_k = ppart_v = L.dummy
    if has_global:
        gpart_k, gpart_v = L.scratch(b * h, num_chunks, L.gstride, bd), L.scratch(b * h, num_chunks, L.gstride, bd)
    if L.has_prefix:
        ppart_k, ppart_v = L.scratch(b * h, n_prefix_slots, p, bd), L.scratch(b * h, n_prefix_slots, p, bd)
    n_global_progs = num_splits + int(L.has_prefix) if global_rows else 0
    n_shared_progs = num_chunks if has_global or L.has_prefix else 0
    _attention_bwd_kernel[(n_global_progs + n_shared_progs + triton.cdiv(n, cfg["BWD_N"]), b * h)](
        q, k, v, L.or_dummy(q_global), L.or_dummy(k_global), L.or_dummy(v_global), L.or_dummy(prefix_k),
        L.or_dummy(prefix_v), L.or_dummy(prefix_k_global), L.or_dummy(prefix_v_global), grad_out, lse, lse_local,
        delta, L.kind, L.gidx, L.gcnt, L.docs, L.pscale,
        dk, dv, L.or_dummy(dk_g), L.or_dummy(dv_g), dq_acc, dqg_acc, gpart_k, gpart_v, ppart_k, ppart_v,
        *_strides(q), *_strides(k), *_strides(v), *_strides(q_global), *_strides(k_global), *_strides(v_global),
        *_strides(prefix_k), *_strides(prefix_v), *_strides(prefix_k_global), *_strides(prefix_v_global),
        *_strides(grad_out), *_strides(dk), *_strides(dv), *_strides(dk_g), *_strides(dv_g),
        n, h, p, n_pad, L.gstride, L.g_pad, window, cfg["CHUNK"], num_splits, cfg["Q_CHUNK"], num_chunks,
        n_prefix_slots, n_global_progs, n_shared_progs, L.doc_plane, L.lse_plane, scale * LOG2E, scale, dropout_p,
        1.0 / (1.0 - dropout_p), seed, BLOCK_M=cfg["BWD_M"], BLOCK_N=cfg["BWD_N"], BLOCK_G=cfg["BWD_G"],
        NUM_STAGES=cfg["bwd_stages"], EVEN_M=n % cfg["BWD_M"] == 0, SINGLE_G=max_global <= cfg["BWD_G"],
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_kernel_stages"], **L.flags)

    fin_m = 64
    n_row_tiles = triton.cdiv(n, fin_m)
    prefix_global = own_prefix_global and global_rows
    _bwd_finalize_kernel[(n_row_tiles + 2 + int(prefix_global), b * h)](
        dq_acc, dqg_acc, L.slot, L.gidx, L.gcnt, gpart_k, gpart_v, ppart_k, ppart_v, dq, L.or_dummy(dq_g), dk, dv,
        L.or_dummy(dpk), L.or_dummy(dpv), L.or_dummy(dpk_g), L.or_dummy(dpv_g), *_strides(dq), *_strides(dq_g),
        *_strides(dk), *_strides(dv), *_strides(dpk), *_strides(dpv), *_strides(dpk_g), *_strides(dpv_g), n, h, p,
        n_pad, L.gstride, L.g_pad, num_chunks, n_prefix_slots, n_row_tiles, scale, HEAD_DIM=d, BLOCK_D=bd,
        BLOCK_M=fin_m, BLOCK_G=cfg["BLOCK_G"], HAS_GLOBAL=has_global, GLOBAL_ROWS=global_rows,
        HAS_PREFIX=L.has_prefix, PREFIX_GLOBAL=prefix_global)
    if L.separate:
        # The prefix scale's gradient: sum over rows of `rowsum(dO * B)` (0 on rows without a prefix softmax).
        dscale = delta[1].sum(dim=(0, 2))
    return dq, dk, dv, dq_g, dk_g, dv_g, dpk, dpv, dpk_g, dpv_g, dscale


# ------------------------------------------------------------------------------------------------------------
# Backend-module interface (see `backends/__init__.py`)
# ------------------------------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return None


@functools.cache
def _device_limits(index: int) -> tuple[int, int, int]:
    """`(major, minor, shared memory per block with opt-in, in bytes)` of CUDA device `index`, read once per device
    (only for calls on CUDA tensors: nothing here runs at import or for CPU tensors)."""
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", None)
    if shared is None:  # a PyTorch without the field: Triton's driver reads the same attribute
        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return props.major, props.minor, int(shared)


def _device_reason(device: torch.device, head_dim: int) -> str | None:
    """Why the compiled kernels cannot run on this GPU, or for this head dim on it: compute capability below 8.0,
    a head dim above the tile table's, or less shared memory per block than the tiles of its arch use."""
    major, minor, shared = _device_limits(torch.cuda.current_device() if device.index is None else device.index)
    gpu = f"{device} (compute capability {major}.{minor}, {shared} bytes of shared memory per block)"
    if (major, minor) < (8, 0):
        return f"{gpu}: the Triton tiles target compute capability 8.0 and above (sm_80, sm_90)"
    if head_dim > MAX_HEAD_DIM:
        return (f"head_dim {head_dim} > {MAX_HEAD_DIM} on {gpu}: the Triton tiles stop at {MAX_HEAD_DIM} (wider "
                "heads spill registers in the backward and, in fp16 / bf16 on sm_90, need more shared memory per "
                "block than the GPU offers)")
    row = _tile_row(10 * major + minor)
    if shared < TILE_SHARED_LIMIT[row]:
        return (f"{gpu}: the Triton tiles for sm_{row} may use up to {TILE_SHARED_LIMIT[row]} bytes of shared "
                "memory per block")
    return None


def cannot_serve(args) -> str | None:
    if args.dtype == torch.float64:
        return "float64 is served by the reference backend only"
    if INTERPRET:
        if args.device.type != "cpu":
            return f"under TRITON_INTERPRET=1 the Triton backend takes CPU tensors, got {args.device}"
        if args.dtype == torch.bfloat16:
            return "bfloat16 is not computed correctly by the Triton interpreter"
        if args.shape[3] > MAX_HEAD_DIM:
            return f"head_dim {args.shape[3]} > {MAX_HEAD_DIM} is not supported (the GPU tiles stop there)"
    elif args.device.type != "cuda":
        return f"needs CUDA tensors, got {args.device}"
    else:
        why = _device_reason(args.device, args.shape[3])
        if why is not None:
            return why
    tensors = (args.q, args.k, args.v, args.q_global, args.k_global, args.v_global, args.prefix_k, args.prefix_v)
    if max(t.stride(-3) for t in tensors if t is not None) >= ROW_STRIDE_LIMIT:
        return "a row stride of 2**24 elements or more overflows the Triton kernels' 32-bit tile offsets"
    return None
