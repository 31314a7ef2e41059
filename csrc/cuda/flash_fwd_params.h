// Host side of the CUDA flash-attention forward: validated tensors -> the kernel's FwdParams. Plain host
// code (no CUDA runtime calls), so the lane-level CPU emulation of the kernels fills its parameters with the
// very code the CUDA op uses.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/neg.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/flash_fwd_kernel.cuh"

namespace cp_attention {
namespace flash {

// Query/key positions and (batch, head, query block) indices are 32-bit in the kernels; the margin keeps
// "position + block size" from overflowing.
constexpr int64_t kMaxSeqLen = INT_MAX - 1024;

// q, k, v, kv_mask are validated; out [B, Sq, H, D] and lse [B, H, Sq] float32 are valid outputs (any
// strides, out's last one 1 or D == 1). q_used receives the q the kernel must read: q itself, or -q when a
// negative scale is folded into it. n_mblocks is left for the launcher (it depends on the tile).
inline FwdParams make_fwd_params(const char* op, const AttnDims& d, const at::Tensor& q_in, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 std::optional<double> scale, bool causal,
                                 const std::optional<at::Tensor>& kv_mask, bool accumulate, at::Tensor& q_used) {
  TORCH_CHECK_VALUE(d.Sq <= kMaxSeqLen && d.Sk <= kMaxSeqLen, op,
                    ": sequence lengths must be below 2^31 - 1024 on CUDA, got Sq=", d.Sq, ", Sk=", d.Sk);
  TORCH_CHECK_VALUE(d.B * d.H <= INT_MAX, op, ": B * H must be below 2^31 on CUDA, got ", d.B * d.H);
  double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
  q_used = q_in;
  if (q_in.scalar_type() != at::kFloat) {
    // The tensor-core kernel needs scale > 0 (it takes the row maximum of the raw scores). A negative scale
    // becomes (-q).k * |scale|, which is exact (negation only flips sign bits); scale 0 becomes one so small
    // that every visible score still weighs exactly 1 (|q.k| * 1e-30 rounds away next to 1).
    if (s < 0.0) {
      q_used = at::neg(q_in);
      s = -s;
    } else if (s == 0.0) {
      s = 1e-30;
    }
  }
  const at::Tensor& q = q_used;

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
  // The 16-bit kernels' epilogue moves out in 16-byte chunks when rows are aligned to them and whole chunks.
  p.out_vec = d.D % (16 / static_cast<int64_t>(out.element_size())) == 0 && cuda_util::rows_aligned(out, 16);
  // cp.async moves 16-byte chunks: every row start 16-byte aligned and rows a whole number of chunks.
  const int64_t chunk = 16 / static_cast<int64_t>(q.element_size());
  p.q_vec = d.D % chunk == 0 && cuda_util::rows_aligned(q, 16);
  p.k_vec = d.D % chunk == 0 && cuda_util::rows_aligned(k, 16);
  p.v_vec = d.D % chunk == 0 && cuda_util::rows_aligned(v, 16);
  return p;
}

}  // namespace flash
}  // namespace cp_attention
