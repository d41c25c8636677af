// Backward kernels for __nv_bfloat16, head dims 16/32/64/128 (a file per dtype and direction, built in parallel).
#include "launch.cuh"

namespace pk {
PK_INSTANTIATE_BACKWARD(__nv_bfloat16)
}  // namespace pk
