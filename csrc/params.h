// The parameters of a call, twice: `pk_params`, what a caller of pk_forward / pk_backward fills (the C ABI), and
// `pk::Params`, what every kernel receives by value in its constant bank. api.cu validates the first and derives
// the second (clamped window, log2-scaled scale, dropout keep scale, the SIMT switch). They are separate because
// the kernels' instructions address pk::Params' fields by offset: its layout is part of every kernel and stays as
// it is, while pk_params can change with the ABI version.

#pragma once

#include <stdint.h>

// Bumped whenever pk_params or an entry point's signature changes; the Python loader refuses another version.
#define PK_ABI_VERSION 2

// X(type, name): the fields of pk_params, in order. This one list declares the struct and the layout table the
// library exports (pk_params_field_name / _offset / _size), which the Python loader compares with its ctypes
// mirror, so that a mismatch fails at load time instead of reading fields at the wrong offsets.
// Tensors are contiguous device pointers; shapes and workspace contracts are in api.cu's header comment.
#define PK_PARAMS_FIELDS(X)                                                               \
  X(uint32_t, abi_version)          /* PK_ABI_VERSION */                                  \
  X(uint32_t, struct_size)          /* sizeof(pk_params) */                               \
  X(int32_t, dtype)                 /* 0 fp16, 1 bf16, 2 fp32 */                          \
  X(int32_t, B)                                                                           \
  X(int32_t, N)                                                                           \
  X(int32_t, H)                                                                           \
  X(int32_t, D)                     /* head dim: 16, 32, 64 or 128 */                     \
  X(int32_t, P)                     /* prefix keys per batch row */                       \
  X(int32_t, window)                /* one-sided band width (clamped to N) */             \
  X(float, scale)                   /* softmax scale */                                   \
  X(float, dropout_p)               /* in [0, 1) */                                       \
  X(int32_t, max_global)            /* columns of global_idx; 0: no global tokens */      \
  X(int32_t, global_chunk)          /* key columns per split of the global-row kernels */ \
  X(int32_t, num_splits)            /* global_chunk * num_splits >= N + P */              \
  X(uint64_t, seed)                 /* dropout */                                         \
  /* inputs */                                                                            \
  X(const void*, q)                                                                       \
  X(const void*, k)                                                                       \
  X(const void*, v)                                                                       \
  X(const void*, q_global)                                                                \
  X(const void*, k_global)                                                                \
  X(const void*, v_global)                                                                \
  X(const void*, prefix_k)                                                                \
  X(const void*, prefix_v)                                                                \
  X(const void*, key_padding_mask)                                                        \
  X(const void*, global_idx)                                                              \
  X(const void*, global_count)                                                            \
  /* forward: outputs; backward: inputs */                                                \
  X(void*, out)                                                                           \
  X(float*, lse)                                                                          \
  /* backward only */                                                                     \
  X(const void*, grad_out)                                                                \
  X(void*, dq)                                                                            \
  X(void*, dk)                                                                            \
  X(void*, dv)                                                                            \
  X(void*, dq_global)                                                                     \
  X(void*, dk_global)                                                                     \
  X(void*, dv_global)                                                                     \
  /* workspaces */                                                                        \
  X(void*, tok_ws)                  /* both directions */                                 \
  X(float*, gpart_ws)               /* forward */                                         \
  X(float*, delta_ws)               /* backward, as are the rest */                       \
  X(float*, dk_gslot_ws)                                                                  \
  X(float*, dv_gslot_ws)                                                                  \
  X(float*, dqg_gslot_ws)                                                                 \
  X(float*, dprefix_k_ws)                                                                 \
  X(float*, dprefix_v_ws)

#define PK_DECLARE_FIELD(type, name) type name;
typedef struct pk_params {
  PK_PARAMS_FIELDS(PK_DECLARE_FIELD)
} pk_params;
#undef PK_DECLARE_FIELD

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
