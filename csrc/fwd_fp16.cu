// Forward kernels for __half, head dims 16/32/64/128 (a file per dtype and direction, built in parallel).
#include "launch.cuh"

namespace pk {
PK_INSTANTIATE_FORWARD(__half)
}  // namespace pk
