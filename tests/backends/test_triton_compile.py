"""The Triton kernels go through Triton's real compiler for sm_90 and sm_80, down to a cubin, on any machine.

The interpreter tests check what the kernels compute but never run the compiler, which rejects things the
interpreter accepts (types, layouts, shared memory beyond the device's). `benchmarks/kernel_resources.py` runs the
real launchers with the GPU tile configuration and compiles every launch for a named architecture without a GPU,
then counts the SASS instructions per tile of every loop and the local-memory (spill) accesses of each kernel and
loop; it runs in a subprocess because `TRITON_INTERPRET`, set for this process by `conftest.py`, is read when
`triton` is first imported.

The configurations: the headline specialization (bf16, D = 64, 17 globals, so a 32-slot global block, 16 prefix
keys, N a multiple of the tiles and a ragged N, both over several key splits) on sm_90 and sm_80; more than 64
globals (the backward's loop over global blocks), without and with fp16 / bf16 dropout (the dropout tile); the
headline with dropout; D = 128 with dropout; IEEE fp32 and TF32; the headline with the op's features
(`prefix_normalization="separate"` with the global rows' own prefix, and `document_ids`). Each with the global
projections and without them (local rows only). Head dims 160, 192 and 256 on sm_80 and sm_90: the tool asks the
launcher's `cannot_serve` reasoning (on a GPU of that arch with all the shared memory its tiles may use) and
compiles what it serves; today it refuses them all (`test_triton_launch.py` checks the refusals on real GPUs'
limits), and tiles for them, once added, are compiled and held to the same limits here.

The compiler is this process's Triton, or the one installed (`pip install --no-deps --target DIR "triton==3.6.*"`)
in the directory `PK_COMPILE_TRITON` names, which the tool's process puts first on its path; CI runs this file under
both, the newest Triton and the GPU machine's 3.6. Spills: no kernel reads or writes its spill stack inside a tile
loop, under any compiler; outside the loops, a kernel keeps a stack only where `ACCEPTED_STACK` names it, with its
size, for that Triton version.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from prefix_kernels.backends.triton.launch import TILE_SHARED_LIMIT

TOOL = ROOT / "benchmarks" / "kernel_resources.py"
KERNELS = {"_attention_fwd_kernel", "_global_rows_merge_kernel", "_bwd_preprocess_kernel", "_attention_bwd_kernel",
           "_bwd_finalize_kernel"}
# SASS instructions one warp issues per interior band tile of the forward (bf16, D = 64, sm_90, 64 x 64 tiles,
# N a multiple of the tile): the budget that leaves the tile's exp2 and fp32 work, not its bookkeeping, as the cost.
FORWARD_INTERIOR_BUDGET = 320
# Another Triton for the tool's process: a directory holding a `triton` package (`pip install --target`).
SIDE_TRITON = "PK_COMPILE_TRITON"

# id: (arch, dtype, head_dim, dropout, fp32 matmul precision, sequence lengths, global tokens, prefix keys, window)
HEADLINE = (17, 16, 256)
CONFIGS = {
    "headline-sm90": (90, "bfloat16", 64, 0.0, "highest", "1088,1000", *HEADLINE),
    "headline-sm80": (80, "bfloat16", 64, 0.0, "highest", "1088,1000", *HEADLINE),
    "headline-dropout-sm90": (90, "bfloat16", 64, 0.1, "highest", "1000", *HEADLINE),
    "globals70-sm90": (90, "bfloat16", 64, 0.0, "highest", "1088", 70, 16, 256),
    "globals70-sm80": (80, "bfloat16", 64, 0.0, "highest", "1088", 70, 16, 256),
    "globals70-dropout-sm80": (80, "bfloat16", 64, 0.1, "highest", "1000", 70, 16, 256),
    "d128-dropout-sm90": (90, "float16", 128, 0.1, "highest", "1000", *HEADLINE),
    "fp32-dropout-sm80": (80, "float32", 32, 0.1, "highest", "320", 3, 4, 40),  # IEEE fp32
    "tf32-d128-sm80": (80, "float32", 128, 0.0, "high", "300", 3, 4, 40),
    "headline-separate-sm90": (90, "bfloat16", 64, 0.0, "highest", "1088", *HEADLINE),
    "headline-documents-sm90": (90, "bfloat16", 64, 0.0, "highest", "1088", *HEADLINE),
}
# The op features a configuration compiles in (`kernel_resources.py --features`; the others: "joint", none).
FEATURES = {"headline-separate-sm90": "separate", "headline-documents-sm90": "documents"}

# Spill stacks (bytes) accepted outside the band loops, per Triton version (major.minor): (config id, kernel, N,
# local rows only) -> stack. A kernel not named here keeps none; a named one keeps exactly this much (a change
# shows). All in the backward kernel, but one in the forward under Triton 3.6.
BWD = "_attention_bwd_kernel"
ACCEPTED_STACK: dict[str, dict[tuple[str, str, int, bool], int]] = {
    "3.8": {("headline-dropout-sm90", BWD, 1000, False): 16, ("headline-dropout-sm90", BWD, 1000, True): 8,
            ("globals70-sm90", BWD, 1088, False): 32, ("globals70-sm80", BWD, 1088, False): 16,
            ("globals70-dropout-sm80", BWD, 1000, False): 24, ("d128-dropout-sm90", BWD, 1000, False): 24,
            ("headline-separate-sm90", BWD, 1088, False): 72, ("headline-documents-sm90", BWD, 1088, False): 104,
            ("headline-documents-sm90", BWD, 1088, True): 112},
    "3.6": {("headline-sm80", BWD, 1088, False): 8, ("headline-sm80", BWD, 1088, True): 8,
            ("headline-sm80", BWD, 1000, False): 96, ("headline-sm80", BWD, 1000, True): 96,
            ("globals70-sm80", BWD, 1088, False): 8, ("globals70-sm80", BWD, 1088, True): 8,
            ("globals70-dropout-sm80", BWD, 1000, False): 64,
            ("globals70-dropout-sm80", "_attention_fwd_kernel", 1000, False): 8,
            ("d128-dropout-sm90", BWD, 1000, False): 32,
            ("tf32-d128-sm80", BWD, 300, False): 88, ("tf32-d128-sm80", BWD, 300, True): 88,
            ("headline-documents-sm90", BWD, 1088, False): 24, ("headline-documents-sm90", BWD, 1088, True): 32},
}
# Spill accesses accepted inside a tile loop, per Triton version: (config id, kernel, N, local rows only, loop
# function) -> accesses per tile. Never in a band loop (`_local_rows_fwd`, `_band_pairs_bwd`: the hot ones). None
# at present, under either Triton.
ACCEPTED_LOOP_SPILLS: dict[str, dict[tuple[str, str, int, bool, str], int]] = {}
HOT_LOOPS = ("_local_rows_fwd:", "_band_pairs_bwd:")

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


def _side_triton_version() -> str | None:
    """The version of the Triton in `PK_COMPILE_TRITON`, from its `dist-info` (None: the variable is unset)."""
    side = os.environ.get(SIDE_TRITON)
    if not side:
        return None
    infos = sorted(Path(side).glob("triton-*.dist-info"))
    assert infos, f"{SIDE_TRITON}={side} holds no triton-*.dist-info (pip install --no-deps --target DIR triton==...)"
    return infos[-1].name.removeprefix("triton-").removesuffix(".dist-info")


def _run_tool(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile now, not from an earlier run's cache
    side = os.environ.get(SIDE_TRITON)
    if side:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (side, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=900)


def test_a_usage_error_is_not_a_machine_that_cannot_compile(tmp_path):
    r = _run_tool(["--no-such-flag"], tmp_path)
    assert r.returncode == 2 != EXIT_CANNOT_COMPILE, r.stdout + r.stderr
    assert "unrecognized arguments: --no-such-flag" in r.stderr


@pytest.mark.parametrize("config", list(CONFIGS))
def test_triton_kernels_compile(tmp_path, config):
    arch, dtype, head_dim, dropout, fp32_precision, seq_len, n_global, prefix, window = CONFIGS[config]
    out = tmp_path / "rows.json"
    args = ["--arch", str(arch), "--dtype", dtype, "--head-dim", str(head_dim), "--dropout", str(dropout),
            "--fp32-precision", fp32_precision, "--seq-len", seq_len, "--globals", str(n_global), "--prefix",
            str(prefix), "--window", str(window), "--features", FEATURES.get(config, "joint"), "--json", str(out)]
    r = _run_tool(args, tmp_path)
    if r.returncode == EXIT_CANNOT_COMPILE:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    version = rows[0]["triton"]
    side = _side_triton_version()
    assert side is None or version == side, f"compiled by Triton {version}, not {SIDE_TRITON}'s {side}"
    lengths = [int(n) for n in seq_len.split(",")]
    # Every kernel with the global projections; without them (local rows only) every kernel but the merge.
    local_kernels = KERNELS - {"_global_rows_merge_kernel"}
    assert sorted((row["kernel"], row["n"], row["local"]) for row in rows) == sorted(
        [(k, n, False) for k in KERNELS for n in lengths] + [(k, n, True) for k in local_kernels for n in lengths])
    major_minor = ".".join(version.split(".")[:2])
    accepted, accepted_loops = ACCEPTED_STACK.get(major_minor, {}), ACCEPTED_LOOP_SPILLS.get(major_minor, {})
    spills = []  # every spill that is not accepted, reported together
    for row in rows:
        tf32 = "-tf32" if dtype == "float32" and fp32_precision != "highest" else ""
        assert (row["arch"], row["dtype"], row["head_dim"]) == (f"sm_{arch}", dtype + tf32, head_dim)
        assert (row["globals"], row["prefix"], row["dropout"]) == (n_global, prefix, dropout > 0)
        assert row["features"] == FEATURES.get(config, "joint")
        assert 0 < row["regs"] <= 255, row
        assert row["shared"] <= TILE_SHARED_LIMIT[arch], row
        key = (config, row["kernel"], row["n"], row["local"])
        where = f"Triton {version}, {key}"
        if row["stack"] != accepted.get(key, 0):
            spills.append(f"{where}: {row['stack']} bytes of spill stack, accepted {accepted.get(key, 0)}")
        most = {}  # loop function -> the most spill accesses per tile in its loops
        for loop in row["loops"]:
            assert 0 < loop["interior"] <= loop["edge"], (row["kernel"], loop)
            function = loop["loop"].split(":")[0]
            most[function] = max(most.get(function, 0), loop["spill_ops"])
            allowed = 0 if loop["loop"].startswith(HOT_LOOPS) else accepted_loops.get((*key, function), 0)
            if loop["spill_ops"] not in (0, allowed):
                spills.append(f"{where}: {loop['spill_ops']} spill accesses per tile in {loop['loop']} "
                              f"({loop['code']}), accepted {allowed}")
        for (*accepted_key, function), allowed in accepted_loops.items():
            if tuple(accepted_key) == key and most.get(function, 0) != allowed:
                spills.append(f"{where}: at most {most.get(function, 0)} spill accesses per tile in the loops of "
                              f"{function}, accepted {allowed}")
    assert not spills, "\n".join(spills)
    # Every tile loop of the main kernels was found in the SASS and named after its Python loop.
    by_kernel = {(row["kernel"], row["n"], row["local"]): {lp["loop"].split(" ")[0] for lp in row["loops"]}
                 for row in rows}
    for n in lengths:
        for local in (False, True):
            assert "_local_rows_fwd:" in " ".join(by_kernel[("_attention_fwd_kernel", n, local)]), by_kernel
            assert "_band_pairs_bwd:" in " ".join(by_kernel[("_attention_bwd_kernel", n, local)]), by_kernel
            if not local:
                assert "_global_rows_bwd_split:" in " ".join(by_kernel[("_attention_bwd_kernel", n, local)]), by_kernel
    if config == "headline-sm90":
        for local in (False, True):
            full = next(row for row in rows
                        if row["kernel"] == "_attention_fwd_kernel" and row["n"] % 64 == 0 and row["local"] == local)
            band = next(lp for lp in full["loops"]
                        if lp["loop"].startswith("_local_rows_fwd:") and "tl.range" in lp["code"])
            assert band["interior"] <= FORWARD_INTERIOR_BUDGET, band
            assert band["edge"] > band["interior"]  # the mask is built on edge tiles only


@pytest.mark.parametrize("arch", [90, 80])
def test_head_dims_above_128_are_refused_or_fit(tmp_path, arch):
    """D = 160, 192, 256 in 16 bits and fp32: each either refused by `cannot_serve` with the reason (nothing
    compiled, `auto` moves on) or compiled within the arch's shared memory, without spills."""
    head_dims = (160, 192, 256)
    out = tmp_path / "rows.json"
    r = _run_tool(["--arch", str(arch), "--dtype", "bfloat16,float16,float32", "--head-dim",
                   ",".join(map(str, head_dims)), "--seq-len", "320", "--json", str(out)], tmp_path)
    if r.returncode == EXIT_CANNOT_COMPILE:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert {(row["dtype"], row["head_dim"]) for row in rows} == {
        (dt, d) for dt in ("bfloat16", "float16", "float32") for d in head_dims}
    for row in rows:
        if row["kernel"] is None:
            assert f"head_dim {row['head_dim']} > " in row["refused"], row
        else:
            assert row["shared"] <= TILE_SHARED_LIMIT[arch] and row["stack"] == 0, row
    refused = {(row["dtype"], row["head_dim"]) for row in rows if row["kernel"] is None}
    served = {(row["dtype"], row["head_dim"]) for row in rows if row["kernel"] is not None}
    assert not refused & served, refused & served


def test_accepted_spills_name_compiled_specializations():
    """Every accepted spill names a configuration, kernel, N and mode that the compile test compiles, and no band
    loop."""
    for version, table in [*ACCEPTED_STACK.items(), *ACCEPTED_LOOP_SPILLS.items()]:
        for (config, kernel, n, local, *loop), size in table.items():
            assert config in CONFIGS and kernel in KERNELS and size > 0, (version, config, kernel)
            assert str(n) in CONFIGS[config][5].split(","), (version, config, n)
            assert not (local and kernel == "_global_rows_merge_kernel"), (version, config, kernel)
            assert not any(f"{name}:".startswith(HOT_LOOPS) for name in loop), (version, config, loop)
