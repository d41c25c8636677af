// Longformer attention (sliding window + global tokens + prefix keys/values): CUDA kernel templates.
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
// Rows are classified once per call into `tok[b, i]`: -2 padding, -1 local, g >= 0 global slot g.
// Padding rows: O = 0, LSE = +inf, zero gradients. A row with no admissible key gets O = 0 and LSE = +inf, so
// the backward's exp2(s - LSE) is exactly 0 and nothing is NaN.
//
// Dropout: Philox4x32-10 (implemented below) keyed by the 64-bit seed; counter = (column, row, h, b) where the
// column is the key position j (< N) or N + prefix index. Every (row, column) pair occurs in exactly one key
// set, so forward and backward draw the same bit. Kept probabilities are scaled by 1/(1-p); l (and so the
// LSE) is the undropped softmax denominator.
//
// Arithmetic. fp16/bf16 local rows (forward, dQ, band dK/dV: the bulk of the work) run on tensor cores through
// nvcuda::wmma 16x16x16 fragments with fp32 accumulators (namespace tc below; probabilities and dS are rounded
// to the input dtype before their matmul, as in FlashAttention). Everything else, and every fp32 call, uses
// SIMT fp32 FMAs: fp32 inputs are IEEE fp32 throughout (no tf32), tolerance ~1e-5 relative to an fp64
// reference. SIMT kernels: one warp per row, lanes own D/32 contiguous elements (D = 16: 16 lanes, one each),
// dot products are butterfly reductions; no shared memory, so no barriers to get wrong. The global-row
// kernels, the shared-key (global/prefix) dK/dV and the finalize pass are SIMT for every dtype.
// Env PREFIX_KERNELS_CUDA_SIMT=1 forces the SIMT kernels (a debugging switch: both paths pass the same tests).
// A tc kernel whose shared memory exceeds the device's opt-in limit falls back to SIMT at launch time (none does
// on an A100 or H100 today; the check keeps a future larger tile from failing at launch).
//
// ptxas -v (nvcc 13.0, sm_90, -O3, bf16), registers per thread for D = 16/32/64/128: tc forward 64/72/72/166
// (12 bytes of spill at D = 64), tc dQ 64/56/96/134, tc band dK/dV 80/96/128/255 (28 bytes of spill at
// D = 128); SIMT kernels 24-99 with no spills. Shared memory per tc block (fp16/bf16): forward 71 KB (D = 64) /
// 111 KB (D = 128); dQ 80 / 112 KB; band dK/dV 89 / 121 KB.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include <type_traits>

namespace pk {

constexpr int WARPS_PER_BLOCK = 4;
constexpr int THREADS = 32 * WARPS_PER_BLOCK;
// Queries per warp in the global/prefix-key backward (fewer atomics vs more parallelism).
constexpr int LOCAL_QCHUNK = 256;

constexpr int TOK_PAD = -2;
constexpr int TOK_LOCAL = -1;

struct Params {
  int B, N, H, D, P;
  int window;        // one-sided, already clamped to [0, N]
  float scale_log2;  // softmax_scale * log2(e)
  float scale;       // softmax_scale
  float dropout_p;
  float keep_scale;  // 1 / (1 - dropout_p)
  uint64_t seed;
  int max_global;    // columns of global_idx; 0 when there are no global tokens
  int global_chunk;  // columns per split in the global-row kernels
  int num_splits;    // ceil((N + P) / global_chunk)
  int simt_only;     // 1: never use the tensor-core kernels (debugging; env PREFIX_KERNELS_CUDA_SIMT=1)

  // (B, N, H, D) contiguous, dtype T
  const void* q;
  const void* k;
  const void* v;
  const void* qg;  // may be null (no global tokens)
  const void* kg;
  const void* vg;
  const void* pk;  // (B, P, H, D) contiguous, may be null when P == 0
  const void* pv;
  const uint8_t* key_padding;  // (B, N) bool, may be null
  const int32_t* global_idx;   // (B, max_global), may be null
  const int32_t* global_count; // (B,), may be null

  // forward outputs / backward inputs
  void* out;   // (B, N, H, D)
  float* lse;  // (B, H, N), log2 domain
  const void* dout;

  // backward outputs (dtype T); dqg/dkg/dvg null when no global tokens
  void* dq;
  void* dk;
  void* dv;
  void* dqg;
  void* dkg;
  void* dvg;

