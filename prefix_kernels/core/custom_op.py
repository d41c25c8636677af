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
        *, window: int, scale: float, dropout_p: float, seed: int, max_global: int, **features) -> (out, lse)
backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
         global_count, out, lse, *, window, scale, dropout_p, seed, max_global, **features)
         -> (dq, dk, dv, dq_global, dk_global, dv_global, dprefix_k, dprefix_v[, dprefix_k_global,
             dprefix_v_global, dprefix_scale])   # None where the input is None
```

`features`, keywords passed only when a call uses them (a backend that does not serve them says so in
`cannot_serve`, so its launchers never see them; a backward that takes none returns the first eight gradients):
`prefix_k_global`, `prefix_v_global` (`(B, P, H, D)`: the prefix keys/values of the global rows; absent: the same
as `prefix_k`, `prefix_v`), `prefix_scale` (`(H,)` fp32: "separate" prefix normalization, see `reference.py`) and
`document_ids` (`(B, N)` integer, contiguous runs).

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
* `out`: `(B, N, H, D)` in `q.dtype` (padding rows 0); `lse`: float32, `(B, H, N)`, or `(2, B, H, N)` with a
  `prefix_scale` (the text and the prefix softmax each), whose meaning is up to the backend (only its own backward
  reads it).
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


# The inputs that get a gradient, in the order of the ops' arguments and of the backward's result.
GRAD_INPUTS = ("q", "k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v", "prefix_k_global",
               "prefix_v_global", "prefix_scale")
_FEATURES = ("prefix_k_global", "prefix_v_global", "prefix_scale", "document_ids")

# Explicit schemas: older torch cannot infer one from this module's (postponed, `X | None`) annotations.
_INPUTS_SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor? q_global, Tensor? k_global, Tensor? v_global, "
                  "Tensor? prefix_k, Tensor? prefix_v, Tensor? prefix_k_global, Tensor? prefix_v_global, "
                  "Tensor? prefix_scale, "
                  "Tensor? key_padding_mask, Tensor? is_global, Tensor? document_ids, Tensor? seed")
_PARAMS_SCHEMA = "str backend, int window, float scale, float dropout_p"
_FWD_SCHEMA = f"({_INPUTS_SCHEMA}, {_PARAMS_SCHEMA}) -> (Tensor, Tensor)"
_BWD_SCHEMA = f"(Tensor grad_out, {_INPUTS_SCHEMA}, Tensor out, Tensor lse, {_PARAMS_SCHEMA}) -> Tensor[]"


def _launch_args(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global,
                 prefix_scale, key_padding_mask, is_global, document_ids, seed, window, scale, dropout_p):
    """The launchers' positional tensors and keywords (the contract above) for the ops' arguments: the compact
    global index, the seed's value, and the keywords of the newer features only when a call uses them."""
    gidx, gcnt, gmax = global_index(is_global)
    if gmax == 0:
        q_global = k_global = v_global = None
    tensors = (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, gidx, gcnt)
    keywords = dict(window=window, scale=scale, dropout_p=dropout_p, seed=_seed_value(seed), max_global=gmax)
    features = dict(zip(_FEATURES, (prefix_k_global, prefix_v_global, prefix_scale, document_ids), strict=True))
    keywords.update({name: t for name, t in features.items() if t is not None})
    return tensors, keywords, gmax


def _lse_shape(q: Tensor, prefix_scale: Tensor | None) -> tuple[int, ...]:
    b, n, h, _ = q.shape
    return (b, h, n) if prefix_scale is None else (2, b, h, n)


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
    prefix_k_global: Tensor | None,
    prefix_v_global: Tensor | None,
    prefix_scale: Tensor | None,
    key_padding_mask: Tensor | None,
    is_global: Tensor | None,
    document_ids: Tensor | None,
    seed: Tensor | None,
    backend: str,
    window: int,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """`out (B, N, H, D)` in `q.dtype` and the backend's fp32 `lse` (`(B, H, N)`, or `(2, B, H, N)` with a
    `prefix_scale`: "separate" mode). `seed` is a CPU int64 scalar tensor (drawn from torch's generator by the
    caller) or `None` without dropout."""
    tensors, keywords, _ = _launch_args(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global,
                                        prefix_v_global, prefix_scale, key_padding_mask, is_global, document_ids,
                                        seed, window, scale, dropout_p)
    return _launchers(backend)[0](*tensors, **keywords)


@fused_attention_fwd.register_fake
def _fused_attention_fwd_fake(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global,
                              prefix_v_global, prefix_scale, key_padding_mask, is_global, document_ids, seed, backend,
                              window, scale, dropout_p):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, prefix_scale), dtype=torch.float32)


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
    prefix_k_global: Tensor | None,
    prefix_v_global: Tensor | None,
    prefix_scale: Tensor | None,
    key_padding_mask: Tensor | None,
    is_global: Tensor | None,
    document_ids: Tensor | None,
    seed: Tensor | None,
    out: Tensor,
    lse: Tensor,
    backend: str,
    window: int,
    scale: float,
    dropout_p: float,
) -> list[Tensor]:
    """Gradients of the inputs in `GRAD_INPUTS`, each shaped as its input (contiguous, in its dtype); an input that
    is `None` gets an empty placeholder (custom ops cannot return `None`)."""
    inputs = (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global,
              prefix_scale)
    tensors, keywords, gmax = _launch_args(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v,
                                           prefix_k_global, prefix_v_global, prefix_scale, key_padding_mask,
                                           is_global, document_ids, seed, window, scale, dropout_p)
    grads = list(_launchers(backend)[1](grad_out, *tensors, out, lse, **keywords))
    grads += [None] * (len(inputs) - len(grads))  # a launcher without the newer features returns the first eight
    if gmax == 0:
        # No token is global: the global projections do not touch the output.
        grads[3:6] = [None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                      for t in inputs[3:6]]
    return [g if g is not None else x.new_empty(0) if x is not None else q.new_empty(0)
            for g, x in zip(grads, inputs, strict=True)]


@fused_attention_bwd.register_fake
def _fused_attention_bwd_fake(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global,
                              prefix_v_global, prefix_scale, key_padding_mask, is_global, document_ids, seed, out,
                              lse, backend, window, scale, dropout_p):
    inputs = (q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, prefix_k_global, prefix_v_global,
              prefix_scale)
    return [q.new_empty(0) if x is None else x.new_empty(x.shape) for x in inputs]


def _setup_context(ctx, inputs, output):
    *tensors, backend, window, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.params = (backend, window, scale, dropout_p)
    ctx.present = tuple(t is not None for t in tensors[: len(GRAD_INPUTS)])


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    grads = fused_attention_bwd(grad_out, *saved, *ctx.params)
    grads = [g if present else None for g, present in zip(grads, ctx.present, strict=True)]
    n_rest = len(saved) - 2 - len(GRAD_INPUTS) + len(ctx.params)  # masks, document ids, seed; the parameters
    return (*grads, *([None] * n_rest))


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
        args.prefix_k_global, args.prefix_v_global, args.prefix_scale, args.key_padding_mask, args.is_global,
        args.document_ids, seed, backend, args.window, args.softmax_scale, args.dropout_p,
    )
    return out
