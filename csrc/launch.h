// The launchers api.cu dispatches to: declared here, defined in launch.cuh and instantiated once per (dtype,
// direction) by fwd_*.cu / bwd_*.cu, so api.cu compiles without the kernels and each kernel is built once.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "params.h"

namespace pk {

template <typename T, int D>
cudaError_t launch_forward(const Params& p, cudaStream_t stream);

template <typename T, int D>
cudaError_t launch_backward(const Params& p, cudaStream_t stream);

}  // namespace pk
