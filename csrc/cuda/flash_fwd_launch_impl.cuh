// Launch helpers and the definition of flash::launch_fwd_tc, included by the kernels' own translation units
// (flash_fwd_hdim*.cu, flash_fwd_f32.cu), never by the dispatcher.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_fwd_launch.h"
#include "cuda/flash_fwd_sm90_kernel.cuh"
#include "cuda/flash_fwd_sm90_tma_kernel.cuh"

namespace cp_attention {
namespace flash {

// Opts a kernel into more than the default 48 KB of dynamic shared memory.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

inline unsigned int grid_size(const char* op, const FwdParams& p) {
  const int64_t blocks = static_cast<int64_t>(p.B) * p.H * p.n_mblocks;
  TORCH_CHECK_VALUE(blocks <= INT_MAX, op, ": B * H * ceil(Sq / block) = ", blocks,
                    " exceeds the CUDA grid limit (", INT_MAX, ")");
  return static_cast<unsigned int>(blocks);
}

// The tile shapes of each head dim: TcTiles (flash_fwd_kernel.cuh).
template <typename T, int kD>
void launch_fwd_tc(const char* op, FwdParams p, cudaStream_t stream) {
  using Tiles = TcTiles<kD>;
  using Cfg = typename Tiles::Cfg;
  constexpr int kBlockM = Tiles::kBlockM;
  p.n_mblocks = static_cast<int>(cuda_util::ceil_div(p.Sq, kBlockM));
  const unsigned int grid = grid_size(op, p);
  auto kernel = flash_fwd_tc_kernel<T, Cfg, Tiles::kMinBlocks>;
  allow_smem(kernel, Cfg::kSmemBytes);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kD>
void launch_fwd_sm90(const char* op, FwdParams p, cudaStream_t stream) {
  using Tl = Sm90Tiles<kD>;
  p.n_mblocks = static_cast<int>(cuda_util::ceil_div(p.Sq, Tl::kBlockM));
  const unsigned int grid = grid_size(op, p);
  auto kernel = flash_fwd_sm90_kernel<T, kD>;
  allow_smem(kernel, Tl::kSmemBytes);
  kernel<<<grid, Tl::kThreads, Tl::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kD>
void launch_fwd_sm90_tma(const char* op, FwdParams p, const Sm90TmaMaps& maps, cudaStream_t stream) {
  using Tt = Sm90TmaTiles<kD>;
  p.n_mblocks = static_cast<int>(cuda_util::ceil_div(p.Sq, Tt::Tl::kBlockM));
  const unsigned int grid = grid_size(op, p);
  auto kernel = flash_fwd_sm90_tma_kernel<T, kD>;
  allow_smem(kernel, Tt::kSmemBytes);
  kernel<<<grid, Tt::kThreads, Tt::kSmemBytes, stream>>>(p, maps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace flash
}  // namespace cp_attention

// Instantiates the launcher for both 16-bit dtypes at one head dim.
#define CP_ATTENTION_INSTANTIATE_FWD_TC(kD)                                                              \
  template void cp_attention::flash::launch_fwd_tc<__half, kD>(const char*, cp_attention::flash::FwdParams, \
                                                               cudaStream_t);                          \
  template void cp_attention::flash::launch_fwd_tc<__nv_bfloat16, kD>(                                 \
      const char*, cp_attention::flash::FwdParams, cudaStream_t);

#define CP_ATTENTION_INSTANTIATE_FWD_SM90(kD)                                                            \
  template void cp_attention::flash::launch_fwd_sm90<__half, kD>(const char*,                            \
                                                                 cp_attention::flash::FwdParams,         \
                                                                 cudaStream_t);                          \
  template void cp_attention::flash::launch_fwd_sm90<__nv_bfloat16, kD>(                                 \
      const char*, cp_attention::flash::FwdParams, cudaStream_t);                                        \
  template void cp_attention::flash::launch_fwd_sm90_tma<__half, kD>(                                    \
      const char*, cp_attention::flash::FwdParams, const cp_attention::flash::Sm90TmaMaps&, cudaStream_t); \
  template void cp_attention::flash::launch_fwd_sm90_tma<__nv_bfloat16, kD>(                             \
      const char*, cp_attention::flash::FwdParams, const cp_attention::flash::Sm90TmaMaps&, cudaStream_t);
