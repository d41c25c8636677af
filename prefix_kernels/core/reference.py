r"""The semantics of `longformer_attention`, written down once, and the two pure-PyTorch references.

Notation, per batch row `b`: `N` tokens, `pad[j]` = padding, `glob[j]` = global token (never both: padding
wins), `doc[j]` = document id (one document when `document_ids` is not given), one-sided window `w`, prefix
keys/values `0..P-1` (prefix-tuning; global rows use `prefix_k_global` / `prefix_v_global` when given, else the
same), `s = softmax_scale` (default `D ** -0.5`, applied to the unscaled `q`). Every softmax is computed in fp32
(fp64 for fp64 inputs). `same(i, j)` is `doc[i] == doc[j]`.

* padding query `i` -> output 0. Padding tokens are neither rows nor keys, whatever their document id.
* local query `i` (not global, not padding): its text keys are
      band keys    {j : |i - j| <= w, same(i, j), not pad[j], not glob[j]}   scores s * q_i . k_j   (local k, v)
    U global keys  {j : glob[j], same(i, j)}                                 scores s * q_i . k_j   (local k, v, once)
  and its prefix keys {p : 0 <= p < P}, scores s * q_i . prefix_k_p.
* global query `i`: its text keys are {j : not pad[j], same(i, j)}, scores s * qg_i . kg_j (global kg, vg), and
  its prefix keys, scores s * qg_i . prefix_k_global_p.
* `prefix_normalization="joint"`: one softmax over the text keys and the prefix keys together.
  `"separate"` (the paper's kernel-attention study): `out_i = A_i + prefix_scale[h] * B_i`, `A_i` the softmax over
  the text keys alone times their values (0 when the row has no text key), `B_i` the softmax over the prefix keys
  alone times the prefix values.
* dropout `p` on every probability matrix (in "separate" mode on `A` and `B` each), kept entries scaled by
  `1 / (1 - p)`.
* a row whose key set is empty outputs 0 (never NaN), with zero gradients.
* local rows only (`local_rows_attention`, `args.local_rows_only`): global queries output 0, with zero gradients;
  global tokens stay the global keys of the local rows.

The mask for N = 10, w = 2, glob = {0, 6}, pad = {9}, P = 0 (`#` band key, `G` global key, `.` not attended;
rows 0 and 6 are global queries and see every non-padding key through the global projections; row 9 is
padding):

        key j:  0 1 2 3 4 5 6 7 8 9
    query 0     G # # # # # G # # .      <- global query (qg . kg)
    query 1     G # # # . . G . . .
    query 2     G # # # # . G . . .
    query 3     G # # # # # G . . .
    query 4     G . # # # # G . . .      band keys 2..6, key 6 counted once, as a global key
    query 5     G . . # # # G # . .
    query 6     G # # # # # G # # .      <- global query
    query 7     G . . . . # G # # .
    query 8     G . . . . . G # # .      key 9 is padding
    query 9     . . . . . . . . . .      <- padding query: output 0

The same row packed with two documents, doc = [0 0 0 0 0 1 1 1 1 1] (`document_ids`), glob = {0, 5}, pad = {9}:
windows stop at the boundary, and each global token is global to its own document only, as a row and as a key.
Without dropout each document gives exactly what it gives alone:

        key j:  0 1 2 3 4 | 5 6 7 8 9
    query 0     G # # # # | . . . . .    <- global query of document 0
    query 1     G # # # . | . . . . .
    query 2     G # # # # | . . . . .
    query 3     G # # # # | . . . . .
    query 4     G . # # # | . . . . .    the window 2..6 stops at 4
    query 5     . . . . . | G # # # .    <- global query of document 1
    query 6     . . . . . | G # # # .    the window 4..8 starts at 5
    query 7     . . . . . | G # # # .
    query 8     . . . . . | G . # # .
    query 9     . . . . . | . . . . .    <- padding

`dense_attention` builds these `N x N` masks explicitly (tests only). `chunked_attention` (the "reference"
backend, `backends/reference.py`) computes the same thing in memory `O(B * H * N * (c + 2w + G + P))`, never
`N x N`: query chunks of `c` rows against their `c + 2w` band keys, the `G` global keys, and the prefix; the global
rows against all keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import AttentionArgs, check_inputs
from .masks import global_positions


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `allowed`; rows with nothing allowed give exactly 0.

    The row max is detached (softmax is invariant to it) and replaced by 0 for empty rows, so neither the
    forward nor the backward ever forms `-inf - -inf`: all-padding rows keep finite gradients in fp16.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bhnd(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`(B, N, H, D)` -> `(B, H, N, D)` in the compute dtype."""
    return None if t is None else t.transpose(1, 2).to(dtype)


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`t (B, H, N, D)`, `idx (B, G)` -> `(B, H, G, D)`."""
    b, h, _, d = t.shape
    return torch.gather(t, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def _dropout(p: torch.Tensor, dropout_p: float) -> torch.Tensor:
    return F.dropout(p, dropout_p, training=True) if dropout_p > 0 else p


def _attend(a: AttentionArgs, s_text: torch.Tensor, ok_text: torch.Tensor, v_text: torch.Tensor,
            s_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None) -> torch.Tensor:
    """`(B, H, rows, D)`: rows' attention over their text keys (scaled scores `s_text (B, H, rows, T)`, `ok_text`
    which are admissible, broadcastable, values `v_text (B, H, T, D)`) and over the prefix keys (`s_prefix
    (B, H, rows, P)`, `v_prefix (B, H, P, D)`, admissible for every row), in one softmax ("joint") or two
    ("separate": `A + prefix_scale[h] * B`), with dropout on each probability matrix."""
    if s_prefix is None:
        return torch.matmul(_dropout(masked_softmax(s_text, ok_text), a.dropout_p), v_text)
    if a.separate:
        text = torch.matmul(_dropout(masked_softmax(s_text, ok_text), a.dropout_p), v_text)
        prefix = torch.matmul(_dropout(torch.softmax(s_prefix, dim=-1), a.dropout_p), v_prefix)
        return text + a.prefix_scale.to(text.dtype).view(1, -1, 1, 1) * prefix
    ok = torch.cat([ok_text.expand(*s_text.shape), torch.ones_like(s_prefix, dtype=torch.bool)], dim=-1)
    probs = _dropout(masked_softmax(torch.cat([s_text, s_prefix], dim=-1), ok), a.dropout_p)
    return torch.matmul(probs, torch.cat([v_text, v_prefix], dim=2))


def _same_document(doc: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | bool:
    """`(B, R, C)` bool: row and column tokens (ids `rows (B, R)`, `cols (B, C)` gathered from `doc`) share a
    document; `True` without documents."""
    if doc is None:
        return True
    return rows[:, :, None] == cols[:, None, :]


def _global_rows(a: AttentionArgs, cdt: torch.dtype, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Global queries against every non-padding key of their document (+ prefix), scattered back to
    `(B, H, N, D)` (0 elsewhere)."""
    qg, kg, vg = (_bhnd(t, cdt) for t in (a.q_global, a.k_global, a.v_global))
    b, h, n, d = qg.shape
    q_sel = _gather_rows(qg, idx)
    key_ok = torch.ones(b, n, dtype=torch.bool, device=qg.device)
    if a.key_padding_mask is not None:
        key_ok = ~a.key_padding_mask
    allowed = valid[:, :, None] & key_ok[:, None, :]  # (B, G, N)
    if a.document_ids is not None:
        allowed = allowed & _same_document(a.document_ids, a.document_ids.gather(1, idx), a.document_ids)
    s_prefix = v_prefix = None
    pk, pv = a.prefix_globals
    if pk is not None:
        pk, v_prefix = _bhnd(pk, cdt), _bhnd(pv, cdt)
        s_prefix = torch.matmul(q_sel, pk.transpose(-1, -2)) * a.softmax_scale
    scores = torch.matmul(q_sel, kg.transpose(-1, -2)) * a.softmax_scale
    out_sel = _attend(a, scores, allowed[:, None], vg, s_prefix, v_prefix)
    out_sel = out_sel * valid[:, None, :, None]  # unused slots (past a row's count) add exact zeros
    full = torch.zeros(b, h, n, d, dtype=cdt, device=qg.device)
    return full.scatter_add(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d), out_sel)


