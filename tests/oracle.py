"""A second, row-by-row statement of `longformer_attention`, written from the semantics in `core/reference.py` and
sharing no code with the package: each query row's key set is listed explicitly, then one softmax (or two, in
"separate" mode) is taken over it, in float64, under autograd. Slow (a Python loop over the rows): for small
problems in the property tests.

`keep`, optional: dropout keep masks `(local, global)`, each `(B, H, N, N + P)` bool, entry `[b, h, i, j]` for
query `i` and key position `j` (prefix key `p` at `N + p`), with entries scaled by `1 / (1 - dropout_p)`; the fused
backends' documented schemes give them (`dropout_masks.py`, the `cpu` backend's tests).
"""

from __future__ import annotations

import torch


def row_oracle(q, k, v, *, window, is_global=None, key_padding_mask=None, q_global=None, k_global=None,
               v_global=None, prefix_k=None, prefix_v=None, prefix_k_global=None, prefix_v_global=None,
               softmax_scale=None, dropout_p=0.0, prefix_normalization="joint", prefix_scale=None,
               document_ids=None, keep=None, **_) -> torch.Tensor:
    b, n, h, d = q.shape
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    pad = torch.zeros(b, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu()
    glob = torch.zeros(b, n, dtype=torch.bool) if is_global is None else is_global.cpu() & ~pad
    doc = torch.zeros(b, n, dtype=torch.long) if document_ids is None else document_ids.cpu().long()
    separate = prefix_normalization == "separate"
    if prefix_k_global is None:
        prefix_k_global, prefix_v_global = prefix_k, prefix_v

    def per_batch(t, row):
        if t is None:
            return None
        return t if t.dim() == 3 else t[row]

    rows = []
    for bb in range(b):
        outs = []
        for i in range(n):
            if pad[bb, i]:
                outs.append(q.new_zeros(h, d, dtype=torch.float64))
                continue
            same = (doc[bb] == doc[bb, i]) & ~pad[bb]
            if glob[bb, i]:
                keys = same.nonzero()[:, 0]
                qi, kk, vv = q_global[bb, i], k_global[bb], v_global[bb]
                pk, pv = per_batch(prefix_k_global, bb), per_batch(prefix_v_global, bb)
                mask = None if keep is None else keep[1][bb, :, i]
            else:
                pos = torch.arange(n)
                band = ((pos - i).abs() <= window) & ~glob[bb]
                keys = (same & (band | glob[bb])).nonzero()[:, 0]
                qi, kk, vv = q[bb, i], k[bb], v[bb]
                pk, pv = per_batch(prefix_k, bb), per_batch(prefix_v, bb)
                mask = None if keep is None else keep[0][bb, :, i]
            outs.append(_row(qi.double(), kk[keys].double(), vv[keys].double(), keys, n, pk, pv, scale, separate,
                             prefix_scale, mask, dropout_p))
        rows.append(torch.stack(outs))
    return torch.stack(rows)


def _row(qi, kt, vt, keys, n, pk, pv, scale, separate, prefix_scale, mask, dropout_p):
    """`(H, D)` output of one query row: `qi (H, D)`, its text keys/values `(T, H, D)` at positions `keys`, and the
    prefix keys/values `(P, H, D)` or `None`."""
    s_text = torch.einsum("hd,thd->ht", qi, kt) * scale
    parts = [(s_text, vt, keys)]
    if pk is not None:
        s_pre = torch.einsum("hd,phd->hp", qi, pk.double()) * scale
        parts.append((s_pre, pv.double(), n + torch.arange(pk.shape[0])))
    if not separate:
        s_all = torch.cat([p[0] for p in parts], dim=1)
        v_all = torch.cat([p[1] for p in parts], dim=0)
        cols = torch.cat([p[2] for p in parts])
        return _attend(s_all, v_all, cols, mask, dropout_p)
    text = _attend(s_text, vt, keys, mask, dropout_p)
    prefix = _attend(parts[1][0], parts[1][1], parts[1][2], mask, dropout_p)
    return text + prefix_scale.double().expand(qi.shape[0])[:, None] * prefix


def _attend(s, vals, cols, mask, dropout_p):
    """`softmax(s) @ vals` per head, `(H, D)`; 0 for an empty key set; dropout entries from `mask[:, cols]`."""
    if s.shape[1] == 0:
        return vals.new_zeros(s.shape[0], vals.shape[-1])
    p = torch.softmax(s, dim=1)
    if mask is not None:
        p = p * mask[:, cols].to(p.dtype) / (1 - dropout_p)
    return torch.einsum("ht,thd->hd", p, vals)
