"""The op's features on the `cpu` backend, side by side in one process: a separately normalised prefix against the
joint one, and a packed row against the same documents run one by one (forward + backward, fp32, one thread).

    python benchmarks/op_features.py [--n 4096] [--repeats 5]

Prints the median time of each and the ratios (the figures of BENCHMARKS.md's "The op's features on the CPU").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prefix_kernels as pk


def _inputs(b: int, n: int, h: int, d: int, p: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {name: torch.randn(b, n, h, d, generator=g) for name in ("q", "k", "v", "q_global", "k_global", "v_global")}
    x.update(prefix_k=torch.randn(b, p, h, d, generator=g), prefix_v=torch.randn(b, p, h, d, generator=g))
    for t in x.values():
        t.requires_grad_(True)
    return x


def _step(x: dict, **kwargs) -> None:
    out = pk.longformer_attention(**x, backend="cpu", **kwargs)
    leaves = [t for t in x.values() if t.requires_grad] + [t for t in kwargs.values()
                                                             if torch.is_tensor(t) and t.requires_grad]
    torch.autograd.grad(out, leaves, torch.ones_like(out))


def _median(fn, repeats: int) -> float:
    fn()  # warm-up: mask caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, h, d, w, p = args.n, args.heads, args.head_dim, args.window, args.prefix

    # Joint against separate: one row, one global token, the prefix.
    x = _inputs(1, n, h, d, p)
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[:, 0] = True
    scale = torch.full((h,), 0.5, requires_grad=True)
    joint = _median(lambda: _step(x, window=w, is_global=glob), args.repeats)
    separate = _median(lambda: _step(x, window=w, is_global=glob, prefix_normalization="separate",
                                     prefix_scale=scale), args.repeats)

    # A packed row against its documents one by one: lengths summing to n, each document's first token global.
    lengths = [n * k // 10 for k in (1, 2, 3, 4)]
    lengths[-1] += n - sum(lengths)
    ids = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])[None]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    doc_glob = torch.zeros(1, n, dtype=torch.bool)
    doc_glob[0, starts] = True
    packed = _median(lambda: _step(x, window=w, is_global=doc_glob, document_ids=ids), args.repeats)
    docs = []
    for s, m in zip(starts.tolist(), lengths, strict=True):
        xd = {k: (t[:, s : s + m] if not k.startswith("prefix") else t).detach().requires_grad_(True)
              for k, t in x.items()}
        gd = torch.zeros(1, m, dtype=torch.bool)
        gd[:, 0] = True
        docs.append((xd, gd))
    unpacked = _median(lambda: [_step(xd, window=w, is_global=gd) for xd, gd in docs], args.repeats)

    print(f"cpu backend, fp32, one thread, B=1, N={n}, H={h}, D={d}, window={w}, P={p}; forward + backward, median "
          f"of {args.repeats}")
    print(f"joint prefix           {joint * 1e3:8.1f} ms")
    print(f"separate prefix        {separate * 1e3:8.1f} ms   {separate / joint:.2f}x joint")
    print(f"packed row, 4 docs     {packed * 1e3:8.1f} ms")
    print(f"the 4 docs one by one  {unpacked * 1e3:8.1f} ms   packed {unpacked / packed:.2f}x as fast "
          f"(lengths {lengths})")


if __name__ == "__main__":
    main()
