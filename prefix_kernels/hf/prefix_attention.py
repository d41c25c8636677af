r"""A prefix normalised on its own ("separate"), the paper's kernel-attention study, as the patched module computes
it beside the op.

Per query row `i` of a layer, with `q_i` its query (a local row's local projection, a global row's global one), the
prefix keys/values `k_p, v_p` (`p < P`) that kind of row sees, `s = softmax_scale`, `q' = s * q_i` and the layer's
scale `scale[h]` (`()` or one per head):

    out_i = A_i + scale[h] * B_i
    A_i   = the row's softmax over its text keys alone, times their values (the op's rows without prefix keys)
    B_i   = sum_p kappa(q', k_p) v_p / sum_p kappa(q', k_p)          (0 when the sum is 0, never NaN)

    "exp":   kappa = exp(q' . k)                     B is a softmax: the op's prefix_normalization="separate"
    "rbf":   kappa = exp(-|q' - k|^2 / (2 l^2))      a fixed length scale l
    "poly":  kappa = (q' . k + c)^2                  a learned offset c

Dropout, in training, on the probabilities of `A` (inside the op) and of `B` each. `B` costs `O(N * P * D)` per
head: `prefix_rows` computes it for any set of rows; `slot_rows` computes the `P` rows of prefix-propagation's slots
themselves (`A` over the text keys through the global projections, `B` over the slots), densely, `P x N` per head.
Everything is computed in fp32 (fp64 for fp64 inputs), as the op's softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.reference import masked_softmax

KERNELS = ("exp", "rbf", "poly")


@dataclass(frozen=True)
class SeparatePrefix:
    """How a layer's prefix enters its attention with `prefix_attention="separate"` (built by the prefix layer).

    kernel: "exp" | "rbf" | "poly"; scale: `()` or `(H,)`, the layer's scale of `B` (a parameter: gradients flow);
    offset: `()`, "poly"'s `c`; length_scale: "rbf"'s `l`.
    """

    kernel: str
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    length_scale: float = 64.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bhrd(t: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """`(B, R, H, D)` or `(R, H, D)` -> `(B or 1, H, R, D)` in the compute dtype."""
    if t.dim() == 3:
        t = t.unsqueeze(0)
    return t.transpose(1, 2).to(cdt)


def prefix_probabilities(q: torch.Tensor, prefix_k: torch.Tensor, spec: SeparatePrefix,
                         softmax_scale: float) -> torch.Tensor:
    """`(B, H, R, P)`: each row's normalised kernel weights over the prefix keys. `q (B, R, H, D)`, `prefix_k`
    `(B, P, H, D)` or `(P, H, D)`."""
    cdt = compute_dtype(q.dtype)
    qs = _bhrd(q, cdt) * softmax_scale  # q'
    k = _bhrd(prefix_k, cdt)
    dots = torch.matmul(qs, k.transpose(-1, -2))
    if spec.kernel == "exp":
        return torch.softmax(dots, dim=-1)
    if spec.kernel == "rbf":
        # |q' - k|^2 expanded, O(R * P) memory; rounding can take it a hair below 0.
        dist = qs.square().sum(-1, keepdim=True) + k.square().sum(-1).unsqueeze(-2) - 2 * dots
        weights = torch.exp(-dist.clamp(min=0) / (2.0 * spec.length_scale**2))
    elif spec.kernel == "poly":
        weights = (dots + spec.offset.to(cdt)).square()
    else:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {spec.kernel!r}")
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def prefix_rows(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, spec: SeparatePrefix,
                softmax_scale: float, dropout_p: float) -> torch.Tensor:
    """`B` of the rows `q (B, R, H, D)` against the prefix keys/values (`(B, P, H, D)` or `(P, H, D)`):
    `(B, R, H, D)` in the compute dtype, dropout `dropout_p` on the probabilities."""
    probs = prefix_probabilities(q, prefix_k, spec, softmax_scale)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, _bhrd(prefix_v, probs.dtype)).transpose(1, 2)


def scaled(spec: SeparatePrefix, rows: torch.Tensor) -> torch.Tensor:
    """`scale[h] * rows` for `rows (B, R, H, D)`."""
    return spec.scale.to(rows.dtype).reshape(1, 1, -1, 1) * rows


def add_prefix_rows(out: torch.Tensor, q: torch.Tensor, local_prefix: tuple[torch.Tensor, torch.Tensor],
                    spec: SeparatePrefix, softmax_scale: float, dropout_p: float, *,
                    q_global: torch.Tensor | None = None, is_global: torch.Tensor | None = None,
                    global_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`A + scale * B`: `out (B, N, H, D)`, the op's rows without prefix keys (`A`), plus the scaled `B` of every row,
    local rows with `q` against `local_prefix`, global rows (`is_global`) with `q_global` against `global_prefix`
    (default: the same prefix); padding rows stay 0. Returns `out`'s dtype."""
    if is_global is None:
        rows = prefix_rows(q, *local_prefix, spec, softmax_scale, dropout_p)
    elif global_prefix is None:  # one prefix for both kinds of rows: one product, each row with its own query
        queries = torch.where(is_global[:, :, None, None], q_global, q)
        rows = prefix_rows(queries, *local_prefix, spec, softmax_scale, dropout_p)
    else:
        rows = torch.where(is_global[:, :, None, None],
                           prefix_rows(q_global, *global_prefix, spec, softmax_scale, dropout_p),
                           prefix_rows(q, *local_prefix, spec, softmax_scale, dropout_p))
    if key_padding_mask is not None:
        rows = rows.masked_fill(key_padding_mask[:, :, None, None], 0.0)
    return (out.to(rows.dtype) + scaled(spec, rows)).to(out.dtype)


def slot_rows(q_slots: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, text_padding: torch.Tensor | None,
              k_slots: torch.Tensor, v_slots: torch.Tensor, spec: SeparatePrefix, softmax_scale: float,
              dropout_p: float) -> torch.Tensor:
    """The `P` rows of prefix-propagation's slots, `(B, P, H, D)` in `q_slots`' dtype: `A` over the text keys
    (`k_text, v_text (B, N, H, D)`, padding `text_padding (B, N)` excluded) plus `scale * B` over the slots'
    keys/values `(B, P, H, D)`; every tensor a global projection (the slots are global rows)."""
    cdt = compute_dtype(q_slots.dtype)
    qs = _bhrd(q_slots, cdt)
    scores = torch.matmul(qs, _bhrd(k_text, cdt).transpose(-1, -2)) * softmax_scale  # (B, H, P, N)
    b, n = k_text.shape[:2]
    allowed = torch.ones(b, 1, 1, n, dtype=torch.bool, device=scores.device)
    if text_padding is not None:
        allowed = ~text_padding[:, None, None, :]
    probs = masked_softmax(scores, allowed)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    text = torch.matmul(probs, _bhrd(v_text, cdt)).transpose(1, 2)
    prefix = prefix_rows(q_slots, k_slots, v_slots, spec, softmax_scale, dropout_p)
    return (text + scaled(spec, prefix)).to(q_slots.dtype)