def _combine(a: AttentionArgs, out_local: torch.Tensor, out_global: torch.Tensor | None) -> torch.Tensor:
    """Global rows take the global result (0 with `local_rows_only`), padding rows 0; back to `(B, N, H, D)` in the
    input dtype."""
    out = out_local
    if out_global is not None:
        out = torch.where(a.is_global[:, None, :, None], out_global, out)
    elif a.local_rows_only:
        out = out.masked_fill(a.is_global[:, None, :, None], 0.0)
    if a.key_padding_mask is not None:
        out = out.masked_fill(a.key_padding_mask[:, None, :, None], 0.0)
    return out.transpose(1, 2).to(a.q.dtype)


def chunked_attention(a: AttentionArgs, chunk: int | None = None) -> torch.Tensor:
    """Memory-efficient reference (the "reference" backend): differentiable, any device and dtype.

    Query chunks of `chunk` rows (default `clamp(w, 32, 512)`) see keys `[start - w, end + w)`; scores of
    a chunk are `(B, H, chunk, chunk + 2w + G + P)`, so autograd keeps `O(N * (chunk + 2w + G + P))` per head.
    """
    cdt = _compute_dtype(a.dtype)
    b, n, h, d = a.shape
    w = a.window
    q, k, v = (_bhnd(t, cdt) for t in (a.q, a.k, a.v))
    dev = q.device
    doc = a.document_ids
    key_ok = torch.ones(b, n, dtype=torch.bool, device=dev)  # may be a band key
    if a.key_padding_mask is not None:
        key_ok &= ~a.key_padding_mask
    idx = valid = None
    if a.is_global is not None:
        key_ok &= ~a.is_global
        idx, counts, g = global_positions(a.is_global)
        valid = torch.arange(g, device=dev)[None, :] < counts[:, None]
        k_glob, v_glob = _gather_rows(k, idx), _gather_rows(v, idx)
        doc_glob = None if doc is None else doc.gather(1, idx)
    pk, pv = _bhnd(a.prefix_k, cdt), _bhnd(a.prefix_v, cdt)

    c = chunk or max(32, min(w, 512))
    outs = []
    for start in range(0, n, c):
        end = min(start + c, n)
        k0, k1 = max(0, start - w), min(n, end + w)
        qc = q[:, :, start:end]
        rows = torch.arange(start, end, device=dev)[:, None]
        cols = torch.arange(k0, k1, device=dev)[None, :]
        doc_rows = None if doc is None else doc[:, start:end]
        band = ((rows - cols).abs() <= w)[None] & key_ok[:, None, k0:k1]
        band = band & _same_document(doc, doc_rows, None if doc is None else doc[:, k0:k1])
        parts_s = [torch.matmul(qc, k[:, :, k0:k1].transpose(-1, -2))]
        parts_a = [band]
        parts_v = [v[:, :, k0:k1]]
        if idx is not None:
            parts_s.append(torch.matmul(qc, k_glob.transpose(-1, -2)))
            parts_a.append(valid[:, None, :] & _same_document(doc, doc_rows, doc_glob))
            parts_v.append(v_glob)
        s_text = torch.cat(parts_s, dim=-1) * a.softmax_scale
        ok_text = torch.cat([m.expand(b, end - start, m.shape[-1]) for m in parts_a], dim=-1)[:, None]
        s_prefix = None if pk is None else torch.matmul(qc, pk.transpose(-1, -2)) * a.softmax_scale
        outs.append(_attend(a, s_text, ok_text, torch.cat(parts_v, dim=2), s_prefix, pv))
    out_local = torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d)
    out_global = _global_rows(a, cdt, idx, valid) if idx is not None and not a.local_rows_only else None
    return _combine(a, out_local, out_global)


