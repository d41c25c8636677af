"""Device helpers shared by the forward (`forward.py`) and backward (`backward.py`) kernels: dropout bits, row
loads and stores, band tile bounds, the compact global keys, the prefix keys, the global rows' key splits, and one
online-softmax step. The conventions they follow are stated once in this package's docstring (`__init__.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def _band_tiles(start, N, window, FIXED: tl.constexpr, STEP: tl.constexpr, key_lo=0, key_hi=0,
                CLIP: tl.constexpr = False):
    """Tiles of `STEP` positions that meet the band of the fixed tile `[start, start + FIXED)`: tile starts
    `[lo, hi)` (`lo` a multiple of `STEP`); those in `[mid_lo, mid_hi)` lie inside the band and the sequence, the
    others cross the band's edge (or the sequence end) and need the element mask. `CLIP`: the other side is
    further limited to positions `[key_lo, key_hi)` (the fixed tile's documents; a subset of `[0, N)`), and tiles
    crossing those limits need the element mask too. Without it the bounds are computed exactly as before
    documents existed (same instructions)."""
    if CLIP:
        lo = tl.maximum(start - window, key_lo) // STEP * STEP
        hi = tl.minimum(start + FIXED + window, key_hi)
    else:
        lo = tl.maximum(start - window, 0) // STEP * STEP
        hi = tl.minimum(start + FIXED + window, N)
    hi_tiles = lo + tl.cdiv(hi - lo, STEP) * STEP
    # inside: t >= start + FIXED - 1 - window, t + STEP - 1 <= start + window, t + STEP <= N (with CLIP: t >=
    # key_lo, t + STEP <= key_hi)
    if CLIP:
        mid_lo = lo + tl.cdiv(tl.maximum(tl.maximum(start + FIXED - 1 - window, key_lo) - lo, 0), STEP) * STEP
        last = tl.minimum(start + window + 1, key_hi) - STEP
    else:
        mid_lo = lo + tl.cdiv(tl.maximum(start + FIXED - 1 - window - lo, 0), STEP) * STEP
        last = tl.minimum(start + window + 1, N) - STEP
    mid_hi = tl.where(last >= lo, lo + (tl.maximum(last - lo, 0) // STEP + 1) * STEP, lo)
    mid_lo = tl.minimum(mid_lo, hi_tiles)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi_tiles), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _doc_span(DOCS, doc_plane, b, N, first, last):
    """Documents of positions `first <= last` of batch row `b` (`DOCS (4, B, N)` int32, planes `doc_plane` apart:
    each token's document start, end, and first / past-last slot in the compact global list): `(start of first's
    document, end of last's document, first slot of first's document, past-last slot of last's document, whether
    first and last lie in different documents)`. Documents are contiguous runs, so the span is every position
    (and global slot) of the documents in between."""
    base = DOCS + b * N
    doc_first = tl.load(base + first)
    doc_last = tl.load(base + last)
    end = tl.load(base + doc_plane + last)
    g_lo = tl.load(base + 2 * doc_plane + first)
    g_hi = tl.load(base + 3 * doc_plane + last)
    return doc_first, end, g_lo, g_hi, doc_first != doc_last


@triton.jit
def _doc_of(DOCS, b, N, pos, ok):
    """Document (its start position) of positions `pos` of batch row `b`; -1 where not `ok`."""
    return tl.load(DOCS + b * N + pos, mask=ok, other=-1)


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
def _shared_block(k_base, v_base, skn, svn, gidx_row, g_start, n_g, pk_base, pv_base, spkn, spvn, n_p, col0, c0,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Block `c0 .. c0 + BLOCK_S - 1` of the shared keys ("joint" mode): the `n_g` compact global slots from
    `g_start` (through `k_base, v_base`), then the `n_p` prefix rows, one list gathered into one block (one gather
    load per row: each row's pointer is selected). Returns `k, v`, which entries exist, which are global keys,
    which are prefix keys, each key's position in the dropout counter space (a global key's token position,
    prefix key `p` at `col0 + p`: the same counters as when they were separate blocks) and the global keys' token
    positions (0 elsewhere)."""
    c = c0 + tl.arange(0, BLOCK_S)
    is_g = c < n_g
    ok = c < n_g + n_p
    is_p = ok & (c >= n_g)
    # (int32 already; the cast is for the placeholder `GIDX` of a call without global tokens)
    gpos = tl.load(gidx_row + g_start + c, mask=is_g, other=0).to(tl.int32)
    pidx = c - n_g  # (negative on global keys: those rows take the other pointer)
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    k_ptrs = tl.where(is_g[:, None], k_base + gpos[:, None].to(tl.int64) * skn + offs_d,
                      pk_base + pidx[:, None].to(tl.int64) * spkn + offs_d)
    v_ptrs = tl.where(is_g[:, None], v_base + gpos[:, None].to(tl.int64) * svn + offs_d,
                      pv_base + pidx[:, None].to(tl.int64) * spvn + offs_d)
    k = _load_at(k_ptrs, ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_at(v_ptrs, ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    return k, v, ok, is_g, is_p, tl.where(is_g, gpos, col0 + pidx), gpos


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
def _doc_clip(DOCS, doc_plane, b, N, gpos, g_ok, g_doc, start, end, col_offset, STEP: tl.constexpr):
    """A global-row split's key range `[start, end)` clipped to the documents of its global queries (`gpos`, which
    exist `g_ok`, their documents `g_doc`); the start stays `STEP`-aligned (the dropout bits' tiles). The prefix
    split (`col_offset > 0`) is left whole."""
    d_lo = tl.min(tl.where(g_ok, g_doc, N), 0)
    d_hi = tl.max(tl.load(DOCS + doc_plane + b * N + gpos, mask=g_ok, other=0), 0)
    text = col_offset == 0
    new_start = tl.maximum(start, d_lo - (d_lo - start) % STEP)
    return tl.where(text, new_start, start), tl.where(text, tl.minimum(end, d_hi), end)


@triton.jit
def _same_doc_or_prefix(DOCS, b, N, cols, col_ok, g_doc, col_offset):
    """`(len(g_doc), len(cols))`: key `cols` lies in the document of each global query, or is a prefix key
    (`col_offset > 0`: every row sees it)."""
    c_doc = _doc_of(DOCS, b, N, cols, col_ok & (col_offset == 0))
    return (g_doc[:, None] == c_doc[None, :]) | (col_offset > 0)


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