  // workspaces
  int32_t* tok;          // (B, N)
  float* gpart;          // (B, H, max_global, num_splits, D + 2) forward partials
  float* delta;          // (B, H, N)
  float* ws_dk_gslot;    // (B, max_global, H, D) zeroed: dK of global keys through local k
  float* ws_dv_gslot;    // (B, max_global, H, D) zeroed
  float* ws_dqg_gslot;   // (B, max_global, H, D) zeroed: dq_global of global rows
  float* ws_dpk;         // (B, P, H, D) zeroed
  float* ws_dpv;         // (B, P, H, D) zeroed
};

// ---------------------------------------------------------------------------------------------------------
// element conversion

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------------------
// Philox4x32-10

__device__ __forceinline__ uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                                      uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0);
    const uint32_t lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2);
    const uint32_t lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return c0;
}

// Multiplier of the probability of (b, h, row, col): 1 without dropout, else 0 or 1/(1-p).
__device__ __forceinline__ float dropout_mul(const Params& p, int b, int h, int row, int col) {
  if (p.dropout_p <= 0.f) return 1.f;
  const uint32_t x = philox_first_word(p.seed, static_cast<uint32_t>(col), static_cast<uint32_t>(row),
                                       static_cast<uint32_t>(h), static_cast<uint32_t>(b));
  const float u = static_cast<float>(x >> 8) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
  return u >= p.dropout_p ? p.keep_scale : 0.f;
}

// ---------------------------------------------------------------------------------------------------------
// one row of D elements spread over a warp

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

// Keys per batch in the warp-per-row loops over long key ranges (the global rows). 4 was measured 40% slower
// than 1 on an H200 (more registers, fewer warps in flight, and these loops are L2-bandwidth bound).
constexpr int KEY_BATCH = 1;

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

// ---------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------
// tokens: tok[b, i] = -2 padding, -1 local, g global slot

// (templates only so that every translation unit including this header may define them)
template <int Unused>
__global__ void build_tok_kernel(Params p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= static_cast<int64_t>(p.B) * p.N) return;
  const bool pad = p.key_padding != nullptr && p.key_padding[t] != 0;
  p.tok[t] = pad ? TOK_PAD : TOK_LOCAL;
}

template <int Unused>
__global__ void scatter_global_tok_kernel(Params p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= static_cast<int64_t>(p.B) * p.max_global) return;
  const int b = static_cast<int>(t / p.max_global);
  const int g = static_cast<int>(t % p.max_global);
  if (g >= global_count_of(p, b)) return;
  const int j = global_pos(p, b, g);
  if (j < 0) return;
  // padding wins over global (the Python checks already guarantee they never overlap)
  if (p.key_padding != nullptr && p.key_padding[static_cast<int64_t>(b) * p.N + j] != 0) return;
  p.tok[static_cast<int64_t>(b) * p.N + j] = g;
}

// ---------------------------------------------------------------------------------------------------------
// 1. local rows forward: one warp per (b, h, i)

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) local_rows_fwd_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.N) return;
  const int i = static_cast<int>(w % p.N);
  const int bh = static_cast<int>(w / p.N);
  const int h = bh % p.H, b = bh / p.H;
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

// ---------------------------------------------------------------------------------------------------------
// 2. global rows forward: one warp per (b, h, g, split), then a merge warp per (b, h, g)

__device__ __forceinline__ int64_t gpart_offset(const Params& p, int b, int h, int g, int s) {
  return (((static_cast<int64_t>(b) * p.H + h) * p.max_global + g) * p.num_splits + s) * (p.D + 2);
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

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) global_rows_fwd_split_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.max_global * p.num_splits) return;
  const int s = static_cast<int>(w % p.num_splits);
  int64_t r = w / p.num_splits;
  const int g = static_cast<int>(r % p.max_global);
  r /= p.max_global;
  const int h = static_cast<int>(r % p.H), b = static_cast<int>(r / p.H);
  if (g >= global_count_of(p, b)) return;
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

// ---------------------------------------------------------------------------------------------------------
// 3. backward

// delta[b, h, i] = sum_d dO * O in fp32 (0 for padding rows)
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) bwd_delta_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.N) return;
  const int i = static_cast<int>(w % p.N);
  const int bh = static_cast<int>(w / p.N);
  const int h = bh % p.H, b = bh / p.H;
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

