// The parameters every kernel receives, by value, in its constant bank.
//
// The kernels' instructions address this struct's fields by offset, so its layout is part of every kernel: keep
// it as it is (api.cu fills it from the caller's struct, which can change with the ABI on its own).

#pragma once

#include <stdint.h>

namespace pk {

enum DType { DTYPE_FP16 = 0, DTYPE_BF16 = 1, DTYPE_FP32 = 2 };

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

}  // namespace pk
