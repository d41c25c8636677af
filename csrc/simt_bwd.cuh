// SIMT backward: delta, the local rows' dQ and band dK/dV (for fp32, and for fp16/bf16 when launch.cuh does not
// pick tc_bwd.cuh), the shared-key (global/prefix) dK/dV, the global rows' gradients and the finalize scatter.

#pragma once

#include "philox.cuh"
#include "warp_row.cuh"

namespace pk {

// Queries per warp in the global/prefix-key backward (fewer atomics vs more parallelism).
constexpr int LOCAL_QCHUNK = 256;

// delta[b, h, i] = sum_d dO * O in fp32 (0 for padding rows)
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) bwd_delta_kernel(Params p) {
  WarpTask t;
  if (!warp_task(p, &Params::N, t)) return;
  const int i = t.x, h = t.h, b = t.b, lane = t.lane;
  float ox[RowLayout<D>::E], dox[RowLayout<D>::E];
  load_row<T, D>(static_cast<const T*>(p.out) + bnhd(p, b, i, h), lane, ox);
  load_row<T, D>(static_cast<const T*>(p.dout) + bnhd(p, b, i, h), lane, dox);
  const float d = warp_sum(lane_dot<D>(ox, dox));
  if (lane == 0) p.delta[bhn(p, b, h, i)] = p.tok[static_cast<int64_t>(b) * p.N + i] == TOK_PAD ? 0.f : d;
}

// Gradient pieces of one (query row, key) pair. Returns ds (d score, before the softmax scale) and pd (the
// dropped probability, the weight of dO in dV).
template <int D>
__device__ __forceinline__ void pair_grad(const Params& p, const float (&qrow)[RowLayout<D>::E],
                                          const float (&dorow)[RowLayout<D>::E], const float (&kx)[RowLayout<D>::E],
                                          const float (&vx)[RowLayout<D>::E], float lse2, float delta, float mul,
                                          float& ds, float& pd) {
  float s = lane_dot<D>(qrow, kx);
  float dp = lane_dot<D>(dorow, vx);
  warp_sum2(s, dp);
  const float prob = exp2f(s * p.scale_log2 - lse2);  // lse2 = +inf gives exactly 0
  pd = prob * mul;
  ds = prob * (dp * mul - delta);
}

// The two halves of one (query row, key) pair in the loops over a key's queries (the shared-key and global-row
// dK/dV kernels), split around the warp reductions so that a batch of rows shares them:
// query_row_dots loads the query's q and dO rows when ok (zeros otherwise: the warp still joins the
// reductions) and their unreduced dots with the key's k and v rows;
template <typename T, int D>
__device__ __forceinline__ void query_row_dots(const Params& p, int b, int h, int row, bool ok, const T* q,
                                               const T* dout, int lane, const float (&kx)[RowLayout<D>::E],
                                               const float (&vx)[RowLayout<D>::E], float (&qx)[RowLayout<D>::E],
                                               float (&dox)[RowLayout<D>::E], float& s, float& dp) {
  if (ok) {
    load_row<T, D>(q + bnhd(p, b, row, h), lane, qx);
    load_row<T, D>(dout + bnhd(p, b, row, h), lane, dox);
  } else {
#pragma unroll
    for (int e = 0; e < RowLayout<D>::E; ++e) qx[e] = dox[e] = 0.f;
  }
  s = lane_dot<D>(qx, kx);
  dp = lane_dot<D>(dox, vx);
}

// add_key_grads adds the query's share to the key's dK (before the softmax scale) and dV from the reduced dots.
template <int D>
__device__ __forceinline__ void add_key_grads(const Params& p, int b, int h, int row, int col, float s, float dp,
                                              float lse2, const float (&qx)[RowLayout<D>::E],
                                              const float (&dox)[RowLayout<D>::E], float (&dkx)[RowLayout<D>::E],
                                              float (&dvx)[RowLayout<D>::E]) {
  const float prob = exp2f(s * p.scale_log2 - lse2);
  const float mul = dropout_mul(p, b, h, row, col);
  const float pd = prob * mul;
  const float ds = prob * (dp * mul - p.delta[bhn(p, b, h, row)]);
#pragma unroll
  for (int e = 0; e < RowLayout<D>::E; ++e) {
    dkx[e] = fmaf(ds, qx[e], dkx[e]);
    dvx[e] = fmaf(pd, dox[e], dvx[e]);
  }
}

