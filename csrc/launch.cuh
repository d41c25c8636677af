// Longformer attention (sliding window + global tokens + prefix keys/values): which kernels run, in which order.
//
// Design note
// -----------
// Semantics: prefix_kernels/reference.py (its docstring states them, with the mask picture). Three parts, so
// that no program walks all N keys alone:
//   1. local rows forward: one warp per (b, h, query row). Keys: the band |i-j| <= w (band columns that are
//      global or padding are skipped), then the row's global keys gathered through `global_idx` (LOCAL k, v),
//      then the P prefix keys; one online softmax in fp32. Writes O (input dtype) and the log2-domain LSE.
//   2. global rows forward: one warp per (b, h, global slot g, key split). Each split covers a contiguous run
//      of the N + P "columns" (columns 0..N-1 are k_global/v_global rows, N..N+P-1 the prefix) and writes an
//      fp32 partial (m, l, acc[D]); a merge warp per (b, h, g) combines them by log-sum-exp and overwrites
//      the row's O and LSE.
//   3. backward recomputes probabilities from the LSE:
//      * delta = rowsum(dO * O) in fp32;
//      * dQ of local rows: one warp per row over the same keys as the forward;
//      * dK/dV of band keys: one warp per key j over the queries |i-j| <= w (symmetric to the forward, so
//        plain stores, no atomics);
//      * dK/dV of global keys (through the local k, v) and of prefix keys: every local query contributes, so
//        one warp per (key, chunk of LOCAL_QCHUNK queries) accumulates in registers and does one fp32
//        atomicAdd per element into a compact workspace;
//      * global rows: dq_global by a warp per (g, key split) with one atomicAdd per element at the end;
//        dk_global/dv_global by a warp per key column over the G_b global queries (plain stores; prefix
//        columns atomically add into the shared fp32 prefix workspace);
//      * a finalize pass scatters the compact fp32 workspaces (global slots) into dk, dv, dq_global.
// Rows are classified once per call into `tok[b, i]` (token_table): -2 padding, -1 local, g >= 0 global slot g.
// Padding rows: O = 0, LSE = +inf, zero gradients. A row with no admissible key gets O = 0 and LSE = +inf, so
// the backward's exp2(s - LSE) is exactly 0 and nothing is NaN. Dropout: philox.cuh.
//
// Arithmetic. fp16/bf16 local rows (forward, dQ, band dK/dV: the bulk of the work) run on tensor cores through
// nvcuda::wmma 16x16x16 fragments with fp32 accumulators (tc_*.cuh; probabilities and dS are rounded to the
// input dtype before their matmul, as in FlashAttention). Everything else, and every fp32 call, uses SIMT fp32
// FMAs (simt_*.cuh, warp_row.cuh): fp32 inputs are IEEE fp32 throughout (no tf32), tolerance ~1e-5 relative to
// an fp64 reference. The global-row kernels, the shared-key (global/prefix) dK/dV and the finalize pass are SIMT
// for every dtype.
// Env PREFIX_KERNELS_CUDA_SIMT=1 forces the SIMT kernels (a debugging switch: both paths pass the same tests).
// A tc kernel whose shared memory exceeds the device's opt-in limit falls back to SIMT at launch time (none does
// on an A100 or H100 today; the check keeps a future larger tile from failing at launch).
//
// ptxas -v (nvcc 13.0, sm_90, -O3, bf16), registers per thread for D = 16/32/64/128: tc forward 64/72/72/166
// (12 bytes of spill at D = 64), tc dQ 64/56/96/134, tc band dK/dV 80/96/128/255 (28 bytes of spill at
// D = 128); SIMT kernels 24-99 with no spills. Shared memory per tc block (fp16/bf16): forward 71 KB (D = 64) /
// 111 KB (D = 128); dQ 80 / 112 KB; band dK/dV 89 / 121 KB.

#pragma once

#include <type_traits>

#include "launch.h"
#include "simt_bwd.cuh"
#include "simt_fwd.cuh"
#include "tc_bwd.cuh"
#include "tc_fwd.cuh"
#include "token_table.h"

