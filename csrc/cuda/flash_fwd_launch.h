// Host-side launchers of the CUDA flash-attention forward kernels. Each tensor-core head dim is compiled in
// its own translation unit (flash_fwd_hdim*.cu) so a parallel build spreads the heavy instantiations over
// cores; flash_attn_fwd.cu only dispatches to them.
#pragma once

#include <cuda_runtime.h>

#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_fwd_sm90_tma_kernel.cuh"

namespace cp_attention {
namespace flash {

// Launches the tensor-core kernel for T in {__half, __nv_bfloat16} and kD in {32, 64, 96, 128, 256}
// (defined in flash_fwd_launch_impl.cuh, instantiated in flash_fwd_hdim<kD>.cu). Sets p.n_mblocks.
template <typename T, int kD>
void launch_fwd_tc(const char* op, FwdParams p, cudaStream_t stream);

// Launches the Hopper wgmma kernel (flash_fwd_sm90_kernel.cuh) for T in {__half, __nv_bfloat16} and kD in
// {64, 128}; only for sm_90 devices and builds that hold sm_90a code (instantiated in
// flash_fwd_sm90_hdim<kD>.cu). Sets p.n_mblocks.
template <typename T, int kD>
void launch_fwd_sm90(const char* op, FwdParams p, cudaStream_t stream);

// Launches the warp-specialized Hopper kernel (flash_fwd_sm90_tma_kernel.cuh) with q, k and v's tensor maps
// (flash_fwd_tma.h); same dtypes, head dims and conditions as launch_fwd_sm90, whose translation units
// instantiate it too. Sets p.n_mblocks.
template <typename T, int kD>
void launch_fwd_sm90_tma(const char* op, FwdParams p, const Sm90TmaMaps& maps, cudaStream_t stream);

// Launches the float32 SIMT kernel (flash_fwd_f32.cu). Sets p.n_mblocks.
void launch_fwd_f32(const char* op, FwdParams p, cudaStream_t stream);

}  // namespace flash
}  // namespace cp_attention