// dQ of local rows: one warp per (b, h, i), same keys as the forward. Non-local rows get dq = 0.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) local_rows_bwd_dq_kernel(Params p) {
  WarpTask t;
  if (!warp_task(p, &Params::N, t)) return;
  const int i = t.x, h = t.h, b = t.b, lane = t.lane;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  T* dqrow = static_cast<T*>(p.dq) + bnhd(p, b, i, h);
  const float lse2 = p.lse[bhn(p, b, h, i)];
  if (tok[i] != TOK_LOCAL || !(lse2 < INFINITY)) {
    store_zero_row<T, D>(dqrow, lane);
    return;
  }
  const float delta = p.delta[bhn(p, b, h, i)];
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  constexpr int E = RowLayout<D>::E;
  float qx[E], dox[E], dqx[E], kx[E], vx[E];
  load_row<T, D>(static_cast<const T*>(p.q) + bnhd(p, b, i, h), lane, qx);
  load_row<T, D>(static_cast<const T*>(p.dout) + bnhd(p, b, i, h), lane, dox);
#pragma unroll
  for (int e = 0; e < E; ++e) dqx[e] = 0.f;
  auto visit = [&](const T* krow, const T* vrow, int col) {
    load_row<T, D>(krow, lane, kx);
    load_row<T, D>(vrow, lane, vx);
    float ds, pd;
    pair_grad<D>(p, qx, dox, kx, vx, lse2, delta, dropout_mul(p, b, h, i, col), ds, pd);
#pragma unroll
    for (int e = 0; e < E; ++e) dqx[e] = fmaf(ds, kx[e], dqx[e]);
  };
  const int lo = i - min(p.window, i);
  const int hi = i + min(p.window, p.N - 1 - i);
  for (int j = lo; j <= hi; ++j) {
    if (tok[j] != TOK_LOCAL) continue;
    visit(k + bnhd(p, b, j, h), v + bnhd(p, b, j, h), j);
  }
  const int G = global_count_of(p, b);
  for (int g = 0; g < G; ++g) {
    const int j = global_pos(p, b, g);
    if (j < 0 || tok[j] != g) continue;
    visit(k + bnhd(p, b, j, h), v + bnhd(p, b, j, h), j);
  }
  for (int j = 0; j < p.P; ++j)
    visit(static_cast<const T*>(p.pk) + bphd(p, b, j, h), static_cast<const T*>(p.pv) + bphd(p, b, j, h), p.N + j);
  store_row<T, D>(dqrow, lane, dqx, p.scale);
}

// dK/dV of band keys: one warp per (b, h, j) over the local queries |i - j| <= w. Global key rows are left to
// the finalize kernel; padding key rows get 0.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) local_rows_bwd_dkv_band_kernel(Params p) {
  WarpTask t;
  if (!warp_task(p, &Params::N, t)) return;
  const int j = t.x, h = t.h, b = t.b, lane = t.lane;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const int tj = tok[j];
  if (tj >= 0) return;
  T* dkrow = static_cast<T*>(p.dk) + bnhd(p, b, j, h);
  T* dvrow = static_cast<T*>(p.dv) + bnhd(p, b, j, h);
  if (tj == TOK_PAD) {
    store_zero_row<T, D>(dkrow, lane);
    store_zero_row<T, D>(dvrow, lane);
    return;
  }
  constexpr int E = RowLayout<D>::E;
  float kx[E], vx[E], qx[E], dox[E], dkx[E], dvx[E];
  load_row<T, D>(static_cast<const T*>(p.k) + bnhd(p, b, j, h), lane, kx);
  load_row<T, D>(static_cast<const T*>(p.v) + bnhd(p, b, j, h), lane, vx);