namespace pk {

inline unsigned blocks_for_warps(int64_t warps) {
  return static_cast<unsigned>((warps + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK);
}

// Launch, then return the launch error (bad configuration, missing kernel image for this GPU) at once.
#define PK_LAUNCH(kernel, warps, ...)                                                      \
  do {                                                                                    \
    const int64_t pk_warps_ = (warps);                                                    \
    if (pk_warps_ > 0) {                                                                  \
      kernel<<<blocks_for_warps(pk_warps_), THREADS, 0, stream>>>(__VA_ARGS__);           \
      const cudaError_t pk_err_ = cudaGetLastError();                                     \
      if (pk_err_ != cudaSuccess) return pk_err_;                                         \
    }                                                                                     \
  } while (0)

// Whether a block with `smem` bytes of dynamic shared memory fits this device (an A100 offers 163 KB, an H100
// 227 KB); the largest tc block (band dK/dV, D = 128) needs 121 KB.
inline bool tc_fits(size_t smem) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return false;
  return smem <= static_cast<size_t>(optin);
}

// One block per (b, h, 64-row tile); dynamic shared memory above 48 KB needs the opt-in attribute.
template <typename Kernel>
inline cudaError_t launch_tc(Kernel kernel, size_t smem, const Params& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = static_cast<int64_t>(p.B) * p.H * ((p.N + tc::BM - 1) / tc::BM);
  if (blocks <= 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(blocks), tc::NTHREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

// The local-row stages that have a tensor-core and a SIMT kernel. Member templates, so that a stage's tc kernel
// is instantiated only for the dtypes that can run it.
struct LocalRowsFwd {
  template <typename T, int D> static constexpr auto simt() { return local_rows_fwd_kernel<T, D>; }
  template <typename T, int D> static constexpr auto tc() { return tc::local_rows_fwd_tc_kernel<T, D>; }
  template <typename T, int D> static constexpr size_t tc_smem() { return tc::fwd_tc_smem<T, D>(); }
};
struct LocalRowsDq {
  template <typename T, int D> static constexpr auto simt() { return local_rows_bwd_dq_kernel<T, D>; }
  template <typename T, int D> static constexpr auto tc() { return tc::local_rows_bwd_dq_tc_kernel<T, D>; }
  template <typename T, int D> static constexpr size_t tc_smem() { return tc::dq_tc_smem<T, D>(); }
};
struct LocalRowsDkvBand {
  template <typename T, int D> static constexpr auto simt() { return local_rows_bwd_dkv_band_kernel<T, D>; }
  template <typename T, int D> static constexpr auto tc() { return tc::local_rows_bwd_dkv_band_tc_kernel<T, D>; }
  template <typename T, int D> static constexpr size_t tc_smem() { return tc::dkv_tc_smem<T, D>(); }
};

// The one place that chooses between the two: tensor cores for fp16/bf16 unless PREFIX_KERNELS_CUDA_SIMT asks
// for SIMT or the block's shared memory does not fit this device; SIMT otherwise.
template <typename Stage, typename T, int D>
cudaError_t launch_local_rows(const Params& p, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    constexpr size_t smem = Stage::template tc_smem<T, D>();
    if (!p.simt_only && tc_fits(smem)) return launch_tc(Stage::template tc<T, D>(), smem, p, stream);
  }
  constexpr auto simt = Stage::template simt<T, D>();
  PK_LAUNCH(simt, static_cast<int64_t>(p.B) * p.H * p.N, p);
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
  cudaError_t err = launch_build_tok(p, stream);
  if (err == cudaSuccess) err = launch_local_rows<LocalRowsFwd, T, D>(p, stream);
  if (err != cudaSuccess) return err;
  if (p.max_global > 0) {
    const int64_t slots = static_cast<int64_t>(p.B) * p.H * p.max_global;
    PK_LAUNCH((global_rows_fwd_split_kernel<T, D>), slots * p.num_splits, p);
    PK_LAUNCH((global_rows_fwd_merge_kernel<T, D>), slots, p);
  }
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_backward(const Params& p, cudaStream_t stream) {
  cudaError_t err = launch_build_tok(p, stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.N;
  PK_LAUNCH((bwd_delta_kernel<T, D>), rows, p);
  err = launch_local_rows<LocalRowsDq, T, D>(p, stream);
  if (err == cudaSuccess) err = launch_local_rows<LocalRowsDkvBand, T, D>(p, stream);
  if (err != cudaSuccess) return err;
  const int shared_keys = p.max_global + p.P;
  if (shared_keys > 0) {
    const int num_chunks = (p.N + LOCAL_QCHUNK - 1) / LOCAL_QCHUNK;
    PK_LAUNCH((local_rows_bwd_dkv_shared_keys_kernel<T, D>),
              static_cast<int64_t>(p.B) * p.H * shared_keys * num_chunks, p, num_chunks);
  }
  if (p.max_global > 0) {
    const int64_t slots = static_cast<int64_t>(p.B) * p.H * p.max_global;
    PK_LAUNCH((global_rows_bwd_dq_kernel<T, D>), slots * p.num_splits, p);
    PK_LAUNCH((global_rows_bwd_dkv_kernel<T, D>), static_cast<int64_t>(p.B) * p.H * (p.N + p.P), p);
    PK_LAUNCH((bwd_finalize_global_kernel<T, D>), rows, p);
  }
  return cudaSuccess;
}

// Explicit instantiations, one dtype and direction per fwd_*.cu / bwd_*.cu so that the files build in parallel.
#define PK_INSTANTIATE_FORWARD(T)                                          \
  template cudaError_t launch_forward<T, 16>(const Params&, cudaStream_t);  \
  template cudaError_t launch_forward<T, 32>(const Params&, cudaStream_t);  \
  template cudaError_t launch_forward<T, 64>(const Params&, cudaStream_t);  \
  template cudaError_t launch_forward<T, 128>(const Params&, cudaStream_t);

#define PK_INSTANTIATE_BACKWARD(T)                                          \
  template cudaError_t launch_backward<T, 16>(const Params&, cudaStream_t); \
  template cudaError_t launch_backward<T, 32>(const Params&, cudaStream_t); \
  template cudaError_t launch_backward<T, 64>(const Params&, cudaStream_t); \
  template cudaError_t launch_backward<T, 128>(const Params&, cudaStream_t);

}  // namespace pk
