// Tensor-core paths (fp16 / bf16): nvcuda::wmma 16x16x16 fragments with fp32 accumulators.
//
// Local rows only (the band dominates the work). A block of 4 warps owns BM = 64 consecutive query rows of
// one (b, h); each warp owns 16 of them. Keys arrive in tiles of BN = 64 columns staged in shared memory:
// first the band [r0 - w, r1 - 1 + w], then "extra" tiles holding the row's global keys (local k, v gathered
// through global_idx) and the prefix keys. Column metadata (kind, dropout column id) sits next to the tile, so
// masking is the same per-element rule as the SIMT kernels: band column j allowed for row i iff
// |i - j| <= w and tok[j] == local; extra columns always allowed; rows that are not local are fully masked.
// Softmax bookkeeping is done by lane pairs (lane = 2 * row + half, each half owning 32 columns / D/2 outputs)
// from an fp32 score tile in shared memory. Shared tiles are padded (+8 halves / +4 floats per row) against
// bank conflicts while keeping every fragment pointer 32-byte aligned. Barriers: __syncthreads before and after
// every refill of the shared K/V (and Q/dO) tiles; __syncwarp between a warp's phases on its own rows.

#pragma once

#include <mma.h>

#include "common.cuh"

namespace pk {
namespace tc {

constexpr int BM = 64;
constexpr int BN = 64;
constexpr int WARPS = 4;
constexpr int NTHREADS = 32 * WARPS;

constexpr int KIND_NONE = 0;   // column out of range / not a key of any row
constexpr int KIND_BAND = 1;   // band key (local, non-padding); allowed iff |i - j| <= w
constexpr int KIND_EXTRA = 2;  // global key through local k/v, or prefix key: allowed for every local row

template <typename T, int D>
struct Smem {
  static constexpr int LDT = D + 8;   // halves per row of Q/K/V/dO tiles
  static constexpr int LDS = BN + 4;  // floats per row of score tiles
  static constexpr int LDP = BN + 8;  // halves per row of probability tiles
  static constexpr int LDO = D + 4;   // floats per row of the output accumulator
  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t tileT = align(sizeof(T) * 64 * LDT);
  static constexpr size_t tileS = align(sizeof(float) * 64 * LDS);
  static constexpr size_t tileP = align(sizeof(T) * 64 * LDP);
  static constexpr size_t tileO = align(sizeof(float) * 64 * LDO);
  static constexpr size_t meta = align((sizeof(int) * 3 + sizeof(int64_t)) * BN);
};

// A key column of a local-row tile: where its k/v rows are, its kind and its dropout column id.
struct KeyCol {
  int64_t k_off;  // element offset into k/v (band, global) or pk/pv (prefix); -1 when none
  bool prefix;
  int kind;
  int id;
};

__device__ __forceinline__ KeyCol band_col(const Params& p, const int32_t* tok, int b, int h, int j) {
  KeyCol c{-1, false, KIND_NONE, 0};
  if (j >= 0 && j < p.N && tok[j] == TOK_LOCAL) {
    c.k_off = bnhd(p, b, j, h);
    c.kind = KIND_BAND;
    c.id = j;
  }
  return c;
}

// x in [0, G + P): global slot x (if x < G) else prefix x - G; G = global count of batch row b
__device__ __forceinline__ KeyCol extra_col(const Params& p, const int32_t* tok, int b, int h, int G, int x) {
  KeyCol c{-1, false, KIND_NONE, 0};
  if (x < G) {
    const int j = global_pos(p, b, x);
    if (j >= 0 && tok[j] == x) {
      c.k_off = bnhd(p, b, j, h);
      c.kind = KIND_EXTRA;
      c.id = j;
    }
  } else if (x < G + p.P) {
    c.k_off = bphd(p, b, x - G, h);
    c.prefix = true;
    c.kind = KIND_EXTRA;
    c.id = p.N + (x - G);
  }
  return c;
}

// 16-byte copies of a (64 x D) tile of rows into shared memory; row_src(r) gives the row's first element, or
// nullptr for a zero row.
template <typename T, int D, typename RowSrc>
__device__ __forceinline__ void load_tile(T* dst, RowSrc row_src) {
  constexpr int CHUNKS = D * sizeof(T) / 16;  // 16-byte chunks per row
  constexpr int PER = 16 / sizeof(T);
  for (int t = threadIdx.x; t < 64 * CHUNKS; t += NTHREADS) {
    const int r = t / CHUNKS, c = t % CHUNKS;
    const T* s = row_src(r);
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (s != nullptr) val = *reinterpret_cast<const uint4*>(s + c * PER);
    *reinterpret_cast<uint4*>(dst + r * Smem<T, D>::LDT + c * PER) = val;
  }
}

using namespace nvcuda;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBcol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
template <typename T>
using FragBrow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// S (16 x 64, fp32, ld LDS) = A (16 x D rows of a tile, ld LDT) . B^T where B is a (64 x D) tile (ld LDT)
template <typename T, int D>
__device__ __forceinline__ void warp_abt(float* S, const T* A, const T* B) {
  constexpr int LDT = Smem<T, D>::LDT;
#pragma unroll
  for (int n = 0; n < BN / 16; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA<T> a;
      FragBcol<T> bt;
      wmma::load_matrix_sync(a, A + kk * 16, LDT);
      wmma::load_matrix_sync(bt, B + n * 16 * LDT + kk * 16, LDT);
      wmma::mma_sync(acc, a, bt, acc);
    }
    wmma::store_matrix_sync(S + n * 16, acc, Smem<T, D>::LDS, wmma::mem_row_major);
  }
}

// acc[n] (16 x 16 blocks of a 16 x D fp32 register accumulator) += P (16 x 64, ld LDP) . V (64 x D tile, ld LDT)
template <typename T, int D>
__device__ __forceinline__ void warp_pv_frag(FragC (&acc)[D / 16], const T* P, const T* V) {
  constexpr int LDT = Smem<T, D>::LDT, LDP = Smem<T, D>::LDP;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    FragA<T> a;
    wmma::load_matrix_sync(a, P + kk * 16, LDP);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragBrow<T> bv;
      wmma::load_matrix_sync(bv, V + kk * 16 * LDT + n * 16, LDT);
      wmma::mma_sync(acc[n], a, bv, acc[n]);
    }
  }
}