#pragma unroll
  for (int e = 0; e < E; ++e) dkx[e] = dvx[e] = 0.f;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const int lo = j - min(p.window, j);
  const int hi = j + min(p.window, p.N - 1 - j);
  for (int i = lo; i <= hi; ++i) {
    if (tok[i] != TOK_LOCAL) continue;
    const float lse2 = p.lse[bhn(p, b, h, i)];
    if (!(lse2 < INFINITY)) continue;
    load_row<T, D>(q + bnhd(p, b, i, h), lane, qx);
    load_row<T, D>(dout + bnhd(p, b, i, h), lane, dox);
    float ds, pd;
    pair_grad<D>(p, qx, dox, kx, vx, lse2, p.delta[bhn(p, b, h, i)], dropout_mul(p, b, h, i, j), ds, pd);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dkx[e] = fmaf(ds, qx[e], dkx[e]);
      dvx[e] = fmaf(pd, dox[e], dvx[e]);
    }
  }
  store_row<T, D>(dkrow, lane, dkx, p.scale);
  store_row<T, D>(dvrow, lane, dvx, 1.f);
}

// dK/dV of the keys every local query sees (global keys through the local k, v; prefix keys): one warp per
// (b, h, key e, chunk of LOCAL_QCHUNK query rows); e < max_global is global slot e, else prefix e - max_global.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) local_rows_bwd_dkv_shared_keys_kernel(Params p, int num_chunks) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  const int num_keys = p.max_global + p.P;
  if (w >= static_cast<int64_t>(p.B) * p.H * num_keys * num_chunks) return;
  const int chunk = static_cast<int>(w % num_chunks);
  int64_t r = w / num_chunks;
  const int e_key = static_cast<int>(r % num_keys);
  r /= num_keys;
  const int h = static_cast<int>(r % p.H), b = static_cast<int>(r / p.H);
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const T* krow;
  const T* vrow;
  float* dk_dst;
  float* dv_dst;
  int col;
  if (e_key < p.max_global) {
    const int g = e_key;
    if (g >= global_count_of(p, b)) return;
    const int j = global_pos(p, b, g);
    if (j < 0 || tok[j] != g) return;
    krow = static_cast<const T*>(p.k) + bnhd(p, b, j, h);
    vrow = static_cast<const T*>(p.v) + bnhd(p, b, j, h);
    dk_dst = p.ws_dk_gslot + bgh(p, b, g, h);
    dv_dst = p.ws_dv_gslot + bgh(p, b, g, h);
    col = j;
  } else {
    const int j = e_key - p.max_global;
    krow = static_cast<const T*>(p.pk) + bphd(p, b, j, h);
    vrow = static_cast<const T*>(p.pv) + bphd(p, b, j, h);
    dk_dst = p.ws_dpk + bphd(p, b, j, h);
    dv_dst = p.ws_dpv + bphd(p, b, j, h);
    col = p.N + j;
  }
  constexpr int E = RowLayout<D>::E;
  float kx[E], vx[E], dkx[E], dvx[E];
  load_row<T, D>(krow, lane, kx);
  load_row<T, D>(vrow, lane, vx);
#pragma unroll
  for (int e = 0; e < E; ++e) dkx[e] = dvx[e] = 0.f;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const int i0 = chunk * LOCAL_QCHUNK;
  const int i1 = min(i0 + LOCAL_QCHUNK, p.N);
  bool any = false;
  for (int i = i0; i < i1; i += KEY_BATCH) {
    float qb[KEY_BATCH][E], ob[KEY_BATCH][E], sd[2 * KEY_BATCH], lse_u[KEY_BATCH];
    bool ok[KEY_BATCH];
#pragma unroll
    for (int u = 0; u < KEY_BATCH; ++u) {
      const int ii = i + u;
      lse_u[u] = ii < i1 && tok[ii] == TOK_LOCAL ? p.lse[bhn(p, b, h, ii)] : INFINITY;
      ok[u] = lse_u[u] < INFINITY;  // uniform over the warp
      query_row_dots<T, D>(p, b, h, ii, ok[u], q, dout, lane, kx, vx, qb[u], ob[u], sd[2 * u], sd[2 * u + 1]);
    }
    warp_sum_n<2 * KEY_BATCH>(sd);
#pragma unroll
    for (int u = 0; u < KEY_BATCH; ++u) {
      if (!ok[u]) continue;
      add_key_grads<D>(p, b, h, i + u, col, sd[2 * u], sd[2 * u + 1], lse_u[u], qb[u], ob[u], dkx, dvx);
      any = true;
    }
  }
  if (any) {
    atomic_add_row<D>(dk_dst, lane, dkx, p.scale);
    atomic_add_row<D>(dv_dst, lane, dvx, 1.f);
  }
}

