"""Compile every Triton kernel for a GPU architecture on any machine (no GPU needed) and report, per kernel,
its registers per thread, spill stack, shared memory and local-memory (spill) accesses, and per loop the SASS
instructions one warp issues per tile and the spill accesses in its body.

    python benchmarks/kernel_resources.py [--arch 90] [--dtype bfloat16,float16,float32] [--head-dim 32,64,128]
                                          [--dropout 0.1] [--fp32-precision highest|high] [--seq-len 320,300]
                                          [--globals 3] [--prefix 4] [--window 40] [--json out.json] [--no-sass]
                                          [--features joint|separate|documents]

The real launchers `prefix_kernels.backends.triton.launch.forward` / `backward` run on small CPU tensors with global
tokens (`--globals` in the first row: 17 gives the headline's 32-slot global block, more than 64 the backward's loop
over global blocks), prefix keys, padding and (optionally) dropout, once with the global projections and once
without them (local rows only, rows marked `local`), so every kernel is specialized exactly as a GPU call of that
shape specializes it and built with the GPU tile configuration; Triton compiles each launch down to a cubin and
does not launch it. Sequence lengths above 512 give the global rows several key splits, as long inputs do.
`cuobjdump` (shipped with Triton) reads the registers and stack from the cubin. Two uses: a compile
check that runs in CI (the interpreter tests never run Triton's compiler), and a first look at register pressure
(a non-zero STACK is a spill to local memory) and at the work per tile before timing on a GPU.

SASS per tile, the method: `nvdisasm -c -gi` (also shipped with Triton) disassembles the cubin with line info.
Every backward branch closes a loop: its body is the instructions from the branch target to the branch. Inside
the body the instructions form a control-flow graph (fall-through, and forward branches that stay in the body;
an inner loop is counted once). An *interior* tile is the shortest path from the loop's first instruction to its
back branch (a band tile inside the band with no global or padding column skips the mask block), an *edge* tile
the longest (everything the body can execute: the element mask, and dropout when compiled in). NOPs are not
counted. A loop that holds another loop is left out (its tiles are the inner loop's). Each loop is named after
the innermost Python `for` whose lines cover at least half as much of its body as the best-covering one (by the
instructions' innermost source lines, else by their inline chains), and the line of the helper call it sits in.
Counts are per warp and per tile: every warp of the program issues the same instructions. A loop's *spill*
column counts the local-memory loads and stores (`LDL`, `STL`) in its body: a spill inside a tile loop costs on
every tile, one outside the loops once per program.

The compiler is the `triton` this process imports: `PYTHONPATH=DIR` with another Triton installed in `DIR`
(`pip install --no-deps --target DIR "triton==3.6.*"`) compiles with that one (torch does not import triton); each
row records the version.

Run it in its own process: it replaces Triton's active driver with one that only names the target.

A head dim the backend refuses on a GPU of the arch (`cannot_serve`, as on a GPU with all the shared memory its
tile row may use: above 128 today) is not compiled: its row names no kernel and gives the reason.

Exit status: 0 when every kernel compiled (or every head dim asked for was refused), 1 when one did not, 2 for
a usage error (argparse), and `EXIT_CANNOT_COMPILE` (77) when this machine cannot compile for a GPU (Triton's
NVIDIA tools are missing): the one status a caller may treat as "nothing to check here".
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile for real

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from prefix_kernels.backends.triton import launch as ta  # noqa: E402

# The Triton backend's source files: a loop is named after the Python `for` it compiles from, in any of them.
SOURCES = sorted(str(p) for p in Path(ta.__file__).parent.glob("*.py"))

# Exit status for "this machine cannot compile for a GPU", distinct from argparse's 2 for a usage error (the
# compile test skips on this status alone) and from 1 for a kernel that did not compile.
EXIT_CANNOT_COMPILE = 77

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
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
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


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LOC = re.compile(r'File "([^"]+)", line (\d+)')
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(\.\S+)?\s+(?:!?U?P\w+,\s*)?`?\(?(\.L_x_\d+)")


def _disassemble(cubin: bytes) -> list[tuple[str, str | None, tuple]]:
    """`(instruction, label it starts, source lines)` per SASS instruction; the lines are `((file, line), ...)`:
    the innermost line (`nvdisasm -g`) then the inline chain (`-gi`, which keeps only some levels)."""
    listings = []
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        for flag in ("-g", "-gi"):
            text = subprocess.run([str(TRITON_BIN / "nvdisasm"), "-c", flag, f.name], capture_output=True,
                                  text=True, check=True).stdout
            out, chain, label = [], (), None
            for line in text.splitlines():
                if line.lstrip().startswith("//##"):
                    chain = tuple((f, int(n)) for f, n in _LOC.findall(line))
                elif m := _LABEL.match(line.strip()):
                    label = m.group(1)
                elif m := _INSTR.match(line):
                    out.append((m.group(2), label, chain))
                    label = None
            listings.append(out)
    return [(ins, label, inner + outer) for (ins, label, inner), (_, _, outer) in zip(*listings, strict=True)]


def _for_loops(paths: list[str]) -> list[tuple[str, int, int, str, str]]:
    """`(file, first line, last line, enclosing function, source of the for line)` of every `for` in the Python
    files `paths`."""
    loops = []
    for path in paths:
        text = Path(path).read_text()
        lines = text.splitlines()
        for fn in ast.walk(ast.parse(text)):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.For):
                        loops.append((path, node.lineno, node.end_lineno, fn.name, lines[node.lineno - 1].strip()))
    return loops


def _path_lengths(body: list[str]) -> tuple[int, int]:
    """Shortest and longest count of non-NOP instructions from `body[0]` to `body[-1]` (the back branch) through
    the body's forward edges."""
    labels = {}
    n = len(body)
    succ = [[] for _ in range(n)]
    for i, (_, label) in enumerate(body):
        if label:
            labels[label] = i
    for i, (ins, _) in enumerate(body[:-1]):
        m = _BRANCH.match(ins)
        unconditional = m is not None and m.group(1) is None and "P" not in ins.split("BRA", 1)[1].split("`")[0]
        if not unconditional and not ins.startswith("EXIT") and not ins.startswith("RET"):
            succ[i].append(i + 1)
        if m and labels.get(m.group(3), -1) > i:
            succ[i].append(labels[m.group(3)])
    inf = float("inf")
    short, long_ = [inf] * n, [-inf] * n
    short[0] = long_[0] = 0
    for i in range(n):  # edges only go forward: one pass in order is a topological order
        if short[i] == inf:
            continue
        w = 0 if body[i][0].startswith("NOP") else 1
        for j in succ[i]:
            short[j] = min(short[j], short[i] + w)
            long_[j] = max(long_[j], long_[i] + w)
    last = 0 if body[-1][0].startswith("NOP") else 1
    return int(short[-1]) + last, int(long_[-1]) + last


