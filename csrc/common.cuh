// Shared by every kernel: launch shape, token kinds, element conversion, tensor offsets, the global-token index.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "params.h"

namespace pk {

constexpr int WARPS_PER_BLOCK = 4;
constexpr int THREADS = 32 * WARPS_PER_BLOCK;

constexpr int TOK_PAD = -2;
constexpr int TOK_LOCAL = -1;

// element conversion

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// offsets, in elements, of rows of the (B, N, H, D) and (B, P, H, D) tensors
__device__ __forceinline__ int64_t bnhd(const Params& p, int b, int i, int h) {
  return ((static_cast<int64_t>(b) * p.N + i) * p.H + h) * p.D;
}
__device__ __forceinline__ int64_t bphd(const Params& p, int b, int j, int h) {
  return ((static_cast<int64_t>(b) * p.P + j) * p.H + h) * p.D;
}
__device__ __forceinline__ int64_t bgh(const Params& p, int b, int g, int h) {  // compact global-slot rows
  return ((static_cast<int64_t>(b) * p.max_global + g) * p.H + h) * p.D;
}
__device__ __forceinline__ int64_t bhn(const Params& p, int b, int h, int i) {
  return (static_cast<int64_t>(b) * p.H + h) * p.N + i;
}

__device__ __forceinline__ int64_t global_warp_id() {
  return static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + (threadIdx.x >> 5);
}

// This warp's (b, h, x) in a kernel with one warp per (b, h, x), x < p.*n, and its lane; false for the warps of
// the last block past the final (b, h, x). n names the field instead of passing its value because the field is
// then read at each use, as the kernels always read it; a value read once compiles to different code.
struct WarpTask {
  int b, h, x, lane;
};
__device__ __forceinline__ bool warp_task(const Params& p, int Params::*n, WarpTask& t) {
  const int64_t w = global_warp_id();
  t.lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * (p.*n)) return false;
  t.x = static_cast<int>(w % (p.*n));
  const int bh = static_cast<int>(w / (p.*n));
  t.h = bh % p.H;
  t.b = bh / p.H;
  return true;
}

__device__ __forceinline__ int global_count_of(const Params& p, int b) {
  if (p.global_idx == nullptr || p.global_count == nullptr || p.max_global <= 0) return 0;
  const int c = p.global_count[b];
  return c < 0 ? 0 : (c > p.max_global ? p.max_global : c);
}

// Position of global slot g of batch row b, or -1 when out of range (never trust an index blindly).
__device__ __forceinline__ int global_pos(const Params& p, int b, int g) {
  const int j = p.global_idx[static_cast<int64_t>(b) * p.max_global + g];
  return (j >= 0 && j < p.N) ? j : -1;
}

// This warp's (b, h, global slot g, key split s) in the global-row split kernels, and its lane; false past the
// last warp or when slot g is beyond batch row b's global count.
struct GlobalSplitTask {
  int b, h, g, s, lane;
};
__device__ __forceinline__ bool global_split_task(const Params& p, GlobalSplitTask& t) {
  const int64_t w = global_warp_id();
  t.lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.max_global * p.num_splits) return false;
  t.s = static_cast<int>(w % p.num_splits);
  int64_t r = w / p.num_splits;
  t.g = static_cast<int>(r % p.max_global);
  r /= p.max_global;
  t.h = static_cast<int>(r % p.H);
  t.b = static_cast<int>(r / p.H);
  return t.g < global_count_of(p, t.b);
}

// Key/value rows of column c of a global row (c < N: k_global/v_global, else prefix c - N); nullptr for a
// padding column.
template <typename T>
__device__ __forceinline__ const T* global_col_k(const Params& p, const int32_t* tok, int b, int h, int c) {
  if (c < p.N) return tok[c] == TOK_PAD ? nullptr : static_cast<const T*>(p.kg) + bnhd(p, b, c, h);
  return static_cast<const T*>(p.pk) + bphd(p, b, c - p.N, h);
}
template <typename T>
__device__ __forceinline__ const T* global_col_v(const Params& p, int b, int h, int c) {
  if (c < p.N) return static_cast<const T*>(p.vg) + bnhd(p, b, c, h);
  return static_cast<const T*>(p.pv) + bphd(p, b, c - p.N, h);
}

}  // namespace pk
