"""Forward kernels: `_attention_fwd_kernel` (local-row tiles and the global rows' key splits in one grid) and
`_global_rows_merge_kernel` (the splits merged by their log-sum-exp). Launched by `launch.forward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    KIND_LOCAL,
    KIND_PAD,
    M_FLOOR,
    _band_tiles,
    _doc_clip,
    _doc_of,
    _doc_span,
    _gather_keys,
    _has_special,
    _in_band,
    _key_split,
    _load_at,
    _load_rows,
    _prefix_col0,
    _prefix_keys,
    _program,
    _same_doc_or_prefix,
    _shared_block,
    _softmax_update,
    _split_key_tile,
    _store_rows,
)

# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _local_rows_fwd(pid_m, bh, b, h, Q, K, V, PK, PV, KIND, SPECIAL, GIDX, GCNT, DOCS, PSCALE, O, LSE,
                    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sob, son, soh,
                    N, P, gidx_stride, doc_plane, lse_plane, window, qk_scale, dropout_p, inv_keep, seed,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_N: tl.constexpr, HAS_KIND: tl.constexpr,
                    HAS_GLOBAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr = False, SEPARATE: tl.constexpr = False):
    """A tile of `BLOCK_M` query rows: its band key tiles, then its row's global keys, then the prefix, in one
    online softmax (with `SEPARATE`, the prefix in a second one, added scaled by `PSCALE[h]`). Writes `O` and `LSE`
    of the tile (0 and `+inf` on rows that are not local queries; with `SEPARATE`, the prefix softmax's LSE at
    `lse_plane` after the text's). `EVEN_N`: `N` is a multiple of `BLOCK_N`, so no band tile reaches past the
    sequence. `HAS_DOC`: the band and the global slots are clipped to the tile's documents; only a tile whose rows
    straddle a document boundary tests every element's document."""
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    m_i = tl.full([BLOCK_M], M_FLOOR, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_DOC:
        doc_lo, doc_hi, g_lo, g_hi, straddle = _doc_span(DOCS, doc_plane, b, N, m0, tl.minimum(m0 + BLOCK_M, N) - 1)
        row_doc = _doc_of(DOCS, b, N, rows, row_ok)
        lo, mid_lo, mid_hi, hi = _band_tiles(m0, N, window, FIXED=BLOCK_M, STEP=BLOCK_N, key_lo=doc_lo,
                                             key_hi=doc_hi, CLIP=True)
    else:
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
        if HAS_DOC:
            masked = masked | straddle
        if HAS_KIND:
            if band_special:
                masked = masked | _has_special(SPECIAL, b, N, n0, n0 + BLOCK_N)
        if masked:
            cols = n0 + offs_n
            ok = _in_band(rows[:, None], cols[None, :], N, window)
            if HAS_KIND:
                ok = ok & (tl.load(KIND + b * N + cols, mask=cols < N, other=KIND_PAD) == KIND_LOCAL)[None, :]
            if HAS_DOC:
                ok = ok & (row_doc[:, None] == _doc_of(DOCS, b, N, cols, cols < N)[None, :])
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, n0, dropout_p,
                                        COLS_TILE=True, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)
        k_tile += BLOCK_N * skn
        v_tile += BLOCK_N * svn

    if HAS_DOC:
        # The tile's documents' slots of the compact (position-ordered) global list.
        g_start = g_lo
        cnt = g_hi
    else:
        g_start = 0
        cnt = 0
        if HAS_GLOBAL:
            cnt = tl.load(GCNT + b)
    pk_base = PK + b * spkb + h * spkh
    pv_base = PV + b * spvb + h * spvh
    if SEPARATE or HAS_DOC:
        # Two blocks: "separate" mode's two softmaxes; with documents, the global keys' document test stays out of
        # the prefix block (in one block of shared keys it costs more than the two blocks).
        if HAS_GLOBAL:
            for g0 in range(g_start, cnt, BLOCK_G):
                k, v, g_ok, gpos = _gather_keys(k_base, v_base, skn, svn, GIDX + b * gidx_stride, g0, cnt,
                                                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_G=BLOCK_G)
                ok = g_ok[None, :]
                if HAS_DOC:
                    ok = ok & (row_doc[:, None] == _doc_of(DOCS, b, N, gpos, g_ok)[None, :])
                s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
                acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, gpos, dropout_p,
                                                COLS_TILE=False, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)
        if SEPARATE:
            # The text softmax ends here; the prefix gets its own running normaliser. Global rows too are not local
            # queries: their result is the global branch's (merged later), or 0 with local rows only.
            live = l_i > 0
            if HAS_KIND:
                local_row = tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD) == KIND_LOCAL
                live = live & local_row
            l_safe = tl.where(live, l_i, 1.0)
            out = tl.where(live[:, None], acc * (inv_keep / l_safe)[:, None], 0.0)
            tl.store(LSE + bh.to(tl.int64) * N + rows, tl.where(live, m_i + tl.log2(l_safe), float("inf")), mask=row_ok)
            m_i = tl.full([BLOCK_M], M_FLOOR, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_PREFIX:
            for p0 in range(0, P, BLOCK_N):
                k, v, p_ok, pcols = _prefix_keys(pk_base, pv_base, spkn, spvn, p0, P, HEAD_DIM=HEAD_DIM,
                                                 BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
                s = tl.where(p_ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
                acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, _prefix_col0(N) + p0,
                                                dropout_p, COLS_TILE=True, DOT_PREC=DOT_PREC,
                                                HAS_DROPOUT=HAS_DROPOUT)
    elif HAS_GLOBAL or HAS_PREFIX:
        # "joint": the tile's global keys and the prefix keys are one list, walked in blocks of `BLOCK_N` keys
        # (one block at the headline), in the same softmax as the band; half as many with dropout at D > 64,
        # where a block's one Philox call per element (its keys' positions are not consecutive) would spill.
        SHARED_N: tl.constexpr = BLOCK_N // 2 if HAS_DROPOUT and BLOCK_D > 64 else BLOCK_N
        n_g = 0
        if HAS_GLOBAL:
            n_g = cnt - g_start
        n_p = 0
        if HAS_PREFIX:
            n_p = P
        else:
            pk_base = k_base  # (a placeholder of another dtype: never read, but the pointers are selected)
            pv_base = v_base
        for c0 in range(0, n_g + n_p, SHARED_N):
            k, v, ok, is_g, is_p, cols, gpos = _shared_block(k_base, v_base, skn, svn, GIDX + b * gidx_stride,
                                                             g_start, n_g, pk_base, pv_base, spkn, spvn, n_p,
                                                             _prefix_col0(N), c0, HEAD_DIM=HEAD_DIM,
                                                             BLOCK_D=BLOCK_D, BLOCK_S=SHARED_N)
            s = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, qk_scale, seed, bh, rows, cols, dropout_p,
                                            COLS_TILE=False, DOT_PREC=DOT_PREC, HAS_DROPOUT=HAS_DROPOUT)

    live = l_i > 0
    if HAS_KIND:
        if SEPARATE:
            live = live & local_row
        else:
            # Global rows too: their result is the global branch's (merged later), or 0 with local rows only.
            live = live & (tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD) == KIND_LOCAL)
    l_safe = tl.where(live, l_i, 1.0)
    if SEPARATE:
        out += tl.where(live[:, None], acc * (inv_keep / l_safe)[:, None], 0.0) * tl.load(PSCALE + h)
        lse_base = LSE + lse_plane  # the prefix softmax's plane
    else:
        out = tl.where(live[:, None], acc * (inv_keep / l_safe)[:, None], 0.0)
        lse_base = LSE
    _store_rows(O + b * sob + h * soh, rows, son, row_ok, out.to(O.dtype.element_ty), HEAD_DIM=HEAD_DIM,
                BLOCK_D=BLOCK_D)
    tl.store(lse_base + bh.to(tl.int64) * N + rows, tl.where(live, m_i + tl.log2(l_safe), float("inf")), mask=row_ok)


