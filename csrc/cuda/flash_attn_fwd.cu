// CUDA flash-attention forward returning the LSE (DESIGN section 1), and its fused ring step
// flash_attn_fwd_acc_, which merges the result into a running (out, lse) in the kernel's epilogue instead
// of writing a partial (out, lse) that a merge would read back. Device code: flash_fwd_kernel.cuh; the
// kernels are instantiated in flash_fwd_hdim*.cu and flash_fwd_f32.cu (flash_fwd_launch.h).
//
// float16 / bfloat16 run on tensor cores with the head dim compiled for 32, 64, 96, 128 and 256 (other D
// are zero-padded up to the next of these inside the kernel); float32 runs on a SIMT kernel.
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
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/flash_fwd_launch.h"
#include "cuda/flash_fwd_params.h"

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
    case at::kHalf: dispatch_head_dim<__half>(op, p, stream); break;
    case at::kBFloat16: dispatch_head_dim<__nv_bfloat16>(op, p, stream); break;
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
