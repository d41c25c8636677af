// Dropout: Philox4x32-10 keyed by the 64-bit seed; counter = (column, row, h, b) where the column is the key
// position j (< N) or N + prefix index. Every (row, column) pair occurs in exactly one key set, so forward and
// backward draw the same bit. Kept probabilities are scaled by 1/(1-p); l (and so the LSE) is the undropped
// softmax denominator.

#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "params.h"

namespace pk {

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

}  // namespace pk
