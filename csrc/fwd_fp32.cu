// Forward kernels for float, head dims 16/32/64/128 (a file per dtype and direction, built in parallel).
#include "launch.cuh"

namespace pk {
PK_INSTANTIATE_FORWARD(float)
}  // namespace pk
