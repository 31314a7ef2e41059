// CUDA flash-attention forward returning the LSE (DESIGN section 1), and its fused ring step
// flash_attn_fwd_acc_, which merges the result into a running (out, lse) in the kernel's epilogue instead
// of writing a partial (out, lse) that a merge would read back. Device code: flash_fwd_kernel.cuh,
// flash_fwd_sm90_kernel.cuh and flash_fwd_f32_kernel.cuh; the kernels are instantiated in flash_fwd_hdim*.cu,
// flash_fwd_sm90_hdim*.cu and flash_fwd_f32.cu (flash_fwd_launch.h).
//
// float16 / bfloat16 run on tensor cores: on sm_90 devices (when the build holds sm_90a code) through the
// wgmma kernel at D <= 64 and 96 < D <= 128 (compiled for 64 and 128), elsewhere through the mma.sync kernel
// with the head dim compiled for 32, 64, 96, 128 and 256 (other D are zero-padded up to the next of these
// inside the kernels); float32 runs on a SIMT kernel. The environment variable CP_ATTENTION_CUDA_FWD_KERNEL,
// read per call, overrides the choice: "mma" forces the mma.sync kernel, "sm90" the wgmma one (an error where
// it cannot run), "auto" or unset chooses as above.
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

// Whether the wgmma kernel runs this call (see the top of this file).
bool use_sm90_kernel(const char* op, const FwdParams& p) {
  const char* knob = std::getenv("CP_ATTENTION_CUDA_FWD_KERNEL");
  const bool force_mma = knob != nullptr && std::strcmp(knob, "mma") == 0;
  const bool force_sm90 = knob != nullptr && std::strcmp(knob, "sm90") == 0;
  TORCH_CHECK_VALUE(knob == nullptr || force_mma || force_sm90 || std::strcmp(knob, "auto") == 0 || *knob == 0,
                    op, ": CP_ATTENTION_CUDA_FWD_KERNEL must be auto, mma or sm90, got '", knob, "'");
  if (force_mma) return false;
  const bool built = std::strstr(CP_ATTENTION_CUDA_ARCHS, "9.0a") != nullptr;
  const bool head_dim = flash::sm90_head_dim(p.D) != 0;
  const bool device = at::cuda::getCurrentDeviceProperties()->major == 9;
  if (force_sm90) {
    TORCH_CHECK_VALUE(built && head_dim && device, op,
                      ": CP_ATTENTION_CUDA_FWD_KERNEL=sm90 needs a build with sm_90a code (this one: '",
                      CP_ATTENTION_CUDA_ARCHS, "'), an sm_90 device and D <= 64 or 96 < D <= 128 (got D=", p.D, ")");
  }
  return built && head_dim && device;
}

template <typename T>
void dispatch_16bit(const char* op, const FwdParams& p, cudaStream_t stream) {
  if (use_sm90_kernel(op, p)) {
    if (flash::sm90_head_dim(p.D) == 64) flash::launch_fwd_sm90<T, 64>(op, p, stream);
    else flash::launch_fwd_sm90<T, 128>(op, p, stream);
    return;
  }
  dispatch_head_dim<T>(op, p, stream);
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
    case at::kHalf: dispatch_16bit<__half>(op, p, stream); break;
    case at::kBFloat16: dispatch_16bit<__nv_bfloat16>(op, p, stream); break;
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
