"""One tiny mixed forward + backward of a fused backend, for `compute-sanitizer` (`benchmarks/gpu_check.sh`).

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_case.py triton|cuda

bf16, two batch rows (one with 5 global tokens, one with 1 and a padded tail), 4 prefix keys, dropout, N not a
multiple of any tile: the band, global-row, shared-key, prefix and padding paths of the forward and the backward,
every kernel launched once or twice. Exits 0 with a line that says why when the backend cannot run here (no CUDA
device, backend unavailable), so the sanitizer's own exit status is the verdict.
"""

from __future__ import annotations

import sys

import torch


def main(backend: str) -> int:
    if not torch.cuda.is_available():
        print(f"{backend}: skipped, no CUDA device")
        return 0
    import prefix_kernels as pk

    why = pk.available_backends().get(backend)
    if why is not None:
        print(f"{backend}: skipped, unavailable: {why}")
        return 0
    b, n, h, d, window = 2, 200, 2, 64, 24
    g = torch.Generator(device="cuda").manual_seed(0)
    names = ("q", "k", "v", "q_global", "k_global", "v_global")
    x = {name: torch.randn(b, n, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for name in names}
    for name in ("prefix_k", "prefix_v"):
        x[name] = torch.randn(4, h, d, generator=g, device="cuda", dtype=torch.bfloat16)
    for t in x.values():
        t.requires_grad_()
    is_global = torch.zeros(b, n, dtype=torch.bool, device="cuda")
    is_global[0, [0, 7, 63, 64, 199]] = True
    is_global[1, 3] = True
    pad = torch.zeros(b, n, dtype=torch.bool, device="cuda")
    pad[1, 170:] = True
    torch.manual_seed(0)
    out = pk.longformer_attention(**x, window=window, is_global=is_global, key_padding_mask=pad, dropout_p=0.1,
                                  backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), list(x.values()))
    torch.cuda.synchronize()
    bad = [name for name, t in zip(("out", *x), (out, *grads), strict=True) if not torch.isfinite(t).all()]
    print(f"{backend}: forward + backward ran" + (f"; non-finite: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "triton"))
