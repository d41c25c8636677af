"""Compile every Triton kernel for a GPU architecture on any machine (no GPU needed) and report, per kernel,
its registers per thread, spill stack and shared memory.

    python benchmarks/kernel_resources.py [--arch 90] [--dtype bfloat16,float16,float32] [--head-dim 32,64,128]
                                          [--dropout 0.1] [--fp32-precision highest|high] [--json out.json]

The real launchers `prefix_kernels.triton_attention.forward` / `backward` run on small CPU tensors with global
tokens, prefix keys, padding and (optionally) dropout, so every kernel is specialized exactly as a GPU call
specializes it and built with the GPU tile configuration; Triton compiles each launch down to a cubin and does not
launch it. `cuobjdump` (shipped with Triton) reads the registers and stack from the cubin. Two uses: a compile
check that runs in CI (the interpreter tests never run Triton's compiler), and a first look at register pressure
(a non-zero STACK is a spill to local memory) before timing on a GPU. The compiler is this machine's Triton,
which may differ from the GPU machine's.

Run it in its own process: it replaces Triton's active driver with one that only names the target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile for real

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from prefix_kernels import triton_attention as ta  # noqa: E402

TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = ("_attention_fwd_kernel", "_global_rows_merge_kernel", "_bwd_preprocess_kernel", "_attention_bwd_kernel",
           "_bwd_finalize_kernel")


class _TargetOnlyDriver:
    """Just enough of a Triton driver to compile for `GPUTarget("cuda", arch)` with no GPU and no libcuda."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def missing_tools() -> str | None:
    """Why this machine cannot run the check, or None."""
    for tool in ("ptxas", "cuobjdump"):
        if not (TRITON_BIN / tool).exists():
            return f"Triton's NVIDIA backend has no {tool} in {TRITON_BIN}"
    return None


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([str(TRITON_BIN / "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", dump)
    if m is None:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{dump}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2))}


def _problem(dtype: torch.dtype, head_dim: int):
    """Small inputs that reach every kernel: 2 rows with different global counts, a prefix, padding."""
    g = torch.Generator().manual_seed(0)
    b, n, h, p = 2, 300, 2, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v, qg, kg, vg = (rnd(b, n, h, head_dim) for _ in range(6))
    pk, pv = rnd(b, p, h, head_dim), rnd(b, p, h, head_dim)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, -20:] = True
    gidx = torch.tensor([[0, 7, 150], [3, 0, 0]], dtype=torch.int32)
    gcnt = torch.tensor([3, 1], dtype=torch.int32)
    return (q, k, v, qg, kg, vg, pk, pv, pad, gidx, gcnt), dict(window=40, scale=head_dim**-0.5, max_global=3)


def compile_all(arch: int, dtypes, head_dims, dropout_p: float) -> list[dict]:
    """One row per compiled kernel specialization: config, kernel name, registers, stack, shared bytes."""
    compiled: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    previous = driver._active
    driver.set_active(_TargetOnlyDriver(arch))
    JITFunction.run = compile_only
    rows = []
    try:
        for dtype in dtypes:
            for d in head_dims:
                inputs, kw = _problem(dtype, d)
                kw.update(dropout_p=dropout_p, seed=1)
                compiled.clear()
                out, lse = ta.forward(*inputs, **kw)
                ta.backward(torch.zeros_like(out), *inputs, out, lse, **kw)
                seen = set()
                for name, kernel in compiled:
                    if name in seen:
                        continue
                    seen.add(name)
                    md = kernel.metadata
                    dt = str(dtype).removeprefix("torch.")
                    if dtype == torch.float32 and ta._fp32_matmuls_use_tf32():
                        dt += "-tf32"
                    rows.append(dict(arch=f"sm_{arch}", dtype=dt, head_dim=d,
                                     dropout=dropout_p > 0, kernel=name, warps=md.num_warps, stages=md.num_stages,
                                     shared=md.shared, **_resources(kernel.asm["cubin"])))
    finally:
        JITFunction.run = run
        driver._active = previous
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'config':<28} {'kernel':<28} {'warps':>5} {'stages':>6} {'regs':>5} {'stack':>6} {'shared':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = f"{r['arch']} {r['dtype']} D={r['head_dim']}{' drop' if r['dropout'] else ''}"
        lines.append(f"{cfg:<28} {r['kernel']:<28} {r['warps']:>5} {r['stages']:>6} {r['regs']:>5} "
                     f"{r['stack']:>6} {r['shared']:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80, 90)")
    ap.add_argument("--dtype", default="bfloat16,float16,float32")
    ap.add_argument("--head-dim", default="32,64,128")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--fp32-precision", default="highest", choices=("highest", "high", "medium"),
                    help="torch.set_float32_matmul_precision for the fp32 kernels (high/medium: TF32)")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    why = missing_tools()
    if why:
        print(f"cannot compile here: {why}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision(a.fp32_precision)
    rows = compile_all(a.arch, [getattr(torch, s) for s in a.dtype.split(",")],
                       [int(s) for s in a.head_dim.split(",")], a.dropout)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    missing = set(KERNELS) - {r["kernel"] for r in rows}
    if missing:
        print(f"not compiled: {sorted(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