// dQ of local rows: one warp per (b, h, i), same keys as the forward. Non-local rows get dq = 0.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) local_rows_bwd_dq_kernel(Params p) {
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.N) return;
  const int i = static_cast<int>(w % p.N);
  const int bh = static_cast<int>(w / p.N);
  const int h = bh % p.H, b = bh / p.H;
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
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.N) return;
  const int j = static_cast<int>(w % p.N);
  const int bh = static_cast<int>(w / p.N);
  const int h = bh % p.H, b = bh / p.H;
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
      if (ok[u]) {
        load_row<T, D>(q + bnhd(p, b, ii, h), lane, qb[u]);
        load_row<T, D>(dout + bnhd(p, b, ii, h), lane, ob[u]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) qb[u][e] = ob[u][e] = 0.f;
      }
      sd[2 * u] = lane_dot<D>(qb[u], kx);
      sd[2 * u + 1] = lane_dot<D>(ob[u], vx);
    }
    warp_sum_n<2 * KEY_BATCH>(sd);
#pragma unroll
    for (int u = 0; u < KEY_BATCH; ++u) {
      if (!ok[u]) continue;
      const int ii = i + u;
      const float prob = exp2f(sd[2 * u] * p.scale_log2 - lse_u[u]);
      const float mul = dropout_mul(p, b, h, ii, col);
      const float pd = prob * mul;
      const float ds = prob * (sd[2 * u + 1] * mul - p.delta[bhn(p, b, h, ii)]);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        dkx[e] = fmaf(ds, qb[u][e], dkx[e]);
        dvx[e] = fmaf(pd, ob[u][e], dvx[e]);
      }
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
  const int64_t w = global_warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.B) * p.H * p.max_global * p.num_splits) return;
  const int s = static_cast<int>(w % p.num_splits);
  int64_t r = w / p.num_splits;
  const int g = static_cast<int>(r % p.max_global);
  r /= p.max_global;
  const int h = static_cast<int>(r % p.H), b = static_cast<int>(r / p.H);
  if (g >= global_count_of(p, b)) return;
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
        if (ok[u]) {
          load_row<T, D>(qg + bnhd(p, b, gi, h), lane, qb[u]);
          load_row<T, D>(dout + bnhd(p, b, gi, h), lane, ob[u]);
        } else {
#pragma unroll
          for (int e = 0; e < E; ++e) qb[u][e] = ob[u][e] = 0.f;
        }
        sd[2 * u] = lane_dot<D>(qb[u], kx);
        sd[2 * u + 1] = lane_dot<D>(ob[u], vx);
      }
      warp_sum_n<2 * KEY_BATCH>(sd);
#pragma unroll
      for (int u = 0; u < KEY_BATCH; ++u) {
        if (!ok[u]) continue;
        const int gi = gi_u[u];
        const float prob = exp2f(sd[2 * u] * p.scale_log2 - lse_u[u]);
        const float mul = dropout_mul(p, b, h, gi, c);
        const float pd = prob * mul;
        const float ds = prob * (sd[2 * u + 1] * mul - p.delta[bhn(p, b, h, gi)]);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          dkx[e] = fmaf(ds, qb[u][e], dkx[e]);
          dvx[e] = fmaf(pd, ob[u][e], dvx[e]);
        }
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

