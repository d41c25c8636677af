// Forward kernels for __nv_bfloat16, head dims 16/32/64/128 (one file per dtype so the build runs in parallel).
#include "longformer_attention.cuh"

namespace pk {
PK_INSTANTIATE_FORWARD(__nv_bfloat16)
}  // namespace pk