// A warp's 16 x D register accumulator into its 16 rows of an fp32 staging area (ld LDO).
template <typename T, int D>
__device__ __forceinline__ void warp_store_frag(float* dst, const FragC (&acc)[D / 16]) {
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(dst + n * 16, acc[n], Smem<T, D>::LDO, wmma::mem_row_major);
}

// This block's (b, h) and its rows [r0, r1): one block per (b, h, 64 consecutive rows), query rows in the forward
// and dQ kernels, key rows in the band dK/dV kernel.
struct BlockRows {
  int b, h, r0, r1;
};
__device__ __forceinline__ BlockRows block_rows(const Params& p) {
  static_assert(BM == BN, "query and key tiles have the same height");
  const int n_tiles = (p.N + BM - 1) / BM;
  const int bh = static_cast<int>(blockIdx.x / n_tiles);
  BlockRows r;
  r.h = bh % p.H;
  r.b = bh / p.H;
  r.r0 = static_cast<int>(blockIdx.x % n_tiles) * BM;
  r.r1 = min(r.r0 + BM, p.N);
  return r;
}

// The key tiles of query rows [r0, r1): band tiles, then extra tiles. Returns the number of tiles; tile_col
// gives column c of tile t.
struct TilePlan {
  int k0, n_band, n_extra, G;
};

__device__ __forceinline__ TilePlan plan_tiles(const Params& p, int b, int r0, int r1) {
  TilePlan t;
  t.k0 = max(0, r0 - p.window);
  const int k1 = min(p.N, r1 - 1 + p.window + 1);
  t.n_band = (k1 - t.k0 + BN - 1) / BN;
  t.G = global_count_of(p, b);
  t.n_extra = (t.G + p.P + BN - 1) / BN;
  return t;
}

__device__ __forceinline__ KeyCol tile_col(const Params& p, const int32_t* tok, int b, int h, const TilePlan& tp,
                                           int t, int c) {
  if (t < tp.n_band) {
    // band_col checks 0 <= j < N; columns past the band's end are masked by |i - j| <= w for every row
    return band_col(p, tok, b, h, tp.k0 + t * BN + c);
  }
  return extra_col(p, tok, b, h, tp.G, (t - tp.n_band) * BN + c);
}

// The staged key tile's column metadata (KeyCol, BN entries per array) in shared memory, next to the tiles.
struct KeyCols {
  int64_t* off;
  int* kind;
  int* id;
  int* prefix;
};

__device__ __forceinline__ KeyCols key_cols_at(unsigned char* at) {
  KeyCols c;
  c.off = reinterpret_cast<int64_t*>(at);
  c.kind = reinterpret_cast<int*>(c.off + BN);
  c.id = c.kind + BN;
  c.prefix = c.id + BN;
  return c;
}

// Column metadata of key tile t into shared memory (callers barrier after it).
__device__ __forceinline__ void stage_key_cols(const Params& p, const int32_t* tok, int b, int h, const TilePlan& tp,
                                               int t, const KeyCols& cols) {
  if (threadIdx.x < BN) {
    const KeyCol c = tile_col(p, tok, b, h, tp, t, threadIdx.x);
    cols.off[threadIdx.x] = c.k_off;
    cols.kind[threadIdx.x] = c.kind;
    cols.id[threadIdx.x] = c.id;
    cols.prefix[threadIdx.x] = c.prefix ? 1 : 0;
  }
}

// The K and V rows of the staged columns: k, v for band and global keys, p.pk, p.pv for prefix keys.
template <typename T, int D>
__device__ __forceinline__ void load_key_rows(const Params& p, const T* k, const T* v, const KeyCols& cols, T* Ks,
                                              T* Vs) {
  load_tile<T, D>(Ks, [&](int c) -> const T* {
    return cols.off[c] < 0 ? nullptr : (cols.prefix[c] ? static_cast<const T*>(p.pk) : k) + cols.off[c];
  });
  load_tile<T, D>(Vs, [&](int c) -> const T* {
    return cols.off[c] < 0 ? nullptr : (cols.prefix[c] ? static_cast<const T*>(p.pv) : v) + cols.off[c];
  });
}

// Both, with the barrier between them (callers barrier around it). The forward kernel calls the two halves
// itself, with the k and v it reads once before its tile loop.
template <typename T, int D>
__device__ __forceinline__ void stage_key_tile(const Params& p, const int32_t* tok, int b, int h, const TilePlan& tp,
                                               int t, const KeyCols& cols, T* Ks, T* Vs) {
  stage_key_cols(p, tok, b, h, tp, t, cols);
  __syncthreads();
  load_key_rows<T, D>(p, static_cast<const T*>(p.k), static_cast<const T*>(p.v), cols, Ks, Vs);
}

}  // namespace tc
}  // namespace pk