def dense_attention(q, k, v, *, window, **kwargs) -> torch.Tensor:
    """Dense `O(N^2)` reference for tests: explicit `(B, N, N)` masks, one softmax (or two, "separate") per branch.

    Same keyword arguments as `longformer_attention` (without `backend`); returns `(B, N, H, D)` in `q.dtype`.
    """
    a = check_inputs(q, k, v, window=window, **kwargs)
    cdt = _compute_dtype(a.dtype)
    b, n, h, d = a.shape
    dev = a.q.device
    pad = a.key_padding_mask if a.key_padding_mask is not None else torch.zeros(b, n, dtype=torch.bool, device=dev)
    glob = a.is_global if a.is_global is not None else torch.zeros(b, n, dtype=torch.bool, device=dev)
    pos = torch.arange(n, device=dev)
    band = (pos[:, None] - pos[None, :]).abs() <= a.window
    same = _same_document(a.document_ids, a.document_ids, a.document_ids)
    local_allowed = ((band[None] & ~pad[:, None, :] & ~glob[:, None, :]) | (glob & ~pad)[:, None, :]) & same
    global_allowed = (~pad)[:, None, :] & same

    def branch(qq, kk, vv, allowed, prefix):
        qq, kk, vv = (_bhnd(t, cdt) for t in (qq, kk, vv))
        scores = torch.matmul(qq, kk.transpose(-1, -2)) * a.softmax_scale
        s_prefix = v_prefix = None
        if prefix[0] is not None:
            pk, v_prefix = _bhnd(prefix[0], cdt), _bhnd(prefix[1], cdt)
            s_prefix = torch.matmul(qq, pk.transpose(-1, -2)) * a.softmax_scale
        return _attend(a, scores, allowed.expand(b, n, n)[:, None], vv, s_prefix, v_prefix)

    out_local = branch(a.q, a.k, a.v, local_allowed, (a.prefix_k, a.prefix_v))
    out_global = None
    if a.is_global is not None and not a.local_rows_only:
        out_global = branch(a.q_global, a.k_global, a.v_global, global_allowed, a.prefix_globals)
    return _combine(a, out_local, out_global)
