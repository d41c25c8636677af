"""Triton backend: fused Longformer attention (band + global tokens + prefix keys), forward and backward.

Read top to bottom: shared device helpers, the forward kernels (local rows, global rows, the log-sum-exp merge),
the backward kernels (preprocess, local-row dQ, band-key dK/dV, global-key dK/dV, global rows, row scatter), the
launchers `forward` / `backward` (contract: `prefix_kernels.custom_op`), then the backend-module functions
`unavailable_reason`, `cannot_serve`, `attention`.

Layout: `q, k, v, q_global, k_global, v_global, O` are `(B, N, H, D)` (any strides, unit stride along `D`), the
prefix `(B, P, H, D)` (batch stride 0 allowed), `LSE` `(B, H, N)` fp32. Conventions shared by every kernel:

* Scores are kept in the log2 domain: `s = (q . k) * scale * log2(e)`, so softmax uses `exp2`. `LSE` stores the
  log2-domain log-sum-exp of the *undropped* softmax of each row; `+inf` marks a row that attends nothing
  (padding, or an empty key set), so the backward's `exp2(s - LSE)` gives exactly 0 there.
* `KIND (B, N)` int8: 0 local token, 1 global token, 2 padding. Band columns of kind != 0 are excluded (global
  keys are attended once, through the compact global list); only rows of kind 0 are local queries.
* Global rows are computed twice in the forward: the local-rows kernel writes them (cheaper than branching), then
  the merge kernel overwrites `O` and `LSE` of those rows with the global-branch result.
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
* Tiles strictly inside the band skip the element mask; only columns that are global or padding are removed, by
  a per-column additive `0 / -inf` bias. Tiles crossing the band's edge (or the sequence end) use the full mask.
* dK/dV of the keys every local query sees (global keys through the local `k, v`, and the prefix keys) are computed
  by `_global_keys_bwd_kernel` over query chunks into fp32 partials that the launcher sums: deterministic, and no
  atomics on a few hot addresses. The global rows' backward is split along the keys; its dQ_global parts (one per
  split) and its prefix dK/dV (one program per batch-head) are fp32 atomic adds into small `(B*H, G or P, D)`
  buffers, then scaled, cast and scattered to the global rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
def _prefix_col0(N):
    """Key position of prefix key 0 in the dropout counter space: `N` rounded up to a multiple of 4, so prefix
    tiles are aligned like band tiles."""
    return (N + 3) // 4 * 4


@triton.jit
def _load_rows(base, rows, stride_n, offs_d, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a `(N, D)` slice; rows outside `row_ok` and padded head-dim columns read as 0."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_rows_in_range(base, rows, stride_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_load_rows` for rows known to be in range (no row mask, so the loads vectorize and pipeline freely)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_rows(base, rows, stride_n, offs_d, row_ok, val, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, val, mask=row_ok[:, None])
    else:
        tl.store(ptrs, val, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _atomic_add_rows(base, rows, offs_d, row_ok, val, HEAD_DIM: tl.constexpr):
    """fp32 atomic add into a contiguous `(R, HEAD_DIM)` buffer."""
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.atomic_add(ptrs, val, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, valid, col_bias, scale_log2, seed, bh, rows, cols, dropout_p,
                         DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, COLS_TILE: tl.constexpr):
    """One key block of the online softmax; `m_i` may stay `-inf` (nothing admissible yet) without NaNs.
    `MASKED`: apply the element mask `valid`; `HAS_BIAS`: add the per-column `col_bias` (0 or -inf), the cheap
    form used by tiles that lie inside the band. `rows`, `cols`, `COLS_TILE`: as in `_dropout_keep`."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    if HAS_BIAS:
        s = s + col_bias[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, rows, cols, dropout_p, COLS_TILE, k.shape[0]), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _band_tiles(start, N, window, FIXED: tl.constexpr, STEP: tl.constexpr):
    """Tiles of `STEP` positions that meet the band of the fixed tile `[start, start + FIXED)`, split in three
    ranges of tile starts: `[lo, mid_lo)` and `[mid_hi, hi)` cross the band's edge (or the sequence end) and need
    the element mask; every tile of `[mid_lo, mid_hi)` lies inside the band and the sequence. Three branch-free
    loops (rather than one loop with a per-tile branch) keep the loads software-pipelined."""
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


# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _band_key_tile(k_base, v_base, KIND, b, rows, n0, N, window, skn, svn, offs_d, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, HAS_KIND: tl.constexpr):
    """The band key tile `n0 + arange(BLOCK_N)` seen from the query rows `rows`: `k, v`, the per-column bias (0 for
    local keys, -inf for global or padding ones; used with `HAS_KIND`) and the element mask (used with `EDGE`).
    The unused ones are placeholders that the compiler drops."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if EDGE:
        k = _load_rows(k_base, cols, skn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, cols, svn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
    else:
        k = _load_rows_in_range(k_base, cols, skn, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_rows_in_range(v_base, cols, svn, offs_d, HEAD_DIM, BLOCK_D)
    if HAS_KIND:
        ck = tl.load(KIND + b * N + cols, mask=col_ok, other=KIND_PAD)
        col_bias = tl.where(ck == KIND_LOCAL, 0.0, float("-inf"))
    else:
        col_bias = tl.zeros([BLOCK_N], tl.float32)
    if EDGE:
        valid = col_ok[None, :] & (tl.abs(rows[:, None] - cols[None, :]) <= window)
    else:
        valid = col_ok[None, :]
    return k, v, col_bias, valid


@triton.jit
def _local_fwd_band(acc, m_i, l_i, q, k_base, v_base, KIND, b, bh, rows, start, end, N, window, skn, svn, offs_d,
                    scale_log2, seed, dropout_p, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, EDGE: tl.constexpr, HAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Band key tiles `[start, end)` of the online softmax (`EDGE`: tiles that need the element mask)."""
    for n0 in range(start, end, BLOCK_N):
        k, v, col_bias, valid = _band_key_tile(k_base, v_base, KIND, b, rows, n0, N, window, skn, svn, offs_d,
                                               HEAD_DIM, BLOCK_D, BLOCK_N, EDGE, HAS_KIND)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, valid, col_bias, scale_log2, seed, bh, rows,
                                             n0, dropout_p, DOT_PREC, EDGE, HAS_KIND, HAS_DROPOUT, True)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed"])
