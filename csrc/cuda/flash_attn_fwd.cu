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
#include <ATen/ops/neg.h>
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

namespace cp_attention {
namespace {

using flash::FwdParams;

// Query/key positions and (batch, head, query block) indices are 32-bit in the kernels; the margin keeps
// "position + block size" from overflowing.
constexpr int64_t kMaxSeqLen = INT_MAX - 1024;

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
  TORCH_CHECK_VALUE(d.Sq <= kMaxSeqLen && d.Sk <= kMaxSeqLen, op,
                    ": sequence lengths must be below 2^31 - 1024 on CUDA, got Sq=", d.Sq, ", Sk=", d.Sk);
  if (d.B * d.H * d.Sq == 0) return;  // no rows (an empty Sk still writes out 0 / lse -inf below)

  double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
  at::Tensor q = q_in;
  if (q.scalar_type() != at::kFloat) {
    // The tensor-core kernel needs scale > 0 (it takes the row maximum of the raw scores). A negative scale
    // becomes (-q).k * |scale|, which is exact (negation only flips sign bits); scale 0 becomes one so small
    // that every visible score still weighs exactly 1 (|q.k| * 1e-30 rounds away next to 1).
    if (s < 0.0) {
      q = at::neg(q_in);
      s = -s;
    } else if (s == 0.0) {
      s = 1e-30;
    }
  }

  FwdParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_ss = out.stride(1), p.o_sh = out.stride(2), p.o_sd = out.stride(3);
  p.l_sb = lse.stride(0), p.l_sh = lse.stride(1), p.l_ss = lse.stride(2);
  if (kv_mask.has_value()) {
    p.mask = reinterpret_cast<const uint8_t*>(kv_mask->const_data_ptr<bool>());
    p.m_sb = kv_mask->stride(0);
    p.m_ss = kv_mask->stride(1);
  }
  TORCH_CHECK_VALUE(d.B * d.H <= INT_MAX, op, ": B * H must be below 2^31 on CUDA, got ", d.B * d.H);
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.group = static_cast<int>(d.H / d.Hkv);
  p.Sq = static_cast<int>(d.Sq);
  p.Sk = static_cast<int>(d.Sk);
  p.D = static_cast<int>(d.D);
  p.scale_log2 = static_cast<float>(s * M_LOG2E);
  p.causal = causal;
  p.accumulate = accumulate;
  p.out_f32 = out.scalar_type() == at::kFloat;
  // Pairs of adjacent out elements move as one access when they are contiguous and aligned to the pair.
  p.out_pair = cuda_util::rows_aligned(out, 2 * static_cast<int64_t>(out.element_size()));
  // cp.async moves 16-byte chunks: every row start 16-byte aligned and rows a whole number of chunks.
  const int64_t chunk = 16 / static_cast<int64_t>(q.element_size());
  p.q_vec = d.D % chunk == 0 && cuda_util::rows_aligned(q, 16);
  p.k_vec = d.D % chunk == 0 && cuda_util::rows_aligned(k, 16);
  p.v_vec = d.D % chunk == 0 && cuda_util::rows_aligned(v, 16);

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
