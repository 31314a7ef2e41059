// Whether the CUDA kernels of this build can run on a device (defined in cuda/merge_attn_states.cu, exposed
// to Python by build_info.cpp; cp_attention/attention.py falls back to other kernels where they cannot).
#pragma once

#include <cstdint>

namespace cp_attention {

// True when the build holds an image of its kernels that loads on CUDA device `device`: SASS for its
// architecture, or PTX the driver can compile for it. False where the runtime reports that no image fits
// (cudaErrorNoKernelImageForDevice); other CUDA errors raise.
bool cuda_kernel_image_fits(int64_t device);

}  // namespace cp_attention
