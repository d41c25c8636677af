// SIMT forward: local rows (one warp per (b, h, i)) and global rows (one warp per (b, h, g, key split), then a
// merge warp per (b, h, g)). Every dtype runs the global rows here; the local rows run here for fp32, and for
// fp16/bf16 when launch.cuh does not pick the tensor-core kernel.

#pragma once

#include "philox.cuh"
#include "warp_row.cuh"

namespace pk {

// One key of a forward row: score, softmax update.
template <typename T, int D>
__device__ __forceinline__ void fwd_key(const Params& p, const float (&qrow)[RowLayout<D>::E], const T* krow,
                                        const T* vrow, int b, int h, int row, int col, int lane,
                                        SoftmaxState<D>& st) {
  float kx[RowLayout<D>::E], vx[RowLayout<D>::E];
  load_row<T, D>(krow, lane, kx);
  load_row<T, D>(vrow, lane, vx);
  const float s2 = warp_sum(lane_dot<D>(qrow, kx)) * p.scale_log2;
  st.add(s2, dropout_mul(p, b, h, row, col), vx);
}

// local rows: one warp per (b, h, i)
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) local_rows_fwd_kernel(Params p) {
  WarpTask t;
  if (!warp_task(p, &Params::N, t)) return;
  const int i = t.x, h = t.h, b = t.b, lane = t.lane;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const int ti = tok[i];
  if (ti >= 0) return;  // global row: written by the global-row kernels
  T* orow = static_cast<T*>(p.out) + bnhd(p, b, i, h);
  if (ti == TOK_PAD) {
    store_zero_row<T, D>(orow, lane);
    if (lane == 0) p.lse[bhn(p, b, h, i)] = INFINITY;
    return;
  }
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float qx[RowLayout<D>::E];
  load_row<T, D>(q + bnhd(p, b, i, h), lane, qx);
  SoftmaxState<D> st;

  const int lo = i - min(p.window, i);
  const int hi = i + min(p.window, p.N - 1 - i);
  for (int j = lo; j <= hi; ++j) {
    if (tok[j] != TOK_LOCAL) continue;  // padding, or a global key (counted once, below)
    fwd_key<T, D>(p, qx, k + bnhd(p, b, j, h), v + bnhd(p, b, j, h), b, h, i, j, lane, st);
  }
  const int G = global_count_of(p, b);
  for (int g = 0; g < G; ++g) {
    const int j = global_pos(p, b, g);
    if (j < 0 || tok[j] != g) continue;
    fwd_key<T, D>(p, qx, k + bnhd(p, b, j, h), v + bnhd(p, b, j, h), b, h, i, j, lane, st);
  }
  if (p.P > 0) {
    const T* pk = static_cast<const T*>(p.pk);
    const T* pv = static_cast<const T*>(p.pv);
    for (int j = 0; j < p.P; ++j)
      fwd_key<T, D>(p, qx, pk + bphd(p, b, j, h), pv + bphd(p, b, j, h), b, h, i, p.N + j, lane, st);
  }
  if (st.l > 0.f) {
    store_row<T, D>(orow, lane, st.acc, 1.f / st.l);
    if (lane == 0) p.lse[bhn(p, b, h, i)] = st.m + log2f(st.l);
  } else {
    store_zero_row<T, D>(orow, lane);
    if (lane == 0) p.lse[bhn(p, b, h, i)] = INFINITY;
  }
}

// global rows: one warp per (b, h, g, split), then a merge warp per (b, h, g)

__device__ __forceinline__ int64_t gpart_offset(const Params& p, int b, int h, int g, int s) {
  return (((static_cast<int64_t>(b) * p.H + h) * p.max_global + g) * p.num_splits + s) * (p.D + 2);
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) global_rows_fwd_split_kernel(Params p) {
  GlobalSplitTask t;
  if (!global_split_task(p, t)) return;
  const int b = t.b, h = t.h, g = t.g, s = t.s, lane = t.lane;
  const int gi = global_pos(p, b, g);
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  float* part = p.gpart + gpart_offset(p, b, h, g, s);
  SoftmaxState<D> st;
  if (gi >= 0 && tok[gi] == g) {
    const T* qg = static_cast<const T*>(p.qg);
    float qx[RowLayout<D>::E];
    load_row<T, D>(qg + bnhd(p, b, gi, h), lane, qx);
    constexpr int E = RowLayout<D>::E;
    const int c0 = s * p.global_chunk;
    const int c1 = min(c0 + p.global_chunk, p.N + p.P);
    // KEY_BATCH columns at a time: their loads and reductions are independent, the softmax updates sequential
    for (int c = c0; c < c1; c += KEY_BATCH) {
      float kx[KEY_BATCH][E], vx[KEY_BATCH][E], dot[KEY_BATCH];
      bool ok[KEY_BATCH];
#pragma unroll
      for (int u = 0; u < KEY_BATCH; ++u) {
        const T* kr = c + u < c1 ? global_col_k<T>(p, tok, b, h, c + u) : nullptr;
        ok[u] = kr != nullptr;  // uniform over the warp
        if (ok[u]) {
          load_row<T, D>(kr, lane, kx[u]);
          load_row<T, D>(global_col_v<T>(p, b, h, c + u), lane, vx[u]);
        } else {
#pragma unroll
          for (int e = 0; e < E; ++e) kx[u][e] = vx[u][e] = 0.f;
        }
        dot[u] = lane_dot<D>(qx, kx[u]);
      }
      warp_sum_n<KEY_BATCH>(dot);
#pragma unroll
      for (int u = 0; u < KEY_BATCH; ++u)
        if (ok[u]) st.add(dot[u] * p.scale_log2, dropout_mul(p, b, h, gi, c + u), vx[u]);
    }
  }
  // always written (possibly empty: m = -inf, l = 0), so the merge never reads uninitialised memory
  if (lane == 0) {
    part[0] = st.m;
    part[1] = st.l;
  }
  constexpr int E = RowLayout<D>::E;
  if (lane < RowLayout<D>::LANES) {
#pragma unroll
    for (int e = 0; e < E; ++e) part[2 + lane * E + e] = st.acc[e];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) global_rows_fwd_merge_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.max_global) return;
  const int g = static_cast<int>(w % p.max_global);
  const int bh = static_cast<int>(w / p.max_global);
  const int h = bh % p.H, b = bh / p.H;
  if (g >= global_count_of(p, b)) return;
  const int gi = global_pos(p, b, g);
  if (gi < 0 || p.tok[static_cast<int64_t>(b) * p.N + gi] != g) return;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.gpart[gpart_offset(p, b, h, g, s)]);
  constexpr int E = RowLayout<D>::E;
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  float l = 0.f;
  if (mx > -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float* part = p.gpart + gpart_offset(p, b, h, g, s);
      const float ms = part[0];
      if (ms == -INFINITY) continue;  // empty split
      const float f = exp2f(ms - mx);
      l = fmaf(part[1], f, l);
      if (lane < RowLayout<D>::LANES) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = fmaf(part[2 + lane * E + e], f, acc[e]);
      }
    }
  }
  T* orow = static_cast<T*>(p.out) + bnhd(p, b, gi, h);
  if (l > 0.f) {
    store_row<T, D>(orow, lane, acc, 1.f / l);
    if (lane == 0) p.lse[bhn(p, b, h, gi)] = mx + log2f(l);
  } else {
    store_zero_row<T, D>(orow, lane);
    if (lane == 0) p.lse[bhn(p, b, h, gi)] = INFINITY;
  }
}

}  // namespace pk
