#!/usr/bin/env bash
# The short GPU benchmark run: every provider at the headline shape (bf16, B=4, N=16384, H=12, D=64, w=256,
# 17 global tokens), the fused backends and SDPA at N = 4096 and 32768, the prefix-tuning family, the module
# level and the longformer-base classifier. About 4 minutes on an H100, compiles included.
#
#   benchmarks/gpu_bench.sh [results.json] [extra pytest args, e.g. -k "N16384"]
#
# The JSON path is the first argument if it ends in .json, else $PK_BENCH_JSON, else bench_results.json.
# Next to it: results.partial.jsonl (each result as it finishes: kept if the run is cut off), results.md and
# results.png (benchmarks/report.py). Each result's line is printed as it finishes; the compact table last.
# PK_BENCH_MATRIX=full runs the whole matrix (bf16 + fp16, B in {1, 4}, N up to 32768; tens of minutes).
# The installed prefix_kernels is used when there is one (else this tree's); the header line of the pytest
# output says which. A backend that cannot run (e.g. no CUDA library) skips with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${PK_BENCH_JSON:-bench_results.json}"
if [[ $# -gt 0 && "$1" == *.json ]]; then
    out="$1"
    shift
fi
py="${PYTHON:-python}"
partial="${out%.json}.partial.jsonl"
rm -f "$partial"

if (cd / && "$py" -c "import prefix_kernels") >/dev/null 2>&1; then
    # An installed package wins, as in `pytest tests`: it carries the CUDA library, which this tree's
    # prefix_kernels/_lib may lack. Python >= 3.11 then keeps the working directory off sys.path.
    export PYTHONSAFEPATH=1
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

PK_BENCH_MATRIX="${PK_BENCH_MATRIX:-short}" PK_BENCH_PARTIAL="$partial" PK_BENCH_PROGRESS=1 PK_BENCH_NO_SUMMARY=1 \
    "$py" -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider --disable-warnings --benchmark-quiet \
    --benchmark-json "$out" "$@"
status=$?

results="$out"
[[ -f "$results" ]] || results="$partial"
if [[ -s "$results" ]]; then
    "$py" benchmarks/report.py "$results" --out-md "${out%.json}.md" --out-png "${out%.json}.png"
else
    echo "gpu_bench.sh: no results written" >&2
fi
exit $status