def sass_per_tile(cubin: bytes, sources: list[str]) -> list[dict]:
    """One row per SASS loop of a kernel: its Python `for` (`function:line`), the helper call it sits in, and the
    instructions per warp of an interior and of an edge tile (see the module docstring)."""
    ins = _disassemble(cubin)
    at_label = {label: i for i, (_, label, _) in enumerate(ins) if label}
    loops = _for_loops(sources)
    spans = []
    for end, (text, _, _) in enumerate(ins):
        m = _BRANCH.match(text)
        start = at_label.get(m.group(3), end) if m else end
        if start < end and end - start >= 16:  # shorter ones are wait/retry loops, not tile loops
            spans.append((start, end))
    rows = []
    for start, end in spans:
        if any(start <= s0 and e0 <= end and (s0, e0) != (start, end) for s0, e0 in spans):
            continue  # an outer loop: its tiles are its inner loop's
        body = ins[start:end + 1]
        # Coverage by each instruction's innermost line first; by any line of its inline chain where no `for`
        # holds an innermost line (the chain is partial: an inlined helper's loop is covered by its caller's loop
        # too, through the call line).
        for depth in (1, None):
            hits = [(sum(any(f == src and lo <= ln <= hi for f, ln in chain[:depth]) for _, _, chain in body),
                     src, lo, hi, fn, line) for src, lo, hi, fn, line in loops]
            most = max((h[0] for h in hits), default=0)
            if most:
                break
        if most == 0:
            continue
        # The innermost `for` that covers at least half as much as the best.
        best = min((h for h in hits if 2 * h[0] >= most), key=lambda h: h[3] - h[2])[1:]
        # The call site just outside the loop's function, when the loop sits in an inlined helper.
        via = Counter()
        for _, _, chain in body:
            inside = [k for k, (f, ln) in enumerate(chain) if f == best[0] and best[1] <= ln <= best[2]]
            if inside and inside[0] + 1 < len(chain):
                via[chain[inside[0] + 1][1]] += 1
        interior, edge = _path_lengths([(t, lab) for t, lab, _ in body])
        name = f"{best[3]}:{best[1]}" + (f" via {via.most_common(1)[0][0]}" if via else "")
        # The same loop inlined twice through the same call line: number the copies in code order.
        copies = sum(r["loop"].split(" #")[0] == name for r in rows)
        rows.append(dict(loop=name + (f" #{copies + 1}" if copies else ""), code=best[4], interior=interior,
                         edge=edge, spill_ops=sum(_is_spill_op(t) for t, _, _ in body)))
    return rows


