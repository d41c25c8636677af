"""The public op `longformer_attention`, the one backend registry, and the per-call dispatch.

Backends (`backends/`) are loaded lazily by name from `BACKEND_ORDER`; a fused backend's launchers are handed to
the shared custom op (`core.custom_op.register_launchers`) when it is loaded, so nothing below this module imports
a backend. Each backend says why it cannot run here (`unavailable_reason`) or cannot serve a call
(`cannot_serve`); `available_backends()` reports the first.

Dispatch, per call (`_dispatch`):

* while an exporter traces (`torch.export`, `torch.onnx.export`): the export formulation `core.static`, standard
  ops with shapes that follow from the input shapes alone;
* else the backend: an explicit one that cannot serve raises `ValueError` with the reason; `"auto"` takes the first
  of `BACKEND_ORDER` that can, except a backend that only emulates its kernels (Triton's interpreter,
  `TRITON_INTERPRET=1`: far slower than the reference backend, so `auto` never picks it; an explicit
  `"triton"` runs it). `PREFIX_KERNELS_BACKEND` overrides the `backend` argument;
* under `torch.compile` the reference backend, which sizes its tensors by a host read of the global count, runs
  eagerly between two graphs (a graph break; `fullgraph=True` needs a fused backend).

`local_rows_attention` is the same dispatch for an internal mode (`AttentionArgs.local_rows_only`): the local rows
alone, for the patched HF module that computes the global rows from the hidden states (`core/global_rows.py`).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .core.checks import AttentionArgs, check_inputs
from .core.custom_op import fused_attention, register_launchers
from .core.static import static_attention
from .core.tracing import is_exporting

# `auto` order, fastest first, as measured (BENCHMARKS.md): on a GPU the Triton kernels ahead of the CUDA library;
# on a CPU the `cpu` backend (block-batched matmuls) for fp32/bf16/fp16; `reference` (the readable statement of the
# semantics) last, for everything else (fp64, any device).
BACKEND_ORDER = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "PREFIX_KERNELS_BACKEND"
_BACKEND_MODULES = {
    "triton": "prefix_kernels.backends.triton",
    "cuda": "prefix_kernels.backends.cuda",
    "cpu": "prefix_kernels.backends.cpu",
    "reference": "prefix_kernels.backends.reference",
}

_MODULES: dict[str, tuple[ModuleType | None, str | None]] = {}
_REASONS: dict[str, str | None] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """The backend module, or the reason it cannot be imported (a plain dict lookup once `_unavailable` ran, so
    torch.compile traces it). A fused backend's launchers are registered with the custom op here."""
    if name not in _MODULES:
        try:
            module = importlib.import_module(_BACKEND_MODULES[name])
        except Exception as exc:  # a missing optional dependency (triton) or a broken build
            _MODULES[name] = (None, f"import failed: {type(exc).__name__}: {exc}")
        else:
            if not hasattr(module, "attention"):
                register_launchers(name, module.forward, module.backward)
            _MODULES[name] = (module, None)
    return _MODULES[name]


# Evaluated eagerly (importing the backend) even while torch.compile traces: dynamo cannot trace importlib.
@torch.compiler.assume_constant_result
def _unavailable(name: str) -> str | None:
    if name not in _REASONS:
        module, why = _load(name)
        _REASONS[name] = why if module is None else module.unavailable_reason()
    return _REASONS[name]


def available_backends() -> dict[str, str | None]:
    """`{"triton": None | "why not", "cuda": ..., "cpu": ..., "reference": None}`: `None` means usable on this
    machine. Usable is not the same as chosen by `auto`: see `auto_skips()`.
    """
    return {name: _unavailable(name) for name in BACKEND_ORDER}


@torch.compiler.assume_constant_result
def _auto_skip_reason(name: str) -> str | None:
    if name != "triton" or _unavailable(name) is not None:
        return None
    module, _ = _load(name)
    if getattr(module, "INTERPRET", os.environ.get("TRITON_INTERPRET") == "1"):
        return ("runs under Triton's interpreter (TRITON_INTERPRET=1), which 'auto' never picks; "
                "pass backend='triton' to run it")
    return None


def auto_skips() -> dict[str, str]:
    """`{name: why}` for the usable backends that `auto` never picks here (Triton under `TRITON_INTERPRET=1`)."""
    reasons = {name: _auto_skip_reason(name) for name in BACKEND_ORDER}
    return {name: why for name, why in reasons.items() if why is not None}


def check_backend_name(backend: str) -> str:
    """`backend` itself when it names a backend or "auto"; else a `ValueError` listing the choices."""
    if backend not in ("auto", *BACKEND_ORDER):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_ORDER))}; got {backend!r}")
    return backend


def _why_not(name: str, args: AttentionArgs) -> str | None:
    why = _unavailable(name)
    if why is not None:
        return why
    module, _ = _load(name)
    return module.cannot_serve(args)