@triton.jit
def _global_rows_fwd_split(split, pid_g, bh, b, h, QG, KG, VG, PK, PV, KIND, GIDX, GCNT, DOCS, PART_O, PART_L,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh,
                           N, P, gidx_stride, g_pad, chunk, num_splits, n_parts, doc_plane, qk_scale, dropout_p,
                           inv_keep, seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_G: tl.constexpr, HAS_KIND: tl.constexpr, HAS_PREFIX: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr = False):
    """A block of global queries against one key chunk (split `num_splits` is the prefix, `PK, PV`: the global
    rows' prefix): the normalized partial output and its log2 LSE, merged later by `_global_rows_merge_kernel`
    (flash-decoding). `HAS_DOC`: a global query sees the text keys of its own document only (the chunk is clipped
    to the block's documents)."""
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
    if HAS_DOC:
        g_doc = _doc_of(DOCS, b, N, gpos, g_ok)
        start, end = _doc_clip(DOCS, doc_plane, b, N, gpos, g_ok, g_doc, start, end, col_offset, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        k, v, cols, col_ok = _split_key_tile(k_base, v_base, key_stride_k, key_stride_v, KIND, b, N, n0, end,
                                             col_offset, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                             HAS_KIND=HAS_KIND)
        ok = col_ok[None, :]
        if HAS_DOC:
            ok = ok & _same_doc_or_prefix(DOCS, b, N, cols, col_ok, g_doc, col_offset)
        s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
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
    Q, K, V, QG, KG, VG, PK, PV, PKG, PVG, KIND, SPECIAL, GIDX, GCNT, DOCS, PSCALE, O, LSE, PART_O, PART_L,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh,
    spkb, spkn, spkh, spvb, spvn, spvh, spkgb, spkgn, spkgh, spvgb, spvgn, spvgh, sob, son, soh,
    N, H, P, gidx_stride, g_pad, chunk, num_splits, n_parts, n_global_progs, doc_plane, lse_plane, window, qk_scale,
    dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_N: tl.constexpr, HAS_KIND: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr, SEPARATE: tl.constexpr,
):
    """Grid `(n_global_progs + cdiv(N, BLOCK_M), B * H)`. The first `n_global_progs` programs of a batch-head are
    the global rows' key splits (`n_parts` splits x the blocks of `BLOCK_G` global queries; they walk the most
    keys, so they start first and overlap the band work); the others are local-row tiles. `HAS_GLOBAL`: global
    tokens exist (global keys of the local rows); `GLOBAL_ROWS`: their rows are computed (`n_global_progs > 0`).
    `PKG, PVG`: the global rows' prefix (the local rows' when the call gives none)."""
    pid, bh, b, h = _program(H)
    if GLOBAL_ROWS:
        if pid < n_global_progs:
            _global_rows_fwd_split(
                pid % n_parts, pid // n_parts, bh, b, h, QG, KG, VG, PKG, PVG, KIND, GIDX, GCNT, DOCS, PART_O,
                PART_L, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh, spkgb, spkgn, spkgh, spvgb, spvgn,
                spvgh, N, P, gidx_stride, g_pad, chunk, num_splits, n_parts, doc_plane, qk_scale, dropout_p,
                inv_keep, seed, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
                HAS_KIND=HAS_KIND, HAS_PREFIX=HAS_PREFIX, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC,
                HAS_DOC=HAS_DOC)
    if pid >= n_global_progs:
        _local_rows_fwd(
            pid - n_global_progs, bh, b, h, Q, K, V, PK, PV, KIND, SPECIAL, GIDX, GCNT, DOCS, PSCALE, O, LSE,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sob, son, soh,
            N, P, gidx_stride, doc_plane, lse_plane, window, qk_scale, dropout_p, inv_keep, seed,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
            NUM_STAGES=NUM_STAGES, EVEN_N=EVEN_N, HAS_KIND=HAS_KIND, HAS_GLOBAL=HAS_GLOBAL,
            HAS_PREFIX=HAS_PREFIX, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC, HAS_DOC=HAS_DOC, SEPARATE=SEPARATE)


