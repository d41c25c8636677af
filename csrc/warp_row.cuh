// SIMT building blocks: one row of D elements spread over a warp (lanes own D/32 contiguous elements; D = 16:
// 16 lanes, one each), butterfly reductions for dot products, and the online softmax state of one query row.
// No shared memory, so the SIMT kernels have no barriers to get wrong.

#pragma once

#include "common.cuh"

namespace pk {

template <int D>
struct RowLayout {
  static_assert(D == 16 || D == 32 || D == 64 || D == 128, "head dim must be 16, 32, 64 or 128");
  static constexpr int E = D >= 32 ? D / 32 : 1;  // elements per lane
  static constexpr int LANES = D / E;              // lanes that own elements
};

template <typename T, int D>
__device__ __forceinline__ void load_row(const T* __restrict__ src, int lane, float (&x)[RowLayout<D>::E]) {
  constexpr int E = RowLayout<D>::E;
  if (lane < RowLayout<D>::LANES) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = to_f<T>(src[lane * E + e]);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = 0.f;
  }
}

template <typename T, int D>
__device__ __forceinline__ void store_row(T* __restrict__ dst, int lane, const float (&x)[RowLayout<D>::E],
                                          float mul) {
  constexpr int E = RowLayout<D>::E;
  if (lane < RowLayout<D>::LANES) {
#pragma unroll
    for (int e = 0; e < E; ++e) dst[lane * E + e] = from_f<T>(x[e] * mul);
  }
}

template <typename T, int D>
__device__ __forceinline__ void store_zero_row(T* __restrict__ dst, int lane) {
  constexpr int E = RowLayout<D>::E;
  if (lane < RowLayout<D>::LANES) {
#pragma unroll
    for (int e = 0; e < E; ++e) dst[lane * E + e] = from_f<T>(0.f);
  }
}

template <int D>
__device__ __forceinline__ void atomic_add_row(float* __restrict__ dst, int lane, const float (&x)[RowLayout<D>::E],
                                               float mul) {
  constexpr int E = RowLayout<D>::E;
  if (lane < RowLayout<D>::LANES) {
#pragma unroll
    for (int e = 0; e < E; ++e) atomicAdd(dst + lane * E + e, x[e] * mul);
  }
}

template <int D>
__device__ __forceinline__ float lane_dot(const float (&a)[RowLayout<D>::E], const float (&b)[RowLayout<D>::E]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < RowLayout<D>::E; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// Butterfly sum: every lane ends with the full sum (inactive lanes contribute 0).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ void warp_sum2(float& x, float& y) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
    y += __shfl_xor_sync(0xffffffffu, y, o);
  }
}

// K independent butterfly sums interleaved (instruction-level parallelism for batched keys).
template <int K>
__device__ __forceinline__ void warp_sum_n(float (&x)[K]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] += __shfl_xor_sync(0xffffffffu, x[k], o);
  }
}

// Keys per batch in the warp-per-row loops over long key or query ranges (the global rows, the shared-key dK/dV):
// one, since a larger batch costs registers and warps in flight in loops that L2 bandwidth bounds.
constexpr int KEY_BATCH = 1;

// online softmax state of one query row
template <int D>
struct SoftmaxState {
  float m = -INFINITY;  // running max of log2-domain scores
  float l = 0.f;        // undropped denominator
  float acc[RowLayout<D>::E];

  __device__ __forceinline__ SoftmaxState() {
#pragma unroll
    for (int e = 0; e < RowLayout<D>::E; ++e) acc[e] = 0.f;
  }

  // s2: log2-domain score; mul: dropout multiplier; vrow: the value row (this lane's part)
  __device__ __forceinline__ void add(float s2, float mul, const float (&vrow)[RowLayout<D>::E]) {
    const float m_new = fmaxf(m, s2);
    const float alpha = exp2f(m - m_new);  // m = -inf the first time: exp2(-inf) = 0, acc and l are 0 anyway
    const float e_s = exp2f(s2 - m_new);
    l = l * alpha + e_s;
    const float pd = e_s * mul;
#pragma unroll
    for (int e = 0; e < RowLayout<D>::E; ++e) acc[e] = fmaf(pd, vrow[e], acc[e] * alpha);
    m = m_new;
  }
};

}  // namespace pk