def _choose(args: AttentionArgs, backend: str) -> tuple[str | None, str | None]:
    """`(name, None)`: the backend that serves `args`; `(None, why)` when the named one, or every one, cannot."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in ("auto", *BACKEND_ORDER):
            raise ValueError(f"{ENV_VAR}={forced!r} must be one of 'auto', {', '.join(map(repr, BACKEND_ORDER))}")
        backend = forced
    backend = check_backend_name(backend)
    if backend != "auto":
        why = _why_not(backend, args)
        if why is not None:
            return None, f"backend {backend!r} cannot serve this call: {why}"
        return backend, None
    reasons = {}
    for name in BACKEND_ORDER:
        why = _auto_skip_reason(name) or _why_not(name, args)
        if why is None:
            return name, None
        reasons[name] = why
    return None, f"no backend can serve this call: {reasons}"


def select_backend(args: AttentionArgs, backend: str = "auto") -> str:
    """The backend that serves `args`; raises `ValueError` when an explicit one cannot."""
    name, why = _choose(args, backend)
    if name is None:
        raise ValueError(why)
    return name


def serving_backend(args: AttentionArgs, backend: str = "auto") -> str | None:
    """The backend `select_backend` picks for `args`, or `None` where it would raise (the named backend, or every
    backend, cannot serve the call). A caller that can compute a feature itself asks before handing it to the op."""
    return _choose(args, backend)[0]


def resolve_backend(device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str = "auto") -> str:
    """The backend a plain call (a few tokens, one global) on `device` tensors of `dtype` gets: what `auto`, or the
    named `backend`, picks there (`ValueError` when the named one cannot serve it)."""
    x = torch.zeros(1, 64, 4, 16, device=device, dtype=dtype)
    glob = torch.zeros(1, 64, dtype=torch.bool, device=device)
    args = check_inputs(x, x, x, window=16, is_global=glob, q_global=x, k_global=x, v_global=x)
    return select_backend(args, backend)


def longformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    is_global: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_global: torch.Tensor | None = None,
    k_global: torch.Tensor | None = None,
    v_global: torch.Tensor | None = None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_k_global: torch.Tensor | None = None,
    prefix_v_global: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    prefix_normalization: str = "joint",
    prefix_scale: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Longformer self-attention: sliding window + global tokens + prefix keys/values (semantics:
    `core/reference.py`).

    Args:
        q, k, v: `(B, N, H, D)` local projections; `q` is not pre-scaled.
        window: one-sided window `w`: local query `i` sees keys `|i - j| <= w`.
        is_global: `(B, N)` bool, tokens with global attention (they attend to, and are attended by, all).
        key_padding_mask: `(B, N)` bool, `True` = padding (output row 0, never attended).
        q_global, k_global, v_global: `(B, N, H, D)` global projections, required when any token is global.
        prefix_k, prefix_v: `(B, P, H, D)` or `(P, H, D)` prefix-tuning keys/values seen by every query.
        prefix_k_global, prefix_v_global: the prefix keys/values global rows use, shaped as `prefix_k` (default:
            the same as local rows).
        softmax_scale: defaults to `D ** -0.5`.
        dropout_p: attention dropout on every probability matrix (pass 0 in eval).
        prefix_normalization: "joint" (the prefix keys in each row's one softmax) or "separate" (their own
            softmax, added as `prefix_scale[h] * B`; needs prefix keys and `prefix_scale`).
        prefix_scale: `()` or `(H,)` scale of the separately normalised prefix attention, differentiable.
        document_ids: `(B, N)` integer, contiguous runs: windows and global tokens stay inside their document.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference"; env `PREFIX_KERNELS_BACKEND` overrides.
            `auto` takes the first backend that can serve the call, never Triton's interpreter.

    Returns:
        `(B, N, H, D)` in `q.dtype`; padding rows and rows with no admissible key are 0.
    """
    call = dict(window=window, is_global=is_global, key_padding_mask=key_padding_mask, q_global=q_global,
                k_global=k_global, v_global=v_global, prefix_k=prefix_k, prefix_v=prefix_v,
                prefix_k_global=prefix_k_global, prefix_v_global=prefix_v_global, softmax_scale=softmax_scale,
                dropout_p=dropout_p, prefix_normalization=prefix_normalization, prefix_scale=prefix_scale,
                document_ids=document_ids)
    return _dispatch(q, k, v, call, backend)


def local_rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    is_global: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    prefix_normalization: str = "joint",
    prefix_scale: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The local rows of `longformer_attention` alone (internal: the patched HF module computes the global rows
    itself, from the hidden states, see `core/global_rows.py`).

    Same arguments as `longformer_attention` without the global projections. Global tokens (`is_global`) are still
    the global keys of every local query, through the local `k, v`; the global rows themselves are not computed:
    their output rows are 0 and no gradient flows through them (as for padding rows).

    Returns:
        `(B, N, H, D)` in `q.dtype`; global, padding and key-less rows are 0.
    """
    call = dict(window=window, is_global=is_global, key_padding_mask=key_padding_mask, prefix_k=prefix_k,
                prefix_v=prefix_v, softmax_scale=softmax_scale, dropout_p=dropout_p,
                prefix_normalization=prefix_normalization, prefix_scale=prefix_scale, document_ids=document_ids,
                local_rows_only=True)
    return _dispatch(q, k, v, call, backend)


def _dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict, backend: str) -> torch.Tensor:
    args = check_inputs(q, k, v, **call)
    if is_exporting():
        return static_attention(args)
    name = select_backend(args, backend)
    if name == "reference" and torch.compiler.is_compiling():
        return _reference_outside_the_graph(q, k, v, call)
    module, _ = _load(name)
    if hasattr(module, "attention"):
        return module.attention(args)
    return fused_attention(args, name)


@torch.compiler.disable
def _reference_outside_the_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict) -> torch.Tensor:
    """The reference backend under `torch.compile`: it sizes its tensors by the global count (a host read), a
    data-dependent size inductor cannot lower, so it runs eagerly between two graphs."""
    module, _ = _load("reference")
    return module.attention(check_inputs(q, k, v, **call))
