"""Input validation for `longformer_attention`: every check raises a `ValueError` that names the argument.

`check_inputs` turns the user's call into one `AttentionArgs`, the normalized form every backend receives:

* `is_global` / `key_padding_mask` are `(B, N)` bool tensors or `None`; a padding token is never global
  (padding wins), so backends may rely on `is_global & key_padding_mask` being all false.
* `prefix_k` / `prefix_v` are `(B, P, H, D)` (a `(P, H, D)` prefix is expanded, differentiably, with stride 0
  over the batch) or `None`; `P == 0` is normalized to `None`.
* `q_global` / `k_global` / `v_global` are present whenever `is_global` is, except with `local_rows_only=True`
  (`local_rows_attention`): then they are `None`, `is_global` is kept as given (its tokens are still global keys
  of the local rows), and the global rows are not computed (output 0, no gradient through them).
* `prefix_k_global` / `prefix_v_global` (what global rows use as prefix keys/values) are `(B, P, H, D)` like the
  prefix, or `None` when not given: global rows then use `prefix_k` / `prefix_v`.
* `separate` is `prefix_normalization == "separate"`; `prefix_scale` is then an fp32 `(H,)` tensor (fp64 for fp64
  inputs; a `()` scale is expanded, differentiably), else `None`.
* `document_ids` is a `(B, N)` integer tensor or `None`; its runs are contiguous (checked when run eagerly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import global_without_padding
from .tracing import is_tracing

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
    prefix_k_global: torch.Tensor | None = None  # None: global rows use prefix_k / prefix_v
    prefix_v_global: torch.Tensor | None = None
    separate: bool = False  # prefix_normalization == "separate"
    prefix_scale: torch.Tensor | None = None  # (H,) fp32 with `separate`
    document_ids: torch.Tensor | None = None  # (B, N) integer

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[1]

    @property
    def features(self) -> list[str]:
        """The newer op features this call uses (a backend that lacks one declines the call with its name)."""
        used = [("prefix_normalization='separate'", self.separate), ("document_ids", self.document_ids is not None),
                ("prefix_k_global / prefix_v_global", self.prefix_k_global is not None)]
        return [name for name, on in used if on]

    @property
    def prefix_globals(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prefix keys/values global rows use: `prefix_k_global` / `prefix_v_global`, else the prefix."""
        if self.prefix_k_global is None:
            return self.prefix_k, self.prefix_v
        return self.prefix_k_global, self.prefix_v_global

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
    prefix_k_global=None,
    prefix_v_global=None,
    softmax_scale=None,
    dropout_p=0.0,
    prefix_normalization="joint",
    prefix_scale=None,
    document_ids=None,
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

    prefix_k, prefix_v = _check_prefix("prefix_k", "prefix_v", prefix_k, prefix_v, q)
    prefix_k_global, prefix_v_global = _check_prefix("prefix_k_global", "prefix_v_global", prefix_k_global,
                                                      prefix_v_global, q)
    if prefix_k_global is not None and (prefix_k is None or prefix_k_global.shape != prefix_k.shape):
        want = "prefix_k" if prefix_k is None else f"the shape of prefix_k {tuple(prefix_k.shape)}"
        raise ValueError(f"prefix_k_global / prefix_v_global need {want}, got {tuple(prefix_k_global.shape)}")

    if prefix_normalization not in ("joint", "separate"):
        raise ValueError(f"prefix_normalization must be 'joint' or 'separate', got {prefix_normalization!r}")
    separate = prefix_normalization == "separate"
    if separate and prefix_k is None:
        raise ValueError("prefix_normalization='separate' needs prefix keys (prefix_k, prefix_v)")
    if separate != (prefix_scale is not None):
        raise ValueError("prefix_scale goes with prefix_normalization='separate' (and is required there)")
    if prefix_scale is not None:
        if not isinstance(prefix_scale, torch.Tensor) or not prefix_scale.is_floating_point():
            raise ValueError(f"prefix_scale must be a floating-point tensor of shape () or (H,), got {prefix_scale!r}")
        if tuple(prefix_scale.shape) not in ((), (h,)):
            raise ValueError(f"prefix_scale must have shape () or (H,) = ({h},), got {tuple(prefix_scale.shape)}")
        if prefix_scale.device != q.device:
            raise ValueError(f"prefix_scale is on {prefix_scale.device}, expected {q.device} (the device of q)")
        # fp32 (fp64 for fp64 inputs), as every softmax statistic.
        prefix_scale = prefix_scale.to(torch.float64 if q.dtype == torch.float64 else torch.float32).expand(h)

    document_ids = _check_documents(document_ids, pad, b, n, q.device)

    if softmax_scale is None:
        # `int(d)`: the legacy ONNX exporter traces sizes as tensors; the head dim is static.
        softmax_scale = int(d) ** -0.5
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
        prefix_k_global=prefix_k_global,
        prefix_v_global=prefix_v_global,
        separate=separate,
        prefix_scale=prefix_scale,
        document_ids=document_ids,
    )