@triton.jit
def _global_rows_merge_kernel(
    PART_O, PART_L, GIDX, GCNT, PSCALE, O, LSE, sob, son, soh,
    N, H, gidx_stride, g_pad, n_parts, lse_plane,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SEPARATE: tl.constexpr = False,
):
    """Grid `(G, B * H)`: merge one global row's partials by their LSE into `O` and `LSE` (replacing the local
    result written for that row). `SEPARATE`: the last partial is the prefix's own softmax, added scaled by
    `PSCALE[h]` rather than merged; its LSE goes to the plane `lse_plane` after the text's."""
    g, bh, b, h = _program(H)
    if g < tl.load(GCNT + b):
        pos = tl.load(GIDX + b * gidx_stride + g).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_parts
        if SEPARATE:
            s_ok = offs_s < n_parts - 1
        part = (bh * g_pad + g).to(tl.int64) * n_parts + offs_s
        lse_s = tl.load(PART_L + part, mask=s_ok, other=float("-inf"))
        o_s = _load_rows(PART_O, part, HEAD_DIM, s_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        m = tl.max(lse_s, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse_s - m_use)
        w_sum = tl.sum(w, 0)
        out = tl.sum(o_s * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
        offs_d = tl.arange(0, BLOCK_D)
        if SEPARATE:
            last = (bh * g_pad + g).to(tl.int64) * n_parts + n_parts - 1
            out += tl.load(PART_O + last * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0) * tl.load(PSCALE + h)
            lse_p = tl.load(PART_L + last)
            tl.store(LSE + lse_plane + bh.to(tl.int64) * N + pos, tl.where(lse_p > float("-inf"), lse_p,
                                                                            float("inf")))
        tl.store(O + b * sob + pos * son + h * soh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
        lse = tl.where(w_sum > 0, m_use + tl.log2(tl.where(w_sum > 0, w_sum, 1.0)), float("inf"))
        tl.store(LSE + bh.to(tl.int64) * N + pos, lse)
