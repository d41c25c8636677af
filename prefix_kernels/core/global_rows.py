r"""The global rows of `longformer_attention` computed from the hidden states, without projecting the sequence by
the global key and value layers.

A global query attends to every non-padding key through the global projections `kg = x Wk^T + bk`,
`vg = x Wv^T + bv` of the hidden states `x (B, N, C)`. Per head `h`, with `Wk_h`, `bk_h` its `D` rows of the key
layer (the same for the value layer) and `qg_i` the global query:

    qg_i . kg_j        = (Wk_h^T qg_i) . x_j + qg_i . bk_h
    sum_j p_ij vg_j    = Wv_h (sum_j p_ij x_j) + bv_h sum_j p_ij        (sums over the text keys, after dropout)

so each global query is one width-`C` query per head against `x`, and the `(B, N, C)` projections never exist. For
`G` global tokens per row this costs `G / D` of the two projections' FLOPs (forward and backward), and autograd keeps
two fp32 `(B, G, H, N)` probability tensors instead of the two projections' activations (`pays`). The patched Hugging
Face module (`hf/self_attention.py`) uses it with `local_rows_attention` computing the local rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import masked_softmax


def pays(max_global: int, head_dim: int) -> bool:
    """Whether the global rows from the hidden states replace the global key / value projections: when the most
    global tokens of a batch row, `G`, are at most `D / 2`. Both its costs scale as `G / D` of what it replaces:
    FLOPs (`2 * B*H*G*N*C` per product against `2 * B*N*C*C` per projection, forward and backward) and the
    activations autograd keeps (about two fp32 `(B, G, H, N)` probability tensors against the two `(B, N, C)`
    projections). At `G <= D / 2` it takes at most half the FLOPs, and no more saved memory than the projections
    even in 16-bit (in fp32, half); beyond that the projections and the fused global rows win."""
    return 2 * max_global <= head_dim


def global_rows_from_hidden(
    x: torch.Tensor,
    qg: torch.Tensor,
    key_weight: torch.Tensor,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    idx: torch.Tensor,
    counts: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    *,
    scale: float,
    dropout_p: float,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The global rows `(B, G, H, D)`, in the compact order of `idx (B, G)` (slots past `counts (B,)` exactly 0).

    Args:
        x: `(B, N, C)` hidden states.
        qg: `(B, G, H, D)` the global queries of the compact slots (the global query layer applied to `x` there).
        key_weight, key_bias, value_weight, value_bias: the global key / value layers, `(H * D, C)` and `(H * D,)`.
        key_padding_mask: `(B, N)` bool or `None`; prefix_k, prefix_v: `(P, H, D)` or `None`.
        scale, dropout_p, document_ids: as in `longformer_attention` (`document_ids (B, N)`: a global query sees
            the keys of its own document only).

    One softmax per row (fp32, padding keys masked), dropout `dropout_p`, as `reference.py` states the global rows.
    Every weight gets its gradient from autograd through these products.
    """
    b, n, c = x.shape
    g, h, d = qg.shape[1:]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The softmax scale is folded into the queries before any product, so 16-bit scores stay as finite as the
    # scaled scores of the reference (scaling the unscaled `x . (Wk^T qg)` afterwards overflows first).
    qs = qg * scale
    qx = torch.einsum("bghd,hdc->bghc", qs, key_weight.view(h, d, c))
    # x untransposed in the product: its gradient comes out contiguous (a transposed one costs a strided
    # accumulation into the gradient of x, slow in bf16).
    scores = torch.bmm(x, qx.reshape(b, g * h, c).transpose(1, 2)).transpose(1, 2).view(b, g, h, n)
    if key_bias is not None:
        scores = scores + (qs * key_bias.view(h, d)).sum(-1, keepdim=True)
    allowed = (torch.arange(g, device=x.device) < counts[:, None])[:, :, None, None]  # (B, G, 1, 1): used slots
    key_ok = allowed if key_padding_mask is None else allowed & ~key_padding_mask[:, None, None, :]
    if document_ids is not None:  # (B, G, 1, N): the key is in the global query's document
        own = document_ids.gather(1, idx.long())
        key_ok = key_ok & (own[:, :, None] == document_ids[:, None, :])[:, :, None, :]
    if prefix_k is not None:
        scores = torch.cat([scores, torch.einsum("bghd,phd->bghp", qs, prefix_k)], dim=-1)
        key_ok = torch.cat([key_ok.expand(b, g, 1, n), allowed.expand(b, g, 1, prefix_k.shape[0])], dim=-1)
    probs = masked_softmax(scores.to(cdt), key_ok)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    probs = probs.to(x.dtype)
    text = probs[..., :n]
    context = torch.bmm(text.reshape(b, g * h, n), x).view(b, g, h, c)
    out = torch.einsum("bghc,hdc->bghd", context, value_weight.view(h, d, c))
    if value_bias is not None:
        out = out + text.sum(-1, keepdim=True) * value_bias.view(h, d)
    if prefix_v is not None:
        out = out + torch.einsum("bghp,phd->bghd", probs[..., n:], prefix_v)
    return out
