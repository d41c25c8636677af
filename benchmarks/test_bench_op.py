"""Op level: `longformer_attention` per backend vs compiled FlexAttention (same mask) vs dense SDPA (flash).

Every provider gets pre-projected inputs in its native layout (ours `(B, N, H, D)`, FlexAttention and SDPA
`(B, H, N, D)` contiguous), built outside the timing, like FlexAttention's block mask and compilation.
Forward runs under `no_grad`; forward+backward calls `torch.autograd.grad` on every input (no `.grad`
accumulation). Useful FLOPs count the Longformer mask's attended pairs for every provider, SDPA included
(its own dense count is in `extra_info["flops_dense"]`).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from bench_utils import attention_flops, free_memory, run_benchmark
from matrix import params


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(shape, device, requires_grad: bool) -> dict:
    """`q, k, v, q_global, k_global, v_global` `(B, N, H, D)` and a shared `(P, H, D)` prefix, fixed seed."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = shape.torch_dtype
    names = ["q", "k", "v", "q_global", "k_global", "v_global"]
    out = {n: torch.randn(shape.B, shape.N, shape.H, shape.D, generator=g, device=device, dtype=dt) for n in names}
    if shape.P:
        for n in ("prefix_k", "prefix_v"):
            out[n] = torch.randn(shape.P, shape.H, shape.D, generator=g, device=device, dtype=dt)
    for t in out.values():
        t.requires_grad_(requires_grad)
    return out


def _make_step(run, leaves: list[torch.Tensor], mode: str):
    """`run()` -> output; returns the measured step: forward only, or forward + gradients of `leaves`."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return run()
        return step
    grad_out = {}

    def step():
        out = run()
        if "g" not in grad_out:  # one fixed output gradient, allocated in the first (untimed) call
            grad_out["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, leaves, grad_out["g"])

    return step


def _ours(backend: str, shape, device, mode: str):
    pk = pytest.importorskip("prefix_kernels")
    why = pk.available_backends().get(backend)
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    x = _inputs(shape, device, mode == "fwdbwd")
    is_global, pad = shape.masks(device)

    def run():
        return pk.longformer_attention(**x, window=shape.w, is_global=is_global, key_padding_mask=pad,
                                       backend=backend)

    try:
        run()  # an explicit backend that cannot serve this call raises ValueError with the reason
    except ValueError as exc:
        pytest.skip(str(exc))
    return _make_step(run, list(x.values()), mode), {"backend": backend}


def _heads_first(x: dict, shape, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(B, H, N, D)` q and `(B, H, P + N, D)` k, v (prefix prepended), contiguous leaves."""
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
    if shape.P:
        pk_, pv_ = (x[n].transpose(0, 1)[None].expand(shape.B, -1, -1, -1) for n in ("prefix_k", "prefix_v"))
        k, v = torch.cat([pk_, k], 2), torch.cat([pv_, v], 2)
    return tuple(t.detach().contiguous().requires_grad_(requires_grad) for t in (q, k, v))


def _flex(shape, device, mode: str):
    if device.type != "cuda" and not os.environ.get("PK_BENCH_FLEX_CPU"):
        pytest.skip("compiled FlexAttention on the CPU: a compile per shape, forward only; set PK_BENCH_FLEX_CPU=1")
    if device.type != "cuda" and mode == "fwdbwd":
        pytest.skip("FlexAttention has no backward on the CPU")
    from flex_mask import build_block_mask, check_block_mask, compiled_flex_attention, longformer_mask_mod

    q, k, v = _heads_first(_inputs(shape, device, False), shape, mode == "fwdbwd")
    is_global, pad = shape.masks(device)
    mask_mod = longformer_mask_mod(is_global, pad, shape.w, shape.P)
    batch = shape.B if shape.pad else 1  # without padding every row has the same mask: broadcast it
    kv_len = shape.N + shape.P
    block_mask = build_block_mask(mask_mod, batch, shape.N, kv_len, device)
    # The dense check costs ~10 bytes per mask element: up to the headline shape on a GPU.
    limit = 1 << 29 if device.type == "cuda" else 1 << 22
    checked = check_block_mask(block_mask, mask_mod, batch, shape.N, kv_len, device, max_elements=limit)
    flex = compiled_flex_attention()

    def run():
        return flex(q, k, v, block_mask=block_mask, scale=shape.D**-0.5)

    return _make_step(run, [q, k, v], mode), {"block_mask_checked": checked,
                                              "block_sparsity": float(block_mask.sparsity())}


def _sdpa(shape, device, mode: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _heads_first(_inputs(shape, device, False), shape, mode == "fwdbwd")
    # The dense bound: flash attention over all P + N keys, no mask (on the CPU: whatever SDPA picks).
    on_gpu = device.type == "cuda"

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if on_gpu else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v)

    dense = 4.0 * shape.D * shape.H * shape.B * shape.N * (shape.N + shape.P)
    return _make_step(run, [q, k, v], mode), {"flops_dense": dense * (3.5 if mode == "fwdbwd" else 1.0)}


_PROVIDERS = {"flex": _flex, "sdpa": _sdpa}


def _run_case(benchmark, provider, shape, mode, device) -> None:
    builder = _PROVIDERS.get(provider)
    step, info = builder(shape, device, mode) if builder else _ours(provider, shape, device, mode)
    step()  # compile (FlexAttention, Triton) outside the timing
    graphs = _graph_count() if provider == "flex" else None
    run_benchmark(benchmark, step, device, level="op", provider=provider, shape=shape, mode=mode,
                  flops=attention_flops(shape, mode), info=info)
    if graphs is not None:
        assert _graph_count() == graphs, "FlexAttention recompiled inside the timed region"


def _graph_count() -> int:
    from flex_mask import compiled_graph_count

    return compiled_graph_count()


@pytest.mark.parametrize("provider, shape, mode", params("op"))
def test_op(benchmark, provider, shape, mode):
    device = _device()
    if device.type == "cpu" and shape.dtype != "fp32":
        pytest.skip("low-precision shapes need a GPU")
    oom = None
    try:
        _run_case(benchmark, provider, shape, mode, device)
    except torch.cuda.OutOfMemoryError as exc:  # the case's tensors die with _run_case's frame
        oom = str(exc).splitlines()[0]
    if oom is not None:
        free_memory()
        pytest.skip(f"out of memory: {oom}")
