"""pytest-benchmark glue: ratios to HF / FlexAttention in the JSON, and a compact table printed last.

Run: `pytest benchmarks --benchmark-only [--benchmark-json out.json]` (see BENCHMARKS.md for the matrix and the
environment variables). Ratios are `baseline median / median` within the same level, shape and mode of the
same run: `xHF` for the module and model levels, `xFlex` for the op level; above 1 means faster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_utils & co. under any --import-mode

import bench_utils  # noqa: E402
import report as bench_report  # noqa: E402

_state: dict = {"printed": 0, "config": None}  # results already printed by the progress hook; the config


def pytest_configure(config):
    import torch

    _state["config"] = config
    if not torch.cuda.is_available():
        # Shared CI runners: intra-op threads competing with other jobs turn milliseconds into seconds.
        torch.set_num_threads(int(os.environ.get("PK_BENCH_CPU_THREADS", "1")))


def pytest_report_header(config):
    import torch

    lines = [f"prefix_kernels benchmarks: matrix {bench_utils.matrix_name()!r}, torch {torch.__version__}"]
    try:
        import prefix_kernels as pk

        lines.append(f"prefix_kernels from {Path(pk.__file__).parent}, backends: {pk.available_backends()}")
    except Exception as exc:  # still collect, so every case skips with the reason
        lines.append(f"prefix_kernels not importable: {exc}")
    return lines


def pytest_collection_modifyitems(config, items):
    from matrix import run_priority

    def priority(item) -> int:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "shape" not in params:
            return 9
        return run_priority(item.originalname.removeprefix("test_"), params["provider"], params["shape"])

    items.sort(key=priority)  # stable: the matrix order within each priority


@pytest.fixture(autouse=True)
def _release_memory():
    """Free the previous case's tensors and cached blocks, so each case's peak memory starts clean."""
    yield
    bench_utils.free_memory()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    bench_utils.compute_ratios()
    by_key = {(r["level"], r["shape"], r["mode"], r["provider"]): r for r in bench_utils.RESULTS}
    for bench in output_json.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        found = by_key.get((extra.get("level"), extra.get("shape"), extra.get("mode"), extra.get("provider")))
        if found is not None:
            extra.update(x_hf=found["x_hf"], x_flex=found["x_flex"])
        params = bench.get("params")
        if isinstance(params, dict) and "shape" in params:  # a Shape object: its readable id, not a repr
            bench["params"] = {**params, "shape": extra.get("shape", str(params["shape"]))}


@pytest.hookimpl(trylast=True)  # after the terminal's own progress mark
def pytest_runtest_logreport(report):
    """With `PK_BENCH_PROGRESS=1`, one line per result as soon as it is measured (survives a killed run)."""
    if report.when != "call" or not os.environ.get("PK_BENCH_PROGRESS") or _state["config"] is None:
        return
    fresh = bench_utils.RESULTS[_state["printed"]:]
    _state["printed"] = len(bench_utils.RESULTS)
    reporter = _state["config"].pluginmanager.get_plugin("terminalreporter")
    for row in bench_report.table_rows(fresh) if fresh else ():
        reporter.write("\n" + "  ".join(row) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not bench_utils.RESULTS or os.environ.get("PK_BENCH_NO_SUMMARY"):
        return
    bench_utils.compute_ratios()
    terminalreporter.section("prefix_kernels benchmark summary")
    terminalreporter.write_line(
        "xHF / xFlex: HF (module, model) or FlexAttention (op) median / this median, same run; > 1 is faster")
    for line in bench_report.format_table(bench_utils.RESULTS):
        terminalreporter.write_line(line)
