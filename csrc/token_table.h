// tok[b, i] (-2 padding, -1 local, g >= 0 global slot g) from key_padding, global_idx and global_count; the
// launchers read it instead of classifying rows again in every kernel.

#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace pk {

// Fills p.tok (B, N) on `stream`; returns the launch error, if any.
cudaError_t launch_build_tok(const Params& p, cudaStream_t stream);

}  // namespace pk
