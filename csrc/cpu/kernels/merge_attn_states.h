#pragma once
// CPU merge of partial attention states (docs/design.md, "Merging partial results"), functional and in
// place. Rows (b, s, h) are independent; each row is loaded to float32, merged, and stored in the
// destination dtype. Any strides are accepted for out and lse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/kernels/vec_tiles.h"

namespace cp_attention::cpu::CPA_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;

// Row loaders/storers by dtype, picked once per call so the row loop has no dtype switch.
using LoadRow = void (*)(const void* src, int64_t stride, float* dst, int64_t n);
using StoreRow = void (*)(const float* src, void* dst, int64_t stride, int64_t n);

template <typename T>
void load_row(const void* src_, int64_t stride, float* dst, int64_t n) {
  const T* src = static_cast<const T*>(src_);
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
}

template <typename T>
void store_row(const float* src, void* dst_, int64_t stride, int64_t n) {
  T* dst = static_cast<T*>(dst_);
  for (int64_t d = 0; d < n; ++d) dst[d * stride] = static_cast<T>(src[d]);
}

LoadRow loader_for(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return load_row<float>;
    case at::kHalf: return load_row<at::Half>;
    default: return load_row<at::BFloat16>;
  }
}

StoreRow storer_for(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return store_row<float>;
    case at::kHalf: return store_row<at::Half>;
    default: return store_row<at::BFloat16>;
  }
}


// dst/dst_lse may alias a/lse_a (the in-place merge): each row is read completely before it is written.
void merge_rows(const at::Tensor& a, const at::Tensor& lse_a, const at::Tensor& b, const at::Tensor& lse_b,
                const at::Tensor& dst, const at::Tensor& dst_lse) {
  const int64_t B = a.size(0), S = a.size(1), H = a.size(2), D = a.size(3);
  if (B * S * H == 0) return;
  const LoadRow load_a = loader_for(a.scalar_type()), load_b = loader_for(b.scalar_type());
  const StoreRow store = storer_for(dst.scalar_type());
  const char* pa = static_cast<const char*>(a.const_data_ptr());
  const char* pb = static_cast<const char*>(b.const_data_ptr());
  char* pd = static_cast<char*>(dst.mutable_data_ptr());
  const float* la = lse_a.const_data_ptr<float>();
  const float* lb = lse_b.const_data_ptr<float>();
  float* ld = dst_lse.mutable_data_ptr<float>();
  const int64_t ea = a.element_size(), eb = b.element_size(), ed = dst.element_size();

  const int64_t rows = B * S * H;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> ra(D), rb(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % H, s = (r / H) % S, bi = r / (H * S);
      const float xa = la[bi * lse_a.stride(0) + h * lse_a.stride(1) + s * lse_a.stride(2)];
      const float xb = lb[bi * lse_b.stride(0) + h * lse_b.stride(1) + s * lse_b.stride(2)];
      const float m = std::max(xa, xb);
      float wa = 0.f, wb = 0.f, lse = kNegInf;
      if (m != kNegInf) {  // both -inf: out 0, lse -inf (never subtract -inf from -inf)
        const float ea_ = std::exp(xa - m), eb_ = std::exp(xb - m);
        const float sum = ea_ + eb_;
        lse = m + std::log(sum);
        wa = ea_ / sum;
        wb = eb_ / sum;
      }
      std::fill(ra.begin(), ra.end(), 0.f);
      // A side with weight 0 (lse -inf) is never read: its out may hold anything, NaN included.
      if (wa != 0.f) {
        load_a(pa + (bi * a.stride(0) + s * a.stride(1) + h * a.stride(2)) * ea, a.stride(3), rb.data(), D);
        int64_t d = 0;
        for (; d + Vec::size() <= D; d += Vec::size())
          (Vec::loadu(rb.data() + d) * Vec(wa)).store(ra.data() + d);
        for (; d < D; ++d) ra[d] = rb[d] * wa;
      }
      if (wb != 0.f) {
        load_b(pb + (bi * b.stride(0) + s * b.stride(1) + h * b.stride(2)) * eb, b.stride(3), rb.data(), D);
        int64_t d = 0;
        for (; d + Vec::size() <= D; d += Vec::size())
          at::vec::fmadd(Vec::loadu(rb.data() + d), Vec(wb), Vec::loadu(ra.data() + d)).store(ra.data() + d);
        for (; d < D; ++d) ra[d] += rb[d] * wb;
      }
      store(ra.data(), pd + (bi * dst.stride(0) + s * dst.stride(1) + h * dst.stride(2)) * ed, dst.stride(3), D);
      ld[bi * dst_lse.stride(0) + h * dst_lse.stride(1) + s * dst_lse.stride(2)] = lse;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge_inputs("cp_attention.merge_attn_states", "out_a", out_a, lse_a, out_b, lse_b);
  at::Tensor out = at::empty(out_a.sizes(), out_a.options().dtype(at::promote_types(out_a.scalar_type(),
                                                                                     out_b.scalar_type())));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  merge_rows(out_a, lse_a, out_b, lse_b, out, lse);
  return {out, lse};
}

void merge_attn_states_inplace_cpu(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_b,
                                   const at::Tensor& lse_b) {
  check_merge_inputs("cp_attention.merge_attn_states_", "out", out, lse, out_b, lse_b);
  merge_rows(out, lse, out_b, lse_b, out, lse);
}

}  // namespace
}  // namespace cp_attention::cpu::CPA_ISA