def _local_rows_fwd_kernel(
    Q, K, V, PK, PV, KIND, GIDX, GCNT, O, LSE,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    spkb, spkn, spkh, spvb, spvn, spvh, sob, son, soh,
    N, H, P, gidx_stride, window, scale_log2, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, HAS_KIND: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(cdiv(N, BLOCK_M), B * H)`: band tiles, then the row's global keys, then the prefix, one pass."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, row_ok, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, mid_lo, mid_hi, hi = _band_tiles(m0, N, window, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _local_fwd_band(acc, m_i, l_i, q, k_base, v_base, KIND, b, bh, rows, lo, mid_lo, N, window, skn,
                                    svn, offs_d, scale_log2, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                                    True, HAS_KIND, HAS_DROPOUT, DOT_PREC)
    acc, m_i, l_i = _local_fwd_band(acc, m_i, l_i, q, k_base, v_base, KIND, b, bh, rows, mid_lo, mid_hi, N, window,
                                    skn, svn, offs_d, scale_log2, seed, dropout_p, HEAD_DIM, BLOCK_D,
                                    BLOCK_N, False, HAS_KIND, HAS_DROPOUT, DOT_PREC)
    acc, m_i, l_i = _local_fwd_band(acc, m_i, l_i, q, k_base, v_base, KIND, b, bh, rows, mid_hi, hi, N, window, skn,
                                    svn, offs_d, scale_log2, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                                    True, HAS_KIND, HAS_DROPOUT, DOT_PREC)

    if HAS_GLOBAL:
        cnt = tl.load(GCNT + b)
        offs_g = tl.arange(0, BLOCK_G)
        for g0 in range(0, cnt, BLOCK_G):
            g_ok = g0 + offs_g < cnt
            gpos = tl.load(GIDX + b * gidx_stride + g0 + offs_g, mask=g_ok, other=0)
            k = _load_rows(k_base, gpos, skn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(v_base, gpos, svn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, g_ok[None, :], None,
                                                 scale_log2, seed, bh, rows, gpos, dropout_p,
                                                 DOT_PREC, True, False, HAS_DROPOUT, False)

    if HAS_PREFIX:
        pk_base = PK + b * spkb + h * spkh
        pv_base = PV + b * spvb + h * spvh
        for p0 in range(0, P, BLOCK_N):
            pcols = p0 + offs_n
            p_ok = pcols < P
            k = _load_rows(pk_base, pcols, spkn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(pv_base, pcols, spvn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, p_ok[None, :], None,
                                                 scale_log2, seed, bh, rows, _prefix_col0(N) + p0, dropout_p,
                                                 DOT_PREC, True, False, HAS_DROPOUT, True)

    live = l_i > 0
    if HAS_KIND:
        rk = tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD)
        live = live & (rk != KIND_PAD)
    out = acc * (inv_keep / tl.where(live, l_i, 1.0))[:, None]
    out = tl.where(live[:, None], out, 0.0)
    _store_rows(O + b * sob + h * soh, rows, son, offs_d, row_ok, out.to(O.dtype.element_ty), HEAD_DIM, BLOCK_D)
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _global_rows_fwd_kernel(
    QG, KG, VG, PK, PV, KIND, GIDX, GCNT, PART_O, PART_L,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    spkb, spkn, spkh, spvb, spvn, spvh,
    N, H, P, gidx_stride, g_pad, chunk, num_splits, n_parts, scale_log2, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_KIND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(num_splits + HAS_PREFIX, cdiv(G, BLOCK_G), B * H)`: a block of global queries against one key chunk
    (split `num_splits` is the prefix); writes the normalized partial output and its log2 LSE (flash-decoding)."""
    split = tl.program_id(0)
    pid_g = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cnt = tl.load(GCNT + b)
    g_rows = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g_rows < cnt
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gpos = tl.load(GIDX + b * gidx_stride + g_rows, mask=g_ok, other=0)
    q = _load_rows(QG + b * sqb + h * sqh, gpos, sqn, offs_d, g_ok, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if split < num_splits:
        k_base = KG + b * skb + h * skh
        v_base = VG + b * svb + h * svh
        start = split * chunk
        end = tl.minimum(start + chunk, N)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < end
            if HAS_KIND:
                ck = tl.load(KIND + b * N + cols, mask=col_ok, other=KIND_PAD)
                col_ok = col_ok & (ck != KIND_PAD)
            k = _load_rows(k_base, cols, skn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(v_base, cols, svn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, col_ok[None, :], None,
                                                 scale_log2, seed, bh, gpos, n0, dropout_p,
                                                 DOT_PREC, True, False, HAS_DROPOUT, True)
    elif HAS_PREFIX:  # the dummy prefix pointers must not even be compiled
        pk_base = PK + b * spkb + h * spkh
        pv_base = PV + b * spvb + h * spvh
        for p0 in range(0, P, BLOCK_N):
            pcols = p0 + offs_n
            p_ok = pcols < P
            k = _load_rows(pk_base, pcols, spkn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(pv_base, pcols, spvn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, p_ok[None, :], None,
                                                 scale_log2, seed, bh, gpos, _prefix_col0(N) + p0, dropout_p,
                                                 DOT_PREC, True, False, HAS_DROPOUT, True)

    live = l_i > 0
    out = acc * (inv_keep / tl.where(live, l_i, 1.0))[:, None]
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
    part = (bh * g_pad + g_rows).to(tl.int64) * n_parts + split
    tl.store(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=offs_d[None, :] < HEAD_DIM)
    tl.store(PART_L + part, lse)


@triton.jit
def _global_rows_merge_kernel(
    PART_O, PART_L, GIDX, GCNT, O, LSE, sob, son, soh,
    N, H, gidx_stride, g_pad, n_parts,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid `(G, B * H)`: merge one global row's partials by their LSE into `O` and `LSE` (replacing the local
    result written for that row)."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if g < tl.load(GCNT + b):
        pos = tl.load(GIDX + b * gidx_stride + g).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < n_parts
        part = (bh * g_pad + g).to(tl.int64) * n_parts + offs_s
        lse_s = tl.load(PART_L + part, mask=s_ok, other=float("-inf"))
        o_s = tl.load(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        m = tl.max(lse_s, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse_s - m_use)
        w_sum = tl.sum(w, 0)
        out = tl.sum(o_s * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
        o_ptrs = O + b * sob + pos * son + h * soh + offs_d
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
        lse = tl.where(w_sum > 0, m_use + tl.log2(tl.where(w_sum > 0, w_sum, 1.0)), float("inf"))
        tl.store(LSE + bh.to(tl.int64) * N + pos, lse)


# ------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, son, soh, sdb, sdn, sdh, N, H,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid `(cdiv(N, BLOCK_M), B * H)`: `DELTA[b, h, i] = sum_d dO * O` in fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, rows, son, offs_d, row_ok, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, offs_d, row_ok, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _probs_and_dscores(q, do, k, v, lse, delta, valid, col_bias, scale_log2, seed, bh, rows, cols, dropout_p,
                       inv_keep, DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, COLS_TILE: tl.constexpr):
    """Recomputed probabilities `p` (undropped), dropped-and-rescaled `p_drop`, and `dS = p * (dP - delta)`.
    Rows with `lse = +inf` (not local queries, out of range) get `p = 0`; masks as in `_online_softmax_step`."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    if HAS_BIAS:
        s = s + col_bias[None, :]
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, rows, cols, dropout_p, COLS_TILE, k.shape[0])
        dp = tl.where(keep, dp * inv_keep, 0.0)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
    else:
        p_drop = p
    ds = p * (dp - delta[:, None])
    return p_drop, ds


