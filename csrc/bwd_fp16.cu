// Backward kernels for __half, head dims 16/32/64/128 (one file per dtype so the build runs in parallel).
#include "longformer_attention.cuh"

namespace pk {
PK_INSTANTIATE_BACKWARD(__half)
}  // namespace pk
