#!/usr/bin/env bash
# The GPU check, in one call: install, GPU tests, main job, the short benchmark matrix; logs under $OUT;
# a short table last. Run from the repository root on a CUDA machine:
#     OUT=/tmp/out bash benchmarks/gpu_check.sh [tests|bench|all]
# The machine needs no network: the install is `pip install --no-deps --no-build-isolation .`. When
# `prefix_kernels/_lib/libprefix_kernels_cuda.so` was built beforehand (e.g. elsewhere, for sm_90), set
# PREFIX_KERNELS_BUILD_CUDA=0 to install it as it is instead of compiling again.
set -uo pipefail
what="${1:-all}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PREFIX_KERNELS_CUDA_ARCHS="${PREFIX_KERNELS_CUDA_ARCHS:-90}"
py=python3
summary="$OUT/summary.txt"
: >"$summary"
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$summary"

step install
t0=$(date +%s)
$py -m pip install --no-deps --no-build-isolation -v . >"$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
grep -E "prefix_kernels: (built|WARNING)|WARNING: prefix_kernels" "$OUT/install.log" | tail -3
echo "install: $(( $(date +%s) - t0 )) s" | tee -a "$summary"

step main job
(cd "$OUT" && timeout 120 $py -m prefix_kernels) 2>&1 | tail -14 | tee -a "$summary"

if [[ "$what" == all || "$what" == tests ]]; then
  step GPU tests
  # Every test case that runs on CUDA tensors is marked `gpu` (test_gpu, backends/test_cuda_gpu, test_memory,
  # test_local_rows, hf/test_self_attention, and the CUDA cases of backends/test_triton, core/test_masks,
  # test_dispatch, hf/test_patching, prefix/test_prefix, hf/test_compile, test_properties); tests/test_gpu.py
  # first: the backend-independent suite of the public op.
  PYTHONSAFEPATH=1 timeout "${PK_TEST_TIMEOUT:-480}" $py -m pytest -q -rfE -p no:cacheprovider -m gpu tests/test_gpu.py \
    tests ${PK_TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  echo "GPU tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.log" | tail -1)" >>"$summary"
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20 >>"$summary"
fi

if [[ "$what" == all || "$what" == bench ]]; then
  step benchmarks
  PYTHON=$py timeout "${PK_BENCH_TIMEOUT:-300}" bash benchmarks/gpu_bench.sh "$OUT/bench.json" ${PK_BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1
  echo "benchmarks exit: $?" >>"$summary"
  tail -n 45 "$OUT/bench.log" >>"$summary"
fi

step summary
cat "$summary"
