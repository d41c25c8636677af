"""The Triton kernels go through Triton's real compiler for sm_90 and sm_80, down to a cubin, on any machine.

The interpreter tests check what the kernels compute but never run the compiler, which rejects things the
interpreter accepts (types, layouts, shared memory beyond the device's). `benchmarks/kernel_resources.py` runs the
real launchers with the GPU tile configuration and compiles every launch for a named architecture without a GPU,
then counts the SASS instructions per tile of every loop; it runs in a subprocess because `TRITON_INTERPRET`, set
for this process by `conftest.py`, is read when `triton` is first imported.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

TOOL = ROOT / "benchmarks" / "kernel_resources.py"
KERNELS = {"_attention_fwd_kernel", "_global_rows_merge_kernel", "_bwd_preprocess_kernel", "_attention_bwd_kernel",
           "_bwd_finalize_kernel"}
# Shared memory per block on the target (opt-in maximum): a kernel above it compiles but cannot launch.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
# SASS instructions one warp issues per interior band tile of the forward (bf16, D = 64, sm_90, 64 x 64 tiles,
# N a multiple of the tile): the budget that leaves the tile's exp2 and fp32 work, not its bookkeeping, as the cost.
FORWARD_INTERIOR_BUDGET = 320

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _tool_constant(name: str):
    """A module-level constant of the tool, read from its source (importing it would set `TRITON_INTERPRET=0` in
    this process)."""
    for node in ast.parse(TOOL.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{TOOL.name} defines no {name}")


# The tool's exit status for "this machine cannot compile for a GPU" (Triton's NVIDIA tools missing): the only one
# that skips. Any other failure, a usage error (argparse's 2, e.g. after a renamed flag) included, fails.
EXIT_CANNOT_COMPILE = _tool_constant("EXIT_CANNOT_COMPILE")


def _run_tool(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile now, not from an earlier run's cache
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=900)


def test_a_usage_error_is_not_a_machine_that_cannot_compile(tmp_path):
    r = _run_tool(["--no-such-flag"], tmp_path)
    assert r.returncode == 2 != EXIT_CANNOT_COMPILE, r.stdout + r.stderr
    assert "unrecognized arguments: --no-such-flag" in r.stderr


@pytest.mark.parametrize("arch, dtype, head_dim, dropout, fp32_precision, seq_len", [
    (90, "bfloat16", 64, 0.0, "highest", "320,300"),  # the headline configuration, full and ragged tiles
    (90, "float16", 128, 0.1, "highest", "300"),
    (80, "float32", 32, 0.1, "highest", "320"),  # IEEE fp32
    (80, "float32", 128, 0.0, "high", "300"),  # TF32
])
def test_triton_kernels_compile(tmp_path, arch, dtype, head_dim, dropout, fp32_precision, seq_len):
    out = tmp_path / "rows.json"
    args = ["--arch", str(arch), "--dtype", dtype, "--head-dim", str(head_dim), "--dropout", str(dropout),
            "--fp32-precision", fp32_precision, "--seq-len", seq_len, "--json", str(out)]
    r = _run_tool(args, tmp_path)
    if r.returncode == EXIT_CANNOT_COMPILE:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    lengths = [int(n) for n in seq_len.split(",")]
    # Every kernel with the global projections; without them (local rows only) every kernel but the merge.
    local_kernels = KERNELS - {"_global_rows_merge_kernel"}
    assert sorted((row["kernel"], row["n"], row["local"]) for row in rows) == sorted(
        [(k, n, False) for k in KERNELS for n in lengths] + [(k, n, True) for k in local_kernels for n in lengths])
    for row in rows:
        tf32 = "-tf32" if dtype == "float32" and fp32_precision != "highest" else ""
        assert (row["arch"], row["dtype"], row["head_dim"]) == (f"sm_{arch}", dtype + tf32, head_dim)
        assert 0 < row["regs"] <= 255, row
        assert row["shared"] <= MAX_SHARED[arch], row
        if dtype != "float32":
            assert row["stack"] == 0, f"{row['kernel']} spills {row['stack']} bytes"
        for loop in row["loops"]:
            assert 0 < loop["interior"] <= loop["edge"], (row["kernel"], loop)
    # Every tile loop of the main kernels was found in the SASS and named after its Python loop.
    by_kernel = {(row["kernel"], row["n"], row["local"]): {lp["loop"].split(" ")[0] for lp in row["loops"]}
                 for row in rows}
    for n in lengths:
        for local in (False, True):
            assert "_local_rows_fwd:" in " ".join(by_kernel[("_attention_fwd_kernel", n, local)]), by_kernel
            assert "_band_keys_bwd:" in " ".join(by_kernel[("_attention_bwd_kernel", n, local)]), by_kernel
    if (arch, dtype, head_dim, dropout) == (90, "bfloat16", 64, 0.0):
        for local in (False, True):
            full = next(row for row in rows
                        if row["kernel"] == "_attention_fwd_kernel" and row["n"] % 64 == 0 and row["local"] == local)
            band = next(lp for lp in full["loops"]
                        if lp["loop"].startswith("_local_rows_fwd:") and "tl.range" in lp["code"])
            assert band["interior"] <= FORWARD_INTERIOR_BUDGET, band
            assert band["edge"] > band["interior"]  # the mask is built on edge tiles only
