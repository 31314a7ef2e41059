// Input validation shared by every kernel file (CPU and CUDA), so all backends reject bad input with the
// same messages: each names the argument and what was expected.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace cp_attention {

constexpr int64_t kMaxHeadDim = 256;

struct AttnDims {
  int64_t B, Sq, Sk, H, Hkv, D;
};

inline bool is_attn_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// q [B, Sq, H, D], k/v [B, Sk, Hkv, D], kv_mask bool [B, Sk]; see docs/design.md, "Tensors and layout".
// allow_double: float64 is accepted too (the CPU backward, so that gradcheck can run).
inline AttnDims check_attn_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const std::optional<at::Tensor>& kv_mask,
                                  bool allow_double = false) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be a 4-D tensor [B, Sq, H, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be a 4-D tensor [B, Sk, Hkv, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, op, ": v must be a 4-D tensor [B, Sk, Hkv, D], got shape ", v.sizes());
  if (allow_double) {
    TORCH_CHECK_VALUE(is_attn_dtype(q.scalar_type()) || q.scalar_type() == at::kDouble, op,
                      ": q must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  } else {
    TORCH_CHECK_VALUE(is_attn_dtype(q.scalar_type()), op,
                      ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
              v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on one device, got q on ", q.device(), ", k on ", k.device(),
              ", v on ", v.device());
  const AttnDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK_VALUE(k.size(0) == d.B && v.size(0) == d.B, op, ": k and v must have batch size ", d.B,
              " (from q), got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(1) == d.Sk, op, ": k and v must have the same sequence length, got k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(2) == d.Hkv, op, ": k and v must have the same number of heads, got k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == d.D && v.size(3) == d.D, op, ": k and v must have head dim ", d.D,
              " (from q), got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(d.D >= 1 && d.D <= kMaxHeadDim, op, ": head dim D must be in [1, ", kMaxHeadDim, "], got ",
              d.D);
  TORCH_CHECK_VALUE(d.Hkv >= 1 && d.H % d.Hkv == 0, op,
              ": the number of query heads must be a multiple of the number of k/v heads (GQA), got H=",
              d.H, ", Hkv=", d.Hkv);
  TORCH_CHECK_VALUE(q.stride(3) == 1 || d.D == 1, op,
              ": q's last dimension must be contiguous (stride 1), got strides ", q.strides());
  TORCH_CHECK_VALUE(k.stride(3) == 1 || d.D == 1, op,
              ": k's last dimension must be contiguous (stride 1), got strides ", k.strides());
  TORCH_CHECK_VALUE(v.stride(3) == 1 || d.D == 1, op,
              ": v's last dimension must be contiguous (stride 1), got strides ", v.strides());
  if (kv_mask.has_value()) {
    const at::Tensor& m = *kv_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool, op, ": kv_mask must be a bool tensor (True = attend), got ",
                m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == d.B && m.size(1) == d.Sk, op,
                ": kv_mask must have shape [B, Sk] = [", d.B, ", ", d.Sk, "], got ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), op, ": kv_mask must be on ", q.device(), " like q, got ",
                m.device());
  }
  return d;
}

// out [B, S, H, D] (float dtype), lse [B, H, S] float32, for both sides of a merge.
inline void check_merge_side(const char* op, const char* out_name, const char* lse_name,
                             const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(out.dim() == 4, op, ": ", out_name, " must be a 4-D tensor [B, S, H, D], got shape ",
              out.sizes());
  TORCH_CHECK_VALUE(is_attn_dtype(out.scalar_type()), op, ": ", out_name,
              " must be float32, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat, op, ": ", lse_name, " must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == out.size(0) && lse.size(1) == out.size(2) &&
                  lse.size(2) == out.size(1),
              op, ": ", lse_name, " must have shape [B, H, S] = [", out.size(0), ", ", out.size(2), ", ",
              out.size(1), "] to match ", out_name, " ", out.sizes(), ", got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == out.device(), op, ": ", lse_name, " must be on ", out.device(), " like ",
              out_name, ", got ", lse.device());
}

inline void check_merge_inputs(const char* op, const char* a_name, const at::Tensor& out_a,
                               const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b) {
  const std::string a_lse = std::string("lse") + (a_name[3] ? a_name + 3 : "");
  check_merge_side(op, a_name, a_lse.c_str(), out_a, lse_a);
  check_merge_side(op, "out_b", "lse_b", out_b, lse_b);
  TORCH_CHECK_VALUE(out_b.sizes() == out_a.sizes(), op, ": out_b must have the shape of ", a_name, " ",
              out_a.sizes(), ", got ", out_b.sizes());
  TORCH_CHECK_VALUE(out_b.device() == out_a.device(), op, ": out_b must be on ", out_a.device(), " like ", a_name,
              ", got ", out_b.device());
}

// The running state of flash_attn_fwd_acc_: out [B, Sq, H, D] in q's dtype or float32 (last dim contiguous,
// other strides free, so row slices of a bigger accumulator work) and lse [B, H, Sq] float32 (any strides).
inline void check_acc_state(const char* op, const AttnDims& d, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& kv_mask, const at::Tensor& out,
                            const at::Tensor& lse) {
  TORCH_CHECK_VALUE(out.dim() == 4 && out.size(0) == d.B && out.size(1) == d.Sq && out.size(2) == d.H &&
                        out.size(3) == d.D,
                    op, ": out must have q's shape [B, Sq, H, D] = ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat, op,
                    ": out must have q's dtype (", q.scalar_type(), ") or float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == q.device(), op, ": out must be on ", q.device(), " like q, got ",
                    out.device());
  TORCH_CHECK_VALUE(out.stride(3) == 1 || d.D == 1, op,
                    ": out's last dimension must be contiguous (stride 1), got strides ", out.strides());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.Sq, op,
                    ": lse must have shape [B, H, Sq] = [", d.B, ", ", d.H, ", ", d.Sq, "], got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": lse must be on ", q.device(), " like q, got ",
                    lse.device());
  // Every (row, head) of out and lse is read and written once while q, k, v and the mask are read
  // throughout: any sharing of memory between the state and the rest would race or read updated values.
  at::assert_no_internal_overlap(out);
  at::assert_no_internal_overlap(lse);
  at::assert_no_overlap(out, lse);
  for (const at::Tensor* t : {&q, &k, &v}) {
    at::assert_no_overlap(out, *t);
    at::assert_no_overlap(lse, *t);
  }
  if (kv_mask.has_value()) {
    at::assert_no_overlap(out, *kv_mask);
    at::assert_no_overlap(lse, *kv_mask);
  }
}

}  // namespace cp_attention