def _check_prefix(name_k: str, name_v: str, pk, pv, q: torch.Tensor):
    """A pair of prefix keys/values: `(B, P, H, D)` (a `(P, H, D)` pair expanded over the batch with stride 0),
    or `(None, None)` when absent or `P == 0`."""
    if (pk is None) != (pv is None):
        missing = name_v if pv is None else name_k
        raise ValueError(f"{missing} missing: {name_k} and {name_v} go together")
    if pk is None:
        return None, None
    b, _, h, d = q.shape
    for name, t in ((name_k, pk), (name_v, pv)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must have shape (B, P, H, D) or (P, H, D), got {tuple(t.shape)}")
    if pk.shape != pv.shape:
        raise ValueError(f"{name_v} must have the shape of {name_k} {tuple(pk.shape)}, got {tuple(pv.shape)}")
    p = pk.shape[-3]
    for name, t in ((name_k, pk), (name_v, pv)):
        _check_tensor(name, t, (p, h, d) if t.dim() == 3 else (b, p, h, d), q)
    if p == 0:
        return None, None
    if pk.dim() == 3:
        return pk.unsqueeze(0).expand(b, p, h, d), pv.unsqueeze(0).expand(b, p, h, d)
    return pk, pv


def _check_documents(ids, pad: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """`document_ids (B, N)` integer, on the device of `q`; eagerly, each id's non-padding tokens form one run."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"document_ids must be a (B, N) integer tensor, got {type(ids).__name__}")
    if tuple(ids.shape) != (b, n):
        raise ValueError(f"document_ids must have shape (B, N) = {(b, n)}, got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"document_ids must have an integer dtype, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"document_ids is on {ids.device}, expected {device} (the device of q)")
    if not is_tracing() and n > 1 and not _runs_are_contiguous(ids, pad):
        raise ValueError("document_ids must number each document as one contiguous run of tokens (padding aside): "
                         "an id reappears after another document started")
    return ids


def _runs_are_contiguous(ids: torch.Tensor, pad: torch.Tensor | None) -> bool:
    """Whether, among each row's non-padding tokens, no id comes back after a different one (one host read): the
    runs of equal ids between consecutive real tokens number exactly the distinct ids."""
    ids = ids.long()
    real = torch.ones_like(ids, dtype=torch.bool) if pad is None else ~pad
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_real = torch.where(real, pos, -1).cummax(dim=1).values  # the latest real position so far
    prev_idx = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)
    starts = real & ((prev_idx < 0) | (ids.gather(1, prev_idx.clamp(min=0)) != ids))
    sentinel = ids.max() + 1
    ordered = torch.where(real, ids, sentinel).sort(dim=1).values
    distinct = (ordered[:, :1] != sentinel).sum(1) + ((ordered[:, 1:] != ordered[:, :-1])
                                                     & (ordered[:, 1:] != sentinel)).sum(1)
    return bool((starts.sum(dim=1) == distinct).all())
