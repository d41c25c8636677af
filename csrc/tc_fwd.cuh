// Local rows forward on tensor cores (fp16 / bf16).

#pragma once

#include "philox.cuh"
#include "tc_tiles.cuh"

namespace pk {
namespace tc {

template <typename T, int D>
__global__ void __launch_bounds__(NTHREADS) local_rows_fwd_tc_kernel(Params p) {
  using S = Smem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + S::tileT);
  T* Vs = reinterpret_cast<T*>(smem + 2 * S::tileT);
  float* Ss = reinterpret_cast<float*>(smem + 3 * S::tileT);
  T* Ps = reinterpret_cast<T*>(smem + 3 * S::tileT + S::tileS);
  float* Os = reinterpret_cast<float*>(smem + 3 * S::tileT + S::tileS + S::tileP);
  const KeyCols cols = key_cols_at(smem + 3 * S::tileT + S::tileS + S::tileP + S::tileO);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BlockRows rows = block_rows(p);
  const int b = rows.b, h = rows.h, r0 = rows.r0, r1 = rows.r1;
  const int32_t* tok = p.tok + static_cast<int64_t>(b) * p.N;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  load_tile<T, D>(Qs, [&](int r) -> const T* { return r0 + r < p.N ? q + bnhd(p, b, r0 + r, h) : nullptr; });
  // O lives in registers (wmma accumulators); Os only stages it when a row's reference max moves (see below)
  FragC o_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(o_acc[n], 0.f);

  // lane pair (row, half): this lane's query row and its statistics
  const int rl = lane >> 1, half = lane & 1;
  const int row = warp * 16 + rl;
  const int i = r0 + row;
  const bool row_local = i < p.N && tok[i] == TOK_LOCAL;
  float m = -INFINITY, l = 0.f;

  const TilePlan tp = plan_tiles(p, b, r0, r1);
  const int n_tiles = tp.n_band + tp.n_extra;
  for (int t = 0; t < n_tiles; ++t) {
    __syncthreads();  // previous tile's K/V (and, the first time, nothing) fully consumed
    stage_key_cols(p, tok, b, h, tp, t, cols);
    __syncthreads();
    load_key_rows<T, D>(p, k, v, cols, Ks, Vs);
    __syncthreads();

    warp_abt<T, D>(Ss + warp * 16 * S::LDS, Qs + warp * 16 * S::LDT, Ks);
    __syncwarp();

    // online softmax on this lane's 32 columns of its row
    const float* srow = Ss + row * S::LDS + half * 32;
    T* prow = Ps + row * S::LDP + half * 32;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const int kind = cols.kind[col];
      const bool ok = row_local && (kind == KIND_EXTRA || (kind == KIND_BAND && abs(i - cols.id[col]) <= p.window));
      if (ok) mx = fmaxf(mx, srow[c] * p.scale_log2);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    // Lazy rescaling: the reference m only moves when the tile's max exceeds it by more than 8 (log2 units),
    // so probabilities stay <= 2^8 (exact enough in fp16/bf16 and fp32 sums) and O, in registers, is
    // rescaled through shared memory only on those (rare) tiles. m = -inf with a finite mx always moves.
    const bool bump = mx > m + 8.f;
    const float m_new = bump ? mx : m;
    const float base = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = bump ? exp2f(m - m_new) : 1.f;
    const bool need_rescale = bump && l > 0.f;  // rows with l = 0 have O = 0
    float rowsum = 0.f;
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const int kind = cols.kind[col];
      const bool ok = row_local && (kind == KIND_EXTRA || (kind == KIND_BAND && abs(i - cols.id[col]) <= p.window));
      float pr = 0.f;
      if (ok) {
        pr = exp2f(srow[c] * p.scale_log2 - base);
        rowsum += pr;
        pr *= dropout_mul(p, b, h, i, cols.id[col]);
      }
      prow[c] = from_f<T>(pr);
    }
    rowsum += __shfl_xor_sync(0xffffffffu, rowsum, 1);
    l = l * alpha + rowsum;
    m = m_new;
    if (__any_sync(0xffffffffu, need_rescale)) {  // warp-uniform
      warp_store_frag<T, D>(Os + warp * 16 * S::LDO, o_acc);
      __syncwarp();
      float* orow = Os + row * S::LDO + half * (D / 2);
      for (int d = 0; d < D / 2; ++d) orow[d] *= alpha;  // alpha = 1 for rows that did not move
      __syncwarp();
#pragma unroll
      for (int n = 0; n < D / 16; ++n)
        wmma::load_matrix_sync(o_acc[n], Os + warp * 16 * S::LDO + n * 16, S::LDO, wmma::mem_row_major);
    }
    __syncwarp();  // P complete (and Os read) before the mma reads P

    warp_pv_frag<T, D>(o_acc, Ps + warp * 16 * S::LDP, Vs);
    __syncwarp();
  }
  __syncthreads();
  warp_store_frag<T, D>(Os + warp * 16 * S::LDO, o_acc);
  __syncwarp();

  // write this lane's half of its row
  if (i < p.N) {
    const int ti = tok[i];
    if (ti < 0) {  // global rows (ti >= 0) are written by the global-row kernels
      T* out = static_cast<T*>(p.out) + bnhd(p, b, i, h) + half * (D / 2);
      const float* orow = Os + row * S::LDO + half * (D / 2);
      const bool has = ti == TOK_LOCAL && l > 0.f;
      const float inv = has ? 1.f / l : 0.f;
      for (int d = 0; d < D / 2; ++d) out[d] = from_f<T>(has ? orow[d] * inv : 0.f);
      if (half == 0) p.lse[bhn(p, b, h, i)] = has ? m + log2f(l) : INFINITY;
    }
  }
}

template <typename T, int D>
constexpr size_t fwd_tc_smem() {
  using S = Smem<T, D>;
  return 3 * S::tileT + S::tileS + S::tileP + S::tileO + S::meta;
}

}  // namespace tc
}  // namespace pk
