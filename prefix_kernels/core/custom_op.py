"""The custom-op and autograd layer shared by the fused backends (`backends/triton`, `backends/cuda`,
`backends/cpu`).

Two `torch.library` custom ops, `prefix_kernels::fused_attention_fwd` and `prefix_kernels::fused_attention_bwd`,
take a `backend: str` and call the launchers registered under that name (`register_launchers`, called by the
dispatcher in `prefix_kernels.attention` when it loads a backend: this module imports no backend). They carry
`register_fake` (shapes only) and one `register_autograd` for every fused backend, so `torch.compile(fullgraph=True)`
traces `longformer_attention` without graph breaks: everything data-dependent (the compact global index, its one
host read, the dropout seed's value) happens inside the ops.

Launcher contract (every fused backend implements exactly these two functions):

```
forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
        *, window: int, scale: float, dropout_p: float, seed: int, max_global: int) -> (out, lse)
backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
         global_count, out, lse, *, window, scale, dropout_p, seed, max_global)
         -> (dq, dk, dv, dq_global, dk_global, dv_global, dprefix_k, dprefix_v)   # None where the input is None
```

* `q, k, v, q_global, k_global, v_global`: `(B, N, H, D)`, one dtype; the `*_global` ones are `None` when no token
  is global (then `global_idx`, `global_count` are `None` and `max_global == 0`).
* Local rows only (`prefix_kernels.attention.local_rows_attention`): `q_global = k_global = v_global = None` while
  `global_idx`, `global_count` are given (`max_global > 0`). The global tokens are then still the global keys of
  every local row (through `k, v`, with their dK/dV), but the global rows are not computed: their `out` rows are 0,
  they give no gradient to any input whatever `grad_out` holds there, and `backward` returns `None` for the three
  global projections. A backend whose launchers cannot serve this says so in `cannot_serve` (`args.local_rows_only`).
* `prefix_k, prefix_v`: `(B, P, H, D)`, possibly with batch stride 0, or `None`.
* `key_padding_mask`: `(B, N)` bool (True = padding) or `None`; a padding token is never global.
* `global_idx`: `(B, max_global)` int32 contiguous, each row's global positions in increasing order; entries at
  or past `global_count[b]` are unused. `global_count`: `(B,)` int32.
* `seed`: dropout seed, an int in `[2**31, 2**62)` (0 when `dropout_p == 0`); the same value reaches the backward.
* `out`: `(B, N, H, D)` in `q.dtype` (padding rows 0); `lse`: `(B, H, N)` float32 whose meaning is up to the
  backend (only its own backward reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .checks import AttentionArgs
from .masks import global_index

Launcher = Callable[..., Any]
_LAUNCHERS: dict[str, tuple[Launcher, Launcher]] = {}


def register_launchers(backend: str, forward: Launcher, backward: Launcher) -> None:
    """Make `backend` ("triton", "cuda", "cpu") servable by the custom ops: its two launchers of the contract above."""
    _LAUNCHERS[backend] = (forward, backward)


def _launchers(backend: str) -> tuple[Launcher, Launcher]:
    try:
        return _LAUNCHERS[backend]
    except KeyError:
        raise RuntimeError(f"no launchers registered for backend {backend!r}: fused backends are loaded by "
                           "prefix_kernels.attention") from None


# ------------------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------------------


def _seed_value(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


# Explicit schemas: older torch cannot infer one from this module's (postponed, `X | None`) annotations.
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? q_global, Tensor? k_global, Tensor? v_global, Tensor? prefix_k, "
               "Tensor? prefix_v, Tensor? key_padding_mask, Tensor? is_global, Tensor? seed, str backend, int window, "
               "float scale, float dropout_p) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? q_global, Tensor? k_global, Tensor? v_global, "
               "Tensor? prefix_k, Tensor? prefix_v, Tensor? key_padding_mask, Tensor? is_global, Tensor? seed, "
               "Tensor out, Tensor lse, str backend, int window, float scale, float dropout_p) -> Tensor[]")


@torch.library.custom_op("prefix_kernels::fused_attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def fused_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Tensor | None,
    k_global: Tensor | None,
    v_global: Tensor | None,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    key_padding_mask: Tensor | None,
    is_global: Tensor | None,
    seed: Tensor | None,
    backend: str,
    window: int,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """`out (B, N, H, D)` in `q.dtype` and the backend's `lse (B, H, N)` fp32. `seed` is a CPU int64 scalar tensor
    (drawn from torch's generator by the caller) or `None` without dropout."""
    gidx, gcnt, gmax = global_index(is_global)
    if gmax == 0:
        q_global = k_global = v_global = None
    return _launchers(backend)[0](
        q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, gidx, gcnt,
        window=window, scale=scale, dropout_p=dropout_p, seed=_seed_value(seed), max_global=gmax,
    )


@fused_attention_fwd.register_fake
def _fused_attention_fwd_fake(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask,
                              is_global, seed, backend, window, scale, dropout_p):
    b, n, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::fused_attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def fused_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Tensor | None,
    k_global: Tensor | None,
    v_global: Tensor | None,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    key_padding_mask: Tensor | None,
    is_global: Tensor | None,
    seed: Tensor | None,
    out: Tensor,
    lse: Tensor,
    backend: str,
    window: int,
    scale: float,
    dropout_p: float,
) -> list[Tensor]:
    """Gradients of the eight inputs `q, k, v, q_global, k_global, v_global, prefix_k, prefix_v`, each
    `(B, N or P, H, D)` contiguous in `q.dtype`; an input that is `None` gets an empty placeholder (custom ops
    cannot return `None`)."""
    gidx, gcnt, gmax = global_index(is_global)
    inputs = (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v)
    proj = (q_global, k_global, v_global)
    if gmax == 0:
        q_global = k_global = v_global = None
    grads = list(_launchers(backend)[1](
        grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, gidx, gcnt, out, lse,
        window=window, scale=scale, dropout_p=dropout_p, seed=_seed_value(seed), max_global=gmax,
    ))
    if gmax == 0:
        # No token is global: the global projections do not touch the output.
        grads[3:6] = [None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in proj]
    return [g if g is not None else x.new_empty(0) if x is not None else q.new_empty(0)
            for g, x in zip(grads, inputs, strict=True)]


