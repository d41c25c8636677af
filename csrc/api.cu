// C API of the CUDA backend: `extern "C"` entry points. pk_forward / pk_backward take a pointer to a filled
// `pk_params` (params.h: raw device pointers, sizes, scalars) and a cudaStream_t (as void*). Every entry point
// that can fail returns 0 on success, else a nonzero code whose message pk_last_error() returns (per host thread).
// No torch headers: the library loads under any torch.
//
// ABI: a caller sets params.abi_version = PK_ABI_VERSION (pk_abi_version()) and params.struct_size =
// sizeof(pk_params); a call whose pair differs from the library's fails with an argument error before reading any
// other field. pk_params_size() and pk_params_field_{count,name,offset,size}() export the struct's layout, so a
// binding can check its mirror of the struct without a GPU.
//
// Tensors are contiguous: q, k, v, q_global, k_global, v_global, out, grads (B, N, H, D); prefix (B, P, H, D);
// key_padding_mask (B, N) bool (1 byte); global_idx (B, max_global) int32 in increasing order with entries
// past global_count[b] unused; global_count (B,) int32; lse and delta (B, H, N) fp32.
// Workspaces the caller allocates (gpart_ws's size from pk_forward_workspace_floats below):
//   forward:  tok_ws (B, N) int32; gpart_ws (B, H, max_global, num_splits, D + 2) fp32
//   backward: tok_ws (B, N) int32; delta_ws (B, H, N) fp32; and ZEROED fp32 dk_gslot_ws, dv_gslot_ws,
//             dqg_gslot_ws (B, max_global, H, D) and dprefix_k_ws, dprefix_v_ws (B, P, H, D). The prefix
//             gradients are left in dprefix_k_ws, dprefix_v_ws (fp32) for the caller to convert.
// Fields a direction does not use are ignored. Without global tokens (max_global = 0) the global projections,
// index and count, and the global gradients and workspaces are ignored; with P = 0 the prefix ones are.

#include <cstddef>
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

struct FieldInfo {
  const char* name;
  int offset;
  int size;
};

#define PK_FIELD_INFO(type, name) {#name, static_cast<int>(offsetof(pk_params, name)), static_cast<int>(sizeof(type))},
constexpr FieldInfo kFields[] = {PK_PARAMS_FIELDS(PK_FIELD_INFO)};
#undef PK_FIELD_INFO
constexpr int kFieldCount = static_cast<int>(sizeof(kFields) / sizeof(kFields[0]));

