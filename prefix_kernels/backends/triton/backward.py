"""Backward kernels: `_bwd_preprocess_kernel` (delta, the local rows' LSE, zeroed fp32 accumulators), the one-pass
`_attention_bwd_kernel` (the global rows' key splits, the shared keys' query chunks, the band key tiles) and
`_bwd_finalize_kernel` (dQ scaled and cast, the shared keys' partials summed). Launched by `launch.backward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    KIND_GLOBAL,
    KIND_LOCAL,
    KIND_PAD,
    _band_tiles,
    _doc_clip,
    _doc_of,
    _doc_span,
    _dropout_keep,
    _gather_keys,
    _in_band,
    _key_split,
    _load_at,
    _load_rows,
    _prefix_col0,
    _prefix_keys,
    _program,
    _row_ptrs,
    _shared_block,
    _split_key_tile,
    _store_rows,
)

# ------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _prefix_delta(q, do, lse_p, rows, pk_base, pv_base, spkn, spvn, P, N, bh, qk_scale, seed, dropout_p, inv_keep,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """`rowsum(dO * B)` fp32 of query rows `rows` (`q`, `dO`), `B` their prefix softmax's output (log2 LSE
    `lse_p`, `+inf` on rows without one) recomputed with the forward's dropout bits: "separate" mode's
    `prefix_scale` gradient, and the delta of both softmaxes (`out` holds `A + s * B`, not each)."""
    b_acc = tl.zeros([rows.shape[0], BLOCK_D], tl.float32)
    for p0 in range(0, P, BLOCK_N):
        k, v, p_ok, pcols = _prefix_keys(pk_base, pv_base, spkn, spvn, p0, P, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                         BLOCK_N=BLOCK_N)
        s = tl.where(p_ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC), float("-inf"))
        p = tl.exp2(tl.fma(s, qk_scale, -lse_p[:, None]))
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows, _prefix_col0(N) + p0, dropout_p, COLS_TILE=True,
                                       NCOLS=BLOCK_N), p, 0.0)
        b_acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return tl.sum(b_acc * do.to(tl.float32), 1) * inv_keep


@triton.jit
def _bwd_preprocess_kernel(O, DO, LSE, KIND, DELTA, LSE_LOCAL, DQ_ACC, DQG_ACC, Q, QG, PK, PV, PKG, PVG, GIDX, GCNT,
                           PSCALE, sob, son, soh, sdb, sdn, sdh, sqb, sqn, sqh, sqgb, sqgn, sqgh, spkb, spkn, spkh,
                           spvb, spvn, spvh, spkgb, spkgn, spkgh, spvgb, spvgn, spvgh,
                           N, H, P, n_pad, g_pad, gidx_stride, n_row_progs, lse_plane, qk_scale, dropout_p, inv_keep,
                           seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, HAS_KIND: tl.constexpr, GLOBAL_ROWS: tl.constexpr,
                           SEPARATE: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
                           DOT_PREC: tl.constexpr = "ieee"):
    """Grid `(n_row_progs [+ global blocks], B * H)`: `DELTA = sum_d dO * O` (fp32); `LSE_LOCAL`, the LSE of local
    rows and `+inf` on global and padding rows (so the local-row backward needs no row kinds); zeroes this tile's
    rows of the fp32 accumulators `DQ_ACC` and (with `GLOBAL_ROWS`) `DQG_ACC`. `SEPARATE`: `LSE`, `DELTA`,
    `LSE_LOCAL` have a second plane (`lse_plane` on) for the prefix softmax; with `dB = rowsum(dO * B)`
    (`_prefix_delta`), the text's delta is `rowsum(dO * O) - s * dB` and the prefix's `dB` (its `dS` is scaled by
    `s` in the main kernel); global rows get theirs from the programs past `n_row_progs`, one per `BLOCK_M` global
    slots (their `q_global` and prefix)."""
    pid, bh, b, h = _program(H)
    if pid < n_row_progs:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        o = _load_rows(O + b * sob + h * soh, rows, son, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        stats = bh.to(tl.int64) * N + rows
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(LSE + stats, mask=row_ok, other=float("inf"))
        if HAS_KIND:
            kind = tl.load(KIND + b * N + rows, mask=row_ok, other=KIND_PAD)
            lse = tl.where(kind == KIND_LOCAL, lse, float("inf"))
        if SEPARATE:
            lse_p = tl.load(LSE + lse_plane + stats, mask=row_ok, other=float("inf"))
            write_ok = row_ok
            if HAS_KIND:
                lse_p = tl.where(kind == KIND_LOCAL, lse_p, float("inf"))
                if GLOBAL_ROWS:
                    write_ok = write_ok & (kind != KIND_GLOBAL)
            q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
            d_b = _prefix_delta(q, do, lse_p, rows, PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn,
                                P, N, bh, qk_scale, seed, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                BLOCK_N=BLOCK_N, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
            tl.store(DELTA + stats, delta - tl.load(PSCALE + h) * d_b, mask=write_ok)
            tl.store(DELTA + lse_plane + stats, d_b, mask=write_ok)
            tl.store(LSE_LOCAL + lse_plane + stats, lse_p, mask=row_ok)
        else:
            tl.store(DELTA + stats, delta, mask=row_ok)
        tl.store(LSE_LOCAL + stats, lse, mask=row_ok)
        zeros = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        _store_rows(DQ_ACC + bh.to(tl.int64) * n_pad * BLOCK_D, rows, BLOCK_D, rows < n_pad, zeros,
                    HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
        if GLOBAL_ROWS:
            _store_rows(DQG_ACC + bh.to(tl.int64) * g_pad * BLOCK_D, rows, BLOCK_D, rows < g_pad, zeros,
                        HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
    if SEPARATE:
        if GLOBAL_ROWS:
            if pid >= n_row_progs:
                g = (pid - n_row_progs) * BLOCK_M + tl.arange(0, BLOCK_M)
                g_ok = g < tl.load(GCNT + b)
                gpos = tl.load(GIDX + b * gidx_stride + g, mask=g_ok, other=0)
                o = _load_rows(O + b * sob + h * soh, gpos, son, g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                do = _load_rows(DO + b * sdb + h * sdh, gpos, sdn, g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                q = _load_rows(QG + b * sqgb + h * sqgh, gpos, sqgn, g_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                stats = bh.to(tl.int64) * N + gpos
                lse_p = tl.load(LSE + lse_plane + stats, mask=g_ok, other=float("inf"))
                d_b = _prefix_delta(q, do, lse_p, gpos, PKG + b * spkgb + h * spkgh, PVG + b * spvgb + h * spvgh,
                                    spkgn, spvgn, P, N, bh, qk_scale, seed, dropout_p, inv_keep, HEAD_DIM=HEAD_DIM,
                                    BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
                tl.store(DELTA + stats, delta - tl.load(PSCALE + h) * d_b, mask=g_ok)
                tl.store(DELTA + lse_plane + stats, d_b, mask=g_ok)


@triton.jit
def _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, rows, cols, bh, qk_scale, seed, dropout_p, inv_keep,
                  COLS_TILE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, ds_mult=1.0,
                  SCALED: tl.constexpr = False):
    """One (query tile, key tile) pair, keys as rows: `s_t = k . q^T` `(keys, queries)`, raw, `-inf` where
    excluded. Adds the pair's unscaled dK and dV to `dk, dv` and returns its unscaled dQ part `(queries, D)`
    fp32. `rows`: query positions; `cols`, `COLS_TILE`: the keys' positions as in `_dropout_keep`. `SCALED`: the
    softmax's output enters the result times `ds_mult` ("separate" mode's prefix): `dS` carries the factor, and
    the caller multiplies the finished dV by it."""
    p_t = tl.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep_t = tl.trans(_dropout_keep(seed, bh, rows, cols, dropout_p, COLS_TILE=COLS_TILE, NCOLS=k.shape[0]))
        dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        dv += tl.dot(tl.where(keep_t, p_t * inv_keep, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    if SCALED:
        ds_t = (p_t * (dp_t - delta[None, :]) * ds_mult).to(q.dtype)
    else:
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
def _band_pairs_bwd(dk, dv, k, v, cols, col_local, special_cols, lo, mid_lo, mid_hi, hi, row_lo, row_hi, bh, b, h, Q,
                    DO, LSE_LOCAL, DELTA, DQ_ACC, sqb, sqn, sqh, sdob, sdon, sdoh, N, n0, n_pad, window, qk_scale,
                    dropout_p, inv_keep, seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    NUM_STAGES: tl.constexpr, EVEN_M: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr):
    """The band key tile against the query tiles `[lo, hi)` (those in `[mid_lo, mid_hi)` unmasked unless
    `special_cols`): adds to `dk, dv` and each pair's dQ part to `DQ_ACC`. `HAS_DOC`: only rows `[row_lo, row_hi)`
    (one document's; `col_local` holds its keys only) are admitted, by two scalar compares in the masked tiles."""
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
            ok_t = _in_band(rows[None, :], cols[:, None], N, window) & col_local[:, None]
            if HAS_DOC:
                ok_t = ok_t & ((rows >= row_lo) & (rows < row_hi))[None, :]
            s_t = tl.where(ok_t, s_t, float("-inf"))
        dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, rows, n0, bh, qk_scale, seed, dropout_p,
                                   inv_keep, COLS_TILE=True, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC)
        tl.atomic_add(dq_tile + dq_offs, dq, sem="relaxed")
        q_tile += BLOCK_M * sqn
        do_tile += BLOCK_M * sdon
        dq_tile += BLOCK_M * BLOCK_D
        stats += BLOCK_M
    return dk, dv