// dq_global of global rows: one warp per (b, h, g, split) over that split's columns, one atomicAdd at the end.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) global_rows_bwd_dq_kernel(Params p) {
  GlobalSplitTask t;
  if (!global_split_task(p, t)) return;
  const int b = t.b, h = t.h, g = t.g, s = t.s, lane = t.lane;
  const int gi = global_pos(p, b, g);
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  if (gi < 0 || tok[gi] != g) return;
  const float lse2 = p.lse[bhn(p, b, h, gi)];
  if (!(lse2 < INFINITY)) return;
  const float delta = p.delta[bhn(p, b, h, gi)];
  constexpr int E = RowLayout<D>::E;
  float qx[E], dox[E], dqx[E];
  load_row<T, D>(static_cast<const T*>(p.qg) + bnhd(p, b, gi, h), lane, qx);
  load_row<T, D>(static_cast<const T*>(p.dout) + bnhd(p, b, gi, h), lane, dox);
#pragma unroll
  for (int e = 0; e < E; ++e) dqx[e] = 0.f;
  const int c0 = s * p.global_chunk;
  const int c1 = min(c0 + p.global_chunk, p.N + p.P);
  bool any = false;
  for (int c = c0; c < c1; c += KEY_BATCH) {
    float kb[KEY_BATCH][E], sd[2 * KEY_BATCH];  // sd[2u]: q.k, sd[2u + 1]: dO.v
    bool ok[KEY_BATCH];
#pragma unroll
    for (int u = 0; u < KEY_BATCH; ++u) {
      const T* kr = c + u < c1 ? global_col_k<T>(p, tok, b, h, c + u) : nullptr;
      ok[u] = kr != nullptr;  // uniform over the warp
      float vb[E];
      if (ok[u]) {
        load_row<T, D>(kr, lane, kb[u]);
        load_row<T, D>(global_col_v<T>(p, b, h, c + u), lane, vb);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) kb[u][e] = vb[e] = 0.f;
      }
      sd[2 * u] = lane_dot<D>(qx, kb[u]);
      sd[2 * u + 1] = lane_dot<D>(dox, vb);
    }
    warp_sum_n<2 * KEY_BATCH>(sd);
#pragma unroll
    for (int u = 0; u < KEY_BATCH; ++u) {
      if (!ok[u]) continue;
      const float prob = exp2f(sd[2 * u] * p.scale_log2 - lse2);
      const float mul = dropout_mul(p, b, h, gi, c + u);
      const float ds = prob * (sd[2 * u + 1] * mul - delta);
#pragma unroll
      for (int e = 0; e < E; ++e) dqx[e] = fmaf(ds, kb[u][e], dqx[e]);
      any = true;
    }
  }
  if (any) atomic_add_row<D>(p.ws_dqg_gslot + bgh(p, b, g, h), lane, dqx, p.scale);
}

// dk_global/dv_global (columns c < N, plain stores; padding columns get 0) and the global rows' share of the
// prefix gradient (columns c >= N, atomics into the fp32 prefix workspace): one warp per (b, h, c) over the
// G_b global queries.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) global_rows_bwd_dkv_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  const int num_cols = p.N + p.P;
  if (w >= static_cast<int64_t>(p.B) * p.H * num_cols) return;
  const int c = static_cast<int>(w % num_cols);
  const int bh = static_cast<int>(w / num_cols);
  const int h = bh % p.H, b = bh / p.H;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const int G = global_count_of(p, b);
  constexpr int E = RowLayout<D>::E;
  float kx[E], vx[E], dkx[E], dvx[E];
