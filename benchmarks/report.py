"""Turn a `pytest benchmarks --benchmark-json results.json` file into a Markdown table and a PNG plot.

    python benchmarks/report.py results.json [--out-md BENCHMARKS_table.md] [--out-png bench.png]
                                             [--dtype bf16] [--batch 4]

`results.partial.jsonl` (written with `PK_BENCH_PARTIAL` as results finish) works too, e.g. after a run was
cut off by a time limit.
The table (printed, and written to `--out-md`) has one line per result: provider, shape, mode, median ms,
useful TFLOP/s, peak extra MB, and the speed ratio to HF (module and model levels) and to FlexAttention (op
level) from the same run. The plot shows median time and peak extra memory against N (log-log), one line per
provider, one row of panels per (level, mode, globals, prefix) family, for one dtype and batch size (default:
the most common dtype and the largest batch). No torch needed: this file only reads JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict

BASELINES = {"op": "flex", "module": "hf", "model": "hf"}
TABLE_COLUMNS = ("level", "provider", "shape", "mode", "median ms", "TFLOP/s", "peak MB", "xHF", "xFlex")
_LEVEL_ORDER = {"op": 0, "module": 1, "model": 2}


def add_ratios(results: list[dict]) -> None:
    """`x_hf` / `x_flex` = baseline median / this median within (level, shape, mode); > 1 means faster."""
    medians = {(r["level"], r["shape"], r["mode"], r["provider"]): r["median_ms"] for r in results}
    for r in results:
        base = BASELINES.get(r["level"])
        ref = medians.get((r["level"], r["shape"], r["mode"], base))
        r["x_flex" if base == "flex" else "x_hf"] = ref / r["median_ms"] if ref and r["median_ms"] else None


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    rows = sorted(results, key=lambda r: (_LEVEL_ORDER.get(r["level"], 9), r["shape"], r["mode"], r["provider"]))
    return [
        (r["level"], r["provider"], r["shape"], r["mode"], _fmt(r["median_ms"], ".3f"), _fmt(r.get("tflops"), ".3g"),
         _fmt(r.get("peak_extra_mb"), ".1f"), _fmt(r.get("x_hf"), ".2f"), _fmt(r.get("x_flex"), ".2f"))
        for r in rows
    ]


def format_table(results: list[dict]) -> list[str]:
    """A compact fixed-width table, one line per result."""
    rows = [TABLE_COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def markdown_table(results: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return lines


def load_results(path: str) -> list[dict]:
    """The `extra_info` of every benchmark that recorded one (median taken from the JSON's own stats).

    A `.jsonl` file is the `PK_BENCH_PARTIAL` log: one `extra_info` per line, written as each result finished.
    """
    with open(path) as fh:
        if path.endswith(".jsonl"):
            results = [json.loads(line) for line in fh if line.strip()]
            add_ratios(results)
            return results
        data = json.load(fh)
    results = []
    for bench in data.get("benchmarks", []):
        extra = dict(bench.get("extra_info") or {})
        if "level" not in extra:
            continue
        median = (bench.get("stats") or {}).get("median")
        if median is not None:
            extra["median_ms"] = median * 1e3
        results.append(extra)
    add_ratios(results)
    return results


def _family(r: dict) -> tuple:
    return r["level"], r["mode"], r.get("G"), r.get("P")


def plot(results: list[dict], path: str, dtype: str | None = None, batch: int | None = None) -> str:
    """Median time and peak memory against N, one line per provider; returns the plotted slice's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    dtype = dtype or Counter(r.get("dtype") for r in results).most_common(1)[0][0]
    chosen = [r for r in results if r.get("dtype") == dtype]
    batch = batch or max((r.get("B") or 0 for r in chosen), default=0)
    chosen = [r for r in chosen if r.get("B") == batch and r.get("N")]
    families = sorted({_family(r) for r in chosen}, key=lambda f: (_LEVEL_ORDER.get(f[0], 9), *map(str, f[1:])))
    if not families:
        raise SystemExit(f"nothing to plot for dtype={dtype} B={batch}")
    fig, axes = plt.subplots(len(families), 2, figsize=(11, 3.2 * len(families)), squeeze=False)
    for row, family in zip(axes, families, strict=True):
        lines = defaultdict(list)
        for r in chosen:
            if _family(r) == family:
                lines[r["provider"]].append((r["N"], r["median_ms"], r.get("peak_extra_mb")))
        level, mode, g, p = family
        for provider, points in sorted(lines.items()):
            points.sort()
            ns = [n for n, _, _ in points]
            row[0].plot(ns, [t for _, t, _ in points], marker="o", label=provider)
            mem = [(n, m) for n, _, m in points if m is not None]
            if mem:
                row[1].plot([n for n, _ in mem], [m for _, m in mem], marker="o", label=provider)
        for ax, ylabel in zip(row, ("median time (ms)", "peak extra memory (MB)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # labels at 1-2-5 only: readable
            ax.yaxis.set_minor_formatter(plain)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{level} {mode}, G={g} P={p}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    title = f"{dtype}, B={batch}, device: {chosen[0].get('device', '?')}"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / len(families) / 3.2))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return title


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a --benchmark-json file, or a PK_BENCH_PARTIAL .jsonl log")
    parser.add_argument("--out-md", help="write the Markdown table here")
    parser.add_argument("--out-png", help="write the plot here")
    parser.add_argument("--dtype", help="plot this dtype (default: the most common)")
    parser.add_argument("--batch", type=int, help="plot this batch size (default: the largest)")
    opts = parser.parse_args(argv)
    results = load_results(opts.json)
    if not results:
        print(f"{opts.json}: no prefix_kernels benchmark results", file=sys.stderr)
        return 1
    first = results[0]
    header = (f"device: {first.get('device')}; torch {first.get('torch')}, triton {first.get('triton')}, "
              f"transformers {first.get('transformers')}")
    md = [header, "", *markdown_table(results)]
    if opts.out_md:
        with open(opts.out_md, "w") as fh:
            fh.write("\n".join(md) + "\n")
    if opts.out_png:
        print(f"plot: {plot(results, opts.out_png, opts.dtype, opts.batch)} -> {opts.out_png}")
    print("\n".join([header, *format_table(results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