def _is_spill_op(instruction: str) -> bool:
    """A local-memory load or store (`LDL`, `STL`, any width, predicated or not): where the kernel reads or writes
    its spill stack."""
    op = instruction.split()[1] if instruction.startswith("@") and " " in instruction else instruction.split()[0]
    return op.split(".")[0] in ("LDL", "STL")


def spill_ops(cubin: bytes) -> int:
    """How many local-memory loads and stores the whole kernel holds (0 when it keeps no stack)."""
    return sum(_is_spill_op(t) for t, _, _ in _disassemble(cubin))


def _problem(dtype: torch.dtype, head_dim: int, n: int, num_global: int = 3, num_prefix: int = 4, window: int = 40):
    """Small inputs that reach every kernel: 2 rows, the first with `num_global` global tokens and the second with
    one, `num_prefix` prefix keys, padding at the end of row 1. `n` a multiple of every tile (as long, window-padded
    inputs are) compiles the full-tile specializations, another `n` the ragged ones; above 512 the global rows take
    several key splits (a runtime count of 1 is specialized as a constant). The integer arguments specialize as on
    a GPU call of the same shape: the global index is `(B, num_global)` as `core.masks.global_index` builds it."""
    g = torch.Generator().manual_seed(0)
    b, h = 2, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v, qg, kg, vg = (rnd(b, n, h, head_dim) for _ in range(6))
    pk, pv = rnd(b, num_prefix, h, head_dim), rnd(b, num_prefix, h, head_dim)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, -20:] = True
    if num_global == 3:  # the positions the recorded counts were taken with
        positions = [0, 7, 150]
    else:
        positions = sorted({(i * 37) % (n - 20) for i in range(num_global)})
        assert len(positions) == num_global, "num_global too large for n"
    gidx = torch.zeros(b, num_global, dtype=torch.int32)
    gidx[0] = torch.tensor(positions, dtype=torch.int32)
    gidx[1, 0] = 3
    gcnt = torch.tensor([num_global, 1], dtype=torch.int32)
    return ((q, k, v, qg, kg, vg, pk, pv, pad, gidx, gcnt),
            dict(window=window, scale=head_dim**-0.5, max_global=num_global))