@triton.jit
def _band_keys_bwd(pid_n, bh, b, h, Q, K, V, DO, LSE_LOCAL, DELTA, KIND, DOCS, DK, DV, DQ_ACC,
                   sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                   N, n_pad, doc_plane, window, qk_scale, scale, dropout_p, inv_keep, seed,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_STAGES: tl.constexpr, EVEN_M: tl.constexpr, HAS_KIND: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr = False):
    """A tile of `BLOCK_N` band keys against the query tiles within `+-window`: its dK/dV (global and padding
    columns get 0 here; global keys are finalized from the shared-key partials) and each pair's dQ part.
    `EVEN_M`: `N` is a multiple of `BLOCK_M`, so no query tile reaches past the sequence. `HAS_DOC`: one pass per
    document of the key tile (one, unless the tile straddles a boundary), its query tiles clipped to the document
    and its rows admitted by their position alone, so the loop body is the one without documents (an element's
    document loaded in the loop lengthens every tile's code)."""
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

    if HAS_DOC:
        tile_end = tl.minimum(n0 + BLOCK_N, N)
        doc_lo, doc_hi, g_lo, g_hi, straddle = _doc_span(DOCS, doc_plane, b, N, n0, tile_end - 1)
        special_cols = special_cols | straddle
        d_lo = doc_lo
        while d_lo < tile_end:
            d_hi = tl.load(DOCS + doc_plane + b * N + d_lo)  # the end of the document that starts at d_lo
            lo, mid_lo, mid_hi, hi = _band_tiles(n0, N, window, FIXED=BLOCK_N, STEP=BLOCK_M, key_lo=d_lo,
                                                 key_hi=d_hi, CLIP=True)
            dk, dv = _band_pairs_bwd(dk, dv, k, v, cols, col_local & (cols >= d_lo) & (cols < d_hi), special_cols,
                                     lo, mid_lo, mid_hi, hi, d_lo, d_hi, bh, b, h, Q, DO, LSE_LOCAL, DELTA, DQ_ACC,
                                     sqb, sqn, sqh, sdob, sdon, sdoh, N, n0, n_pad, window, qk_scale, dropout_p,
                                     inv_keep, seed, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                                     NUM_STAGES=NUM_STAGES, EVEN_M=EVEN_M, HAS_DROPOUT=HAS_DROPOUT,
                                     DOT_PREC=DOT_PREC, HAS_DOC=True)
            d_lo = d_hi
    else:
        lo, mid_lo, mid_hi, hi = _band_tiles(n0, N, window, FIXED=BLOCK_N, STEP=BLOCK_M)
        dk, dv = _band_pairs_bwd(dk, dv, k, v, cols, col_local, special_cols, lo, mid_lo, mid_hi, hi, 0, N, bh, b,
                                 h, Q, DO, LSE_LOCAL, DELTA, DQ_ACC, sqb, sqn, sqh, sdob, sdon, sdoh, N, n0, n_pad,
                                 window, qk_scale, dropout_p, inv_keep, seed, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                 BLOCK_M=BLOCK_M, NUM_STAGES=NUM_STAGES, EVEN_M=EVEN_M, HAS_DROPOUT=HAS_DROPOUT,
                                 DOT_PREC=DOT_PREC, HAS_DOC=False)

    _store_rows(DK + b * sdkb + h * sdkh, cols, sdkn, col_ok, (dk * scale).to(DK.dtype.element_ty),
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    _store_rows(DV + b * sdvb + h * sdvh, cols, sdvn, col_ok, dv.to(DV.dtype.element_ty), HEAD_DIM=HEAD_DIM,
                BLOCK_D=BLOCK_D)


@triton.jit
def _shared_key_block_bwd(k, v, key_ok, key_cols, q_base, do_base, dq_base, LSE_LOCAL, DELTA, key_lo, key_hi, bh, b,
                          N, start, end, sqn, sdon, qk_scale, seed, dropout_p, inv_keep, ds_mult,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          COLS_TILE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                          HAS_DOC: tl.constexpr = False, SCALED: tl.constexpr = False):
    """A block of keys every local query sees (`key_ok`: which exist; `key_cols`, `COLS_TILE`: their positions as
    in `_dropout_keep`) against the local query rows `[start, end)`: unscaled dK, dV; each pair's dQ part is added
    to `DQ_ACC`. `HAS_DOC`: key `c` is seen by the rows `[key_lo[c], key_hi[c])` only (a global key's document, a
    prefix key's `[0, N)`, an absent key's none): compares only, no load in the loop. `SCALED`: as in
    `_key_tile_bwd` (the
    returned dV is already multiplied)."""
    dk = tl.zeros([k.shape[0], BLOCK_D], tl.float32)
    dv = tl.zeros([k.shape[0], BLOCK_D], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        stats = bh.to(tl.int64) * N + rows
        q, do, lse, delta = _query_tile_bwd(_row_ptrs(q_base, rows, sqn, BLOCK_D=BLOCK_D),
                                            _row_ptrs(do_base, rows, sdon, BLOCK_D=BLOCK_D), LSE_LOCAL + stats,
                                            DELTA + stats, rows < N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        if HAS_DOC:
            ok_t = (rows[None, :] >= key_lo[:, None]) & (rows[None, :] < key_hi[:, None])
        else:
            ok_t = key_ok[:, None]
        s_t = tl.where(ok_t, tl.dot(k, tl.trans(q), input_precision=DOT_PREC), float("-inf"))
        dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, rows, key_cols, bh, qk_scale, seed,
                                   dropout_p, inv_keep, COLS_TILE=COLS_TILE, HAS_DROPOUT=HAS_DROPOUT,
                                   DOT_PREC=DOT_PREC, ds_mult=ds_mult, SCALED=SCALED)
        tl.atomic_add(_row_ptrs(dq_base, rows, BLOCK_D, BLOCK_D=BLOCK_D), dq, sem="relaxed")
    if SCALED:
        dv = dv * ds_mult
    return dk, dv


@triton.jit
def _shared_keys_bwd(chunk, bh, b, h, Q, K, V, PK, PV, DO, LSE_LOCAL, DELTA, GIDX, GCNT, DOCS, PSCALE, DQ_ACC,
                     GPART_K, GPART_V, PPART_K, PPART_V,
                     sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sdob, sdon, sdoh,
                     N, P, n_pad, gidx_stride, q_chunk, num_chunks, n_prefix_slots, doc_plane, lse_plane, qk_scale,
                     dropout_p, inv_keep, seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                     HAS_DOC: tl.constexpr = False, SEPARATE: tl.constexpr = False):
    """dK/dV (unscaled, fp32) of the global keys (through the local `k, v`) and of the prefix keys from the local
    queries of one chunk of `q_chunk` rows, written as this chunk's partials `GPART_* (B*H, num_chunks, G,
    BLOCK_D)`, `PPART_* (B*H, n_prefix_slots, P, BLOCK_D)`: every local query feeds these few keys, so the work is
    split over query chunks instead of one program walking all N rows. `HAS_DOC`: a global key's query rows are
    clipped to its block's documents. `SEPARATE`: the prefix keys use the prefix softmax's plane of `LSE_LOCAL`
    and `DELTA`, scaled by `PSCALE[h]`."""
    start = chunk * q_chunk
    end = tl.minimum(start + q_chunk, N)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ_ACC + bh.to(tl.int64) * n_pad * BLOCK_D
    if SEPARATE:
        # Two blocks: the global keys in the text's softmax, the prefix keys in their own.
        if HAS_GLOBAL:
            cnt = tl.load(GCNT + b)
            for g0 in range(0, cnt, BLOCK_G):
                # Global keys through the local `k, v`, as every local query sees them.
                k, v, g_ok, gpos = _gather_keys(K + b * skb + h * skh, V + b * svb + h * svh, skn, svn,
                                                GIDX + b * gidx_stride, g0, cnt, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                                BLOCK_G=BLOCK_G)
                q_start = start
                q_end = end
                key_lo = gpos
                key_hi = gpos
                if HAS_DOC:
                    key_lo = _doc_of(DOCS, b, N, gpos, g_ok)
                    key_hi = tl.load(DOCS + doc_plane + b * N + gpos, mask=g_ok, other=-1)
                    q_start, q_end = _doc_clip(DOCS, doc_plane, b, N, gpos, g_ok, key_lo, start, end,
                                               start * 0, BLOCK_M)
                dk, dv = _shared_key_block_bwd(k, v, g_ok, gpos, q_base, do_base, dq_base, LSE_LOCAL, DELTA, key_lo,
                                               key_hi, bh, b, N, q_start, q_end, sqn, sdon, qk_scale, seed,
                                               dropout_p, inv_keep, 1.0, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                               BLOCK_M=BLOCK_M, COLS_TILE=False, HAS_DROPOUT=HAS_DROPOUT,
                                               DOT_PREC=DOT_PREC, HAS_DOC=HAS_DOC)
                part = (bh.to(tl.int64) * num_chunks + chunk) * gidx_stride + g0 + tl.arange(0, BLOCK_G)
                _store_rows(GPART_K, part, BLOCK_D, g_ok, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
                _store_rows(GPART_V, part, BLOCK_D, g_ok, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
        if HAS_PREFIX:
            lse_p = LSE_LOCAL + lse_plane
            delta_p = DELTA + lse_plane
            ds_mult = tl.load(PSCALE + h)
            for p0 in range(0, P, BLOCK_N):
                k, v, p_ok, pcols = _prefix_keys(PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, p0,
                                                 P, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
                dk, dv = _shared_key_block_bwd(k, v, p_ok, _prefix_col0(N) + p0, q_base, do_base, dq_base, lse_p,
                                               delta_p, pcols, pcols, bh, b, N, start, end, sqn, sdon, qk_scale,
                                               seed, dropout_p, inv_keep, ds_mult, HEAD_DIM=HEAD_DIM,
                                               BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, COLS_TILE=True,
                                               HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC, SCALED=True)
                part = (bh.to(tl.int64) * n_prefix_slots + chunk) * P + pcols
                _store_rows(PPART_K, part, BLOCK_D, p_ok, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
                _store_rows(PPART_V, part, BLOCK_D, p_ok, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
    else:
        # "joint": the global keys and the prefix keys are one list (compact global slots, then the prefix rows),
        # walked in blocks of `BLOCK_N` keys (one block at the headline): each query tile is loaded and its dQ part
        # reduced once per block.
        n_g = 0
        if HAS_GLOBAL:
            n_g = tl.load(GCNT + b)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        n_p = 0
        if HAS_PREFIX:
            n_p = P
            pk_base = PK + b * spkb + h * spkh
            pv_base = PV + b * spvb + h * spvh
        else:
            pk_base = k_base  # (a placeholder of another dtype: never read, but the pointers are selected)
            pv_base = v_base
        # Half the keys per block with dropout at D > 64, as in the forward.
        SHARED_N: tl.constexpr = BLOCK_N // 2 if HAS_DROPOUT and BLOCK_D > 64 else BLOCK_N
        for c0 in range(0, n_g + n_p, SHARED_N):
            k, v, ok, is_g, is_p, cols, gpos = _shared_block(k_base, v_base, skn, svn, GIDX + b * gidx_stride, 0,
                                                             n_g, pk_base, pv_base, spkn, spvn, n_p,
                                                             _prefix_col0(N), c0, HEAD_DIM=HEAD_DIM,
                                                             BLOCK_D=BLOCK_D, BLOCK_S=SHARED_N)
            q_start = start
            q_end = end
            key_lo = gpos
            key_hi = gpos
            if HAS_DOC:
                key_doc = _doc_of(DOCS, b, N, gpos, is_g)
                # The rows that see each key: a global key's document, a prefix key's all, an absent key's none.
                key_lo = tl.where(is_p, 0, key_doc)
                key_hi = tl.where(is_p, N, tl.load(DOCS + doc_plane + b * N + gpos, mask=is_g, other=-1))
                # A block of global keys alone walks its documents' rows only; one with prefix keys every row.
                c_start, c_end = _doc_clip(DOCS, doc_plane, b, N, gpos, is_g, key_doc, start, end, start * 0,
                                           BLOCK_M)
                has_p = c0 + SHARED_N > n_g
                q_start = tl.where(has_p, start, c_start)
                q_end = tl.where(has_p, end, c_end)
            dk, dv = _shared_key_block_bwd(k, v, ok, cols, q_base, do_base, dq_base, LSE_LOCAL, DELTA,
                                           key_lo, key_hi, bh, b, N, q_start, q_end, sqn, sdon, qk_scale, seed,
                                           dropout_p, inv_keep, 1.0, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                           BLOCK_M=BLOCK_M, COLS_TILE=False, HAS_DROPOUT=HAS_DROPOUT,
                                           DOT_PREC=DOT_PREC, HAS_DOC=HAS_DOC)
            c = c0 + tl.arange(0, SHARED_N)
            if HAS_GLOBAL:
                part = (bh.to(tl.int64) * num_chunks + chunk) * gidx_stride + c
                _store_rows(GPART_K, part, BLOCK_D, is_g, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
                _store_rows(GPART_V, part, BLOCK_D, is_g, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
            if HAS_PREFIX:
                part = (bh.to(tl.int64) * n_prefix_slots + chunk) * P + c - n_g
                _store_rows(PPART_K, part, BLOCK_D, is_p, dk, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)
                _store_rows(PPART_V, part, BLOCK_D, is_p, dv, HEAD_DIM=BLOCK_D, BLOCK_D=BLOCK_D)


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
def _global_rows_bwd_split(split, bh, b, h, QG, KG, VG, PK, PV, DO, LSE, DELTA, KIND, GIDX, GCNT, DOCS, PSCALE, DKG,
                           DVG, DQG_ACC, PPART_K, PPART_V,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh,
                           sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                           N, P, gidx_stride, g_pad, chunk, num_splits, n_prefix_slots, doc_plane, lse_plane,
                           qk_scale, scale, dropout_p, inv_keep, seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SINGLE_G: tl.constexpr,
                           HAS_KIND: tl.constexpr, TO_PREFIX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                           DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr = False, SEPARATE: tl.constexpr = False):
    """The global queries' backward against one key split (flash-decoding style): split `s < num_splits` owns the
    keys `[s * chunk, (s + 1) * chunk)` of `k_global, v_global` and writes their dK_global, dV_global; split
    `num_splits` (`TO_PREFIX`) is the prefix (`PK, PV`: the global rows' prefix), written as the last slot of the
    prefix partials. `TO_PREFIX` is a compile-time flag, so the loop's stores need no branch (a branch there fails
    Triton 3.6's pipeliner). dQ_global parts go to the fp32 `DQG_ACC (B*H, G_pad, BLOCK_D)` by atomics: once per
    program when all global queries fit one block (`SINGLE_G`), else once per (key tile, query block).
    `HAS_DOC`: the text keys of each query's document only. `SEPARATE`: the prefix split reads the prefix
    softmax's plane of `LSE` and `DELTA` and is scaled by `PSCALE[h]`."""
    cnt = tl.load(GCNT + b)
    gidx_row = GIDX + b * gidx_stride
    qg_base = QG + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dqg_base = DQG_ACC + bh.to(tl.int64) * g_pad * BLOCK_D
    k_base, v_base, key_stride_k, key_stride_v, start, end, col_offset = _key_split(
        split, num_splits, chunk, N, P, KG + b * skb + h * skh, VG + b * svb + h * svh, skn, svn,
        PK + b * spkb + h * spkh, PV + b * spvb + h * spvh, spkn, spvn, HAS_PREFIX=TO_PREFIX)
    ds_mult = 1.0
    if TO_PREFIX:
        if SEPARATE:
            LSE = LSE + lse_plane
            DELTA = DELTA + lse_plane
            ds_mult = tl.load(PSCALE + h)
    # Every key of the split gets its dK_global / dV_global written (zeros outside the queries' documents), so
    # the split is walked whole; the prefix split needs no document test.
    DOC_TEST: tl.constexpr = HAS_DOC and not TO_PREFIX
    if SINGLE_G:
        q, do, lse, delta, g, gpos = _global_query_block(qg_base, do_base, LSE, DELTA, gidx_row, 0, cnt, bh, N, sqn,
                                                         sdon, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_G=BLOCK_G)
        if DOC_TEST:
            g_doc = _doc_of(DOCS, b, N, gpos, g < cnt)
        dq_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        k, v, cols, col_ok = _split_key_tile(k_base, v_base, key_stride_k, key_stride_v, KIND, b, N, n0, end,
                                             col_offset, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                             HAS_KIND=HAS_KIND)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if DOC_TEST:
            c_doc = _doc_of(DOCS, b, N, cols, col_ok)
        if SINGLE_G:
            ok_t = col_ok[:, None]
            if DOC_TEST:
                ok_t = ok_t & (c_doc[:, None] == g_doc[None, :])
            s_t = tl.where(ok_t, tl.dot(k, tl.trans(q), input_precision=DOT_PREC), float("-inf"))
            dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, gpos, col_offset + n0, bh, qk_scale,
                                       seed, dropout_p, inv_keep, COLS_TILE=True, HAS_DROPOUT=HAS_DROPOUT,
                                       DOT_PREC=DOT_PREC, ds_mult=ds_mult, SCALED=SEPARATE and TO_PREFIX)
            dq_acc += dq
        else:
            for g0 in range(0, cnt, BLOCK_G):
                q, do, lse, delta, g, gpos = _global_query_block(qg_base, do_base, LSE, DELTA, gidx_row, g0, cnt, bh,
                                                                 N, sqn, sdon, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                                                                 BLOCK_G=BLOCK_G)
                ok_t = col_ok[:, None]
                if DOC_TEST:
                    ok_t = ok_t & (c_doc[:, None] == _doc_of(DOCS, b, N, gpos, g < cnt)[None, :])
                s_t = tl.where(ok_t, tl.dot(k, tl.trans(q), input_precision=DOT_PREC), float("-inf"))
                dk, dv, dq = _key_tile_bwd(dk, dv, k, v, s_t, q, do, lse, delta, gpos, col_offset + n0, bh,
                                           qk_scale, seed, dropout_p, inv_keep, COLS_TILE=True,
                                           HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC, ds_mult=ds_mult,
                                           SCALED=SEPARATE and TO_PREFIX)
                tl.atomic_add(_row_ptrs(dqg_base, g, BLOCK_D, BLOCK_D=BLOCK_D), dq, sem="relaxed")
        if TO_PREFIX:
            if SEPARATE:
                dv = dv * ds_mult
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
    Q, K, V, QG, KG, VG, PK, PV, PKG, PVG, DO, LSE, LSE_LOCAL, DELTA, KIND, GIDX, GCNT, DOCS, PSCALE,
    DK, DV, DKG, DVG, DQ_ACC, DQG_ACC, GPART_K, GPART_V, PPART_K, PPART_V,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh,
    spkb, spkn, spkh, spvb, spvn, spvh, spkgb, spkgn, spkgh, spvgb, spvgn, spvgh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, sdkgb, sdkgn, sdkgh, sdvgb, sdvgn, sdvgh,
    N, H, P, n_pad, gidx_stride, g_pad, window, chunk, num_splits, q_chunk, num_chunks, n_prefix_slots,
    n_global_progs, n_shared_progs, doc_plane, lse_plane, qk_scale, scale, dropout_p, inv_keep, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_M: tl.constexpr, SINGLE_G: tl.constexpr,
    HAS_KIND: tl.constexpr, HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DOC: tl.constexpr, SEPARATE: tl.constexpr,
):
    """Grid `(n_global_progs + n_shared_progs + cdiv(N, BLOCK_N), B * H)`, the whole backward in one pass. Per
    batch-head, in launch order (the longest first): the global rows' key splits (`_global_rows_bwd_split`, with
    `GLOBAL_ROWS` only), the shared-key query chunks (`_shared_keys_bwd`), then one program per band key tile
    (`_band_keys_bwd`). `PKG, PVG`: the global rows' prefix (the local rows' when the call gives none)."""
    pid, bh, b, h = _program(H)
    if GLOBAL_ROWS:
        # Two instances: the k_global splits, then (with a prefix) the prefix split.
        for to_prefix in tl.static_range(1 + HAS_PREFIX):
            mine = pid < num_splits
            if to_prefix == 1:
                mine = pid == num_splits
            if mine:
                _global_rows_bwd_split(
                    pid, bh, b, h, QG, KG, VG, PKG, PVG, DO, LSE, DELTA, KIND, GIDX, GCNT, DOCS, PSCALE, DKG, DVG,
                    DQG_ACC, PPART_K, PPART_V, sqgb, sqgn, sqgh, skgb, skgn, skgh, svgb, svgn, svgh, spkgb, spkgn,
                    spkgh, spvgb, spvgn, spvgh, sdob, sdon, sdoh, sdkgb, sdkgn, sdkgh, sdvgb, sdvgn, sdvgh,
                    N, P, gidx_stride, g_pad, chunk, num_splits, n_prefix_slots, doc_plane, lse_plane, qk_scale,
                    scale, dropout_p, inv_keep, seed, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                    BLOCK_G=BLOCK_G, SINGLE_G=SINGLE_G, HAS_KIND=HAS_KIND, TO_PREFIX=to_prefix == 1,
                    HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC, HAS_DOC=HAS_DOC, SEPARATE=SEPARATE)
    if HAS_GLOBAL or HAS_PREFIX:
        if (pid >= n_global_progs) & (pid < n_global_progs + n_shared_progs):
            _shared_keys_bwd(
                pid - n_global_progs, bh, b, h, Q, K, V, PK, PV, DO, LSE_LOCAL, DELTA, GIDX, GCNT, DOCS, PSCALE,
                DQ_ACC, GPART_K, GPART_V, PPART_K, PPART_V,
                sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, spkb, spkn, spkh, spvb, spvn, spvh, sdob, sdon, sdoh,
                N, P, n_pad, gidx_stride, q_chunk, num_chunks, n_prefix_slots, doc_plane, lse_plane, qk_scale,
                dropout_p, inv_keep, seed, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_G=BLOCK_G, HAS_GLOBAL=HAS_GLOBAL, HAS_PREFIX=HAS_PREFIX, HAS_DROPOUT=HAS_DROPOUT,
                DOT_PREC=DOT_PREC, HAS_DOC=HAS_DOC, SEPARATE=SEPARATE)
    if pid >= n_global_progs + n_shared_progs:
        _band_keys_bwd(
            pid - n_global_progs - n_shared_progs, bh, b, h, Q, K, V, DO, LSE_LOCAL, DELTA, KIND, DOCS, DK, DV,
            DQ_ACC, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
            N, n_pad, doc_plane, window, qk_scale, scale, dropout_p, inv_keep, seed,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES,
            EVEN_M=EVEN_M, HAS_KIND=HAS_KIND, HAS_DROPOUT=HAS_DROPOUT, DOT_PREC=DOT_PREC, HAS_DOC=HAS_DOC)


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
    DQ_ACC, DQG_ACC, SLOT, GIDX, GCNT, GPART_K, GPART_V, PPART_K, PPART_V, DQ, DQG, DK, DV, DPK, DPV, DPKG, DPVG,
    sdqb, sdqn, sdqh, sdqgb, sdqgn, sdqgh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, sdpkb, sdpkn, sdpkh, sdpvb, sdpvn,
    sdpvh, sdpkgb, sdpkgn, sdpkgh, sdpvgb, sdpvgn, sdpvgh, N, H, P, n_pad, gidx_stride, g_pad, num_chunks,
    n_prefix_slots, n_row_tiles, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    PREFIX_GLOBAL: tl.constexpr = False,
):
    """Grid `(n_row_tiles + 2 [+ 1], B * H)`. Row tiles: `dQ = scale * DQ_ACC` and, with `GLOBAL_ROWS`, `dQ_global`
    (`scale * DQG_ACC` on global rows, 0 elsewhere) in the input dtype. The next two programs sum the shared keys'
    partials: `dK, dV` of the global keys (overwriting the zeros the band programs wrote there), then the prefix
    gradients. `PREFIX_GLOBAL`: the global rows have their own prefix; its gradients (the prefix partials' last
    slot) go to `DPKG, DPVG` from one more program, and the prefix's sum leaves that slot out."""
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
            n_local_slots = n_prefix_slots
            if PREFIX_GLOBAL:
                n_local_slots = n_prefix_slots - 1
            for p0 in range(0, P, BLOCK_G):
                pr = p0 + tl.arange(0, BLOCK_G)
                p_ok = pr < P
                dk, dv = _sum_partials(PPART_K, PPART_V, bh.to(tl.int64) * n_prefix_slots * P, P, n_local_slots,
                                       pr, p_ok, BLOCK_D=BLOCK_D)
                _store_rows(DPK + b * sdpkb + h * sdpkh, pr, sdpkn, p_ok, (dk * scale).to(DPK.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                _store_rows(DPV + b * sdpvb + h * sdpvh, pr, sdpvn, p_ok, dv.to(DPV.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    if PREFIX_GLOBAL:
        if pid == n_row_tiles + 2:
            for p0 in range(0, P, BLOCK_G):
                pr = p0 + tl.arange(0, BLOCK_G)
                p_ok = pr < P
                dk, dv = _sum_partials(PPART_K, PPART_V, (bh.to(tl.int64) * n_prefix_slots + n_prefix_slots - 1) * P,
                                       P, 1, pr, p_ok, BLOCK_D=BLOCK_D)
                _store_rows(DPKG + b * sdpkgb + h * sdpkgh, pr, sdpkgn, p_ok, (dk * scale).to(DPKG.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
                _store_rows(DPVG + b * sdpvgb + h * sdpvgh, pr, sdpvgn, p_ok, dv.to(DPVG.dtype.element_ty),
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
