// C API of the CUDA backend: `extern "C"` entry points taking raw device pointers, sizes, scalars and a
// cudaStream_t (as void*). Every entry point returns 0 on success, else a nonzero code whose message
// pk_last_error() returns (per host thread). No torch headers: the library loads under any torch.
//
// Tensors are contiguous: q, k, v, q_global, k_global, v_global, out, grads (B, N, H, D); prefix (B, P, H, D);
// key_padding_mask (B, N) bool (1 byte); global_idx (B, max_global) int32 in increasing order with entries
// past global_count[b] unused; global_count (B,) int32; lse and delta (B, H, N) fp32.
// Workspaces the caller allocates (sizes from pk_*_workspace_floats below):
//   forward:  tok (B, N) int32; gpart (B, H, max_global, num_splits, D + 2) fp32
//   backward: tok (B, N) int32; delta (B, H, N) fp32; and ZEROED fp32 ws_dk_gslot, ws_dv_gslot, ws_dqg_gslot
//             (B, max_global, H, D) and ws_dpk, ws_dpv (B, P, H, D). The prefix gradients are left in ws_dpk,
//             ws_dpv (fp32) for the caller to convert.

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "launch.h"

namespace {

thread_local char g_last_error[512] = "";

enum ErrorCode { PK_OK = 0, PK_ERR_ARGS = 1, PK_ERR_CUDA = 2 };

int fail_args(const char* what) {
  std::snprintf(g_last_error, sizeof(g_last_error), "prefix_kernels CUDA: invalid argument: %s", what);
  return PK_ERR_ARGS;
}

int check_cuda(cudaError_t err, const char* where) {
  if (err == cudaSuccess) {
    g_last_error[0] = '\0';
    return PK_OK;
  }
  std::snprintf(g_last_error, sizeof(g_last_error), "prefix_kernels CUDA: %s failed: %s (%s)", where,
                cudaGetErrorName(err), cudaGetErrorString(err));
  return PK_ERR_CUDA;
}

bool head_dim_supported(int d) { return d == 16 || d == 32 || d == 64 || d == 128; }

// Shared argument checks; fills the common fields of `p`.
int fill_common(pk::Params& p, int dtype, int B, int N, int H, int D, int P, int window, float scale,
                float dropout_p, unsigned long long seed, const void* q, const void* k, const void* v,
                const void* qg, const void* kg, const void* vg, const void* pkey, const void* pval,
                const void* key_padding, const void* global_idx, const void* global_count, int max_global,
                int global_chunk, int num_splits, void* tok) {
  if (dtype < pk::DTYPE_FP16 || dtype > pk::DTYPE_FP32) return fail_args("dtype code must be 0, 1 or 2");
  if (B <= 0 || N <= 0 || H <= 0) return fail_args("B, N and H must be positive");
  if (!head_dim_supported(D)) return fail_args("head dim must be 16, 32, 64 or 128");
  if (P < 0 || window < 0 || max_global < 0) return fail_args("P, window and max_global must be >= 0");
  if (!(scale > 0.f) || !(dropout_p >= 0.f && dropout_p < 1.f)) return fail_args("scale or dropout_p out of range");
  if (q == nullptr || k == nullptr || v == nullptr || tok == nullptr) return fail_args("null q, k, v or tok");
  if (P > 0 && (pkey == nullptr || pval == nullptr)) return fail_args("P > 0 but prefix pointers are null");
  // Global rows need all of: projections, index, count. Without projections there are no global tokens.
  const bool has_global = max_global > 0 && qg != nullptr && kg != nullptr && vg != nullptr &&
                          global_idx != nullptr && global_count != nullptr;
  if (max_global > 0 && !has_global) return fail_args("max_global > 0 needs q/k/v_global, global_idx, global_count");
  if (has_global && (global_chunk <= 0 || num_splits <= 0 ||
                     static_cast<long long>(global_chunk) * num_splits < static_cast<long long>(N) + P))
    return fail_args("global_chunk * num_splits must cover N + P");
  std::memset(&p, 0, sizeof(p));
  p.B = B;
  p.N = N;
  p.H = H;
  p.D = D;
  p.P = P;
  p.window = window < N ? window : N;
  p.scale = scale;
  p.scale_log2 = scale * 1.4426950408889634f;
  p.dropout_p = dropout_p;
  p.keep_scale = 1.f / (1.f - dropout_p);
  p.seed = seed;
  p.max_global = has_global ? max_global : 0;
  p.global_chunk = has_global ? global_chunk : 1;
  p.num_splits = has_global ? num_splits : 1;
  p.q = q;
  p.k = k;
  p.v = v;
  p.qg = has_global ? qg : nullptr;
  p.kg = has_global ? kg : nullptr;
  p.vg = has_global ? vg : nullptr;
  p.pk = P > 0 ? pkey : nullptr;
  p.pv = P > 0 ? pval : nullptr;
  p.key_padding = static_cast<const uint8_t*>(key_padding);
  p.global_idx = has_global ? static_cast<const int32_t*>(global_idx) : nullptr;
  p.global_count = has_global ? static_cast<const int32_t*>(global_count) : nullptr;
  p.tok = static_cast<int32_t*>(tok);
  const char* simt = std::getenv("PREFIX_KERNELS_CUDA_SIMT");
  p.simt_only = (simt != nullptr && simt[0] != '\0' && simt[0] != '0') ? 1 : 0;
  return PK_OK;
}

template <bool Forward>
cudaError_t dispatch(int dtype, const pk::Params& p, cudaStream_t s) {
#define PK_CASE(T, DIM) \
  if (p.D == DIM) return Forward ? pk::launch_forward<T, DIM>(p, s) : pk::launch_backward<T, DIM>(p, s);
#define PK_DTYPE(T) \
  PK_CASE(T, 16)    \
  PK_CASE(T, 32)    \
  PK_CASE(T, 64)    \
  PK_CASE(T, 128)
  if (dtype == pk::DTYPE_FP16) {
    PK_DTYPE(__half)
  } else if (dtype == pk::DTYPE_BF16) {
    PK_DTYPE(__nv_bfloat16)
  } else if (dtype == pk::DTYPE_FP32) {
    PK_DTYPE(float)
  }
#undef PK_DTYPE
#undef PK_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

// Bumped whenever a signature below changes; the Python loader refuses a library with another version.
int pk_abi_version(void) { return 1; }

const char* pk_last_error(void) { return g_last_error; }

int pk_supports_head_dim(int d) { return head_dim_supported(d) ? 1 : 0; }

// Number of fp32 elements of the forward partials workspace `gpart`.
long long pk_forward_workspace_floats(int B, int H, int D, int max_global, int num_splits) {
  return static_cast<long long>(B) * H * max_global * num_splits * (D + 2);
}

int pk_forward(int dtype, int B, int N, int H, int D, int P, int window, float scale, float dropout_p,
               unsigned long long seed, const void* q, const void* k, const void* v, const void* q_global,
               const void* k_global, const void* v_global, const void* prefix_k, const void* prefix_v,
               const void* key_padding_mask, const void* global_idx, const void* global_count, int max_global,
               int global_chunk, int num_splits, void* out, float* lse, void* tok_ws, float* gpart_ws,
               void* stream) {
  pk::Params p;
  int rc = fill_common(p, dtype, B, N, H, D, P, window, scale, dropout_p, seed, q, k, v, q_global, k_global,
                       v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count, max_global,
                       global_chunk, num_splits, tok_ws);
  if (rc != PK_OK) return rc;
  if (out == nullptr || lse == nullptr) return fail_args("null out or lse");
  if (p.max_global > 0 && gpart_ws == nullptr) return fail_args("null gpart workspace");
  p.out = out;
  p.lse = lse;
  p.gpart = gpart_ws;
  return check_cuda(dispatch<true>(dtype, p, static_cast<cudaStream_t>(stream)), "forward launch");
}

int pk_backward(int dtype, int B, int N, int H, int D, int P, int window, float scale, float dropout_p,
                unsigned long long seed, const void* q, const void* k, const void* v, const void* q_global,
                const void* k_global, const void* v_global, const void* prefix_k, const void* prefix_v,
                const void* key_padding_mask, const void* global_idx, const void* global_count, int max_global,
                int global_chunk, int num_splits, const void* out, const float* lse, const void* grad_out,
                void* dq, void* dk, void* dv, void* dq_global, void* dk_global, void* dv_global, void* tok_ws,
                float* delta_ws, float* ws_dk_gslot, float* ws_dv_gslot, float* ws_dqg_gslot, float* ws_dpk,
                float* ws_dpv, void* stream) {
  pk::Params p;
  int rc = fill_common(p, dtype, B, N, H, D, P, window, scale, dropout_p, seed, q, k, v, q_global, k_global,
                       v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count, max_global,
                       global_chunk, num_splits, tok_ws);
  if (rc != PK_OK) return rc;
  if (out == nullptr || lse == nullptr || grad_out == nullptr || delta_ws == nullptr)
    return fail_args("null out, lse, grad_out or delta workspace");
  if (dq == nullptr || dk == nullptr || dv == nullptr) return fail_args("null dq, dk or dv");
  if (P > 0 && (ws_dpk == nullptr || ws_dpv == nullptr)) return fail_args("null prefix gradient workspace");
  if (p.max_global > 0 && (dq_global == nullptr || dk_global == nullptr || dv_global == nullptr ||
                           ws_dk_gslot == nullptr || ws_dv_gslot == nullptr || ws_dqg_gslot == nullptr))
    return fail_args("null global gradient or workspace");
  p.out = const_cast<void*>(out);
  p.lse = const_cast<float*>(lse);
  p.dout = grad_out;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.dqg = p.max_global > 0 ? dq_global : nullptr;
  p.dkg = p.max_global > 0 ? dk_global : nullptr;
  p.dvg = p.max_global > 0 ? dv_global : nullptr;
  p.delta = delta_ws;
  p.ws_dk_gslot = ws_dk_gslot;
  p.ws_dv_gslot = ws_dv_gslot;
  p.ws_dqg_gslot = ws_dqg_gslot;
  p.ws_dpk = ws_dpk;
  p.ws_dpv = ws_dpv;
  return check_cuda(dispatch<false>(dtype, p, static_cast<cudaStream_t>(stream)), "backward launch");
}

}  // extern "C"