@triton.jit
def _local_dq_band(dq, q, do, lse, delta, k_base, v_base, KIND, b, bh, rows, start, end, N, window, skn, svn, offs_d,
                   scale_log2, seed, dropout_p, inv_keep, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, EDGE: tl.constexpr, HAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """Unscaled dQ of a row tile from the band key tiles `[start, end)`."""
    for n0 in range(start, end, BLOCK_N):
        k, v, col_bias, valid = _band_key_tile(k_base, v_base, KIND, b, rows, n0, N, window, skn, svn, offs_d,
                                               HEAD_DIM, BLOCK_D, BLOCK_N, EDGE, HAS_KIND)
        _, ds = _probs_and_dscores(q, do, k, v, lse, delta, valid, col_bias, scale_log2, seed, bh, rows, n0,
                                   dropout_p, inv_keep, DOT_PREC, EDGE, HAS_KIND, HAS_DROPOUT, True)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _local_rows_bwd_dq_kernel(
    Q, K, V, PK, PV, KIND, GIDX, GCNT, DO, LSE, DELTA, DQ,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    spkb, spkn, spkh, spvb, spvn, spvh, sdb, sdn, sdh, sdqb, sdqn, sdqh,
    N, H, P, gidx_stride, window, scale, scale_log2, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, HAS_KIND: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(cdiv(N, BLOCK_M), B * H)`: dQ of a tile of local rows from its band tiles, global keys and prefix."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, row_ok, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, offs_d, row_ok, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
    if HAS_KIND:
        rk = tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD)
        lse = tl.where(rk == KIND_LOCAL, lse, float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, mid_lo, mid_hi, hi = _band_tiles(m0, N, window, BLOCK_M, BLOCK_N)
    dq = _local_dq_band(dq, q, do, lse, delta, k_base, v_base, KIND, b, bh, rows, lo, mid_lo, N, window, skn, svn,
                        offs_d, scale_log2, seed, dropout_p, inv_keep, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                        HAS_KIND, HAS_DROPOUT, DOT_PREC)
    dq = _local_dq_band(dq, q, do, lse, delta, k_base, v_base, KIND, b, bh, rows, mid_lo, mid_hi, N, window, skn,
                        svn, offs_d, scale_log2, seed, dropout_p, inv_keep, HEAD_DIM, BLOCK_D, BLOCK_N,
                        False, HAS_KIND, HAS_DROPOUT, DOT_PREC)
    dq = _local_dq_band(dq, q, do, lse, delta, k_base, v_base, KIND, b, bh, rows, mid_hi, hi, N, window, skn, svn,
                        offs_d, scale_log2, seed, dropout_p, inv_keep, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                        HAS_KIND, HAS_DROPOUT, DOT_PREC)

    if HAS_GLOBAL:
        cnt = tl.load(GCNT + b)
        offs_g = tl.arange(0, BLOCK_G)
        for g0 in range(0, cnt, BLOCK_G):
            g_ok = g0 + offs_g < cnt
            gpos = tl.load(GIDX + b * gidx_stride + g0 + offs_g, mask=g_ok, other=0)
            k = _load_rows(k_base, gpos, skn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(v_base, gpos, svn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
            _, ds = _probs_and_dscores(q, do, k, v, lse, delta, g_ok[None, :], None, scale_log2, seed, bh, rows,
                                       gpos, dropout_p, inv_keep, DOT_PREC, True, False, HAS_DROPOUT, False)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    if HAS_PREFIX:
        pk_base = PK + b * spkb + h * spkh
        pv_base = PV + b * spvb + h * spvh
        for p0 in range(0, P, BLOCK_N):
            pcols = p0 + offs_n
            p_ok = pcols < P
            k = _load_rows(pk_base, pcols, spkn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(pv_base, pcols, spvn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            _, ds = _probs_and_dscores(q, do, k, v, lse, delta, p_ok[None, :], None, scale_log2, seed, bh, rows,
                                       _prefix_col0(N) + p0, dropout_p, inv_keep, DOT_PREC, True, False,
                                       HAS_DROPOUT, True)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    _store_rows(DQ + b * sdqb + h * sdqh, rows, sdqn, offs_d, row_ok, (dq * scale).to(DQ.dtype.element_ty),
                HEAD_DIM, BLOCK_D)


@triton.jit
def _band_dkdv_rows(dk, dv, k, v, col_ok, col_bias, q_base, do_base, LSE, DELTA, KIND, b, bh, cols, start, end, N,
                    window, sqn, sdn, offs_d, scale_log2, seed, col0, dropout_p, inv_keep, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr, HAS_KIND: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Unscaled dK/dV of the band key tile `cols = col0 + arange(BLOCK_N)` from the query tiles `[start, end)` (local
    rows only, via `LSE`)."""
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q = _load_rows(q_base, rows, sqn, offs_d, row_ok, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, rows, sdn, offs_d, row_ok, HEAD_DIM, BLOCK_D)
        lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
        if HAS_KIND:
            rk = tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD)
            lse = tl.where(rk == KIND_LOCAL, lse, float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        valid = None
        if EDGE:
            valid = col_ok[None, :] & (tl.abs(rows[:, None] - cols[None, :]) <= window)
        p_drop, ds = _probs_and_dscores(q, do, k, v, lse, delta, valid, col_bias, scale_log2, seed, bh, rows, col0,
                                        dropout_p, inv_keep, DOT_PREC, EDGE, HAS_KIND, HAS_DROPOUT, True)
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _band_keys_bwd_dkdv_kernel(
    Q, K, V, KIND, DO, LSE, DELTA, DK, DV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    N, H, P, window, scale, scale_log2, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(cdiv(N, BLOCK_N), B * H)`: dK/dV of a tile of band keys from the local queries within `±window`.
    Writes every row of the tile: columns that are global or padding get 0 here (global keys are finalized from
    the partials of `_global_keys_bwd_kernel` afterwards)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, cols, skn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + b * svb + h * svh, cols, svn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
    col_bias = None
    if HAS_KIND:
        ck = tl.load(KIND + b * N + cols, mask=col_ok, other=KIND_PAD)
        col_bias = tl.where(ck == KIND_LOCAL, 0.0, float("-inf"))
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Rows past N read as 0 with lse = +inf (p = 0): only the band needs masking when iterating query tiles.
    lo, mid_lo, mid_hi, hi = _band_tiles(n0, N, window, BLOCK_N, BLOCK_M)
    dk, dv = _band_dkdv_rows(dk, dv, k, v, col_ok, col_bias, q_base, do_base, LSE, DELTA, KIND, b, bh, cols, lo,
                             mid_lo, N, window, sqn, sdn, offs_d, scale_log2, seed, n0, dropout_p, inv_keep,
                             HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_KIND, HAS_DROPOUT, DOT_PREC)
    dk, dv = _band_dkdv_rows(dk, dv, k, v, col_ok, col_bias, q_base, do_base, LSE, DELTA, KIND, b, bh, cols, mid_lo,
                             mid_hi, N, window, sqn, sdn, offs_d, scale_log2, seed, n0, dropout_p, inv_keep,
                             HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_KIND, HAS_DROPOUT, DOT_PREC)
    dk, dv = _band_dkdv_rows(dk, dv, k, v, col_ok, col_bias, q_base, do_base, LSE, DELTA, KIND, b, bh, cols, mid_hi,
                             hi, N, window, sqn, sdn, offs_d, scale_log2, seed, n0, dropout_p, inv_keep,
                             HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_KIND, HAS_DROPOUT, DOT_PREC)

    _store_rows(DK + b * sdkb + h * sdkh, cols, sdkn, offs_d, col_ok, (dk * scale).to(DK.dtype.element_ty),
                HEAD_DIM, BLOCK_D)
    _store_rows(DV + b * sdvb + h * sdvh, cols, sdvn, offs_d, col_ok, dv.to(DV.dtype.element_ty), HEAD_DIM, BLOCK_D)


@triton.jit
def _key_block_bwd_from_local_rows(dk, dv, q_base, do_base, LSE, DELTA, KIND, k, v, key_ok, key_cols, b, bh, N,
                                   start, end, sqn, sdn, offs_d, scale_log2, seed, dropout_p, inv_keep,
                                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                   HAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                                   COLS_TILE: tl.constexpr):
    """Adds to `dk, dv` (unscaled) the contributions of the local query rows `[start, end)` to one key block
    (`key_cols`, `COLS_TILE`: the keys' positions, as in `_dropout_keep`)."""
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        q = _load_rows(q_base, rows, sqn, offs_d, row_ok, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, rows, sdn, offs_d, row_ok, HEAD_DIM, BLOCK_D)
        lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
        if HAS_KIND:
            rk = tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD)
            lse = tl.where(rk == KIND_LOCAL, lse, float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        p_drop, ds = _probs_and_dscores(q, do, k, v, lse, delta, key_ok[None, :], None, scale_log2, seed, bh, rows,
                                        key_cols, dropout_p, inv_keep, DOT_PREC, True, False, HAS_DROPOUT, COLS_TILE)
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _global_keys_bwd_kernel(
    Q, K, V, PK, PV, KIND, GIDX, GCNT, DO, LSE, DELTA, GPART_K, GPART_V, PPART_K, PPART_V,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sdb, sdn, sdh,
    N, H, P, gidx_stride, q_chunk, num_chunks, scale_log2, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, HAS_KIND: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(num_chunks, B * H)`: dK/dV (unscaled, fp32) of the global keys (through the local `k, v`) and of the
    prefix keys from the local queries of one chunk of `q_chunk` rows, written as per-chunk partials
    `GPART_* (B*H, num_chunks, G, D)`, `PPART_* (B*H, num_chunks, P, D)` that the launcher sums: every local query
    feeds these few keys, so the work is split over query chunks instead of one program walking all N rows."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = chunk * q_chunk
    end = tl.minimum(start + q_chunk, N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    if HAS_GLOBAL:
        cnt = tl.load(GCNT + b)
        offs_g = tl.arange(0, BLOCK_G)
        for g0 in range(0, cnt, BLOCK_G):
            g_rows = g0 + offs_g
            g_ok = g_rows < cnt
            gpos = tl.load(GIDX + b * gidx_stride + g_rows, mask=g_ok, other=0)
            k = _load_rows(K + b * skb + h * skh, gpos, skn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(V + b * svb + h * svh, gpos, svn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
            dk = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            dk, dv = _key_block_bwd_from_local_rows(dk, dv, q_base, do_base, LSE, DELTA, KIND, k, v, g_ok, gpos, b,
                                                    bh, N, start, end, sqn, sdn, offs_d, scale_log2, seed,
                                                    dropout_p, inv_keep, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                    HAS_KIND, HAS_DROPOUT, DOT_PREC, False)
            part = (bh.to(tl.int64) * num_chunks + chunk) * gidx_stride + g_rows
            _store_rows(GPART_K, part, HEAD_DIM, offs_d, g_ok, dk, HEAD_DIM, BLOCK_D)
            _store_rows(GPART_V, part, HEAD_DIM, offs_d, g_ok, dv, HEAD_DIM, BLOCK_D)
    if HAS_PREFIX:
        offs_n = tl.arange(0, BLOCK_N)
        for p0 in range(0, P, BLOCK_N):
            pcols = p0 + offs_n
            p_ok = pcols < P
            k = _load_rows(PK + b * spkb + h * spkh, pcols, spkn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            v = _load_rows(PV + b * spvb + h * spvh, pcols, spvn, offs_d, p_ok, HEAD_DIM, BLOCK_D)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dk, dv = _key_block_bwd_from_local_rows(dk, dv, q_base, do_base, LSE, DELTA, KIND, k, v, p_ok,
                                                    _prefix_col0(N) + p0, b, bh, N, start, end, sqn, sdn, offs_d,
                                                    scale_log2, seed, dropout_p, inv_keep, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                    HAS_KIND, HAS_DROPOUT, DOT_PREC, True)
            part = (bh.to(tl.int64) * num_chunks + chunk) * P + pcols
            _store_rows(PPART_K, part, HEAD_DIM, offs_d, p_ok, dk, HEAD_DIM, BLOCK_D)
            _store_rows(PPART_V, part, HEAD_DIM, offs_d, p_ok, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _global_rows_bwd_tile(q, do, lse, delta, g_ok, gpos, k, v, col_ok, col0, bh, scale_log2, dropout_p, inv_keep,
                          seed, DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """One (global-query block, key tile) pair: unscaled dQ part `(BLOCK_G, D)`, dK and dV parts `(BLOCK_N, D)`.
    The tile's keys are the positions `col0 + arange(BLOCK_N)`, `col0` a multiple of 4."""
    valid = g_ok[:, None] & col_ok[None, :]
    p_drop, ds = _probs_and_dscores(q, do, k, v, lse, delta, valid, None, scale_log2, seed, bh, gpos, col0, dropout_p,
                                    inv_keep, DOT_PREC, True, False, HAS_DROPOUT, True)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dv = tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PREC)
    return dq, dk, dv


@triton.jit
def _global_rows_bwd_keys(KEYS, VALS, skn, svn, KIND, GIDX, DO, LSE, DELTA, GDQ, qg_base, do_base, b, bh, N, cnt,
                          gidx_stride, key_start, key_end, col_offset, sqn, sdn, scale_log2, dropout_p,
                          inv_keep, seed, DK_OUT, DV_OUT, sdkn, sdvn, dk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                          SINGLE_G: tl.constexpr, CHECK_PAD: tl.constexpr, ATOMIC_KV: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """The global queries against the key tiles of `[key_start, key_end)`; dK/dV of each tile are complete after the
    inner loop over global-query blocks and are stored (or, for the prefix, atomically added to fp32 buffers); dQ is
    atomically added to `GDQ` once per program when all global queries fit one block, else once per tile."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    if SINGLE_G:
        g_ok = offs_g < cnt
        gpos = tl.load(GIDX + b * gidx_stride + offs_g, mask=g_ok, other=0)
        q1 = _load_rows(qg_base, gpos, sqn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
        do1 = _load_rows(do_base, gpos, sdn, offs_d, g_ok, HEAD_DIM, BLOCK_D)
        lse1 = tl.load(LSE + bh.to(tl.int64) * N + gpos, mask=g_ok, other=float("inf"))
        delta1 = tl.load(DELTA + bh.to(tl.int64) * N + gpos, mask=g_ok, other=0.0)
        dq1 = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(key_start, key_end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < key_end
        store_ok = col_ok
        if CHECK_PAD:
            ck = tl.load(KIND + b * N + cols, mask=col_ok, other=KIND_PAD)
            col_ok = col_ok & (ck != KIND_PAD)
        k = _load_rows(KEYS, cols, skn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
        v = _load_rows(VALS, cols, svn, offs_d, col_ok, HEAD_DIM, BLOCK_D)
        if SINGLE_G:
            dq_t, dk, dv = _global_rows_bwd_tile(q1, do1, lse1, delta1, g_ok, gpos, k, v, col_ok, col_offset + n0,
                                                 bh, scale_log2, dropout_p, inv_keep, seed, DOT_PREC,
                                                 HAS_DROPOUT)
            dq1 += dq_t
        else:
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for g0 in range(0, cnt, BLOCK_G):
                g_rows = g0 + offs_g
                g_ok2 = g_rows < cnt
                gpos2 = tl.load(GIDX + b * gidx_stride + g_rows, mask=g_ok2, other=0)
                q = _load_rows(qg_base, gpos2, sqn, offs_d, g_ok2, HEAD_DIM, BLOCK_D)
                do = _load_rows(do_base, gpos2, sdn, offs_d, g_ok2, HEAD_DIM, BLOCK_D)
                lse = tl.load(LSE + bh.to(tl.int64) * N + gpos2, mask=g_ok2, other=float("inf"))
                delta = tl.load(DELTA + bh.to(tl.int64) * N + gpos2, mask=g_ok2, other=0.0)
                dq_t, dk_t, dv_t = _global_rows_bwd_tile(q, do, lse, delta, g_ok2, gpos2, k, v, col_ok,
                                                         col_offset + n0, bh, scale_log2, dropout_p,
                                                         inv_keep, seed, DOT_PREC, HAS_DROPOUT)
                _atomic_add_rows(GDQ, bh * gidx_stride + g_rows, offs_d, g_ok2, dq_t, HEAD_DIM)
                dk += dk_t
                dv += dv_t
        dk = dk * dk_scale
        if ATOMIC_KV:
            _atomic_add_rows(DK_OUT, cols, offs_d, store_ok, dk, HEAD_DIM)
            _atomic_add_rows(DV_OUT, cols, offs_d, store_ok, dv, HEAD_DIM)
        else:
            _store_rows(DK_OUT, cols, sdkn, offs_d, store_ok, dk.to(DK_OUT.dtype.element_ty), HEAD_DIM, BLOCK_D)
            _store_rows(DV_OUT, cols, sdvn, offs_d, store_ok, dv.to(DV_OUT.dtype.element_ty), HEAD_DIM, BLOCK_D)
    if SINGLE_G:
        _atomic_add_rows(GDQ, bh * gidx_stride + offs_g, offs_d, g_ok, dq1, HEAD_DIM)


@triton.jit(do_not_specialize=["seed"])
def _global_rows_bwd_kernel(
    QG, KG, VG, PK, PV, KIND, GIDX, GCNT, DO, LSE, DELTA, DKG, DVG, GDQ, PDK, PDV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    spkb, spkn, spkh, spvb, spvn, spvh, sdb, sdn, sdh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    N, H, P, gidx_stride, chunk, num_splits, scale, scale_log2, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    SINGLE_G: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid `(num_splits + HAS_PREFIX, B * H)`: the global queries' backward, split along the keys (flash-decoding
    style). Split `s` owns the key tiles of `[s * chunk, (s + 1) * chunk)` and writes their dK_global, dV_global;
    the unscaled dQ_global goes to the fp32 `GDQ (B*H, G, D)`; the last split does the prefix keys, adding into the
    fp32 `PDK/PDV (B*H, P, D)`, which already hold the local rows' sums."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cnt = tl.load(GCNT + b)
    qg_base = QG + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    if split < num_splits:
        start = split * chunk
        _global_rows_bwd_keys(KG + b * skb + h * skh, VG + b * svb + h * svh, skn, svn, KIND, GIDX, DO, LSE, DELTA,
                              GDQ, qg_base, do_base, b, bh, N, cnt, gidx_stride, start, tl.minimum(start + chunk, N),
                              0, sqn, sdn, scale_log2, dropout_p, inv_keep, seed,
                              DKG + b * sdkb + h * sdkh, DVG + b * sdvb + h * sdvh, sdkn, sdvn, scale,
                              HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_G, SINGLE_G, True, False, HAS_DROPOUT, DOT_PREC)
    elif HAS_PREFIX:
        _global_rows_bwd_keys(PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, KIND, GIDX, DO, LSE,
                              DELTA, GDQ, qg_base, do_base, b, bh, N, cnt, gidx_stride, 0, P, _prefix_col0(N), sqn, sdn,
                              scale_log2, dropout_p, inv_keep, seed, PDK + bh.to(tl.int64) * P * HEAD_DIM,
                              PDV + bh.to(tl.int64) * P * HEAD_DIM, HEAD_DIM, HEAD_DIM, 1.0,
                              HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_G, SINGLE_G, False, True, HAS_DROPOUT, DOT_PREC)


@triton.jit
def _scatter_global_rows_kernel(SRC, GIDX, GCNT, DST, sdb, sdn, sdh, H, gidx_stride, factor,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid `(G, B * H)`: `DST[b, GIDX[b, g], h] = factor * SRC[b * H + h, g]` for `g < GCNT[b]`."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if g < tl.load(GCNT + b):
        pos = tl.load(GIDX + b * gidx_stride + g).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        val = tl.load(SRC + (bh.to(tl.int64) * gidx_stride + g) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        tl.store(DST + b * sdb + pos * sdn + h * sdh + offs_d, (val * factor).to(DST.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------------------------------------------------
# Launchers (contract: `prefix_kernels.custom_op`)
# ------------------------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _unit_d(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels address `D` with unit stride; anything else is copied once."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _config(head_dim: int, n: int, num_global: int, dot_prec: str, dtype_bytes: int) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = min(64, max(16, triton.next_power_of_2(max(num_global, 1))))
    if SMALL_TILES:
        # Small, unequal tiles: cheap on the CPU and they make short test sequences cross many tile edges.
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=16, BLOCK_G=16, BWD_M=16, BWD_N=32, CHUNK=32, Q_CHUNK=32,
                    num_warps=4, num_stages=1)
    chunks = dict(CHUNK=1024 if n > 4096 else 512, Q_CHUNK=1024 if n > 4096 else 512)
    if dot_prec == "ieee":
        # IEEE fp32 dots run on FMA units, whose operand layouts need far more registers than tensor-core tiles:
        # with 64 x 64 tiles every kernel spilled kilobytes per thread to local memory when compiled for sm_90
        # (`benchmarks/kernel_resources.py`). 32 x 32 tiles with 8 warps spill nothing for D <= 64 (at D = 128 the
        # backward dK/dV kernels keep ~0.5 KB of stack).
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=32, BLOCK_G=block_g, BWD_M=32, BWD_N=32, **chunks,
                    num_warps=8, num_stages=2)
    big_d = block_d > 64
    if dot_prec == "tf32" and dtype_bytes == 4:
        # TF32 tensor cores on fp32 tiles (twice the bytes of bf16): the bf16 configuration spilled in the backward
        # and needed up to 197 KB of shared memory at D = 128 (more than an A100 has). These compile with at most 24
        # bytes of spill (the forward at D = 128) in at most 100 KB. Chosen from compiled resources, not yet timed.
        tn = 32 if big_d else 64
        return dict(BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=tn, BLOCK_G=block_g, BWD_M=32, BWD_N=tn, **chunks,
                    num_warps=4, num_stages=2)
    # Measured on H200 (Triton 3.6, B=4, N=16384, H=12, D=64, w=256, bf16): 64 x 64 tiles, 4 warps, 3 stages beat
    # 128 x 64 and 128 x 128 for the band (fewer wasted columns at the band's edges).
    return dict(BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=64, BLOCK_G=block_g, BWD_M=64, BWD_N=64, **chunks,
                num_warps=8 if big_d else 4, num_stages=2 if big_d else 3)


def _kind(key_padding_mask, global_idx, global_count, b: int, n: int, device) -> torch.Tensor | None:
    """`(B, N)` int8 token kinds (0 local, 1 global, 2 padding) built on the device, no host sync."""
    if key_padding_mask is None and global_idx is None:
        return None
    kind = torch.zeros(b, n + 1, dtype=torch.int8, device=device)
    if global_idx is not None:
        used = torch.arange(global_idx.shape[1], device=device)[None, :] < global_count[:, None]
        kind.scatter_(1, torch.where(used, global_idx.long(), n), KIND_GLOBAL.value)
    kind = kind[:, :n]
    if key_padding_mask is not None:
        kind = kind.masked_fill(key_padding_mask, KIND_PAD.value)
    return kind.contiguous()


def _dummy(device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


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


def forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            *, window: int, scale: float, dropout_p: float, seed: int, max_global: int):
    """Returns `out (B, N, H, D)` in `q.dtype` and `lse (B, H, N)` fp32 (log2 domain, `+inf` = no key)."""
    q, k, v, q_global, k_global, v_global, prefix_k, prefix_v = map(
        _unit_d, (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v))
    b, n, h, d = q.shape
    dev = q.device
    has_global = global_idx is not None and max_global > 0
    has_prefix = prefix_k is not None
    p = prefix_k.shape[1] if has_prefix else 0
    dot_prec = _dot_precision(q.dtype)
    cfg = _config(d, n, max_global if has_global else 0, dot_prec, q.element_size())
    kind = _kind(key_padding_mask, global_idx if has_global else None, global_count, b, n, dev)
    out = _empty_out((b, n, h, d), q.dtype, dev)
    lse = _empty_out((b, h, n), torch.float32, dev)
    if n == 0:
        return out, lse
    dummy = _dummy(dev)
    gidx = global_idx if has_global else dummy
    gcnt = global_count if has_global else dummy
    gstride = global_idx.stride(0) if has_global else 0
    scale_log2 = scale * LOG2E
    inv_keep = 1.0 / (1.0 - dropout_p)
    common = dict(HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], HAS_PREFIX=has_prefix, HAS_DROPOUT=dropout_p > 0,
                  DOT_PREC=dot_prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    pk = prefix_k if has_prefix else dummy
    pv = prefix_v if has_prefix else dummy

    _local_rows_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), b * h)](
        q, k, v, pk, pv, kind if kind is not None else dummy, gidx, gcnt, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v), *_strides(out),
        n, h, p, gstride, window, scale_log2, dropout_p, inv_keep, seed,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], HAS_KIND=kind is not None,
        HAS_GLOBAL=has_global, **common)

    if has_global:
        block_g = cfg["BLOCK_G"]
        g_pad = triton.cdiv(max_global, block_g) * block_g
        chunk = cfg["CHUNK"]
        num_splits = triton.cdiv(n, chunk)
        n_parts = num_splits + int(has_prefix)
        part_o = torch.empty((b * h, g_pad, n_parts, d), dtype=torch.float32, device=dev)
        part_l = torch.empty((b * h, g_pad, n_parts), dtype=torch.float32, device=dev)
        _global_rows_fwd_kernel[(n_parts, g_pad // block_g, b * h)](
            q_global, k_global, v_global, pk, pv, kind, gidx, gcnt, part_o, part_l,
            *_strides(q_global), *_strides(k_global), *_strides(v_global), *_strides(prefix_k),
            *_strides(prefix_v), n, h, p, gstride, g_pad, chunk, num_splits, n_parts, scale_log2, dropout_p, inv_keep,
            seed, BLOCK_N=cfg["BLOCK_N"], BLOCK_G=block_g, HAS_KIND=kind is not None, **common)
        _global_rows_merge_kernel[(max_global, b * h)](
            part_o, part_l, gidx, gcnt, out, lse, *_strides(out), n, h, gstride, g_pad, n_parts,
            HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(n_parts)))
    return out, lse


def backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
             global_count, out, lse, *, window: int, scale: float, dropout_p: float, seed: int, max_global: int):
    """Returns `(dq, dk, dv, dq_global, dk_global, dv_global, dprefix_k, dprefix_v)`, `None` where the input is."""
    grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, out = map(
        _unit_d, (grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, out))
    b, n, h, d = q.shape
    dev = q.device
    has_global = global_idx is not None and max_global > 0 and q_global is not None
    has_prefix = prefix_k is not None
    p = prefix_k.shape[1] if has_prefix else 0
    dot_prec = _dot_precision(q.dtype)
    cfg = _config(d, n, max_global if has_global else 0, dot_prec, q.element_size())
    kind = _kind(key_padding_mask, global_idx if has_global else None, global_count, b, n, dev)
    dq = _empty_out((b, n, h, d), q.dtype, dev)
    dk = _empty_out((b, n, h, d), q.dtype, dev)
    dv = _empty_out((b, n, h, d), q.dtype, dev)
    dq_g = dk_g = dv_g = None
    if q_global is not None:
        # dq_global is 0 except on global rows, which the scatter below fills.
        dq_g = torch.zeros((b, n, h, d), dtype=q.dtype, device=dev)
        dk_g = _empty_out((b, n, h, d), q.dtype, dev)
        dv_g = _empty_out((b, n, h, d), q.dtype, dev)
    if n == 0:
        return dq, dk, dv, dq_g, dk_g, dv_g, *((torch.zeros_like(prefix_k),) * 2 if has_prefix else (None, None))
    dummy = _dummy(dev)
    gidx = global_idx if has_global else dummy
    gcnt = global_count if has_global else dummy
    gstride = global_idx.stride(0) if has_global else 0
    scale_log2 = scale * LOG2E
    inv_keep = 1.0 / (1.0 - dropout_p)
    kind_t = kind if kind is not None else dummy
    common = dict(HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], HAS_DROPOUT=dropout_p > 0, DOT_PREC=dot_prec,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    delta = torch.empty((b, h, n), dtype=torch.float32, device=dev)
    _bwd_preprocess_kernel[(triton.cdiv(n, 64), b * h)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), n, h, HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"],
        BLOCK_M=64)

    pk = prefix_k if has_prefix else dummy
    pv = prefix_v if has_prefix else dummy
    _local_rows_bwd_dq_kernel[(triton.cdiv(n, cfg["BWD_M"]), b * h)](
        q, k, v, pk, pv, kind_t, gidx, gcnt, grad_out, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v),
        *_strides(grad_out), *_strides(dq), n, h, p, gstride, window, scale, scale_log2, dropout_p, inv_keep,
        seed, BLOCK_M=cfg["BWD_M"], BLOCK_N=cfg["BWD_N"], BLOCK_G=cfg["BLOCK_G"], HAS_KIND=kind is not None,
        HAS_GLOBAL=has_global, HAS_PREFIX=has_prefix, **common)
    _band_keys_bwd_dkdv_kernel[(triton.cdiv(n, cfg["BWD_N"]), b * h)](
        q, k, v, kind_t, grad_out, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        n, h, p, window, scale, scale_log2, dropout_p, inv_keep, seed,
        BLOCK_M=cfg["BWD_M"], BLOCK_N=cfg["BWD_N"], HAS_KIND=kind is not None, **common)

    # Keys that every local query sees (global keys through k, v; the prefix): fp32 per-query-chunk partials,
    # summed here (deterministic, no atomics on these hot addresses).
    gdk = gdv = pdk = pdv = dummy
    if has_global or has_prefix:
        q_chunk = cfg["Q_CHUNK"]
        num_chunks = triton.cdiv(n, q_chunk)
        parts = [dummy] * 4
        if has_global:
            parts[0:2] = (torch.empty((b * h, num_chunks, gstride, d), dtype=torch.float32, device=dev)
                          for _ in range(2))
        if has_prefix:
            parts[2:4] = (torch.empty((b * h, num_chunks, p, d), dtype=torch.float32, device=dev) for _ in range(2))
        _global_keys_bwd_kernel[(num_chunks, b * h)](
            q, k, v, pk, pv, kind_t, gidx, gcnt, grad_out, lse, delta, *parts,
            *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v),
            *_strides(grad_out), n, h, p, gstride, q_chunk, num_chunks, scale_log2, dropout_p, inv_keep, seed,
            BLOCK_M=cfg["BWD_M"], BLOCK_N=cfg["BWD_N"], BLOCK_G=cfg["BLOCK_G"], HAS_KIND=kind is not None,
            HAS_GLOBAL=has_global, HAS_PREFIX=has_prefix, **common)
        if has_global:
            gdk, gdv = parts[0].sum(1), parts[1].sum(1)
        if has_prefix:
            pdk, pdv = parts[2].sum(1), parts[3].sum(1)

    if has_global:
        gdq = torch.zeros((b * h, gstride, d), dtype=torch.float32, device=dev)
        chunk = cfg["CHUNK"]
        num_splits = triton.cdiv(n, chunk)
        _global_rows_bwd_kernel[(num_splits + int(has_prefix), b * h)](
            q_global, k_global, v_global, pk, pv, kind_t, gidx, gcnt, grad_out, lse, delta, dk_g, dv_g, gdq,
            pdk, pdv, *_strides(q_global), *_strides(k_global), *_strides(v_global), *_strides(prefix_k),
            *_strides(prefix_v), *_strides(grad_out), *_strides(dk_g), *_strides(dv_g),
            n, h, p, gstride, chunk, num_splits, scale, scale_log2, dropout_p, inv_keep, seed,
            BLOCK_N=cfg["BWD_N"], BLOCK_G=cfg["BLOCK_G"], SINGLE_G=max_global <= cfg["BLOCK_G"],
            HAS_PREFIX=has_prefix, **common)
        for src, dst, factor in ((gdk, dk, scale), (gdv, dv, 1.0), (gdq, dq_g, scale)):
            _scatter_global_rows_kernel[(max_global, b * h)](
                src, gidx, gcnt, dst, *_strides(dst), h, gstride, factor, HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"])
    elif q_global is not None:
        # No token is global: the global projections get zero gradients.
        dk_g.zero_()
        dv_g.zero_()

    dpk_out = dpv_out = None
    if has_prefix:
        dpk_out = (pdk * scale).view(b, h, p, d).transpose(1, 2).to(q.dtype).contiguous()
        dpv_out = pdv.view(b, h, p, d).transpose(1, 2).to(q.dtype).contiguous()
    return dq, dk, dv, dq_g, dk_g, dv_g, dpk_out, dpv_out


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
    return None


def attention(args) -> torch.Tensor:
    from .custom_op import fused_attention

    return fused_attention(args, "triton")


