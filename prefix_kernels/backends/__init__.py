"""The backends of `longformer_attention`. Each module here imports only `prefix_kernels.core` and exposes:

* `unavailable_reason() -> str | None`: why it cannot run on this machine at all;
* `cannot_serve(args: AttentionArgs) -> str | None`: why it cannot serve this particular call;
* either the launchers `forward(...)` / `backward(...)` of the contract in `core/custom_op.py` (the fused
  backends: `triton`, `cuda`, `cpu`, run through the shared custom op), or `attention(args) -> Tensor`, a
  differentiable PyTorch computation (`reference`).

`prefix_kernels.attention` holds the one registry that loads them lazily by name and dispatches per call.
"""