@fused_attention_bwd.register_fake
def _fused_attention_bwd_fake(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v,
                              key_padding_mask, is_global, seed, out, lse, backend, window, scale, dropout_p):
    inputs = (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v)
    return [q.new_empty(0) if x is None else x.new_empty(x.shape) for x in inputs]


def _setup_context(ctx, inputs, output):
    (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, is_global, seed, backend, window,
     scale, dropout_p) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, is_global,
                          seed, out, lse)
    ctx.params = (backend, window, scale, dropout_p)
    ctx.present = tuple(t is not None for t in (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v))


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    grads = fused_attention_bwd(grad_out, *saved, *ctx.params)
    grads = [g if present else None for g, present in zip(grads, ctx.present, strict=True)]
    return (*grads, None, None, None, None, None, None, None)


fused_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(args: AttentionArgs, backend: str) -> Tensor:
    """`(B, N, H, D)` attention through the fused custom op, with the launchers registered as `backend`."""
    seed = None
    if args.dropout_p > 0:
        # Drawn from torch's default CPU generator so torch.utils.checkpoint's RNG restore replays it; the range
        # keeps the value a 64-bit integer (never re-specialized by the kernel compilers).
        seed = torch.randint(2**31, 2**62, (), dtype=torch.int64)
    out, _ = fused_attention_fwd(
        args.q, args.k, args.v, args.q_global, args.k_global, args.v_global, args.prefix_k, args.prefix_v,
        args.key_padding_mask, args.is_global, seed, backend, args.window, args.softmax_scale, args.dropout_p,
    )
    return out
