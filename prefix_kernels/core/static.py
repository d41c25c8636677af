r"""The formulation of `longformer_attention` that exporters trace (`torch.export`, `torch.onnx.export` with
`dynamo=True` or the legacy `dynamo=False`): standard ops only, the fused op's `O(N * w)` cost, no `N x N` tensor.

The fused backends hide their data-dependent parts (the compact list of each row's global tokens) inside custom
ops, which an exported graph cannot carry. Here every size follows from the input shapes, except one: `G`, the
number of global slots, which is data and enters the graph through `nonzero` (a data-dependent size: ONNX
`NonZero` in the legacy exporter, an unbacked size in `torch.export` and the dynamo exporter). Nothing in the
graph depends on the traced mask, so any mask gives the eager result; the sequence length may be symbolic too.

With `B` rows, `N` tokens, `H` heads of `D`, one-sided window `w`, `P` prefix keys, block size `c` and
`m = ceil(w / c)` (scale folded into the queries, every softmax in fp32, fp64 for fp64 inputs):

* local rows, in blocks of `c` queries: the sequence is padded to `nb = ceil(N / c)` blocks, the keys and values
  `m` more blocks on each side, and block `i` sees the `2m + 1` blocks `i - m .. i + m` side by side (a
  concatenation of `2m + 1` shifted views): `(c + 2w)`-wide when `c` divides `w`. A bias built from a constant
  `c x (2m + 1)c` band and a per-key vector (`-inf` for padding, global and out-of-range keys) masks the scores;
* the global keys of the local rows, compacted: a stable partition of each row (globals first, by `cumsum` and
  `scatter`) and the first `G = max(1, max_b count_b)` columns of it (`nonzero` of `arange(N) < G`); slots past a
  row's count are masked. Scores `(B, H, N, G)` against the local `k`, `v` at those positions;
* the prefix keys: `(B, H, N, P)` scores;
* one softmax over the three parts, without concatenating the band with the rest: a shared row max, `exp`, the
  sums, and `sum_part exp(s - max) @ v_part` divided by the sum (0 where a row has no admissible key, never NaN).
  With `prefix_normalization="separate"` the prefix leaves that softmax: `A` over the band and the global keys,
  plus `prefix_scale[h]` times the prefix's own softmax over its `P` keys;
* the global rows, compacted: the `G` slots' global queries against every non-padding key (global projections)
  and the prefix they see (`prefix_k_global` / `prefix_v_global` when given), `(B, H, G, N + P)` scores, scattered
  back to their positions;
* `document_ids`: a bias per band score (`-inf` across a document boundary: `(B, nb, c, (2m + 1)c)` from the
  blocks' ids), per global key of the local rows (`(B, N, G)`) and per key of the global rows (`(B, G, N)`); the
  prefix is every document's. Ids are compared, not assumed contiguous: exact for any numbering (contiguous runs
  are what the op checks eagerly and the caller promises under export).

Memory and time per head: `N (2m + 1) c` band scores, `N (G + P)` for the global keys and the prefix, `G (N + P)`
for the global rows; `O(N * w)` for a fixed number of global tokens (the document biases add as much, shared by
the heads). The constants in the graph are the `c x (2m + 1)c` band and `O(N)` aranges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import AttentionArgs


def block_size(window: int) -> int:
    """The default query block `c` for a one-sided window `w`: `w / 2` from `w = 64` (then `c + 2w` keys per block
    are `2.5 w`), else 32 (small windows: one block on each side)."""
    return window // 2 if window >= 64 else 32


def static_attention(a: AttentionArgs, chunk: int | None = None) -> torch.Tensor:
    """`longformer_attention` in the export formulation (this module's docstring): `(B, N, H, D)` in `a.q.dtype`.

    Same semantics as `reference.chunked_attention` (padding rows 0, rows with no admissible key 0 and never NaN,
    prefix keys seen by every query, dropout on the probabilities, the local rows alone with `local_rows_only`, both
    prefix normalizations, `prefix_k_global` / `prefix_v_global`, `document_ids`).
    `chunk`: the query block `c` (default `block_size(window)`).
    """
    cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    b, n, h, d = a.shape
    w = a.window
    c = int(chunk or block_size(w))
    m = -(-w // c)  # blocks of keys on each side
    span = (2 * m + 1) * c
    dev = a.q.device
    # Query blocks. With a symbolic length (torch.export with a dynamic dimension) one more, so that `nb >= 2`
    # follows from `N >= 1` and the shape reasoning needs no guard on a block dimension of length 1 (written as one
    # floor division: `nb * c` then divides by `nb` symbolically).
    nb = (n + (2 if isinstance(n, torch.SymInt) else 1) * c - 1) // c

    def blocks(t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """`(B, N, H, D)` -> `(B, H, nb, c, D)` or `(B, N)` -> `(B, nb, c, 1)`, padded with `value` to `nb` whole
        blocks; contiguous, so the split is a view whose shape follows from `nb` alone."""
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, nb * c - n), value=value)
        if t.dim() == 2:
            return t.reshape(b, nb, c, 1)
        return t.transpose(1, 2).contiguous().reshape(b, h, nb, c, d)

    def windows(t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """`(..., nb, c, X)` blocks -> `(..., nb, (2m + 1) c, X)`: block `i` next to its `m` neighbours on each side
        (`value` past the ends): the block dimension padded by `m` and `2m + 1` shifted views of it side by side,
        with static slice bounds."""
        if m == 0:
            return t
        t = F.pad(t, (0, 0, 0, 0, m, m), value=value)
        return torch.cat([t[..., s : (s - 2 * m) or None, :, :] for s in range(2 * m + 1)], dim=-2)

    neg_inf = float("-inf")
    zero = torch.zeros((), dtype=cdt, device=dev)
    glob, doc = a.is_global, a.document_ids
    key_ok = torch.ones(b, n, dtype=torch.bool, device=dev) if a.key_padding_mask is None else ~a.key_padding_mask
    if glob is not None:
        key_ok = key_ok & ~glob  # a band key: neither padding nor global
    key_bias = windows(blocks(torch.where(key_ok, zero, neg_inf), neg_inf), neg_inf).reshape(b, 1, nb, 1, span)
    rows = torch.arange(c, device=dev)[:, None]
    cols = torch.arange(span, device=dev)[None, :] - m * c
    band_bias = torch.where((cols - rows).abs() <= w, zero, neg_inf)  # (c, span), the same for every block

    # The band: (B * H * nb) products of c queries by the span keys of their block.
    qb = blocks(a.q.to(cdt) * a.softmax_scale)  # (B, H, nb, c, D)
    kb = _view(windows(blocks(a.k.to(cdt))), -1, span, d)  # (B * H * nb, span, D)
    vb = _view(windows(blocks(a.v.to(cdt))), -1, span, d)
    s_band = torch.bmm(_view(qb, -1, c, d), kb.transpose(1, 2)).reshape(b, h, nb, c, span) + (key_bias + band_bias)
    doc_rows = None
    if doc is not None:  # band keys of the query's document only: (B, 1, nb, c, span)
        doc_q = blocks(doc)  # (B, nb, c, 1), ids of the padding past N never compared with a kept key
        doc_rows = _view(doc_q, b, -1)  # (B, nb * c)
        same = doc_q == windows(doc_q).transpose(-1, -2)
        s_band = s_band + torch.where(same, zero, neg_inf)[:, None]

    # Beyond the band, the text keys every local row sees: the compacted global keys (local projections); and the
    # prefix, in the same softmax ("joint") or in its own ("separate").
    keys, values, biases = [], [], []
    idx = valid = None
    if glob is not None:
        idx, valid = _global_slots(glob)
        keys.append(_gather_rows(_bhnd(a.k, cdt), idx))
        values.append(_gather_rows(_bhnd(a.v, cdt), idx))
        ok = valid[:, None, :]  # (B, 1, G): slots past a row's count masked
        if doc_rows is not None:  # (B, nb * c, G): a global token is a key of its own document's rows
            ok = ok & (doc_rows[:, :, None] == doc.gather(1, idx)[:, None, :])
        biases.append(torch.where(ok, zero, neg_inf))
    pk = pv = None
    if a.prefix_k is not None:
        pk, pv = _bhnd(a.prefix_k, cdt), _bhnd(a.prefix_v, cdt)
        if not a.separate:
            keys.append(pk)
            values.append(pv)
            biases.append(torch.zeros(b, 1, pk.shape[2], dtype=cdt, device=dev))

    q_rows = _view(qb, b, h, -1, d)  # (B, H, nb * c, D)
    row_max = _view(s_band.amax(dim=-1), b, h, -1, 1)  # (B, H, nb * c, 1)
    if keys:
        bias_rows = 1 if doc_rows is None else doc_rows.shape[1]
        s_more = _bmm(q_rows, _cat(keys), transpose=True) + _cat_biases(biases, bias_rows)[:, None]
        row_max = torch.maximum(row_max, s_more.amax(dim=-1, keepdim=True))
    row_max = _finite_max(row_max, cdt)
    # Dropout on the unnormalized exponentials: the same as on the probabilities, the sums taken before it.
    e_band = torch.exp(s_band - row_max.reshape(b, h, nb, c, 1))
    denom = _view(e_band.sum(dim=-1), b, h, -1, 1)
    out = _view(torch.bmm(_view(_dropout(e_band, a.dropout_p), -1, c, span), vb), b, h, -1, d)
    if keys:
        e = torch.exp(s_more - row_max)
        denom = denom + e.sum(dim=-1, keepdim=True)
        out = out + _bmm(_dropout(e, a.dropout_p), _cat(values))
    out = out / torch.where(denom > 0, denom, torch.ones_like(denom))
    if a.separate:
        out = out + _scaled_prefix(a, q_rows, pk, pv)
    # The first N rows, by index rather than by a slice: a fresh tensor, no strides to reason about.
    out = out.index_select(2, torch.arange(n, device=dev))

    if glob is not None and not a.local_rows_only:
        rows_out = _global_rows(a, cdt, idx)  # (B, H, G, D)
        placed = torch.zeros_like(out).scatter(2, idx[:, None, :, None].expand_as(rows_out), rows_out)
        out = torch.where(glob[:, None, :, None], placed, out)
    elif glob is not None:
        out = out.masked_fill(glob[:, None, :, None], 0.0)
    if a.key_padding_mask is not None:
        out = out.masked_fill(a.key_padding_mask[:, None, :, None], 0.0)
    return out.transpose(1, 2).to(a.q.dtype)


def _scaled_prefix(a: AttentionArgs, q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """`prefix_scale[h] * B` of the separate normalization: `q (B, H, R, D)` (scaled) against the prefix keys alone
    in a softmax of their own (every row sees every prefix key), times the prefix values: `(B, H, R, D)`."""
    s = _bmm(q, pk, transpose=True)  # (B, H, R, P), P >= 1
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    out = _bmm(_dropout(e, a.dropout_p), pv) / e.sum(dim=-1, keepdim=True)
    return a.prefix_scale.to(out.dtype)[None, :, None, None] * out


def _cat_biases(biases: list[torch.Tensor], rows) -> torch.Tensor:
    """`(B, 1 or rows, K_i)` biases side by side: `(B, rows, sum K_i)` (`rows` given, not compared: with a symbolic
    length a comparison of sizes would be a guard)."""
    if len(biases) == 1:
        return biases[0]
    return _cat([t.expand(t.shape[0], rows, t.shape[2]) for t in biases])


def _cat(tensors: list[torch.Tensor], dim: int = 2) -> torch.Tensor:
    return torch.cat(tensors, dim=dim) if len(tensors) > 1 else tensors[0]


def _view(t: torch.Tensor, *shape) -> torch.Tensor:
    """`t.reshape(*shape)` for a contiguous `t`, through one dimension. With a symbolic length, a reshape that merges
    a block (or data-dependent) dimension with another asks for a divisibility the shape reasoning cannot always
    prove (a guard, which a named `Dim` rejects); flattening a contiguous tensor and splitting the result ask for
    none."""
    return t.reshape(-1).reshape(*shape)


def _bhnd(t: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """`(B, N, H, D)` -> contiguous `(B, H, N, D)` in the compute dtype."""
    return t.to(cdt).transpose(1, 2).contiguous()


def _bmm(x: torch.Tensor, y: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """`x @ y` (or `x @ y^T`) for contiguous `(B, H, ., .)` tensors, as one `bmm` over `B * H` (views through
    `_view`, not `matmul`'s own reshapes, which merge dimensions)."""
    b, h = x.shape[:2]
    x3, y3 = _view(x, b * h, -1, x.shape[-1]), _view(y, b * h, -1, y.shape[-1])
    r = torch.bmm(x3, y3.transpose(1, 2) if transpose else y3)
    return _view(r, b, h, -1, r.shape[-1])


def _global_slots(glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(idx (B, G) int64, valid (B, G) bool)`: row `b`'s global positions in increasing order in its first
    `count_b` slots (`valid`), distinct non-global positions after them. `G = max(1, max_b count_b)` is a
    data-dependent size (`nonzero`); at least one slot, so no reduction runs over an empty dimension."""
    b, n = glob.shape
    g = glob.to(torch.int64)
    counts = g.sum(dim=1, keepdim=True)  # (B, 1)
    # A stable partition, globals first: each token's destination, then the positions scattered there.
    dest = torch.where(glob, g.cumsum(dim=1) - 1, counts + (1 - g).cumsum(dim=1) - 1)
    pos = torch.arange(n, device=glob.device)
    order = torch.zeros_like(dest).scatter(1, dest, pos[None, :].expand(b, n))
    slots = torch.nonzero(pos < counts.max().clamp(min=1))[:, 0]  # (G,) = 0 .. G - 1
    return order.index_select(1, slots), slots[None, :] < counts


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`t (B, H, N, D)`, `idx (B, G)` -> `(B, H, G, D)`."""
    b, h, _, d = t.shape
    return torch.gather(t, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def _global_rows(a: AttentionArgs, cdt: torch.dtype, idx: torch.Tensor) -> torch.Tensor:
    """The global queries of the `G` slots against every non-padding key of their document (global projections) and
    the prefix as global rows see it (`prefix_k_global` / `prefix_v_global`, else the prefix), in one softmax or,
    separately normalized, two: `(B, H, G, D)` (slots past a row's count hold finite values the caller discards)."""
    qg = _gather_rows(_bhnd(a.q_global, cdt) * a.softmax_scale, idx)
    keys, values, biases = [_bhnd(a.k_global, cdt)], [_bhnd(a.v_global, cdt)], []
    zero = torch.zeros((), dtype=cdt, device=qg.device)
    b = qg.shape[0]
    ok = None if a.key_padding_mask is None else ~a.key_padding_mask[:, None, :]  # (B, 1, N)
    if a.document_ids is not None:  # (B, G, N)
        doc = a.document_ids
        same = doc.gather(1, idx)[:, :, None] == doc[:, None, :]
        ok = same if ok is None else ok & same
    if ok is not None:
        biases.append(torch.where(ok, zero, float("-inf")))
    pk, pv = a.prefix_globals
    if pk is not None:
        pk, pv = _bhnd(pk, cdt), _bhnd(pv, cdt)
    if pk is not None and not a.separate:
        keys.append(pk)
        values.append(pv)
        if biases:  # the prefix keys admissible for every row
            biases.append(torch.zeros(b, 1, pk.shape[2], dtype=cdt, device=qg.device))
    s = _bmm(qg, _cat(keys), transpose=True)  # (B, H, G, N (+ P))
    if biases:
        s = s + _cat_biases(biases, 1 if a.document_ids is None else idx.shape[1])[:, None]
    e = torch.exp(s - _finite_max(s.amax(dim=-1, keepdim=True), cdt))
    denom = e.sum(dim=-1, keepdim=True)
    out = _bmm(_dropout(e, a.dropout_p), _cat(values))
    out = out / torch.where(denom > 0, denom, torch.ones_like(denom))
    if a.separate:
        out = out + _scaled_prefix(a, qg, pk, pv)
    return out


def _finite_max(row_max: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """The row max with `-inf` (a row with no admissible key) raised to the dtype's lowest finite value, so
    `exp(-inf - max)` is 0 and never `exp(-inf + inf)`; a clamp, which every exporter and runtime has."""
    return row_max.clamp(min=torch.finfo(cdt).min)


def _dropout(p: torch.Tensor, dropout_p: float) -> torch.Tensor:
    return F.dropout(p, dropout_p, training=True) if dropout_p > 0 else p
