"""A static-shape, pure-PyTorch formulation of `longformer_attention` for exporters (`torch.export`,
`torch.onnx.export` with `dynamo=True` or the legacy `dynamo=False`).

The fused backends hide their data-dependent parts (the compact list of each row's global tokens, whose length
needs a host read) inside custom ops, which an exported graph cannot carry, and the reference backend sizes its
tensors by that read. An exported graph must have shapes that follow from the input shapes alone, while the
number of global tokens is data: so this formulation never compacts anything. Every query row is scored against
every key, and the mask of `reference.py` selects what each row may see. One `N x N` score matrix per head serves
both kinds of rows, because the two projections are concatenated along the head dimension:

    query row i   = [q_i, 0]    (local row)      or  [0, qg_i]   (global row)
    key j         = [k_j, kg_j]                      (prefix key p: [pk_p, pk_p])
    value j       = [v_j, vg_j]                      (prefix value p: [pv_p, pv_p])

so a local row's score is exactly `q_i . k_j` and a global row's `qg_i . kg_j`; the first `D` output columns are
the local result, the last `D` the global one. Cost: `O(N^2)` time and memory per head (exact for any mask);
the fused backends stay `O(N)` outside of export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import AttentionArgs
from .reference import masked_softmax


def static_attention(a: AttentionArgs) -> torch.Tensor:
    """`longformer_attention` with static shapes and standard ops only: `(B, N, H, D)` in `a.q.dtype`.

    Same semantics as `reference.chunked_attention` (padding rows 0, rows with no admissible key 0 and never NaN,
    prefix keys seen by every query, dropout on the probabilities); `O(B * H * N * (N + P))` memory.
    """
    if a.local_rows_only:
        raise ValueError("static_attention computes the global rows too: local_rows_only is not supported")
    cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    b, n, h, d = a.shape
    dev = a.q.device

    def bhnd(t: torch.Tensor) -> torch.Tensor:  # (B, N, H, D) -> (B, H, N, D) in the compute dtype
        return t.transpose(1, 2).to(cdt)

    q, k, v = bhnd(a.q), bhnd(a.k), bhnd(a.v)
    pos = torch.arange(n, device=dev)
    band = (pos[:, None] - pos[None, :]).abs() <= a.window  # (N, N)
    key_ok = torch.ones(b, 1, n, dtype=torch.bool, device=dev)
    if a.key_padding_mask is not None:
        key_ok = ~a.key_padding_mask[:, None, :]
    if a.is_global is None:
        allowed = band[None] & key_ok  # (B, N, N)
        qq, kk, vv = q, k, v
        prefix_k = None if a.prefix_k is None else bhnd(a.prefix_k)
        prefix_v = None if a.prefix_v is None else bhnd(a.prefix_v)
    else:
        glob = a.is_global  # never padding (checks.py)
        row_global = glob[:, None, :, None]  # (B, 1, N, 1)
        # A local row sees its band's non-global keys and every global key; a global row every key.
        local = (band[None] & ~glob[:, None, :]) | glob[:, None, :]
        allowed = key_ok & (glob[:, :, None] | local)  # (no `where` on bools: onnxruntime has no such kernel)
        zero = torch.zeros((), dtype=cdt, device=dev)
        qq = torch.cat([torch.where(row_global, zero, q), torch.where(row_global, bhnd(a.q_global), zero)], dim=-1)
        kk = torch.cat([k, bhnd(a.k_global)], dim=-1)
        vv = torch.cat([v, bhnd(a.v_global)], dim=-1)
        prefix_k = prefix_v = None
        if a.prefix_k is not None:  # the same prefix keys and values for both kinds of rows
            prefix_k = bhnd(a.prefix_k).repeat(1, 1, 1, 2)
            prefix_v = bhnd(a.prefix_v).repeat(1, 1, 1, 2)

    if a.document_ids is not None:  # windows and global tokens stop at document boundaries
        allowed = allowed & (a.document_ids[:, :, None] == a.document_ids[:, None, :])
    scores = torch.matmul(qq, kk.transpose(-1, -2)) * a.softmax_scale  # (B, H, N, N)
    allowed = allowed[:, None].expand(b, 1, n, n)
    if prefix_k is not None:
        p = prefix_k.shape[2]
        scores = torch.cat([scores, torch.matmul(qq, prefix_k.transpose(-1, -2)) * a.softmax_scale], dim=-1)
        allowed = torch.cat([allowed, torch.ones(b, 1, n, p, dtype=torch.bool, device=dev)], dim=-1)
        vv = torch.cat([vv, prefix_v], dim=2)
    probs = masked_softmax(scores, allowed)
    if a.dropout_p > 0:
        probs = F.dropout(probs, a.dropout_p, training=True)
    out = torch.matmul(probs, vv)
    if a.is_global is not None:
        out = torch.where(row_global, out[..., d:], out[..., :d])
    if a.key_padding_mask is not None:
        out = out.masked_fill(a.key_padding_mask[:, None, :, None], 0.0)
    return out.transpose(1, 2).to(a.q.dtype)
