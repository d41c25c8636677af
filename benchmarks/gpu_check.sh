#!/usr/bin/env bash
# The GPU check, in one call of at most 9 minutes on a GPU machine without network, the install included. Run from
# the repository root on a CUDA machine:
#     OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# Tier 1 (meant to finish within 5 minutes): the environment, the install (`pip install --no-deps
# --no-build-isolation .`), every kernel path of both fused backends once at small shapes against the reference
# (`pytest -m gpu_short`), and the headline timing (bf16, B=4, N=16384, H=12, D=64, w=256, 17 globals) of the op
# against FlexAttention and of the module against HF's, in the same run. Its table is printed and written to
# $OUT/summary.txt before tier 2 starts.
# Tier 2 (the time that is left; may be cut off without losing tier 1's results): the long GPU tests
# (`pytest -m "gpu and not gpu_short"`), `compute-sanitizer` (memcheck and initcheck with
# PYTORCH_NO_CUDA_MEMORY_CACHING=1, so a read past a tensor is not hidden inside PyTorch's pool; racecheck for
# shared memory) on one tiny mixed forward + backward per fused backend when the tool is there, the main job, and
# the short benchmark matrix. The summary file is appended after every step.
#
# PK_CHECK_SECONDS (default 525) is the whole run's budget and PK_TIER1_SECONDS (default 300) tier 1's, both
# counted from the start: every step runs under `timeout`, limited to what is left of them, and a step with under
# 20 seconds left is skipped (said so in the summary). PYTHON picks the
# interpreter (default python3). When `prefix_kernels/_lib/libprefix_kernels_cuda.so` was built beforehand (e.g.
# elsewhere, for sm_90), PREFIX_KERNELS_BUILD_CUDA=0 installs it as it is instead of compiling again.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget="${PK_CHECK_SECONDS:-525}"
tier1="${PK_TIER1_SECONDS:-300}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PREFIX_KERNELS_CUDA_ARCHS="${PREFIX_KERNELS_CUDA_ARCHS:-90}"
py="${PYTHON:-python3}"
summary="$OUT/summary.txt"
: >"$summary"
exec 3>&1  # this script's stdout, for notes made while a step's output goes to its log

elapsed() { echo $(($(date +%s) - start)); }
in_tier1() { local left=$((tier1 - $(elapsed))); echo $((left < $1 ? left : $1)); }  # in_tier1 N: min(N, tier 1's rest)
note() { echo "$*" | tee -a "$summary" >&3; }
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s; $(elapsed) s of $budget)"; }

# run NAME MAX_SECONDS COMMAND...: COMMAND under `timeout`, at most MAX_SECONDS and never past the budget; notes
# its exit status and time in the summary (124: cut off by the time limit).
run() {
  local name=$1 max=$2 left rc t0
  shift 2
  left=$((budget - $(elapsed)))
  ((left < max)) && max=$left
  if ((max < 20)); then
    note "$name: skipped, $left s left of the budget"
    return 0
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$max" "$@"
  rc=$?
  note "$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (cut off by its time limit)'), $(($(date +%s) - t0)) s"
  return $rc
}

# pytest_summary LOG: the result line and the failures of a pytest log, for the summary.
pytest_summary() {
  grep -E "[0-9]+ (passed|failed|skipped|error)" "$1" | tail -1 | tee -a "$summary"
  grep -E "^(FAILED|ERROR)" "$1" | head -20 | tee -a "$summary"
}

# ------------------------------------------------------------------------------------------------ tier 1
note "== tier 1"
step environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(), 'GPUs:', torch.cuda.device_count())"
} 2>&1 | tee -a "$summary"

step install
run install "$(in_tier1 240)" $py -m pip install --no-deps --no-build-isolation -v . >"$OUT/install.log" 2>&1 ||
  { tail -40 "$OUT/install.log"; note "install failed: stopping"; exit 1; }
grep -E "prefix_kernels: (built|WARNING)|WARNING: prefix_kernels" "$OUT/install.log" | tail -3 | tee -a "$summary"

# The installed package, not this tree (whose prefix_kernels/_lib may lack the CUDA library): Python >= 3.11 keeps
# the working directory off sys.path.
export PYTHONSAFEPATH=1

step "GPU tests, first tier: every kernel path once, small shapes, both fused backends"
run "GPU tests (gpu_short)" "$(in_tier1 170)" $py -m pytest -q -rfEs -p no:cacheprovider -m gpu_short tests ${PK_TEST_ARGS:-} \
  >"$OUT/gpu_tests_short.log" 2>&1
tail -30 "$OUT/gpu_tests_short.log"
pytest_summary "$OUT/gpu_tests_short.log"

step "headline timing: the op against FlexAttention, the module against HF"
PK_BENCH_N=16384 PK_BENCH_LEVELS=op,module PK_BENCH_PROVIDERS=triton,cuda,flex,hf PYTHON=$py \
  run "headline benchmark" "$(in_tier1 150)" bash benchmarks/gpu_bench.sh "$OUT/headline.json" -k "G17-P0" >"$OUT/headline.log" 2>&1
if [[ -s "$OUT/headline.md" ]]; then cat "$OUT/headline.md" | tee -a "$summary"; else tail -20 "$OUT/headline.log"; fi

step "tier 1 summary"
note "== tier 1 done after $(elapsed) s"
cat "$summary"

# ------------------------------------------------------------------------------------------------ tier 2
note ""
note "== tier 2 (may be cut off)"
step "GPU tests, the rest: long shapes and every other test marked gpu"
run "GPU tests (gpu, not gpu_short)" 200 $py -m pytest -q -rfE -p no:cacheprovider -m "gpu and not gpu_short" \
  tests/test_gpu.py tests ${PK_TEST_ARGS:-} >"$OUT/gpu_tests_long.log" 2>&1
tail -30 "$OUT/gpu_tests_long.log"
pytest_summary "$OUT/gpu_tests_long.log"

step "compute-sanitizer"
sanitizer="$(command -v compute-sanitizer || true)"
[[ -z "$sanitizer" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && sanitizer="$CUDA_HOME/bin/compute-sanitizer"
if [[ -z "$sanitizer" ]]; then
  note "compute-sanitizer: not found (PATH, $CUDA_HOME/bin): skipped"
else
  for backend in triton cuda; do
    for tool in memcheck initcheck racecheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 run "compute-sanitizer $tool, $backend" 90 "$sanitizer" --tool "$tool" \
        --error-exitcode 9 --print-limit 20 $py benchmarks/sanitizer_case.py "$backend" \
        >"$OUT/sanitizer_${tool}_${backend}.log" 2>&1
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|: (forward|skipped)" "$OUT/sanitizer_${tool}_${backend}.log" |
        tail -3 | tee -a "$summary"
    done
  done
fi

step "main job"
(cd "$OUT" && run "main job" 120 $py -m prefix_kernels) 2>&1 | tail -14 | tee -a "$summary"

step "benchmark matrix (short)"
PYTHON=$py run "benchmarks" 300 bash benchmarks/gpu_bench.sh "$OUT/bench.json" ${PK_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
tail -n 45 "$OUT/bench.log" | tee -a "$summary"

step summary
note "== done after $(elapsed) s"
cat "$summary"