#pragma unroll
  for (int e = 0; e < E; ++e) dkx[e] = dvx[e] = 0.f;
  const bool is_prefix = c >= p.N;
  const bool pad = !is_prefix && tok[c] == TOK_PAD;
  if (!pad) {
    if (is_prefix) {
      if (G == 0) return;
      load_row<T, D>(static_cast<const T*>(p.pk) + bphd(p, b, c - p.N, h), lane, kx);
      load_row<T, D>(static_cast<const T*>(p.pv) + bphd(p, b, c - p.N, h), lane, vx);
    } else {
      load_row<T, D>(static_cast<const T*>(p.kg) + bnhd(p, b, c, h), lane, kx);
      load_row<T, D>(static_cast<const T*>(p.vg) + bnhd(p, b, c, h), lane, vx);
    }
    const T* qg = static_cast<const T*>(p.qg);
    const T* dout = static_cast<const T*>(p.dout);
    for (int g = 0; g < G; g += KEY_BATCH) {
      float qb[KEY_BATCH][E], ob[KEY_BATCH][E], sd[2 * KEY_BATCH], lse_u[KEY_BATCH];
      int gi_u[KEY_BATCH];
      bool ok[KEY_BATCH];
#pragma unroll
      for (int u = 0; u < KEY_BATCH; ++u) {
        const int gi = g + u < G ? global_pos(p, b, g + u) : -1;
        gi_u[u] = gi;
        lse_u[u] = (gi >= 0 && tok[gi] == g + u) ? p.lse[bhn(p, b, h, gi)] : INFINITY;
        ok[u] = lse_u[u] < INFINITY;  // uniform over the warp
        query_row_dots<T, D>(p, b, h, gi, ok[u], qg, dout, lane, kx, vx, qb[u], ob[u], sd[2 * u], sd[2 * u + 1]);
      }
      warp_sum_n<2 * KEY_BATCH>(sd);
#pragma unroll
      for (int u = 0; u < KEY_BATCH; ++u) {
        if (!ok[u]) continue;
        add_key_grads<D>(p, b, h, gi_u[u], c, sd[2 * u], sd[2 * u + 1], lse_u[u], qb[u], ob[u], dkx, dvx);
      }
    }
  }
  if (is_prefix) {
    atomic_add_row<D>(p.ws_dpk + bphd(p, b, c - p.N, h), lane, dkx, p.scale);
    atomic_add_row<D>(p.ws_dpv + bphd(p, b, c - p.N, h), lane, dvx, 1.f);
  } else {
    store_row<T, D>(static_cast<T*>(p.dkg) + bnhd(p, b, c, h), lane, dkx, p.scale);
    store_row<T, D>(static_cast<T*>(p.dvg) + bnhd(p, b, c, h), lane, dvx, 1.f);
  }
}

// Scatter of the compact global-slot workspaces: dk/dv rows of global tokens, and every row of dq_global
// (0 for rows that are not global). One warp per (b, i, h).
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) bwd_finalize_global_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.N * p.H) return;
  const int h = static_cast<int>(w % p.H);
  const int64_t bi = w / p.H;
  const int i = static_cast<int>(bi % p.N), b = static_cast<int>(bi / p.N);
  const int t = p.tok[bi];
  const int64_t o = bnhd(p, b, i, h);
  constexpr int E = RowLayout<D>::E;
  float x[E];
  if (t >= 0) {
    const int64_t src = bgh(p, b, t, h);
    load_row<float, D>(p.ws_dk_gslot + src, lane, x);
    store_row<T, D>(static_cast<T*>(p.dk) + o, lane, x, 1.f);
    load_row<float, D>(p.ws_dv_gslot + src, lane, x);
    store_row<T, D>(static_cast<T*>(p.dv) + o, lane, x, 1.f);
    if (p.dqg != nullptr) {
      load_row<float, D>(p.ws_dqg_gslot + src, lane, x);
      store_row<T, D>(static_cast<T*>(p.dqg) + o, lane, x, 1.f);
    }
  } else if (p.dqg != nullptr) {
    store_zero_row<T, D>(static_cast<T*>(p.dqg) + o, lane);
  }
}

}  // namespace pk
