// CUDA flash-attention forward returning the LSE (DESIGN section 1), and its fused ring step
// flash_attn_fwd_acc_, which merges the result into a running (out, lse) in the kernel's epilogue instead
// of writing a partial (out, lse) that a merge would read back. Device code: flash_fwd_kernel.cuh,
// flash_fwd_sm90_kernel.cuh, flash_fwd_sm90_tma_kernel.cuh and flash_fwd_f32_kernel.cuh; the kernels are
// instantiated in flash_fwd_hdim*.cu, flash_fwd_sm90_hdim*.cu and flash_fwd_f32.cu (flash_fwd_launch.h).
//
// float16 / bfloat16 run on tensor cores: on sm_90 devices (when the build holds sm_90a code) at D <= 64
// and 96 < D <= 128 (compiled for 64 and 128) through a wgmma kernel, the warp-specialized one that loads by
// TMA (flash_fwd_sm90_tma_kernel.cuh) where q, k and v have tensor maps (flash_fwd_tma.h: aligned layouts
// of BSHD or BHSD memory), else the one that loads by cp.async (flash_fwd_sm90_kernel.cuh); elsewhere
// through the mma.sync kernel with the head dim compiled for 32, 64, 96, 128 and 256 (other D are
// zero-padded up to the next of these inside the kernels); float32 runs on a SIMT kernel. The environment
// variable CP_ATTENTION_CUDA_FWD_KERNEL, read per call, overrides the choice: "mma" forces the mma.sync
// kernel, "sm90" the cp.async wgmma one, "sm90_tma" the TMA one (an error where it cannot run),
// "sm90_tma_no_pingpong" the TMA one with its compute warpgroups issuing without turns (to measure what the
// turns buy), "auto" or unset chooses as above.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cp_attention_build_config.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/flash_fwd_launch.h"
#include "cuda/flash_fwd_params.h"
#include "cuda/flash_fwd_sm90_kernel.cuh"
#include "cuda/flash_fwd_sm90_tma_kernel.cuh"
#include "cuda/flash_fwd_tma.h"