// ---------------------------------------------------------------------------------------------------------
// Tensor-core paths (fp16 / bf16): nvcuda::wmma 16x16x16 fragments with fp32 accumulators.
//
// Local rows only (the band dominates the work). A block of 4 warps owns TC_BM = 64 consecutive query rows of
// one (b, h); each warp owns 16 of them. Keys arrive in tiles of TC_BN = 64 columns staged in shared memory:
// first the band [r0 - w, r1 - 1 + w], then "extra" tiles holding the row's global keys (local k, v gathered
// through global_idx) and the prefix keys. Column metadata (kind, dropout column id) sits next to the tile, so
// masking is the same per-element rule as the SIMT kernels: band column j allowed for row i iff
// |i - j| <= w and tok[j] == local; extra columns always allowed; rows that are not local are fully masked.
// Softmax bookkeeping is done by lane pairs (lane = 2 * row + half, each half owning 32 columns / D/2 outputs)
// from an fp32 score tile in shared memory. Shared tiles are padded (+8 halves / +4 floats per row) against
// bank conflicts while keeping every fragment pointer 32-byte aligned. Barriers: __syncthreads before and after
// every refill of the shared K/V (and Q/dO) tiles; __syncwarp between a warp's phases on its own rows.

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
  int64_t* col_off = reinterpret_cast<int64_t*>(smem + 3 * S::tileT + S::tileS + S::tileP + S::tileO);
  int* col_kind = reinterpret_cast<int*>(col_off + BN);
  int* col_id = col_kind + BN;
  int* col_prefix = col_id + BN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n_row_tiles = (p.N + BM - 1) / BM;
  const int bh = static_cast<int>(blockIdx.x / n_row_tiles);
  const int h = bh % p.H, b = bh / p.H;
  const int r0 = static_cast<int>(blockIdx.x % n_row_tiles) * BM;
  const int r1 = min(r0 + BM, p.N);
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
    if (threadIdx.x < BN) {
      const KeyCol c = tile_col(p, tok, b, h, tp, t, threadIdx.x);
      col_off[threadIdx.x] = c.k_off;
      col_kind[threadIdx.x] = c.kind;
      col_id[threadIdx.x] = c.id;
      col_prefix[threadIdx.x] = c.prefix ? 1 : 0;
    }
    __syncthreads();
    load_tile<T, D>(Ks, [&](int c) -> const T* {
      return col_off[c] < 0 ? nullptr : (col_prefix[c] ? static_cast<const T*>(p.pk) : k) + col_off[c];
    });
    load_tile<T, D>(Vs, [&](int c) -> const T* {
      return col_off[c] < 0 ? nullptr : (col_prefix[c] ? static_cast<const T*>(p.pv) : v) + col_off[c];
    });
    __syncthreads();

    warp_abt<T, D>(Ss + warp * 16 * S::LDS, Qs + warp * 16 * S::LDT, Ks);
    __syncwarp();

    // online softmax on this lane's 32 columns of its row
    const float* srow = Ss + row * S::LDS + half * 32;
    T* prow = Ps + row * S::LDP + half * 32;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const int kind = col_kind[col];
      const bool ok = row_local && (kind == KIND_EXTRA || (kind == KIND_BAND && abs(i - col_id[col]) <= p.window));
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
      const int kind = col_kind[col];
      const bool ok = row_local && (kind == KIND_EXTRA || (kind == KIND_BAND && abs(i - col_id[col]) <= p.window));
      float pr = 0.f;
      if (ok) {
        pr = exp2f(srow[c] * p.scale_log2 - base);
        rowsum += pr;
        pr *= dropout_mul(p, b, h, i, col_id[col]);
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


// Column metadata of a key tile into shared memory, then its K and V rows (callers barrier around it).
template <typename T, int D>
__device__ __forceinline__ void stage_key_tile(const Params& p, const int32_t* tok, int b, int h, const TilePlan& tp,
                                               int t, int64_t* col_off, int* col_kind, int* col_id, int* col_prefix,
                                               T* Ks, T* Vs) {
  if (threadIdx.x < BN) {
    const KeyCol c = tile_col(p, tok, b, h, tp, t, threadIdx.x);
    col_off[threadIdx.x] = c.k_off;
    col_kind[threadIdx.x] = c.kind;
    col_id[threadIdx.x] = c.id;
    col_prefix[threadIdx.x] = c.prefix ? 1 : 0;
  }
  __syncthreads();
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  load_tile<T, D>(Ks, [&](int c) -> const T* {
    return col_off[c] < 0 ? nullptr : (col_prefix[c] ? static_cast<const T*>(p.pk) : k) + col_off[c];
  });
  load_tile<T, D>(Vs, [&](int c) -> const T* {
    return col_off[c] < 0 ? nullptr : (col_prefix[c] ? static_cast<const T*>(p.pv) : v) + col_off[c];
  });
}

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
  int64_t* col_off = reinterpret_cast<int64_t*>(cur += S::tileP);
  int* col_kind = reinterpret_cast<int*>(col_off + BN);
  int* col_id = col_kind + BN;
  int* col_prefix = col_id + BN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n_row_tiles = (p.N + BM - 1) / BM;
  const int bh = static_cast<int>(blockIdx.x / n_row_tiles);
  const int h = bh % p.H, b = bh / p.H;
  const int r0 = static_cast<int>(blockIdx.x % n_row_tiles) * BM;
  const int r1 = min(r0 + BM, p.N);
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
    stage_key_tile<T, D>(p, tok, b, h, tp, t, col_off, col_kind, col_id, col_prefix, Ks, Vs);
    __syncthreads();
    warp_abt<T, D>(Ss + warp * 16 * S::LDS, Qs + warp * 16 * S::LDT, Ks);
    warp_abt<T, D>(dPs + warp * 16 * S::LDS, dOs + warp * 16 * S::LDT, Vs);
    __syncwarp();
    const float* srow = Ss + row * S::LDS + half * 32;
    const float* dprow = dPs + row * S::LDS + half * 32;
    T* dsrow = dSs + row * S::LDP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      const int kind = col_kind[col];
      const bool ok = row_ok && (kind == KIND_EXTRA || (kind == KIND_BAND && abs(i - col_id[col]) <= p.window));
      float ds = 0.f;
      if (ok) {
        const float pr = exp2f(srow[c] * p.scale_log2 - lse2);
        const float mul = dropout_mul(p, b, h, i, col_id[col]);
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
  const int n_key_tiles = (p.N + BN - 1) / BN;
  const int bh = static_cast<int>(blockIdx.x / n_key_tiles);
  const int h = bh % p.H, b = bh / p.H;
  const int j0 = static_cast<int>(blockIdx.x % n_key_tiles) * BN;
  const int j1 = min(j0 + BN, p.N);
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
constexpr size_t fwd_tc_smem() {
  using S = Smem<T, D>;
  return 3 * S::tileT + S::tileS + S::tileP + S::tileO + S::meta;
}
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

// ---------------------------------------------------------------------------------------------------------
// host-side launchers (instantiated per dtype in fwd_*.cu / bwd_*.cu; api.cu only declares them)

enum DType { DTYPE_FP16 = 0, DTYPE_BF16 = 1, DTYPE_FP32 = 2 };

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

inline cudaError_t launch_build_tok(const Params& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.B) * p.N;
  build_tok_kernel<0><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.max_global > 0) {
    const int64_t m = static_cast<int64_t>(p.B) * p.max_global;
    scatter_global_tok_kernel<0><<<static_cast<unsigned>((m + 255) / 256), 256, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

template <typename T, int D>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
  const cudaError_t err = launch_build_tok(p, stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.N;
  {
    bool done = false;
    if constexpr (!std::is_same<T, float>::value) {
      if (!p.simt_only && tc_fits(tc::fwd_tc_smem<T, D>())) {
        const cudaError_t e = launch_tc((tc::local_rows_fwd_tc_kernel<T, D>), tc::fwd_tc_smem<T, D>(), p, stream);
        if (e != cudaSuccess) return e;
        done = true;
      }
    }
    if (!done) PK_LAUNCH((local_rows_fwd_kernel<T, D>), rows, p);
  }
  if (p.max_global > 0) {
    const int64_t slots = static_cast<int64_t>(p.B) * p.H * p.max_global;
    PK_LAUNCH((global_rows_fwd_split_kernel<T, D>), slots * p.num_splits, p);
    PK_LAUNCH((global_rows_fwd_merge_kernel<T, D>), slots, p);
  }
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_backward(const Params& p, cudaStream_t stream) {
  const cudaError_t err = launch_build_tok(p, stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.N;
  PK_LAUNCH((bwd_delta_kernel<T, D>), rows, p);
  {
    bool done = false;
    if constexpr (!std::is_same<T, float>::value) {
      if (!p.simt_only && tc_fits(tc::dq_tc_smem<T, D>())) {
        const cudaError_t e = launch_tc((tc::local_rows_bwd_dq_tc_kernel<T, D>), tc::dq_tc_smem<T, D>(), p, stream);
        if (e != cudaSuccess) return e;
        done = true;
      }
    }
    if (!done) PK_LAUNCH((local_rows_bwd_dq_kernel<T, D>), rows, p);
  }
  {
    bool done = false;
    if constexpr (!std::is_same<T, float>::value) {
      if (!p.simt_only && tc_fits(tc::dkv_tc_smem<T, D>())) {
        const cudaError_t e = launch_tc((tc::local_rows_bwd_dkv_band_tc_kernel<T, D>), tc::dkv_tc_smem<T, D>(), p, stream);
        if (e != cudaSuccess) return e;
        done = true;
      }
    }
    if (!done) PK_LAUNCH((local_rows_bwd_dkv_band_kernel<T, D>), rows, p);
  }
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
