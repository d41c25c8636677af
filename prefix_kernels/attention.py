"""The public op `longformer_attention` and its per-call backend dispatch.

Each backend is a module with three functions:

* `unavailable_reason() -> str | None`: why it cannot run on this machine at all (cached by the caller);
* `cannot_serve(args: AttentionArgs) -> str | None`: why it cannot serve this particular call;
* `attention(args: AttentionArgs) -> Tensor`: the result, `(B, N, H, D)` in `q.dtype`.

`backend="auto"` takes the first of `BACKEND_ORDER` that can serve the call, except a backend that only emulates
its kernels (Triton's interpreter, `TRITON_INTERPRET=1`: thousands of times slower than the reference backend); an
explicit backend that cannot serve raises `ValueError` with the reason, and an explicit `"triton"` still runs the
interpreter. `PREFIX_KERNELS_BACKEND` overrides the `backend` argument.

`local_rows_attention` is the same dispatch for an internal mode (`AttentionArgs.local_rows_only`): the local rows
alone, for the patched HF module that computes the global rows from the hidden states (`patching.py`); a backend
that cannot serve it says so in `cannot_serve`.
"""

from __future__ import annotations

import importlib
import os

import torch

from .checks import AttentionArgs, check_inputs

# `auto` order, fastest first, as measured (BENCHMARKS.md): on a GPU the Triton kernels ahead of the CUDA library;
# on a CPU the `cpu` backend (block-batched matmuls) for fp32/bf16/fp16; `reference` (the readable statement of the
# semantics) last, for everything else (fp64, any device).
BACKEND_ORDER = ("triton", "cuda", "cpu", "reference")
_BACKEND_MODULES = {
    "cuda": "prefix_kernels.cuda_attention",
    "triton": "prefix_kernels.triton_attention",
    "cpu": "prefix_kernels.cpu_attention",
    "reference": "prefix_kernels.reference",
}
ENV_VAR = "PREFIX_KERNELS_BACKEND"


_MODULES: dict[str, tuple] = {}


def _load(name: str):
    """The backend module, or the reason it cannot be imported (a plain dict lookup once `_unavailable` ran, so
    torch.compile traces it)."""
    if name not in _MODULES:
        try:
            _MODULES[name] = (importlib.import_module(_BACKEND_MODULES[name]), None)
        except Exception as exc:  # a missing optional dependency (triton) or a broken build
            _MODULES[name] = (None, f"import failed: {type(exc).__name__}: {exc}")
    return _MODULES[name]


_REASONS: dict[str, str | None] = {}


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


def _why_not(name: str, args: AttentionArgs) -> str | None:
    why = _unavailable(name)
    if why is not None:
        return why
    module, _ = _load(name)
    return module.cannot_serve(args)


def select_backend(args: AttentionArgs, backend: str = "auto") -> str:
    """The backend that serves `args`; raises `ValueError` when an explicit one cannot."""
    backend = os.environ.get(ENV_VAR) or backend
    if backend not in ("auto", *BACKEND_ORDER):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_ORDER))}; got {backend!r}")
    if backend != "auto":
        why = _why_not(backend, args)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {why}")
        return backend
    reasons = {}
    for name in BACKEND_ORDER:
        why = _auto_skip_reason(name) or _why_not(name, args)
        if why is None:
            return name
        reasons[name] = why
    raise ValueError(f"no backend can serve this call: {reasons}")


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
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Longformer self-attention: sliding window + global tokens + prefix keys/values (semantics: `reference`).

    Args:
        q, k, v: `(B, N, H, D)` local projections; `q` is not pre-scaled.
        window: one-sided window `w`: local query `i` sees keys `|i - j| <= w`.
        is_global: `(B, N)` bool, tokens with global attention (they attend to, and are attended by, all).
        key_padding_mask: `(B, N)` bool, `True` = padding (output row 0, never attended).
        q_global, k_global, v_global: `(B, N, H, D)` global projections, required when any token is global.
        prefix_k, prefix_v: `(B, P, H, D)` or `(P, H, D)` prefix-tuning keys/values seen by every query.
        softmax_scale: defaults to `D ** -0.5`.
        dropout_p: attention dropout on both probability matrices (pass 0 in eval).
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference"; env `PREFIX_KERNELS_BACKEND` overrides.
            `auto` takes the first backend that can serve the call, never Triton's interpreter.

    Returns:
        `(B, N, H, D)` in `q.dtype`; padding rows and rows with no admissible key are 0.
    """
    args = check_inputs(q, k, v, window=window, is_global=is_global, key_padding_mask=key_padding_mask,
                        q_global=q_global, k_global=k_global, v_global=v_global, prefix_k=prefix_k, prefix_v=prefix_v,
                        softmax_scale=softmax_scale, dropout_p=dropout_p)
    return _dispatch(args, backend)


def _dispatch(args: AttentionArgs, backend: str) -> torch.Tensor:
    module, _ = _load(select_backend(args, backend))
    return module.attention(args)


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
    backend: str = "auto",
) -> torch.Tensor:
    """The local rows of `longformer_attention` alone (internal: the patched HF module computes the global rows
    itself, from the hidden states, see `patching.py`).

    Same arguments as `longformer_attention` without the global projections. Global tokens (`is_global`) are still
    the global keys of every local query, through the local `k, v`; the global rows themselves are not computed:
    their output rows are 0 and no gradient flows through them (as for padding rows).

    Returns:
        `(B, N, H, D)` in `q.dtype`; global, padding and key-less rows are 0.
    """
    args = check_inputs(q, k, v, window=window, is_global=is_global, key_padding_mask=key_padding_mask,
                        prefix_k=prefix_k, prefix_v=prefix_v, softmax_scale=softmax_scale, dropout_p=dropout_p,
                        local_rows_only=True)
    return _dispatch(args, backend)