// Checks shared by both directions; fills pk::Params from them. No field past abi_version and struct_size is
// read when either differs from the library's: the caller's struct may then have another layout.
int fill_common(pk::Params& p, const pk_params* a) {
  if (a == nullptr) return fail_args("null params");
  if (a->abi_version != PK_ABI_VERSION || a->struct_size != sizeof(pk_params)) {
    char what[160];
    std::snprintf(what, sizeof(what), "params abi_version %u / struct_size %u, the library expects %d / %zu",
                  a->abi_version, a->struct_size, PK_ABI_VERSION, sizeof(pk_params));
    return fail_args(what);
  }
  const int B = a->B, N = a->N, H = a->H, D = a->D, P = a->P, window = a->window, max_global = a->max_global;
  const float scale = a->scale, dropout_p = a->dropout_p;
  if (a->dtype < pk::DTYPE_FP16 || a->dtype > pk::DTYPE_FP32) return fail_args("dtype code must be 0, 1 or 2");
  if (B <= 0 || N <= 0 || H <= 0) return fail_args("B, N and H must be positive");
  if (!head_dim_supported(D)) return fail_args("head dim must be 16, 32, 64 or 128");
  if (P < 0 || window < 0 || max_global < 0) return fail_args("P, window and max_global must be >= 0");
  if (!(scale > 0.f) || !(dropout_p >= 0.f && dropout_p < 1.f)) return fail_args("scale or dropout_p out of range");
  if (a->q == nullptr || a->k == nullptr || a->v == nullptr || a->tok_ws == nullptr)
    return fail_args("null q, k, v or tok");
  if (P > 0 && (a->prefix_k == nullptr || a->prefix_v == nullptr))
    return fail_args("P > 0 but prefix pointers are null");
  // Global rows need all of: projections, index, count. Without projections there are no global tokens.
  const bool has_global = max_global > 0 && a->q_global != nullptr && a->k_global != nullptr &&
                          a->v_global != nullptr && a->global_idx != nullptr && a->global_count != nullptr;
  if (max_global > 0 && !has_global) return fail_args("max_global > 0 needs q/k/v_global, global_idx, global_count");
  if (has_global && (a->global_chunk <= 0 || a->num_splits <= 0 ||
                     static_cast<long long>(a->global_chunk) * a->num_splits < static_cast<long long>(N) + P))
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
  p.seed = a->seed;
  p.max_global = has_global ? max_global : 0;
  p.global_chunk = has_global ? a->global_chunk : 1;
  p.num_splits = has_global ? a->num_splits : 1;
  p.q = a->q;
  p.k = a->k;
  p.v = a->v;
  p.qg = has_global ? a->q_global : nullptr;
  p.kg = has_global ? a->k_global : nullptr;
  p.vg = has_global ? a->v_global : nullptr;
  p.pk = P > 0 ? a->prefix_k : nullptr;
  p.pv = P > 0 ? a->prefix_v : nullptr;
  p.key_padding = static_cast<const uint8_t*>(a->key_padding_mask);
  p.global_idx = has_global ? static_cast<const int32_t*>(a->global_idx) : nullptr;
  p.global_count = has_global ? static_cast<const int32_t*>(a->global_count) : nullptr;
  p.tok = static_cast<int32_t*>(a->tok_ws);
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

int pk_abi_version(void) { return PK_ABI_VERSION; }

const char* pk_last_error(void) { return g_last_error; }

int pk_supports_head_dim(int d) { return head_dim_supported(d) ? 1 : 0; }

// Layout of pk_params: its size, and per field (0 <= i < count, in declaration order) its name, byte offset and
// byte size; name NULL and offset / size -1 for any other i.
int pk_params_size(void) { return static_cast<int>(sizeof(pk_params)); }
int pk_params_field_count(void) { return kFieldCount; }
const char* pk_params_field_name(int i) { return i >= 0 && i < kFieldCount ? kFields[i].name : nullptr; }
int pk_params_field_offset(int i) { return i >= 0 && i < kFieldCount ? kFields[i].offset : -1; }
int pk_params_field_size(int i) { return i >= 0 && i < kFieldCount ? kFields[i].size : -1; }

// Number of fp32 elements of the forward partials workspace `gpart_ws`.
long long pk_forward_workspace_floats(int B, int H, int D, int max_global, int num_splits) {
  return static_cast<long long>(B) * H * max_global * num_splits * (D + 2);
}

int pk_forward(const pk_params* params, void* stream) {
  pk::Params p;
  const int rc = fill_common(p, params);
  if (rc != PK_OK) return rc;
  const pk_params& a = *params;
  if (a.out == nullptr || a.lse == nullptr) return fail_args("null out or lse");
  if (p.max_global > 0 && a.gpart_ws == nullptr) return fail_args("null gpart workspace");
  p.out = a.out;
  p.lse = a.lse;
  p.gpart = a.gpart_ws;
  return check_cuda(dispatch<true>(a.dtype, p, static_cast<cudaStream_t>(stream)), "forward launch");
}

int pk_backward(const pk_params* params, void* stream) {
  pk::Params p;
  const int rc = fill_common(p, params);
  if (rc != PK_OK) return rc;
  const pk_params& a = *params;
  if (a.out == nullptr || a.lse == nullptr || a.grad_out == nullptr || a.delta_ws == nullptr)
    return fail_args("null out, lse, grad_out or delta workspace");
  if (a.dq == nullptr || a.dk == nullptr || a.dv == nullptr) return fail_args("null dq, dk or dv");
  if (a.P > 0 && (a.dprefix_k_ws == nullptr || a.dprefix_v_ws == nullptr))
    return fail_args("null prefix gradient workspace");
  if (p.max_global > 0 && (a.dq_global == nullptr || a.dk_global == nullptr || a.dv_global == nullptr ||
                           a.dk_gslot_ws == nullptr || a.dv_gslot_ws == nullptr || a.dqg_gslot_ws == nullptr))
    return fail_args("null global gradient or workspace");
  p.out = a.out;
  p.lse = a.lse;
  p.dout = a.grad_out;
  p.dq = a.dq;
  p.dk = a.dk;
  p.dv = a.dv;
  p.dqg = p.max_global > 0 ? a.dq_global : nullptr;
  p.dkg = p.max_global > 0 ? a.dk_global : nullptr;
  p.dvg = p.max_global > 0 ? a.dv_global : nullptr;
  p.delta = a.delta_ws;
  p.ws_dk_gslot = a.dk_gslot_ws;
  p.ws_dv_gslot = a.dv_gslot_ws;
  p.ws_dqg_gslot = a.dqg_gslot_ws;
  p.ws_dpk = a.dprefix_k_ws;
  p.ws_dpv = a.dprefix_v_ws;
  return check_cuda(dispatch<false>(a.dtype, p, static_cast<cudaStream_t>(stream)), "backward launch");
}

}  // extern "C"
