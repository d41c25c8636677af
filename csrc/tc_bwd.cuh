// Local rows backward on tensor cores (fp16 / bf16): dQ, and dK/dV of band keys.

#pragma once

#include "philox.cuh"
#include "tc_tiles.cuh"

namespace pk {
namespace tc {

// dQ of local rows, tensor cores: same tiles as the forward; per tile S = Q K^T and dP = dO V^T (fp32), then
// dS = P (dP * mul - delta) in the input dtype, dQ += dS K (fp32 accumulator in shared memory).
template <typename T, int D>
__global__ void __launch_bounds__(NTHREADS) local_rows_bwd_dq_tc_kernel(Params p) {
  using S = Smem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* cur = smem;
  T* Qs = reinterpret_cast<T*>(cur);
  T* dOs = reinterpret_cast<T*>(cur += S::tileT);
  T* Ks = reinterpret_cast<T*>(cur += S::tileT);
  T* Vs = reinterpret_cast<T*>(cur += S::tileT);
  float* Ss = reinterpret_cast<float*>(cur += S::tileT);
  float* dPs = reinterpret_cast<float*>(cur += S::tileS);
  T* dSs = reinterpret_cast<T*>(cur += S::tileS);
  const KeyCols cols = key_cols_at(cur += S::tileP);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BlockRows rows = block_rows(p);
  const int b = rows.b, h = rows.h, r0 = rows.r0, r1 = rows.r1;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);

  load_tile<T, D>(Qs, [&](int r) -> const T* { return r0 + r < p.N ? q + bnhd(p, b, r0 + r, h) : nullptr; });
  load_tile<T, D>(dOs, [&](int r) -> const T* { return r0 + r < p.N ? dout + bnhd(p, b, r0 + r, h) : nullptr; });
  FragC dq_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq_acc[n], 0.f);

  const int rl = lane >> 1, half = lane & 1;
  const int row = warp * 16 + rl;
  const int i = r0 + row;
  const float lse2 = i < p.N ? p.lse[bhn(p, b, h, i)] : INFINITY;
  const bool row_ok = i < p.N && tok[i] == TOK_LOCAL && lse2 < INFINITY;
  const float delta = row_ok ? p.delta[bhn(p, b, h, i)] : 0.f;

  const TilePlan tp = plan_tiles(p, b, r0, r1);
  const int n_tiles = tp.n_band + tp.n_extra;
  for (int t = 0; t < n_tiles; ++t) {
    __syncthreads();
    stage_key_tile<T, D>(p, tok, b, h, tp, t, cols, Ks, Vs);
    __syncthreads();
    warp_abt<T, D>(Ss + warp * 16 * S::LDS, Qs + warp * 16 * S::LDT, Ks);
    warp_abt<T, D>(dPs + warp * 16 * S::LDS, dOs + warp * 16 * S::LDT, Vs);
    __syncwarp();
    const float* srow = Ss + row * S::LDS + half * 32;
    const float* dprow = dPs + row * S::LDS + half * 32;
    T* dsrow = dSs + row * S::LDP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const int kind = cols.kind[col];
      const bool ok = row_ok && (kind == KIND_EXTRA || (kind == KIND_BAND && abs(i - cols.id[col]) <= p.window));
      float ds = 0.f;
      if (ok) {
        const float pr = exp2f(srow[c] * p.scale_log2 - lse2);
        const float mul = dropout_mul(p, b, h, i, cols.id[col]);
        ds = pr * (dprow[c] * mul - delta);
      }
      dsrow[c] = from_f<T>(ds);
    }
    __syncwarp();
    warp_pv_frag<T, D>(dq_acc, dSs + warp * 16 * S::LDP, Ks);
  }
  __syncthreads();  // every warp is done with Ss/dPs: reuse them (2 * tileS >= 64 * LDO floats) as staging
  float* dQs = Ss;
  warp_store_frag<T, D>(dQs + warp * 16 * S::LDO, dq_acc);
  __syncwarp();
  if (i < p.N) {
    T* dq = static_cast<T*>(p.dq) + bnhd(p, b, i, h) + half * (D / 2);
    const float* drow = dQs + row * S::LDO + half * (D / 2);
    for (int d = 0; d < D / 2; ++d) dq[d] = from_f<T>(row_ok ? drow[d] * p.scale : 0.f);
  }
}

