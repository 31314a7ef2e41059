// CUDA flash-attention forward returning the LSE (docs/design.md, "LSE"), and its fused ring step
// flash_attn_fwd_acc_, which merges the result into a running (out, lse) in the kernel's epilogue instead
// of writing a partial (out, lse) that a merge would read back. Device code: flash_fwd_kernel.cuh,
// flash_fwd_sm90_kernel.cuh, flash_fwd_sm90_tma_kernel.cuh and flash_fwd_f32_kernel.cuh; the kernels are
// instantiated in flash_fwd_hdim*.cu, flash_fwd_sm90_hdim*.cu and flash_fwd_f32.cu (flash_fwd_launch.h).
//
// float16 / bfloat16 run on tensor cores, through the kernel the ops' `variant` argument names:
// - "default" or "mma": the mma.sync kernel, any sm_80+ device, the head dim compiled for 32, 64, 96, 128
//   and 256 (other D are zero-padded up to the next of these inside the kernel). The default: it is the one
//   a GPU run has shown right (cp_attention/kernel_variants.py names the run).
// - "sm90": the Hopper wgmma kernel that loads by cp.async (flash_fwd_sm90_kernel.cuh); "sm90_tma": the
//   warp-specialized one whose producer warpgroup loads by TMA (flash_fwd_sm90_tma_kernel.cuh), and
//   "sm90_tma_no_pingpong" the same with its compute warpgroups issuing without turns. They need a build
//   with sm_90a code, an sm_90 device and D <= 64 or 96 < D <= 128 (compiled for 64 and 128), the TMA ones
//   also q, k and v with tensor maps (flash_fwd_tma.h: aligned layouts of BSHD or BHSD memory) and Sk > 0;
//   a call they cannot run is an error. None of them has run on a GPU yet.
// - "auto": the TMA kernel where it can run, else the cp.async wgmma one, else mma.sync.
// float32 runs on a SIMT kernel whatever `variant` names.
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

constexpr const char* kVariantNames = "default, mma, sm90, sm90_tma, sm90_tma_no_pingpong or auto";

void check_variant_name(const char* op, c10::string_view variant) {
  const bool known = variant == "default" || variant == "mma" || variant == "sm90" || variant == "sm90_tma" ||
                     variant == "sm90_tma_no_pingpong" || variant == "auto";
  TORCH_CHECK_VALUE(known, op, ": variant must be ", kVariantNames, ", got '", variant, "'");
}

FwdKernel choose_kernel(const char* op, c10::string_view variant, const FwdParams& p, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, flash::Sm90TmaMaps& maps) {
  if (variant == "default" || variant == "mma") return FwdKernel::kMma;
  const bool any = variant == "auto";
  const bool built = std::strstr(CP_ATTENTION_CUDA_ARCHS, "9.0a") != nullptr;
  const bool head_dim = flash::sm90_head_dim(p.D) != 0;
  const bool device = at::cuda::getCurrentDeviceProperties()->major == 9;
  const bool sm90 = built && head_dim && device;
  TORCH_CHECK_VALUE(sm90 || any, op, ": variant='", variant, "' needs a build with sm_90a code (this one: '",
                    CP_ATTENTION_CUDA_ARCHS, "'), an sm_90 device and D <= 64 or 96 < D <= 128 (got D=", p.D,
                    ")");
  if (variant == "sm90") return FwdKernel::kSm90;
  // Tensor maps are encoded only where the TMA kernel may run; Sk == 0 (no key to load) keeps the other.
  const bool tma = sm90 && p.Sk > 0 && flash::encode_sm90_maps(maps, q, k, v);
  if (any) return tma ? FwdKernel::kSm90Tma : sm90 ? FwdKernel::kSm90 : FwdKernel::kMma;
  TORCH_CHECK_VALUE(tma, op, ": variant='", variant, "' needs q, k and v that TMA can address: 16-byte ",
                    "aligned, D a multiple of 8, strides that are multiples of 16 bytes, B outermost, no ",
                    "overlap, and Sk > 0");
  return variant == "sm90_tma" ? FwdKernel::kSm90Tma : FwdKernel::kSm90TmaNoPingPong;
}

template <typename T>
void dispatch_16bit(const char* op, c10::string_view variant, const FwdParams& p, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, cudaStream_t stream) {
  flash::Sm90TmaMaps maps;
  const FwdKernel kernel = choose_kernel(op, variant, p, q, k, v, maps);
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
                   bool causal, const std::optional<at::Tensor>& kv_mask, bool accumulate,
                   c10::string_view variant) {
  if (d.B * d.H * d.Sq == 0) return;  // no rows (an empty Sk still writes out 0 / lse -inf below)
  at::Tensor q;  // q_in, or -q_in when a negative scale is folded into it; alive until the launch
  const FwdParams p =
      flash::make_fwd_params(op, d, q_in, k, v, out, lse, scale, causal, kv_mask, accumulate, q);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kHalf: dispatch_16bit<__half>(op, variant, p, q, k, v, stream); break;
    case at::kBFloat16: dispatch_16bit<__nv_bfloat16>(op, variant, p, q, k, v, stream); break;
    default: flash::launch_fwd_f32(op, p, stream); break;  // float32 (dtypes are checked by check_attn_inputs)
  }
}

void check_on_cuda(const char* op, const at::Tensor& q) {
  // check_attn_inputs has already put q, k, v and kv_mask on one device.
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", q.device());
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, std::optional<double> scale,
                                                       bool causal, const std::optional<at::Tensor>& kv_mask,
                                                       c10::string_view variant) {
  constexpr const char* op = "cp_attention.flash_attn_fwd";
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask);
  check_on_cuda(op, q);
  check_variant_name(op, variant);
  c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({d.B, d.Sq, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Sq}, q.options().dtype(at::kFloat));
  run_flash_fwd(op, d, q, k, v, out, lse, scale, causal, kv_mask, /*accumulate=*/false, variant);
  return {out, lse};
}

void flash_attn_fwd_acc_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, std::optional<double> scale, bool causal,
                             const std::optional<at::Tensor>& kv_mask, c10::string_view variant) {
  constexpr const char* op = "cp_attention.flash_attn_fwd_acc_";
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask);
  check_acc_state(op, d, q, k, v, kv_mask, out, lse);
  check_on_cuda(op, q);
  check_variant_name(op, variant);
  c10::cuda::CUDAGuard device_guard(q.device());
  run_flash_fwd(op, d, q, k, v, out, lse, scale, causal, kv_mask, /*accumulate=*/true, variant);
}

}  // namespace
}  // namespace cp_attention

TORCH_LIBRARY_IMPL(cp_attention, CUDA, m) {
  m.impl("flash_attn_fwd", &cp_attention::flash_attn_fwd_cuda);
  m.impl("flash_attn_fwd_acc_", &cp_attention::flash_attn_fwd_acc_cuda);
}