namespace cp_attention {
namespace {

using flash::FwdParams;

template <typename T>
void dispatch_head_dim(const char* op, const FwdParams& p, cudaStream_t stream) {
  if (p.D <= 32) {
    flash::launch_fwd_tc<T, 32>(op, p, stream);
  } else if (p.D <= 64) {
    flash::launch_fwd_tc<T, 64>(op, p, stream);
  } else if (p.D <= 96) {
    flash::launch_fwd_tc<T, 96>(op, p, stream);
  } else if (p.D <= 128) {
    flash::launch_fwd_tc<T, 128>(op, p, stream);
  } else {
    flash::launch_fwd_tc<T, 256>(op, p, stream);  // D <= 256 is checked by check_attn_inputs
  }
}

// Which 16-bit kernel runs this call (see the top of this file).
enum class FwdKernel { kMma, kSm90, kSm90Tma, kSm90TmaNoPingPong };

FwdKernel choose_kernel(const char* op, const FwdParams& p, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, flash::Sm90TmaMaps& maps) {
  const char* knob = std::getenv("CP_ATTENTION_CUDA_FWD_KERNEL");
  auto is = [&](const char* name) { return knob != nullptr && std::strcmp(knob, name) == 0; };
  const bool no_pingpong = is("sm90_tma_no_pingpong");
  const bool tma_forced = is("sm90_tma") || no_pingpong;
  TORCH_CHECK_VALUE(knob == nullptr || *knob == 0 || is("auto") || is("mma") || is("sm90") || tma_forced,
                    op, ": CP_ATTENTION_CUDA_FWD_KERNEL must be auto, mma, sm90, sm90_tma or sm90_tma_no_pingpong, ",
                    "got '", knob, "'");
  if (is("mma")) return FwdKernel::kMma;
  const bool built = std::strstr(CP_ATTENTION_CUDA_ARCHS, "9.0a") != nullptr;
  const bool head_dim = flash::sm90_head_dim(p.D) != 0;
  const bool device = at::cuda::getCurrentDeviceProperties()->major == 9;
  const bool sm90 = built && head_dim && device;
  if (is("sm90") || tma_forced) {
    TORCH_CHECK_VALUE(sm90, op, ": CP_ATTENTION_CUDA_FWD_KERNEL=", knob,
                      " needs a build with sm_90a code (this one: '", CP_ATTENTION_CUDA_ARCHS,
                      "'), an sm_90 device and D <= 64 or 96 < D <= 128 (got D=", p.D, ")");
  }
  if (is("sm90")) return FwdKernel::kSm90;
  // Tensor maps are encoded only where the TMA kernel may run; Sk == 0 (no key to load) keeps the other.
  const bool tma = sm90 && p.Sk > 0 && flash::encode_sm90_maps(maps, q, k, v);
  if (tma_forced) {
    TORCH_CHECK_VALUE(tma, op, ": CP_ATTENTION_CUDA_FWD_KERNEL=", knob, " needs q, k and v that TMA can address: ",
                      "16-byte aligned, D a multiple of 8, strides that are multiples of 16 bytes, B outermost, ",
                      "no overlap, and Sk > 0");
    return no_pingpong ? FwdKernel::kSm90TmaNoPingPong : FwdKernel::kSm90Tma;
  }
  return tma ? FwdKernel::kSm90Tma : sm90 ? FwdKernel::kSm90 : FwdKernel::kMma;
}

template <typename T>
void dispatch_16bit(const char* op, const FwdParams& p, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, cudaStream_t stream) {
  flash::Sm90TmaMaps maps;
  const FwdKernel kernel = choose_kernel(op, p, q, k, v, maps);
  switch (kernel) {
    case FwdKernel::kSm90Tma:
    case FwdKernel::kSm90TmaNoPingPong: {
      FwdParams pt = p;
      pt.pingpong = kernel == FwdKernel::kSm90Tma;
      if (flash::sm90_head_dim(p.D) == 64) flash::launch_fwd_sm90_tma<T, 64>(op, pt, maps, stream);
      else flash::launch_fwd_sm90_tma<T, 128>(op, pt, maps, stream);
      return;
    }
    case FwdKernel::kSm90:
      if (flash::sm90_head_dim(p.D) == 64) flash::launch_fwd_sm90<T, 64>(op, p, stream);
      else flash::launch_fwd_sm90<T, 128>(op, p, stream);
      return;
    case FwdKernel::kMma:
      dispatch_head_dim<T>(op, p, stream);
      return;
  }
}

// q, k, v, kv_mask are validated; out [B, Sq, H, D] and lse [B, H, Sq] float32 are valid outputs (any
// strides, out's last one 1 or D == 1). Fills the parameters and launches the kernel for q's dtype.
void run_flash_fwd(const char* op, const AttnDims& d, const at::Tensor& q_in, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale,
                   bool causal, const std::optional<at::Tensor>& kv_mask, bool accumulate) {
  if (d.B * d.H * d.Sq == 0) return;  // no rows (an empty Sk still writes out 0 / lse -inf below)
  at::Tensor q;  // q_in, or -q_in when a negative scale is folded into it; alive until the launch
  const FwdParams p =
      flash::make_fwd_params(op, d, q_in, k, v, out, lse, scale, causal, kv_mask, accumulate, q);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kHalf: dispatch_16bit<__half>(op, p, q, k, v, stream); break;
    case at::kBFloat16: dispatch_16bit<__nv_bfloat16>(op, p, q, k, v, stream); break;
    default: flash::launch_fwd_f32(op, p, stream); break;  // float32 (dtypes are checked by check_attn_inputs)
  }
}

void check_on_cuda(const char* op, const at::Tensor& q) {
  // check_attn_inputs has already put q, k, v and kv_mask on one device.
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", q.device());
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, std::optional<double> scale,
                                                       bool causal, const std::optional<at::Tensor>& kv_mask) {
  constexpr const char* op = "cp_attention.flash_attn_fwd";
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask);
  check_on_cuda(op, q);
  c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({d.B, d.Sq, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Sq}, q.options().dtype(at::kFloat));
  run_flash_fwd(op, d, q, k, v, out, lse, scale, causal, kv_mask, /*accumulate=*/false);
  return {out, lse};
}

void flash_attn_fwd_acc_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, std::optional<double> scale, bool causal,
                             const std::optional<at::Tensor>& kv_mask) {
  constexpr const char* op = "cp_attention.flash_attn_fwd_acc_";
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask);
  check_acc_state(op, d, q, k, v, kv_mask, out, lse);
  check_on_cuda(op, q);
  c10::cuda::CUDAGuard device_guard(q.device());
  run_flash_fwd(op, d, q, k, v, out, lse, scale, causal, kv_mask, /*accumulate=*/true);
}

}  // namespace
}  // namespace cp_attention

TORCH_LIBRARY_IMPL(cp_attention, CUDA, m) {
  m.impl("flash_attn_fwd", &cp_attention::flash_attn_fwd_cuda);
  m.impl("flash_attn_fwd_acc_", &cp_attention::flash_attn_fwd_acc_cuda);
}