// dK/dV of band keys, tensor cores: a block owns 64 consecutive keys (16 per warp) and walks the query tiles
// of [j0 - w, j1 - 1 + w]: S^T = K Q^T, dP^T = V dO^T, then dV += (P * mul)^T-rows dO and dK += dS^T-rows Q.
// Rows of global keys are left to the finalize kernel, padding keys get 0 (as in the SIMT kernel).
template <typename T, int D>
__global__ void __launch_bounds__(NTHREADS) local_rows_bwd_dkv_band_tc_kernel(Params p) {
  using S = Smem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* cur = smem;
  T* Ks = reinterpret_cast<T*>(cur);
  T* Vs = reinterpret_cast<T*>(cur += S::tileT);
  T* Qs = reinterpret_cast<T*>(cur += S::tileT);
  T* dOs = reinterpret_cast<T*>(cur += S::tileT);
  float* Ss = reinterpret_cast<float*>(cur += S::tileT);
  float* dPs = reinterpret_cast<float*>(cur += S::tileS);
  T* Pds = reinterpret_cast<T*>(cur += S::tileS);
  T* dSs = reinterpret_cast<T*>(cur += S::tileP);
  float* q_lse = reinterpret_cast<float*>(cur += S::tileP);
  float* q_delta = q_lse + BM;
  int* q_ok = reinterpret_cast<int*>(q_delta + BM);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BlockRows rows = block_rows(p);
  const int b = rows.b, h = rows.h, j0 = rows.r0, j1 = rows.r1;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);

  // only band keys (local, non-padding) are loaded; other rows stay zero and fully masked
  auto key_src = [&](const T* base, int r) -> const T* {
    const int j = j0 + r;
    return (j < p.N && tok[j] == TOK_LOCAL) ? base + bnhd(p, b, j, h) : nullptr;
  };
  load_tile<T, D>(Ks, [&](int r) { return key_src(k, r); });
  load_tile<T, D>(Vs, [&](int r) { return key_src(v, r); });
  FragC dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.f);
    wmma::fill_fragment(dv_acc[n], 0.f);
  }

  const int rl = lane >> 1, half = lane & 1;
  const int row = warp * 16 + rl;
  const int j = j0 + row;
  const bool key_ok = j < p.N && tok[j] == TOK_LOCAL;

  const int i_lo = max(0, j0 - p.window);
  const int i_hi = min(p.N, j1 - 1 + p.window + 1);
  for (int i0 = i_lo; i0 < i_hi; i0 += BM) {
    __syncthreads();
    if (threadIdx.x < BM) {
      const int i = i0 + threadIdx.x;
      const float l2 = i < p.N ? p.lse[bhn(p, b, h, i)] : INFINITY;
      const bool ok = i < p.N && tok[i] == TOK_LOCAL && l2 < INFINITY;
      q_ok[threadIdx.x] = ok ? 1 : 0;
      q_lse[threadIdx.x] = ok ? l2 : 0.f;
      q_delta[threadIdx.x] = ok ? p.delta[bhn(p, b, h, i)] : 0.f;
    }
    load_tile<T, D>(Qs, [&](int r) -> const T* { return i0 + r < p.N ? q + bnhd(p, b, i0 + r, h) : nullptr; });
    load_tile<T, D>(dOs, [&](int r) -> const T* { return i0 + r < p.N ? dout + bnhd(p, b, i0 + r, h) : nullptr; });
    __syncthreads();
    warp_abt<T, D>(Ss + warp * 16 * S::LDS, Ks + warp * 16 * S::LDT, Qs);
    warp_abt<T, D>(dPs + warp * 16 * S::LDS, Vs + warp * 16 * S::LDT, dOs);
    __syncwarp();
    const float* srow = Ss + row * S::LDS + half * 32;
    const float* dprow = dPs + row * S::LDS + half * 32;
    T* pdrow = Pds + row * S::LDP + half * 32;
    T* dsrow = dSs + row * S::LDP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const int i = i0 + col;
      float pd = 0.f, ds = 0.f;
      if (key_ok && q_ok[col] && abs(i - j) <= p.window) {
        const float pr = exp2f(srow[c] * p.scale_log2 - q_lse[col]);
        const float mul = dropout_mul(p, b, h, i, j);
        pd = pr * mul;
        ds = pr * (dprow[c] * mul - q_delta[col]);
      }
      pdrow[c] = from_f<T>(pd);
      dsrow[c] = from_f<T>(ds);
    }
    __syncwarp();
    warp_pv_frag<T, D>(dv_acc, Pds + warp * 16 * S::LDP, dOs);
    warp_pv_frag<T, D>(dk_acc, dSs + warp * 16 * S::LDP, Qs);
  }
  __syncthreads();  // every warp is done with Ss/dPs: reuse them (2 * tileS >= 64 * LDO floats) as staging
  float* stage = Ss + warp * 16 * S::LDO;
  const float* srow = Ss + row * S::LDO + half * (D / 2);
  const bool write = j < p.N && tok[j] < 0;  // rows of global keys: finalize kernel
  const bool pad = write && tok[j] == TOK_PAD;
  warp_store_frag<T, D>(stage, dk_acc);
  __syncwarp();
  if (write) {
    T* dk = static_cast<T*>(p.dk) + bnhd(p, b, j, h) + half * (D / 2);
    for (int d = 0; d < D / 2; ++d) dk[d] = from_f<T>(pad ? 0.f : srow[d] * p.scale);
  }
  __syncwarp();  // all lanes have read dK before dV overwrites the staging rows
  warp_store_frag<T, D>(stage, dv_acc);
  __syncwarp();
  if (write) {
    T* dv = static_cast<T*>(p.dv) + bnhd(p, b, j, h) + half * (D / 2);
    for (int d = 0; d < D / 2; ++d) dv[d] = from_f<T>(pad ? 0.f : srow[d]);
  }
}

static_assert(2 * Smem<__half, 128>::tileS >= sizeof(float) * 64 * Smem<__half, 128>::LDO,
              "the backward stages its fp32 accumulators in the two score tiles");

template <typename T, int D>
constexpr size_t dq_tc_smem() {
  using S = Smem<T, D>;
  return 4 * S::tileT + 2 * S::tileS + S::tileP + S::meta;
}
template <typename T, int D>
constexpr size_t dkv_tc_smem() {
  using S = Smem<T, D>;
  return 4 * S::tileT + 2 * S::tileS + 2 * S::tileP + S::align(3 * sizeof(float) * BM);
}

}  // namespace tc
}  // namespace pk