def refusal(arch: int, head_dim: int) -> str | None:
    """Why the Triton backend's `cannot_serve` refuses head dim `head_dim` on a GPU of compute capability
    `arch / 10` with all the shared memory per block its tile row may use (None: it serves it). The launchers
    themselves compile whatever they are given: this is where a head dim without tiles of its own is refused."""
    limits = ta._device_limits
    ta._device_limits = lambda index: (arch // 10, arch % 10, ta.TILE_SHARED_LIMIT[ta._tile_row(arch)])
    try:
        return ta._device_reason(torch.device("cuda", 0), head_dim)
    finally:
        ta._device_limits = limits


def _features(feature: str, b: int, n: int, h: int, prefix_k) -> dict:
    """The launchers' feature keywords of `--features`: "joint" none; "separate" a `prefix_scale` and the global
    rows' own prefix; "documents" three documents per row (boundaries inside tiles)."""
    if feature == "separate":
        return dict(prefix_scale=torch.full((h,), 0.5), prefix_k_global=prefix_k.clone(),
                    prefix_v_global=prefix_k.clone())
    if feature == "documents":
        return dict(document_ids=(torch.arange(n) * 3 // n).expand(b, n).contiguous())
    return {}


def compile_all(arch: int, dtypes, head_dims, dropout_p: float, sass: bool = True, lengths=(320,), num_global: int = 3,
                num_prefix: int = 4, window: int = 40, feature: str = "joint") -> list[dict]:
    """One row per compiled kernel specialization: config, kernel name, registers, stack, shared bytes and (with
    `sass`) its loops' SASS instructions per tile and the local-memory (spill) accesses of the kernel and of each
    loop; one row with `kernel` None and the reason in `refused` per (dtype, head dim, N) that `refusal` refuses.
    `feature`: "joint" (the plain op), "separate" or "documents" (`_features`)."""
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
        for dtype, d, n in itertools.product(dtypes, head_dims, lengths):
            why = refusal(arch, d)
            if why is not None:  # what `cannot_serve` says on a GPU of this arch: nothing of it is compiled
                rows.append(dict(arch=f"sm_{arch}", dtype=str(dtype).removeprefix("torch."), head_dim=d, n=n,
                                 dropout=dropout_p > 0, globals=num_global, prefix=num_prefix, kernel=None,
                                 refused=why, triton=triton.__version__))
                continue
            for local in (False, True):
                inputs, kw = _problem(dtype, d, n, num_global, num_prefix, window)
                if local:  # local rows only: a global index without the global projections
                    inputs = (*inputs[:3], None, None, None, *inputs[6:])
                kw.update(dropout_p=dropout_p, seed=1)
                kw.update(_features(feature, inputs[0].shape[0], n, inputs[0].shape[2], inputs[6]))
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
                    row = dict(arch=f"sm_{arch}", dtype=dt, head_dim=d, n=n, dropout=dropout_p > 0, local=local,
                               globals=num_global, prefix=num_prefix, features=feature, kernel=name, warps=md.num_warps,
                               stages=md.num_stages, shared=md.shared, triton=triton.__version__,
                               **_resources(kernel.asm["cubin"]))
                    if sass:
                        row["loops"] = sass_per_tile(kernel.asm["cubin"], SOURCES)
                        row["spill_ops"] = spill_ops(kernel.asm["cubin"]) if row["stack"] else 0
                    rows.append(row)
    finally:
        JITFunction.run = run
        driver._active = previous
    return rows


def _label(r: dict) -> str:
    extra = "" if (r.get("globals", 3), r.get("prefix", 4)) == (3, 4) else f" G={r['globals']} P={r['prefix']}"
    return (f"{r['arch']} {r['dtype']} D={r['head_dim']} N={r['n']}{extra}{' drop' if r['dropout'] else ''}"
            f"{' local' if r.get('local') else ''}")


def table(rows: list[dict]) -> str:
    head = (f"{'config':<46} {'kernel':<28} {'warps':>5} {'stages':>6} {'regs':>5} {'stack':>6} {'shared':>7} "
            f"{'spill ops':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = _label(r)
        if r["kernel"] is None:
            lines.append(f"{cfg:<46} refused: {r['refused']}")
            continue
        lines.append(f"{cfg:<46} {r['kernel']:<28} {r['warps']:>5} {r['stages']:>6} {r['regs']:>5} "
                     f"{r['stack']:>6} {r['shared']:>7} {r.get('spill_ops', ''):>9}")
    if any(r.get("loops") for r in rows):
        head = (f"{'config':<46} {'kernel':<28} {'loop (function:line, via call line)':<44} {'interior':>8} "
                f"{'edge':>6} {'spill':>5}")
        lines += ["", "SASS instructions per warp per tile (spill: local-memory accesses in the loop body)", head,
                  "-" * len(head)]
        for r in rows:
            cfg = _label(r)
            for lp in r.get("loops", []):
                lines.append(f"{cfg:<46} {r['kernel']:<28} {lp['loop']:<44} {lp['interior']:>8} {lp['edge']:>6} "
                             f"{lp['spill_ops']:>5}   {lp['code'][:60]}")
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
    ap.add_argument("--no-sass", action="store_true", help="skip the SASS per-tile counts")
    ap.add_argument("--seq-len", default="320,300", help="N of the compiled problems (320: full tiles only)")
    ap.add_argument("--globals", type=int, default=3,
                    help="global tokens of the first row (the global block is the next power of 2, 16 to 64; more "
                    "than 64 loop over global blocks)")
    ap.add_argument("--prefix", type=int, default=4, help="prefix keys")
    ap.add_argument("--window", type=int, default=40, help="one-sided window")
    ap.add_argument("--features", default="joint", choices=("joint", "separate", "documents"),
                    help="the op features compiled in: none, prefix_normalization='separate' with the global rows' "
                         "own prefix, or document_ids")
    a = ap.parse_args(argv)
    why = missing_tools()
    if why:
        print(f"cannot compile here: {why}", file=sys.stderr)
        return EXIT_CANNOT_COMPILE
    torch.set_float32_matmul_precision(a.fp32_precision)
    rows = compile_all(a.arch, [getattr(torch, s) for s in a.dtype.split(",")],
                       [int(s) for s in a.head_dim.split(",")], a.dropout, sass=not a.no_sass,
                       lengths=[int(s) for s in a.seq_len.split(",")], num_global=a.globals, num_prefix=a.prefix,
                       window=a.window, feature=a.features)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    served = {r["kernel"] for r in rows if r["kernel"] is not None}  # none: every head dim refused
    missing = set(KERNELS) - served
    if served and missing:
        print(f"not compiled: {sorted(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
