// Row classification, once per call: tok[b, i] = -2 padding, -1 local, g >= 0 global slot g.

#pragma once

#include "common.cuh"

namespace pk {

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

}  // namespace pk
