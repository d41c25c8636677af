"""Triton backend: fused Longformer attention (band + global tokens + prefix keys), forward and backward.

Read top to bottom: device helpers, the forward kernels (`_attention_fwd_kernel`: local-row tiles and global-row key
splits in one grid; `_global_rows_merge_kernel`), the backward kernels (`_bwd_preprocess_kernel`, the one-pass
`_attention_bwd_kernel`, `_bwd_finalize_kernel`), the per-mask token tables, the tile table and the launchers
`forward` / `backward` (contract: `prefix_kernels.custom_op`), then the backend-module functions
`unavailable_reason`, `cannot_serve`, `attention`.

Layout: `q, k, v, q_global, k_global, v_global, O` are `(B, N, H, D)` (any strides, unit stride along `D`), the
prefix `(B, P, H, D)` (batch stride 0 allowed), `LSE` `(B, H, N)` fp32. Conventions shared by every kernel:

* Scores stay raw (`q . k`, fp32) until one FFMA maps them into the log2 domain: `p = exp2(s * qk_scale - m)` with
  `qk_scale = scale * log2(e)`. `LSE` stores the log2-domain log-sum-exp of the *undropped* softmax of each row;
  `+inf` marks a row that attends nothing (padding, or an empty key set), so the backward's `exp2(s * qk_scale -
  LSE)` gives exactly 0 there. The running maximum starts at a finite floor (`M_FLOOR`), so a row whose keys so
  far are all masked (`-inf`) gives `p = 0` and a rescale factor of 1 with no per-element guard.
* Token tables, built once per mask tensor and cached (`_token_tables`): `KIND (B, N)` int8 (0 local, 1 global,
  2 padding), `SPECIAL (B, N + 1)` int32, the running count of non-local tokens (a tile holds a global or padding
  column iff its two ends differ), and `SLOT (B, N)` int32, each global token's index in the compact global list
  (-1 elsewhere). Band columns of kind != 0 are excluded (global keys are attended once, through the compact list);
  only rows of kind 0 are local queries.
* Band tiles are classified per tile, not per element: a tile inside the band, inside the sequence and free of
  global/padding columns takes the plain path (one FFMA, one exp2 per score); only the others build the element
  mask. Whether a tile holds such a column is looked up in `SPECIAL` only by programs whose band holds one (one
  check per program). One software-pipelined loop walks all band tiles of a program; when `N` is a multiple of
  the tile, its loads carry no predicate.
* Global rows are computed twice in the forward: the local-row tiles compute them too (cheaper than branching)
  but store 0 and `LSE = +inf` there, as for padding rows; `_global_rows_merge_kernel` then writes `O` and `LSE` of
  those rows from the global branch, whose key splits ran as extra programs of the same grid as the local-row
  tiles. Without the global projections (`q_global = None` with a global index: local rows only, `GLOBAL_ROWS`
  off) no global-row program runs, in the forward or the backward: those rows stay 0 and take no gradient, while
  the global tokens remain the global keys of the local rows (`HAS_GLOBAL`), with their dK/dV.
* Dropout: Philox-4x32-10 keyed by `seed`, counter `(j // 4, i, b * H + h, 0)`, output word `j % 4`, for query `i`
  and key position `j` (prefix key `p` is at `N` rounded up to a multiple of 4, plus `p`): one Philox call serves
  four consecutive keys of a tile, and no counter repeats below 2**32 rows. A row is local or global, never both,
  so one counter space covers both probability matrices, and the backward regenerates exactly the forward's
  mask. Kept probabilities are scaled by `1 / (1 - p)`.
* fp32 follows PyTorch's fp32 matmul setting, as PyTorch's own matmuls do: by default (precision "highest")
  `tl.dot(..., input_precision="ieee")`, full fp32 products on the FMA units, matching the fp32 reference to
  ~1e-5; with TF32 matmuls enabled (`torch.set_float32_matmul_precision("high")`, `allow_tf32`,
  `torch.backends.fp32_precision = "tf32"`) TF32 tensor cores (~1e-3). fp16/bf16 use tensor cores with fp32
  accumulation; probabilities and `dS` are rounded to the input dtype before their matmuls, as in FlashAttention.
* Backward, one pass: each key tile's program recomputes the scores of every (query tile, key tile) pair once and
  produces dK/dV of its keys and the pair's dQ part, added with fp32 atomics into `DQ_ACC (B*H, N_pad, BLOCK_D)`
  (zeroed by the preprocess kernel, scaled and cast once by the finalize kernel). Keys every local query sees
  (global keys through the local `k, v`, and the prefix) get their dK/dV from programs that each own a chunk of
  query rows and write fp32 partials, summed once by the finalize kernel (deterministic, no atomics on a few hot
  addresses). The global rows' backward is split along the keys in the same grid; its dQ_global goes to the
  fp32 `DQG_ACC (B*H, G_pad, BLOCK_D)` by atomics. Every float atomic is relaxed: the adds commute, and only the
  next kernel reads the sums (kernel boundaries order them). On a GPU dQ and dQ_global are therefore not bitwise
  reproducible from run to run (the order of the fp32 adds varies); the forward, dK and dV are.
* Memory access is through pointers, not TMA tensor descriptors. The inputs may have any strides and a descriptor
  needs a 16-byte aligned base and strides, so the pointer path has to exist anyway; it is the path the
  interpreter tests run, and a second, descriptor path would be checked only by compiling and on a GPU. With a
  scalar tile pointer plus loop-invariant offsets the forward's band tile already meets its instruction budget
  (BENCHMARKS.md). Descriptors remain a candidate for the GPU tuning round.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tensor_cache import TensorCache

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter `_config` picks small tiles (fast on a CPU, many tile edges in short tests); tests clear
# this to run the GPU tile configurations through the interpreter too.
SMALL_TILES = INTERPRET
LOG2E = 1.4426950408889634
# Set (or env PREFIX_KERNELS_POISON=1) to NaN-fill every output before the kernels run: tests catch elements
# that no kernel writes.
POISON_OUTPUTS = False

# Token kinds in `KIND` (constexpr: jitted code may only read constexpr globals).
KIND_LOCAL = tl.constexpr(0)
KIND_GLOBAL = tl.constexpr(1)
KIND_PAD = tl.constexpr(2)
# Initial running maximum (log2 domain). Finite, so that `exp2(-inf - M_FLOOR) = 0` and `exp2(M_FLOOR - M_FLOOR)
# = 1` need no NaN guard; a real score below it would need |q . k| near fp32's limit, where the scores overflow.
M_FLOOR = tl.constexpr(-3.0e38)


# ------------------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, bh, rows, cols, dropout_p, COLS_TILE: tl.constexpr, NCOLS: tl.constexpr):
    """`(len(rows), NCOLS)` bool: True where element (query `i`, key position `j`) survives dropout.

    Philox keyed by `seed`, counter `(j // 4, i, b * H + h, 0)`, output word `j % 4`, so one call serves four
    consecutive keys. `cols`: the `NCOLS` key positions; with `COLS_TILE`, the first of `NCOLS` consecutive
    positions (a multiple of 4), and the tile takes one Philox call per four elements instead of one per element.
    Both forms give the same bits for the same `(i, j)`."""
    if COLS_TILE:
        groups = cols // 4 + tl.arange(0, NCOLS // 4)
        c0 = (rows[:, None] * 0 + groups[None, :]).to(tl.uint32, bitcast=True)
        c1 = (rows[:, None] + groups[None, :] * 0).to(tl.uint32, bitcast=True)
        c2 = c0 * 0 + bh.to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c2 * 0)
        # `join(join(r0, r2), join(r1, r3))` is `(M, NCOLS / 4, 2, 2)` with `[.., t, s] = r_{2t+s}`: in row-major
        # order word `k` of group `g` lands in column `4 g + k`.
        r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], NCOLS))
    else:
        c0 = (rows[:, None] * 0 + (cols // 4)[None, :]).to(tl.uint32, bitcast=True)
        c1 = (rows[:, None] + cols[None, :] * 0).to(tl.uint32, bitcast=True)
        c2 = c0 * 0 + bh.to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c2 * 0)
        word = rows[:, None] * 0 + (cols % 4)[None, :]
        r = tl.where(word < 2, tl.where(word == 0, r0, r1), tl.where(word == 2, r2, r3))
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _program(H):
    """`(program_id(0), batch-head, batch, head)` of a grid `(., B * H)`; batch and head as int64 for offsets."""
    bh = tl.program_id(1)
    return tl.program_id(0), bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _prefix_col0(N):
    """Key position of prefix key 0 in the dropout counter space: `N` rounded up to a multiple of 4, so prefix
    tiles are aligned like band tiles."""
    return (N + 3) // 4 * 4


@triton.jit
def _row_ptrs(base, rows, stride, BLOCK_D: tl.constexpr):
    """`(len(rows), BLOCK_D)` pointers to rows `rows` of a `(N, D)` slice with row stride `stride`."""
    return base + rows[:, None].to(tl.int64) * stride + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _load_at(ptrs, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_IN_RANGE: tl.constexpr = False):
    """Rows outside `row_ok` and padded head-dim columns read as 0. `ROWS_IN_RANGE`: every row exists (`row_ok`
    is ignored), so full tiles load with no predicate at all."""
    if BLOCK_D == HEAD_DIM:
        if ROWS_IN_RANGE:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM
    if ROWS_IN_RANGE:
        return tl.load(ptrs, mask=d_ok, other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok, other=0.0)


@triton.jit
def _load_rows(base, rows, stride, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    return _load_at(_row_ptrs(base, rows, stride, BLOCK_D=BLOCK_D), row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)


@triton.jit
def _store_rows(base, rows, stride, row_ok, val, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = _row_ptrs(base, rows, stride, BLOCK_D=BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, val, mask=row_ok[:, None])
    else:
        tl.store(ptrs, val, mask=row_ok[:, None] & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM))


@triton.jit
def _in_band(i, j, N, window):
    """Query `i` may see band key `j` (broadcast shapes)."""
    return (j < N) & (tl.abs(i - j) <= window)


@triton.jit
def _has_special(SPECIAL, b, N, start, end):
    """Whether positions `[start, end)` of batch row `b` hold a global or padding token (two scalar loads)."""
    base = SPECIAL + b * (N + 1)
    return tl.load(base + tl.minimum(end, N)) != tl.load(base + start)


@triton.jit
def _band_tiles(start, N, window, FIXED: tl.constexpr, STEP: tl.constexpr):
    """Tiles of `STEP` positions that meet the band of the fixed tile `[start, start + FIXED)`: tile starts
    `[lo, hi)` (`lo` a multiple of `STEP`); those in `[mid_lo, mid_hi)` lie inside the band and the sequence, the
    others cross the band's edge (or the sequence end) and need the element mask."""
    lo = tl.maximum(start - window, 0) // STEP * STEP
    hi = tl.minimum(start + FIXED + window, N)
    hi_tiles = lo + tl.cdiv(hi - lo, STEP) * STEP
    # inside: t >= start + FIXED - 1 - window, t + STEP - 1 <= start + window, t + STEP <= N
    mid_lo = lo + tl.cdiv(tl.maximum(start + FIXED - 1 - window - lo, 0), STEP) * STEP
    last = tl.minimum(start + window + 1, N) - STEP
    mid_hi = tl.where(last >= lo, lo + (tl.maximum(last - lo, 0) // STEP + 1) * STEP, lo)
    mid_lo = tl.minimum(mid_lo, hi_tiles)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi_tiles), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _gather_keys(k_base, v_base, skn, svn, gidx_row, g0, cnt, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
    """Keys/values of the global tokens `g0 .. g0 + BLOCK_G - 1` of a batch row (`cnt` in all): `k, v`, which
    entries exist, and their positions."""
    g = g0 + tl.arange(0, BLOCK_G)
    g_ok = g < cnt
    gpos = tl.load(gidx_row + g, mask=g_ok, other=0)
    k = _load_rows(k_base, gpos, skn, g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_rows(v_base, gpos, svn, g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    return k, v, g_ok, gpos


@triton.jit
def _prefix_keys(pk_base, pv_base, spkn, spvn, p0, P, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Prefix keys/values `p0 .. p0 + BLOCK_N - 1` (`P` in all): `k, v`, which exist, and their indices."""
    pcols = p0 + tl.arange(0, BLOCK_N)
    p_ok = pcols < P
    k = _load_rows(pk_base, pcols, spkn, p_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_rows(pv_base, pcols, spvn, p_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    return k, v, p_ok, pcols


@triton.jit
def _key_split(split, num_splits, chunk, N, P, kg_base, vg_base, skn, svn, pk_base, pv_base, spkn, spvn,
               HAS_PREFIX: tl.constexpr):
    """The keys of a global-row split: `(k_base, v_base, k_stride, v_stride, start, end, dropout position offset)`.
    Split `s < num_splits` is the chunk `[s * chunk, (s + 1) * chunk)` of `k_global, v_global`, split `num_splits`
    the prefix (selected, not branched on: the loop after it is the same)."""
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    col_offset = split * 0
    if HAS_PREFIX:
        is_prefix = split == num_splits
        kg_base = tl.where(is_prefix, pk_base, kg_base)
        vg_base = tl.where(is_prefix, pv_base, vg_base)
        skn = tl.where(is_prefix, spkn, skn)
        svn = tl.where(is_prefix, spvn, svn)
        start = tl.where(is_prefix, 0, start)
        end = tl.where(is_prefix, P, end)
        col_offset = tl.where(is_prefix, _prefix_col0(N), col_offset)
    return kg_base, vg_base, skn, svn, start, end, col_offset


@triton.jit
def _split_key_tile(k_base, v_base, skn, svn, KIND, b, N, n0, end, col_offset, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KIND: tl.constexpr):
    """Key tile `n0 + arange(BLOCK_N)` of a global-row split (`_key_split`): `k, v`, the positions, and which keys
    count (inside the split, not padding; prefix keys, `col_offset > 0`, never are padding)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < end
    if HAS_KIND:
        kind = tl.load(KIND + b * N + cols, mask=col_ok & (col_offset == 0), other=KIND_LOCAL)
        col_ok = col_ok & (kind != KIND_PAD)
    k = _load_rows(k_base, cols, skn, col_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_rows(v_base, cols, svn, col_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    return k, v, cols, col_ok


@triton.jit
def _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, cols, dropout_p, COLS_TILE: tl.constexpr,
                    DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """One key block of the online softmax. `s`: raw scores, `-inf` where excluded; `rows`, `cols`, `COLS_TILE`:
    query and key positions for the dropout bits, as in `_dropout_keep`."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, rows, cols, dropout_p, COLS_TILE=COLS_TILE, NCOLS=v.shape[0]), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _local_rows_fwd(pid_m, bh, b, h, Q, K, V, PK, PV, KIND, SPECIAL, GIDX, GCNT, O, LSE,
                    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sob, son, soh,
                    N, P, gidx_stride, window, qk_scale, dropout_p, inv_keep, seed,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_N: tl.constexpr, HAS_KIND: tl.constexpr,
                    HAS_GLOBAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """A tile of `BLOCK_M` query rows: its band key tiles, then its row's global keys, then the prefix, in one
    online softmax. Writes `O` and `LSE` of the tile (0 and `+inf` on rows that are not local queries). `EVEN_N`:
    `N` is a multiple of `BLOCK_N`, so no band tile reaches past the sequence."""
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    m_i = tl.full([BLOCK_M], M_FLOOR, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, mid_lo, mid_hi, hi = _band_tiles(m0, N, window, FIXED=BLOCK_M, STEP=BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    # A scalar pointer to the current tile plus loop-invariant int32 offsets: per tile, one 64-bit add per load
    # instead of per-row address arithmetic.
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    k_tile = k_base + lo.to(tl.int64) * skn
    v_tile = v_base + lo.to(tl.int64) * svn
    k_offs = offs_n[:, None] * skn + tl.arange(0, BLOCK_D)[None, :]
    v_offs = offs_n[:, None] * svn + tl.arange(0, BLOCK_D)[None, :]
    # Most programs' bands hold no global or padding token: they never look a tile up.
    band_special = False
    if HAS_KIND:
        band_special = _has_special(SPECIAL, b, N, lo, hi)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        k = _load_at(k_tile + k_offs, n0 + offs_n < N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROWS_IN_RANGE=EVEN_N)
        v = _load_at(v_tile + v_offs, n0 + offs_n < N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROWS_IN_RANGE=EVEN_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        masked = (n0 < mid_lo) | (n0 >= mid_hi)
        if HAS_KIND:
            if band_special:
                masked = masked | _has_special(SPECIAL, b, N, n0, n0 + BLOCK_N)
        if masked:
            cols = n0 + offs_n
            ok = _in_band(rows[:, None], cols[None, :], N, window)
            if HAS_KIND:
                ok = ok & (tl.load(KIND + b * N + cols, mask=cols < N, other=KIND_PAD) == KIND_LOCAL)[None, :]
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, n0, dropout_p,
                                        COLS_TILE=True, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)
        k_tile += BLOCK_N * skn
        v_tile += BLOCK_N * svn

    if HAS_GLOBAL:
        cnt = tl.load(GCNT + b)
        for g0 in range(0, cnt, BLOCK_G):
            k, v, g_ok, gpos = _gather_keys(k_base, v_base, skn, svn, GIDX + b * gidx_stride, g0, cnt,
                                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_G=BLOCK_G)
            s = tl.where(g_ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, gpos, dropout_p,
                                            COLS_TILE=False, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)
    if HAS_PREFIX:
        for p0 in range(0, P, BLOCK_N):
            k, v, p_ok, pcols = _prefix_keys(PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, p0, P,
                                             HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
            s = tl.where(p_ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, _prefix_col0(N) + p0,
                                            dropout_p, COLS_TILE=True, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)

    live = l_i > 0
    if HAS_KIND:
        # Global rows too: their result is the global branch's (merged later), or 0 with local rows only.
        live = live & (tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD) == KIND_LOCAL)
    l_safe = tl.where(live, l_i, 1.0)
    out = tl.where(live[:, None], acc * (inv_keep / l_safe)[:, None], 0.0)
    _store_rows(O + b * sob + h * soh, rows, son, row_ok, out.to(O.dtype.element_ty), HEAD_DIM=HEAD_DIM,
                BLOCK_D=BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * N + rows, tl.where(live, m_i + tl.log2(l_safe), float("inf")), mask=row_ok)


@triton.jit
def _global_rows_fwd_split(split, pid_g, bh, b, h, QG, KG, VG, PK, PV, KIND, GIDX, GCNT, PART_O, PART_L,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh,
                           N, P, gidx_stride, g_pad, chunk, num_splits, n_parts, qk_scale, dropout_p, inv_keep, seed,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_G: tl.constexpr, HAS_KIND: tl.constexpr, HAS_PREFIX: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """A block of global queries against one key chunk (split `num_splits` is the prefix): the normalized partial
    output and its log2 LSE, merged later by `_global_rows_merge_kernel` (flash-decoding)."""
    cnt = tl.load(GCNT + b)
    g_rows = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g_rows < cnt
    gpos = tl.load(GIDX + b * gidx_stride + g_rows, mask=g_ok, other=0)
    q = _load_rows(QG + b * sqb + h * sqh, gpos, sqn, g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    m_i = tl.full([BLOCK_G], M_FLOOR, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base, v_base, key_stride_k, key_stride_v, start, end, col_offset = _key_split(
        split, num_splits, chunk, N, P, KG + b * skb + h * skh, VG + b * svb + h * svh, skn, svn,
        PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, HAS_PREFIX=HAS_PREFIX)
    for n0 in range(start, end, BLOCK_N):
        k, v, cols, col_ok = _split_key_tile(k_base, v_base, key_stride_k, key_stride_v, KIND, b, N, n0, end,
                                             col_offset, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                             HAS_KIND=HAS_KIND)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, gpos, col_offset + n0, dropout_p,
                                        COLS_TILE=True, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)

    live = l_i > 0
    l_safe = tl.where(live, l_i, 1.0)
    part = (bh * g_pad + g_rows).to(tl.int64) * n_parts + split
    _store_rows(PART_O, part, HEAD_DIM, g_rows >= 0, acc * (inv_keep / l_safe)[:, None], HEAD_DIM=HEAD_DIM,
                BLOCK_D=BLOCK_D)
    tl.store(PART_L + part, tl.where(live, m_i + tl.log2(l_safe), float("-inf")))


@triton.jit(do_not_specialize=["seed"])
def _attention_fwd_kernel(
    Q, K, V, QG, KG, VG, PK, PV, KIND, SPECIAL, GIDX, GCNT, O, LSE, PART_O, PART_L,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh,
    spkb, spkn, spkh, spvb, spvn, spvh, sob, son, soh,
    N, H, P, gidx_stride, g_pad, chunk, num_splits, n_parts, n_global_progs, window, qk_scale, dropout_p, inv_keep,
    seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_N: tl.constexpr, HAS_KIND: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid `(n_global_progs + cdiv(N, BLOCK_M), B * H)`. The first `n_global_progs` programs of a batch-head are
    the global rows' key splits (`n_parts` splits x the blocks of `BLOCK_G` global queries; they walk the most
    keys, so they start first and overlap the band work); the others are local-row tiles. `HAS_GLOBAL`: global
    tokens exist (global keys of the local rows); `GLOBAL_ROWS`: their rows are computed (`n_global_progs > 0`)."""
    pid, bh, b, h = _program(H)
    if GLOBAL_ROWS:
        if pid < n_global_progs:
            _global_rows_fwd_split(
                pid % n_parts, pid // n_parts, bh, b, h, QG, KG, VG, PK, PV, KIND, GIDX, GCNT, PART_O, PART_L,
                sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh, spkb, spkn, spkh, spvb, spvn, spvh,
                N, P, gidx_stride, g_pad, chunk, num_splits, n_parts, qk_scale, dropout_p, inv_keep, seed,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, HAS_KIND=HAS_KIND,
                HAS_PREFIX=HAS_PREFIX, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
    if pid >= n_global_progs:
        _local_rows_fwd(
            pid - n_global_progs, bh, b, h, Q, K, V, PK, PV, KIND, SPECIAL, GIDX, GCNT, O, LSE,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sob, son, soh,
            N, P, gidx_stride, window, qk_scale, dropout_p, inv_keep, seed,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
            NUM_STAGES=NUM_STAGES, EVEN_N=EVEN_N, HAS_KIND=HAS_KIND, HAS_GLOBAL=HAS_GLOBAL,
            HAS_PREFIX=HAS_PREFIX, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)


@triton.jit
def _global_rows_merge_kernel(
    PART_O, PART_L, GIDX, GCNT, O, LSE, sob, son, soh,
    N, H, gidx_stride, g_pad, n_parts,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid `(G, B * H)`: merge one global row's partials by their LSE into `O` and `LSE` (replacing the local
    result written for that row)."""
    g, bh, b, h = _program(H)
    if g < tl.load(GCNT + b):
        pos = tl.load(GIDX + b * gidx_stride + g).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_parts
        part = (bh * g_pad + g).to(tl.int64) * n_parts + offs_s
        lse_s = tl.load(PART_L + part, mask=s_ok, other=float("-inf"))
        o_s = _load_rows(PART_O, part, HEAD_DIM, s_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        m = tl.max(lse_s, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse_s - m_use)
        w_sum = tl.sum(w, 0)
        out = tl.sum(o_s * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(O + b * sob + pos * son + h * soh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
        lse = tl.where(w_sum > 0, m_use + tl.log2(tl.where(w_sum > 0, w_sum, 1.0)), float("inf"))
        tl.store(LSE + bh.to(tl.int64) * N + pos, lse)


# ------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(O, DO, LSE, KIND, DELTA, LSE_LOCAL, DQ_ACC, DQG_ACC, sob, son, soh, sdb, sdn, sdh,
                           N, H, n_pad, g_pad, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, HAS_KIND: tl.constexpr, GLOBAL_ROWS: tl.constexpr):
    """Grid `(n_pad / BLOCK_M, B * H)`: `DELTA = sum_d dO * O` (fp32); `LSE_LOCAL`, the LSE of local rows and
    `+inf` on global and padding rows (so the local-row backward needs no row kinds); zeroes this tile's rows of
    the fp32 accumulators `DQ_ACC` and (with `GLOBAL_ROWS`) `DQG_ACC`."""
    pid_m, bh, b, h = _program(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    o = _load_rows(O + b * sob + h * soh, rows, son, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    stats = bh.to(tl.int64) * N + rows
    tl.store(DELTA + stats, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
    lse = tl.load(LSE + stats, mask=row_ok, other=float("inf"))
    if HAS_KIND:
        lse = tl.where(tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD) == KIND_LOCAL, lse, float("inf"))
    tl.store(LSE_LOCAL + stats, lse, mask=row_ok)
    zeros = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    _store_rows(DQ_ACC + bh.to(tl.int64) * n_pad * BLOCK_D, rows, BLOCK_D, rows < n_pad, zeros, HEAD_DIM=BLOCK_D,
                BLOCK_D=BLOCK_D)
    if GLOBAL_ROWS:
        _store_rows(DQG_ACC + bh.to(tl.int64) * g_pad * BLOCK_D, rows, BLOCK_D, rows < g_pad, zeros,
                    HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)


@triton.jit
def _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, rows, cols, bh, qk_scale, seed, dropout_p, inv_keep,
                  COLS_TILE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (query tile, key tile) pair, keys as rows: `s_t = k . q^T` `(keys, queries)`, raw, `-inf` where
    excluded. Adds the pair's unscaled dK and dV to `dk, dv` and returns its unscaled dQ part `(queries, D)`
    fp32. `rows`: query positions; `cols`, `COLS_TILE`: the keys' positions as in `_dropout_keep`."""
    p_t = tl.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep_t = tl.trans(_dropout_keep(seed, bh, rows, cols, dropout_p, COLS_TILE=COLS_TILE, NCOLS=k.shape[0]))
        dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        dv += tl.dot(tl.where(keep_t, p_t * inv_keep, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=DOT_PREC)
    return dk, dv, tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC)


@triton.jit
def _query_tile_bwd(q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    ROWS_IN_RANGE: tl.constexpr = False):
    """`q`, `dO`, LSE and delta of a tile of query rows; rows outside `row_ok` read as 0 with LSE = +inf (p = 0)."""
    q = _load_at(q_ptrs, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROWS_IN_RANGE=ROWS_IN_RANGE)
    do = _load_at(do_ptrs, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROWS_IN_RANGE=ROWS_IN_RANGE)
    if ROWS_IN_RANGE:
        return q, do, tl.load(lse_ptrs), tl.load(delta_ptrs)
    return q, do, tl.load(lse_ptrs, mask=row_ok, other=float("inf")), tl.load(delta_ptrs, mask=row_ok, other=0.0)


@triton.jit
def _band_keys_bwd(pid_n, bh, b, h, Q, K, V, DO, LSE_LOCAL, DELTA, KIND, DK, DV, DQ_ACC,
                   sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                   N, n_pad, window, qk_scale, scale, dropout_p, inv_keep, seed,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_STAGES: tl.constexpr, EVEN_M: tl.constexpr, HAS_KIND: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """A tile of `BLOCK_N` band keys against the query tiles within `+-window`: its dK/dV (global and padding
    columns get 0 here; global keys are finalized from the shared-key partials) and each pair's dQ part.
    `EVEN_M`: `N` is a multiple of `BLOCK_M`, so no query tile reaches past the sequence."""
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k = _load_rows(K + b * skb + h * skh, cols, skn, col_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_rows(V + b * svb + h * svh, cols, svn, col_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    col_local = col_ok
    if HAS_KIND:
        col_local = tl.load(KIND + b * N + cols, mask=col_ok, other=KIND_PAD) == KIND_LOCAL
    # One decision per program: whether any column of the tile is excluded (global, padding, past N).
    special_cols = tl.sum(tl.where(col_local, 0, 1)) > 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo, mid_lo, mid_hi, hi = _band_tiles(n0, N, window, FIXED=BLOCK_N, STEP=BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # Scalar pointers to the current query tile plus loop-invariant int32 offsets (as in the forward's band loop).
    q_tile = Q + b * sqb + h * sqh + lo.to(tl.int64) * sqn
    do_tile = DO + b * sdob + h * sdoh + lo.to(tl.int64) * sdon
    dq_tile = DQ_ACC + (bh.to(tl.int64) * n_pad + lo) * BLOCK_D
    stats = bh.to(tl.int64) * N + lo
    q_offs = offs_m[:, None] * sqn + offs_d[None, :]
    do_offs = offs_m[:, None] * sdon + offs_d[None, :]
    dq_offs = offs_m[:, None] * BLOCK_D + offs_d[None, :]
    for m0 in tl.range(lo, hi, BLOCK_M, num_stages=NUM_STAGES):
        # Rows past N, padding rows and global rows all have p = 0 through LSE_LOCAL: only columns need masks.
        rows = m0 + offs_m
        q, do, lse, delta = _query_tile_bwd(q_tile + q_offs, do_tile + do_offs, LSE_LOCAL + stats + offs_m,
                                            DELTA + stats + offs_m, rows < N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                            ROWS_IN_RANGE=EVEN_M)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        if special_cols | (m0 < mid_lo) | (m0 >= mid_hi):
            s_t = tl.where(_in_band(rows[None, :], cols[:, None], N, window) & col_local[:, None], s_t,
                           float("-inf"))
        dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, rows, n0, bh, qk_scale, seed, dropout_p,
                                   inv_keep, COLS_TILE=True, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
        tl.atomic_add(dq_tile + dq_offs, dq, sem="relaxed")
        q_tile += BLOCK_M * sqn
        do_tile += BLOCK_M * sdon
        dq_tile += BLOCK_M * BLOCK_D
        stats += BLOCK_M

    _store_rows(DK + b * sdkb + h * sdkh, cols, sdkn, col_ok, (dk * scale).to(DK.dtype.element_ty),
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    _store_rows(DV + b * sdvb + h * sdvh, cols, sdvn, col_ok, dv.to(DV.dtype.element_ty), HEAD_DIM=HEAD_DIM,
                BLOCK_D=BLOCK_D)


@triton.jit
def _shared_key_block_bwd(k, v, key_ok, key_cols, q_base, do_base, dq_base, LSE_LOCAL, DELTA, bh, N, start, end,
                          sqn, sdon, qk_scale, seed, dropout_p, inv_keep, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, COLS_TILE: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """A block of keys every local query sees (`key_ok`: which exist; `key_cols`, `COLS_TILE`: their positions as
    in `_dropout_keep`) against the local query rows `[start, end)`: unscaled dK, dV; each pair's dQ part is added
    to `DQ_ACC`."""
    dk = tl.zeros([k.shape[0], BLOCK_D], tl.float32)
    dv = tl.zeros([k.shape[0], BLOCK_D], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        stats = bh.to(tl.int64) * N + rows
        q, do, lse, delta = _query_tile_bwd(_row_ptrs(q_base, rows, sqn, BLOCK_D=BLOCK_D),
                                            _row_ptrs(do_base, rows, sdon, BLOCK_D=BLOCK_D), LSE_LOCAL + stats,
                                            DELTA + stats, rows < N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        s_t = tl.where(key_ok[:, None], tl.dot(k, tl.trans(q), input_precision=DOT_PREC), float("-inf"))
        dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, rows, key_cols, bh, qk_scale, seed,
                                   dropout_p, inv_keep, COLS_TILE=COLS_TILE, HAS_DROPOUT=HAS_DROPOUT,
                                   DOT_PREC=DOT_PREC)
        tl.atomic_add(_row_ptrs(dq_base, rows, BLOCK_D, BLOCK_D=BLOCK_D), dq, sem="relaxed")
    return dk, dv


@triton.jit
def _shared_keys_bwd(chunk, bh, b, h, Q, K, V, PK, PV, DO, LSE_LOCAL, DELTA, GIDX, GCNT, DQ_ACC,
                     GPART_K, GPART_V, PPART_K, PPART_V,
                     sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sdob, sdon, sdoh,
                     N, P, n_pad, gidx_stride, q_chunk, num_chunks, n_prefix_slots, qk_scale, dropout_p, inv_keep,
                     seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK/dV (unscaled, fp32) of the global keys (through the local `k, v`) and of the prefix keys from the local
    queries of one chunk of `q_chunk` rows, written as this chunk's partials `GPART_* (B*H, num_chunks, G,
    BLOCK_D)`, `PPART_* (B*H, n_prefix_slots, P, BLOCK_D)`: every local query feeds these few keys, so the work is
    split over query chunks instead of one program walking all N rows."""
    start = chunk * q_chunk
    end = tl.minimum(start + q_chunk, N)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ_ACC + bh.to(tl.int64) * n_pad * BLOCK_D
    if HAS_GLOBAL:
        cnt = tl.load(GCNT + b)
        for g0 in range(0, cnt, BLOCK_G):
            # Global keys through the local `k, v`, as every local query sees them.
            k, v, g_ok, gpos = _gather_keys(K + b * skb + h * skh, V + b * svb + h * svh, skn, svn,
                                            GIDX + b * gidx_stride, g0, cnt, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                            BLOCK_G=BLOCK_G)
            dk, dv = _shared_key_block_bwd(k, v, g_ok, gpos, q_base, do_base, dq_base, LSE_LOCAL, DELTA, bh, N, start,
                                           end, sqn, sdon, qk_scale, seed, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM,
                                           BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, COLS_TILE=False,
                                           HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
            part = (bh.to(tl.int64) * num_chunks + chunk) * gidx_stride + g0 + tl.arange(0, BLOCK_G)
            _store_rows(GPART_K, part, BLOCK_D, g_ok, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
            _store_rows(GPART_V, part, BLOCK_D, g_ok, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
    if HAS_PREFIX:
        for p0 in range(0, P, BLOCK_N):
            k, v, p_ok, pcols = _prefix_keys(PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, p0, P,
                                             HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
            dk, dv = _shared_key_block_bwd(k, v, p_ok, _prefix_col0(N) + p0, q_base, do_base, dq_base, LSE_LOCAL,
                                           DELTA, bh, N, start, end, sqn, sdon, qk_scale, seed, dropout_p, inv_keep,
                                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, COLS_TILE=True,
                                           HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
            part = (bh.to(tl.int64) * n_prefix_slots + chunk) * P + pcols
            _store_rows(PPART_K, part, BLOCK_D, p_ok, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
            _store_rows(PPART_V, part, BLOCK_D, p_ok, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)


@triton.jit
def _global_query_block(qg_base, do_base, LSE, DELTA, gidx_row, g0, cnt, bh, N, sqn, sdon,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
    """Global queries `g0 .. g0 + BLOCK_G - 1` of a batch row: `q_global`, `dO`, LSE, delta, their slots and
    positions (slots past `cnt` read as 0 with LSE = +inf)."""
    g = g0 + tl.arange(0, BLOCK_G)
    g_ok = g < cnt
    gpos = tl.load(gidx_row + g, mask=g_ok, other=0)
    stats = bh.to(tl.int64) * N + gpos
    q, do, lse, delta = _query_tile_bwd(_row_ptrs(qg_base, gpos, sqn, BLOCK_D=BLOCK_D),
                                        _row_ptrs(do_base, gpos, sdon, BLOCK_D=BLOCK_D), LSE + stats, DELTA + stats,
                                        g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    return q, do, lse, delta, g, gpos


@triton.jit
def _global_rows_bwd_split(split, bh, b, h, QG, KG, VG, PK, PV, DO, LSE, DELTA, KIND, GIDX, GCNT, DKG, DVG,
                           DQG_ACC, PPART_K, PPART_V,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh,
                           sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                           N, P, gidx_stride, g_pad, chunk, num_splits, n_prefix_slots, qk_scale, scale, dropout_p,
                           inv_keep, seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_G: tl.constexpr, SINGLE_G: tl.constexpr, HAS_KIND: tl.constexpr,
                           TO_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """The global queries' backward against one key split (flash-decoding style): split `s < num_splits` owns the
    keys `[s * chunk, (s + 1) * chunk)` of `k_global, v_global` and writes their dK_global, dV_global; split
    `num_splits` (`TO_PREFIX`) is the prefix, written as the last slot of the prefix partials. `TO_PREFIX` is a
    compile-time flag, so the loop's stores need no branch (a branch there fails Triton 3.6's pipeliner).
    dQ_global parts go to the fp32 `DQG_ACC (B*H, G_pad, BLOCK_D)` by atomics: once per program when all global
    queries fit one block (`SINGLE_G`), else once per (key tile, query block)."""
    cnt = tl.load(GCNT + b)
    gidx_row = GIDX + b * gidx_stride
    qg_base = QG + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dqg_base = DQG_ACC + bh.to(tl.int64) * g_pad * BLOCK_D
    k_base, v_base, key_stride_k, key_stride_v, start, end, col_offset = _key_split(
        split, num_splits, chunk, N, P, KG + b * skb + h * skh, VG + b * svb + h * svh, skn, svn,
        PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, HAS_PREFIX=TO_PREFIX)
    if SINGLE_G:
        q, do, lse, delta, g, gpos = _global_query_block(qg_base, do_base, LSE, DELTA, gidx_row, 0, cnt, bh, N, sqn,
                                                         sdon, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_G=BLOCK_G)
        dq_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        k, v, cols, col_ok = _split_key_tile(k_base, v_base, key_stride_k, key_stride_v, KIND, b, N, n0, end,
                                             col_offset, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                             HAS_KIND=HAS_KIND)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if SINGLE_G:
            s_t = tl.where(col_ok[:, None], tl.dot(k, tl.trans(q), input_precision=DOT_PREC), float("-inf"))
            dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, gpos, col_offset + n0, bh, qk_scale,
                                       seed, dropout_p, inv_keep, COLS_TILE=True, HAS_DROPOUT=HAS_DROPOUT,
                                       DOT_PREC=DOT_PREC)
            dq_acc += dq
        else:
            for g0 in range(0, cnt, BLOCK_G):
                q, do, lse, delta, g, gpos = _global_query_block(qg_base, do_base, LSE, DELTA, gidx_row, g0, cnt, bh,
                                                                 N, sqn, sdon, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                                                 BLOCK_G=BLOCK_G)
                s_t = tl.where(col_ok[:, None], tl.dot(k, tl.trans(q), input_precision=DOT_PREC), float("-inf"))
                dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, gpos, col_offset + n0, bh,
                                           qk_scale, seed, dropout_p, inv_keep, COLS_TILE=True,
                                           HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
                tl.atomic_add(_row_ptrs(dqg_base, g, BLOCK_D, BLOCK_D=BLOCK_D), dq, sem="relaxed")
        if TO_PREFIX:
            part = (bh.to(tl.int64) * n_prefix_slots + n_prefix_slots - 1) * P + cols
            _store_rows(PPART_K, part, BLOCK_D, cols < end, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
            _store_rows(PPART_V, part, BLOCK_D, cols < end, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
        else:
            _store_rows(DKG + b * sdkb + h * sdkh, cols, sdkn, cols < end, (dk * scale).to(DKG.dtype.element_ty),
                        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
            _store_rows(DVG + b * sdvb + h * sdvh, cols, sdvn, cols < end, dv.to(DVG.dtype.element_ty),
                        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    if SINGLE_G:
        tl.atomic_add(_row_ptrs(dqg_base, g, BLOCK_D, BLOCK_D=BLOCK_D), dq_acc, sem="relaxed")


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_kernel(
    Q, K, V, QG, KG, VG, PK, PV, DO, LSE, LSE_LOCAL, DELTA, KIND, GIDX, GCNT,
    DK, DV, DKG, DVG, DQ_ACC, DQG_ACC, GPART_K, GPART_V, PPART_K, PPART_V,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh,
    spkb, spkn, spkh, spvb, spvn, spvh, sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    sdkgb, sdkgn, sdkgh, sdvgb, sdvgn, sdvgh,
    N, H, P, n_pad, gidx_stride, g_pad, window, chunk, num_splits, q_chunk, num_chunks, n_prefix_slots,
    n_global_progs, n_shared_progs, qk_scale, scale, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_M: tl.constexpr, SINGLE_G: tl.constexpr,
    HAS_KIND: tl.constexpr, HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(n_global_progs + n_shared_progs + cdiv(N, BLOCK_N), B * H)`, the whole backward in one pass. Per
    batch-head, in launch order (the longest first): the global rows' key splits (`_global_rows_bwd_split`, with
    `GLOBAL_ROWS` only), the shared-key query chunks (`_shared_keys_bwd`), then one program per band key tile
    (`_band_keys_bwd`)."""
    pid, bh, b, h = _program(H)
    if GLOBAL_ROWS:
        # Two instances: the k_global splits, then (with a prefix) the prefix split.
        for to_prefix in tl.static_range(1 + HAS_PREFIX):
            mine = pid < num_splits
            if to_prefix == 1:
                mine = pid == num_splits
            if mine:
                _global_rows_bwd_split(
                    pid, bh, b, h, QG, KG, VG, PK, PV, DO, LSE, DELTA, KIND, GIDX, GCNT, DKG, DVG, DQG_ACC, PPART_K,
                    PPART_V, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh, spkb, spkn, spkh, spvb, spvn,
                    spvh, sdob, sdon, sdoh, sdkgb, sdkgn, sdkgh, sdvgb, sdvgn, sdvgh,
                    N, P, gidx_stride, g_pad, chunk, num_splits, n_prefix_slots, qk_scale, scale, dropout_p,
                    inv_keep, seed, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
                    SINGLE_G=SINGLE_G, HAS_KIND=HAS_KIND, TO_PREFIX=to_prefix == 1, HAS_DROPOUT=HAS_DROPOUT,
                    DOT_PREC=DOT_PREC)
    if HAS_GLOBAL or HAS_PREFIX:
        if (pid >= n_global_progs) & (pid < n_global_progs + n_shared_progs):
            _shared_keys_bwd(
                pid - n_global_progs, bh, b, h, Q, K, V, PK, PV, DO, LSE_LOCAL, DELTA, GIDX, GCNT, DQ_ACC,
                GPART_K, GPART_V, PPART_K, PPART_V,
                sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sdob, sdon, sdoh,
                N, P, n_pad, gidx_stride, q_chunk, num_chunks, n_prefix_slots, qk_scale, dropout_p, inv_keep, seed,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
                HAS_GLOBAL=HAS_GLOBAL, HAS_PREFIX=HAS_PREFIX, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
    if pid >= n_global_progs + n_shared_progs:
        _band_keys_bwd(
            pid - n_global_progs - n_shared_progs, bh, b, h, Q, K, V, DO, LSE_LOCAL, DELTA, KIND, DK, DV, DQ_ACC,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
            N, n_pad, window, qk_scale, scale, dropout_p, inv_keep, seed,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES,
            EVEN_M=EVEN_M, HAS_KIND=HAS_KIND, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)


@triton.jit
def _sum_partials(PART_K, PART_V, first, slot_stride, n_slots, rows, row_ok, BLOCK_D: tl.constexpr):
    """Sums over `n_slots` slots of two fp32 partial buffers; slot `s` of row `r` is row `first + s * slot_stride +
    r` of `(., BLOCK_D)`."""
    dk = tl.zeros([rows.shape[0], BLOCK_D], tl.float32)
    dv = tl.zeros([rows.shape[0], BLOCK_D], tl.float32)
    for s in range(0, n_slots):
        at = first + s * slot_stride + rows
        dk += _load_rows(PART_K, at, BLOCK_D, row_ok, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
        dv += _load_rows(PART_V, at, BLOCK_D, row_ok, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
    return dk, dv


@triton.jit
def _bwd_finalize_kernel(
    DQ_ACC, DQG_ACC, SLOT, GIDX, GCNT, GPART_K, GPART_V, PPART_K, PPART_V, DQ, DQG, DK, DV, DPK, DPV,
    sdqb, sdqn, sdqh, sdqgb, sdqgn, sdqgh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, sdpkb, sdpkn, sdpkh, sdpvb, sdpvn,
    sdpvh, N, H, P, n_pad, gidx_stride, g_pad, num_chunks, n_prefix_slots, n_row_tiles, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    """Grid `(n_row_tiles + 2, B * H)`. Row tiles: `dQ = scale * DQ_ACC` and, with `GLOBAL_ROWS`, `dQ_global`
    (`scale * DQG_ACC` on global rows, 0 elsewhere) in the input dtype. The last two programs sum the shared keys'
    partials: `dK, dV` of the global keys (overwriting the zeros the band programs wrote there), then the prefix
    gradients."""
    pid, bh, b, h = _program(H)
    if pid < n_row_tiles:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        dq = _load_rows(DQ_ACC + bh.to(tl.int64) * n_pad * BLOCK_D, rows, BLOCK_D, row_ok, HEAD_DIM=BLOCK_D,
                        BLOCK_D=BLOCK_D)
        _store_rows(DQ + b * sdqb + h * sdqh, rows, sdqn, row_ok, (dq * scale).to(DQ.dtype.element_ty),
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        if GLOBAL_ROWS:
            slot = tl.load(SLOT + b * N + rows, mask=row_ok, other=-1)
            dqg = _load_rows(DQG_ACC + bh.to(tl.int64) * g_pad * BLOCK_D, slot, BLOCK_D, slot >= 0,
                             HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
            _store_rows(DQG + b * sdqgb + h * sdqgh, rows, sdqgn, row_ok, (dqg * scale).to(DQG.dtype.element_ty),
                        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    if HAS_GLOBAL:
        if pid == n_row_tiles:
            cnt = tl.load(GCNT + b)
            for g0 in range(0, cnt, BLOCK_G):
                g = g0 + tl.arange(0, BLOCK_G)
                g_ok = g < cnt
                gpos = tl.load(GIDX + b * gidx_stride + g, mask=g_ok, other=0)
                dk, dv = _sum_partials(GPART_K, GPART_V, bh.to(tl.int64) * num_chunks * gidx_stride, gidx_stride,
                                       num_chunks, g, g_ok, BLOCK_D=BLOCK_D)
                _store_rows(DK + b * sdkb + h * sdkh, gpos, sdkn, g_ok, (dk * scale).to(DK.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                _store_rows(DV + b * sdvb + h * sdvh, gpos, sdvn, g_ok, dv.to(DV.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    if HAS_PREFIX:
        if pid == n_row_tiles + 1:
            for p0 in range(0, P, BLOCK_G):
                pr = p0 + tl.arange(0, BLOCK_G)
                p_ok = pr < P
                dk, dv = _sum_partials(PPART_K, PPART_V, bh.to(tl.int64) * n_prefix_slots * P, P, n_prefix_slots,
                                       pr, p_ok, BLOCK_D=BLOCK_D)
                _store_rows(DPK + b * sdpkb + h * sdpkh, pr, sdpkn, p_ok, (dk * scale).to(DPK.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                _store_rows(DPV + b * sdpvb + h * sdpvh, pr, sdpvn, p_ok, dv.to(DPV.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)


# ------------------------------------------------------------------------------------------------------------
# Token tables, cached per mask tensor
# ------------------------------------------------------------------------------------------------------------

_TABLE_CACHE = TensorCache()


def _token_tables(key_padding_mask, global_idx, global_count, b: int, n: int, device):
    """`(KIND (B, N) int8, SPECIAL (B, N + 1) int32, SLOT (B, N) int32)` (see the module docstring), or `None` when
    every token is local.

    Built with a few small torch ops, once per mask (`tensor_cache`): keyed on `key_padding_mask` and the compact
    global index (itself cached per `is_global` tensor by `custom_op.global_index`), so every layer of a model
    reuses one set and an in-place edit of a mask rebuilds it."""
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
    return _TABLE_CACHE.get(sources, build, extra=(b, n, str(device)))


# ------------------------------------------------------------------------------------------------------------
# Tile table and launchers (contract: `prefix_kernels.custom_op`)
# ------------------------------------------------------------------------------------------------------------

# Tiles per matmul precision, head_dim bucket (<= 64, <= 128) and arch (sm_90; sm_80 and anything below sm_90):
# forward (BLOCK_M, BLOCK_N, warps, stages), backward (query tile, key tile, warps, stages). "16bit" is fp16 / bf16
# on tensor cores, "tf32" fp32 on TF32 tensor cores, "ieee" fp32 on the FMA units. Chosen from the compiled
# resources (`benchmarks/kernel_resources.py`: no spills in fp16 / bf16, shared memory within the arch's limit,
# fewest SASS instructions per tile; BENCHMARKS.md has the figures) and, for the 16-bit forward at D = 64, from the
# H200 timings of the earlier kernels (64 x 64 tiles, 4 warps, 3 stages beat 128-row tiles). sm_80's `mma.sync`
# backward spills with 64-row query tiles, hence 32 rows there (and fewer with dropout or a ragged N: `_config`);
# IEEE fp32 dots need about twice the registers of a tensor-core tile, hence 16-key tiles in its backward and at
# D = 128. To be confirmed by measurement on a GPU (`benchmarks/gpu_bench.sh`); no autotuning at run time.
_TILES = {
    "16bit": {64: {90: ((64, 64, 4, 3), (64, 64, 4, 2)), 80: ((64, 64, 4, 3), (32, 64, 4, 2))},
              128: {90: ((64, 64, 8, 2), (64, 64, 8, 2)), 80: ((64, 64, 8, 2), (32, 64, 8, 2))}},
    "tf32": {64: dict.fromkeys((90, 80), ((64, 64, 4, 2), (32, 32, 4, 2))),
             128: dict.fromkeys((90, 80), ((64, 32, 4, 2), (32, 32, 4, 2)))},
    "ieee": {64: dict.fromkeys((90, 80), ((32, 32, 8, 2), (32, 16, 8, 2))),
             128: dict.fromkeys((90, 80), ((32, 16, 8, 2), (32, 16, 8, 2)))},
}


def _target_arch() -> int:
    """The compile target's compute capability x 10, as Triton sees it (80 for anything below sm_90)."""
    try:
        arch = triton.runtime.driver.active.get_current_target().arch
    except Exception:  # no active GPU driver (e.g. the interpreter)
        return 90
    return 90 if isinstance(arch, int) and arch >= 90 else 80


def _config(head_dim: int, n: int, num_global: int, dot_prec: str, dtype_bytes: int, dropout: bool) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = min(64, max(16, triton.next_power_of_2(max(num_global, 1))))
    if SMALL_TILES:
        # Small, unequal tiles: cheap on the CPU and they make short test sequences cross many tile edges.
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=16, BLOCK_G=16, BWD_M=16, BWD_N=32, CHUNK=32, Q_CHUNK=32,
                    num_warps=4, num_stages=1, bwd_warps=4, bwd_stages=1)
    precision = "ieee" if dot_prec == "ieee" else "tf32" if dtype_bytes == 4 else "16bit"
    arch = _target_arch()
    (bm, bn, warps, stages), (bwd_m, bwd_n, bwd_warps, bwd_stages) = _TILES[precision][
        64 if block_d <= 64 else 128][arch]
    if precision == "16bit" and dropout:
        # The dropout bits push the backward past 255 registers (72-192 bytes of spill with the table's query
        # tiles): half the rows fit.
        bwd_m //= 2
    elif precision == "16bit" and n % bwd_m:
        # So do the row-masked loads of a ragged N with 64-row query tiles (40-56 bytes of spill in fp16).
        bwd_m = 32
    chunk = 1024 if n > 4096 else 512
    return dict(BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=block_g, BWD_M=bwd_m, BWD_N=bwd_n, CHUNK=chunk,
                Q_CHUNK=chunk, num_warps=warps, num_stages=stages, bwd_warps=bwd_warps, bwd_stages=bwd_stages)


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


def _empty_out(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS or os.environ.get("PREFIX_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _Launch:
    """What both launchers derive from the inputs: shapes, flags, tile configuration, token tables, and the
    placeholders that stand for absent tensors."""

    def __init__(self, q, prefix_k, key_padding_mask, global_idx, global_count, max_global, dropout_p, has_global,
                 global_rows):
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
        self.dummy = torch.empty(1, dtype=torch.float32, device=self.device)
        self.kind, self.special, self.slot = self.tables if self.tables is not None else (self.dummy,) * 3
        self.gidx = global_idx if has_global else self.dummy
        self.gcnt = global_count if has_global else self.dummy
        self.gstride = global_idx.stride(0) if has_global else 0
        self.g_pad = triton.cdiv(max_global, self.cfg["BLOCK_G"]) * self.cfg["BLOCK_G"] if has_global else 0
        self.flags = dict(HEAD_DIM=self.d, BLOCK_D=self.cfg["BLOCK_D"], HAS_KIND=self.tables is not None,
                          HAS_GLOBAL=has_global, GLOBAL_ROWS=global_rows, HAS_PREFIX=self.has_prefix,
                          HAS_DROPOUT=dropout_p > 0, DOT_PREC=self.dot_prec)

    def or_dummy(self, t):
        return self.dummy if t is None else t

    def scratch(self, *shape):
        return torch.empty(shape, dtype=torch.float32, device=self.device)


def forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            *, window: int, scale: float, dropout_p: float, seed: int, max_global: int):
    """Returns `out (B, N, H, D)` in `q.dtype` and `lse (B, H, N)` fp32 (log2 domain, `+inf` = no key)."""
    q, k, v, q_global, k_global, v_global, prefix_k, prefix_v = map(
        _unit_d, (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v))
    has_global = global_idx is not None and max_global > 0
    global_rows = has_global and q_global is not None  # else local rows only: global rows stay 0
    L = _Launch(q, prefix_k, key_padding_mask, global_idx, global_count, max_global, dropout_p, has_global,
                global_rows)
    b, n, h, d, cfg = L.b, L.n, L.h, L.d, L.cfg
    out = _empty_out((b, n, h, d), q.dtype, L.device)
    lse = _empty_out((b, h, n), torch.float32, L.device)
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
        L.or_dummy(prefix_v), L.kind, L.special, L.gidx, L.gcnt, out, lse, part_o, part_l,
        *_strides(q), *_strides(k), *_strides(v), *_strides(q_global), *_strides(k_global), *_strides(v_global),
        *_strides(prefix_k), *_strides(prefix_v), *_strides(out),
        n, h, L.p, L.gstride, L.g_pad, cfg["CHUNK"], num_splits, n_parts, n_global_progs, window, scale * LOG2E,
        dropout_p, 1.0 / (1.0 - dropout_p), seed,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], NUM_STAGES=cfg["num_stages"],
        EVEN_N=n % cfg["BLOCK_N"] == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **L.flags)
    if global_rows:
        _global_rows_merge_kernel[(max_global, b * h)](
            part_o, part_l, L.gidx, L.gcnt, out, lse, *_strides(out), n, h, L.gstride, L.g_pad, n_parts,
            HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(n_parts)))
    return out, lse


def backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
             global_count, out, lse, *, window: int, scale: float, dropout_p: float, seed: int, max_global: int):
    """Returns `(dq, dk, dv, dq_global, dk_global, dv_global, dprefix_k, dprefix_v)`, `None` where the input is."""
    grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, out = map(
        _unit_d, (grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, out))
    has_global = global_idx is not None and max_global > 0
    global_rows = has_global and q_global is not None  # else local rows only: no gradient through global rows
    L = _Launch(q, prefix_k, key_padding_mask, global_idx, global_count, max_global, dropout_p, has_global,
                global_rows)
    b, n, h, d, p, cfg = L.b, L.n, L.h, L.d, L.p, L.cfg
    dq, dk, dv = (_empty_out((b, n, h, d), q.dtype, L.device) for _ in range(3))
    dq_g = dk_g = dv_g = dpk = dpv = None
    if q_global is not None:
        dq_g, dk_g, dv_g = (_empty_out((b, n, h, d), q.dtype, L.device) for _ in range(3))
    if L.has_prefix:
        dpk, dpv = (_empty_out((b, p, h, d), q.dtype, L.device) for _ in range(2))
    if n == 0 or (q_global is not None and not has_global):
        # Nothing to compute for the global projections (no token is global): zero gradients.
        for t in (dq_g, dk_g, dv_g, dpk, dpv) if n == 0 else (dq_g, dk_g, dv_g):
            if t is not None:
                t.zero_()
        if n == 0:
            return dq, dk, dv, dq_g, dk_g, dv_g, dpk, dpv
    bd = cfg["BLOCK_D"]
    pre_m = max(64, cfg["BWD_M"])
    n_pad = triton.cdiv(n, pre_m) * pre_m  # every query tile of the backward lies inside the fp32 dQ accumulator
    delta = L.scratch(b, h, n)
    lse_local = L.scratch(b, h, n)
    dq_acc = L.scratch(b * h, n_pad, bd)
    dqg_acc = L.scratch(b * h, L.g_pad, bd) if global_rows else L.dummy
    _bwd_preprocess_kernel[(n_pad // pre_m, b * h)](
        out, grad_out, lse, L.kind, delta, lse_local, dq_acc, dqg_acc, *_strides(out), *_strides(grad_out),
        n, h, n_pad, L.g_pad, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_m, HAS_KIND=L.tables is not None,
        GLOBAL_ROWS=global_rows)

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
        L.or_dummy(prefix_v), grad_out, lse, lse_local, delta, L.kind, L.gidx, L.gcnt,
        dk, dv, L.or_dummy(dk_g), L.or_dummy(dv_g), dq_acc, dqg_acc, gpart_k, gpart_v, ppart_k, ppart_v,
        *_strides(q), *_strides(k), *_strides(v), *_strides(q_global), *_strides(k_global), *_strides(v_global),
        *_strides(prefix_k), *_strides(prefix_v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        *_strides(dk_g), *_strides(dv_g),
        n, h, p, n_pad, L.gstride, L.g_pad, window, cfg["CHUNK"], num_splits, cfg["Q_CHUNK"], num_chunks,
        n_prefix_slots, n_global_progs, n_shared_progs, scale * LOG2E, scale, dropout_p, 1.0 / (1.0 - dropout_p),
        seed, BLOCK_M=cfg["BWD_M"], BLOCK_N=cfg["BWD_N"], BLOCK_G=cfg["BLOCK_G"], NUM_STAGES=cfg["bwd_stages"],
        EVEN_M=n % cfg["BWD_M"] == 0, SINGLE_G=max_global <= cfg["BLOCK_G"], num_warps=cfg["bwd_warps"],
        num_stages=cfg["bwd_stages"], **L.flags)

    fin_m = 64
    n_row_tiles = triton.cdiv(n, fin_m)
    _bwd_finalize_kernel[(n_row_tiles + 2, b * h)](
        dq_acc, dqg_acc, L.slot, L.gidx, L.gcnt, gpart_k, gpart_v, ppart_k, ppart_v, dq, L.or_dummy(dq_g), dk, dv,
        L.or_dummy(dpk), L.or_dummy(dpv), *_strides(dq), *_strides(dq_g), *_strides(dk), *_strides(dv),
        *_strides(dpk), *_strides(dpv), n, h, p, n_pad, L.gstride, L.g_pad, num_chunks, n_prefix_slots,
        n_row_tiles, scale, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=fin_m, BLOCK_G=cfg["BLOCK_G"], HAS_GLOBAL=has_global,
        GLOBAL_ROWS=global_rows, HAS_PREFIX=L.has_prefix)
    return dq, dk, dv, dq_g, dk_g, dv_g, dpk, dpv


# ------------------------------------------------------------------------------------------------------------
# Backend-module interface (see `prefix_kernels.attention`)
# ------------------------------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return None


def cannot_serve(args) -> str | None:
    if args.dtype == torch.float64:
        return "float64 is served by the reference backend only"
    if INTERPRET:
        if args.device.type != "cpu":
            return f"under TRITON_INTERPRET=1 the Triton backend takes CPU tensors, got {args.device}"
        if args.dtype == torch.bfloat16:
            return "bfloat16 is not computed correctly by the Triton interpreter"
    elif args.device.type != "cuda":
        return f"needs CUDA tensors, got {args.device}"
    if args.shape[3] > 256:
        return f"head_dim {args.shape[3]} > 256 is not supported"
    tensors = (args.q, args.k, args.v, args.q_global, args.k_global, args.v_global, args.prefix_k, args.prefix_v)
    if max(t.stride(-3) for t in tensors if t is not None) >= 2**24:
        return "a row stride of 2**24 elements or more overflows the Triton kernels' 32-bit tile offsets"
    return None


def attention(args) -> torch.Tensor:
    from .custom_op import fused_attention

    return fused_attention(args, "triton")
