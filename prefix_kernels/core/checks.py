"""Input validation for `longformer_attention`: every check raises a `ValueError` that names the argument.

`check_inputs` turns the user's call into one `AttentionArgs`, the normalized form every backend receives:

* `is_global` / `key_padding_mask` are `(B, N)` bool tensors or `None`; a padding token is never global
  (padding wins), so backends may rely on `is_global & key_padding_mask` being all false.
* `prefix_k` / `prefix_v` are `(B, P, H, D)` (a `(P, H, D)` prefix is expanded, differentiably, with stride 0
  over the batch) or `None`; `P == 0` is normalized to `None`.
* `q_global` / `k_global` / `v_global` are present whenever `is_global` is, except with `local_rows_only=True`
  (`local_rows_attention`): then they are `None`, `is_global` is kept as given (its tokens are still global keys
  of the local rows), and the global rows are not computed (output 0, no gradient through them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import global_without_padding

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionArgs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window: int
    is_global: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    q_global: torch.Tensor | None
    k_global: torch.Tensor | None
    v_global: torch.Tensor | None
    prefix_k: torch.Tensor | None
    prefix_v: torch.Tensor | None
    softmax_scale: float
    dropout_p: float
    local_rows_only: bool = False  # global rows not computed: their output is 0 (no global projections)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


def _check_tensor(name: str, t, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape):
        raise ValueError(f"{name} must have rank {len(shape)} {shape}, got shape {tuple(t.shape)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {ref.dtype} (the dtype of q)")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} (the device of q)")


def _check_mask(name: str, m, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{name} must be a (B, N) bool tensor, got {type(m).__name__}")
    if tuple(m.shape) != (b, n):
        raise ValueError(f"{name} must have shape (B, N) = {(b, n)}, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool, got {m.dtype}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device}, expected {device} (the device of q)")
    return m


def check_inputs(
    q,
    k,
    v,
    *,
    window,
    is_global=None,
    key_padding_mask=None,
    q_global=None,
    k_global=None,
    v_global=None,
    prefix_k=None,
    prefix_v=None,
    softmax_scale=None,
    dropout_p=0.0,
    local_rows_only=False,
) -> AttentionArgs:
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have rank 4 (B, N, H, D), got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    b, n, h, d = q.shape
    if d == 0 or h == 0:
        raise ValueError(f"q must have non-empty heads and head_dim, got shape {tuple(q.shape)}")
    _check_tensor("k", k, (b, n, h, d), q)
    _check_tensor("v", v, (b, n, h, d), q)

    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"window must be an int (one-sided window w), got {window!r}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")

    pad = _check_mask("key_padding_mask", key_padding_mask, b, n, q.device)
    glob = _check_mask("is_global", is_global, b, n, q.device)
    if glob is not None and pad is not None:
        glob = global_without_padding(glob, pad)

    if not isinstance(local_rows_only, bool):
        raise ValueError(f"local_rows_only must be a bool, got {local_rows_only!r}")
    projections = {"q_global": q_global, "k_global": k_global, "v_global": v_global}
    given = [name for name, t in projections.items() if t is not None]
    if local_rows_only and given:
        raise ValueError(f"{', '.join(given)} must be None with local_rows_only=True: the global rows are not "
                         "computed, global tokens enter the local rows through k and v")
    if given and len(given) != 3:
        missing = [name for name, t in projections.items() if t is None]
        raise ValueError(f"{', '.join(missing)} missing: q_global, k_global and v_global go together")
    for name, t in projections.items():
        if t is not None:
            _check_tensor(name, t, (b, n, h, d), q)
    if glob is not None and not given and not local_rows_only:
        # Only this error path pays for a host sync; with projections present nothing is read back.
        if bool(glob.any()):
            raise ValueError("q_global, k_global and v_global are required when any token is_global")
        glob = None
    if glob is None:
        q_global = k_global = v_global = None

    if (prefix_k is None) != (prefix_v is None):
        missing = "prefix_v" if prefix_v is None else "prefix_k"
        raise ValueError(f"{missing} missing: prefix_k and prefix_v go together")
    if prefix_k is not None:
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (3, 4):
                raise ValueError(f"{name} must have shape (B, P, H, D) or (P, H, D), got {tuple(t.shape)}")
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_v must have the shape of prefix_k {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}"
            )
        p = prefix_k.shape[-3]
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            want = (p, h, d) if t.dim() == 3 else (b, p, h, d)
            _check_tensor(name, t, want, q)
        if p == 0:
            prefix_k = prefix_v = None
        elif prefix_k.dim() == 3:
            prefix_k = prefix_k.unsqueeze(0).expand(b, p, h, d)
            prefix_v = prefix_v.unsqueeze(0).expand(b, p, h, d)

    if softmax_scale is None:
        softmax_scale = d**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float, got {softmax_scale!r}")
    if not (float(softmax_scale) > 0 and float(softmax_scale) < float("inf")):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")

    return AttentionArgs(
        q=q,
        k=k,
        v=v,
        window=int(window),
        is_global=glob,
        key_padding_mask=pad,
        q_global=q_global,
        k_global=k_global,
        v_global=v_global,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
        softmax_scale=float(softmax_scale),
        dropout_p=float(dropout_p),
        local_rows_only=local_rows_only and glob is not None,
    )
