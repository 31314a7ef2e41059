// Launcher of the float32 SIMT flash-attention forward (flash_fwd_f32_kernel.cuh).
#include "cuda/flash_fwd_f32_kernel.cuh"
#include "cuda/flash_fwd_launch_impl.cuh"

namespace cp_attention {
namespace flash {

void launch_fwd_f32(const char* op, FwdParams p, cudaStream_t stream) {
  p.n_mblocks = static_cast<int>(cuda_util::ceil_div(p.Sq, kF32BlockM));
  const unsigned int grid = grid_size(op, p);
  const size_t smem = f32_smem_bytes(p.D);
  allow_smem(flash_fwd_f32_kernel, smem);
  flash_fwd_f32_kernel<<<grid, kF32Threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace flash
}  // namespace cp_attention
