// The token table (token_table.h). Its kernels depend on neither the dtype nor the head dim, so they are
// compiled here once rather than in every launcher's translation unit.

#include "common.cuh"
#include "token_table.h"

namespace pk {

__global__ void build_tok_kernel(Params p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= static_cast<int64_t>(p.B) * p.N) return;
  const bool pad = p.key_padding != nullptr && p.key_padding[t] != 0;
  p.tok[t] = pad ? TOK_PAD : TOK_LOCAL;
}

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

cudaError_t launch_build_tok(const Params& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.B) * p.N;
  build_tok_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.max_global > 0) {
    const int64_t m = static_cast<int64_t>(p.B) * p.max_global;
    scatter_global_tok_kernel<<<static_cast<unsigned>((m + 255) / 256), 256, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace pk
