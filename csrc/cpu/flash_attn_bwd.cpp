// Flash-attention backward on the CPU (docs/design.md, "Backward"): the gradients of flash_attn_fwd's
// (out, lse) with respect to q, k and v, FlashAttention-2 style. The probabilities are recomputed from the
// saved lse, P = exp(scale * q k^T - lse), block by block, so the Sq x Sk matrix never exists:
//   dV = P^T dO,  dP = dO V^T,  Delta_i = rowsum(dO_i * O_i) - dlse_i,  dS = P * (dP - Delta),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// Two passes, each writing every gradient element from one task only (no atomics, so the result does not
// depend on the number of threads): dK and dV per (batch, kv head), summed over that kv head's query heads
// (GQA) in a fixed order; dQ per (batch, head, block of queries). Accumulation is float32 for float32,
// float16 and bfloat16 inputs and float64 for float64 inputs (gradcheck). Plain loops: correctness first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_isa.h"

namespace cp_attention::cpu {
namespace {

constexpr int64_t kBlock = 64;  // queries or keys per block

template <typename acc_t>
struct BwdProblem {
  int64_t B, Sq, Sk, H, Hkv, D;
  acc_t scale;
  bool causal;
  const bool* mask;  // [B, Sk] or nullptr
  int64_t mask_s0, mask_s1;
  const acc_t* lse;    // [B, H, Sq] contiguous, in acc_t
  const acc_t* delta;  // [B, H, Sq] contiguous: Delta_i = rowsum(dout_i * out_i) - dlse_i (see run_bwd)

  bool visible(int64_t b, int64_t i, int64_t j) const {
    if (causal && j > i + Sk - Sq) return false;
    return mask == nullptr || mask[b * mask_s0 + j * mask_s1];
  }
};

// A [B, S, heads, D] tensor with its last dim contiguous, read row by row into acc_t.
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  int64_t s0, s1, s2;
  explicit Rows(const at::Tensor& t)
      : p(t.const_data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  template <typename acc_t>
  void load(int64_t b, int64_t i, int64_t h, int64_t D, acc_t* dst) const {
    const scalar_t* row = p + b * s0 + i * s1 + h * s2;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(row[d]);
  }
};

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// p_ij and ds_ij for one query row i against the keys of a block (rows of kb, vb): p = 0 where the key is
// hidden. qi and doi are the row's q and dout.
template <typename acc_t>
inline void row_probs(const BwdProblem<acc_t>& p, int64_t b, int64_t i, acc_t lse_i, acc_t delta_i,
                      const acc_t* qi, const acc_t* doi, const acc_t* kb, const acc_t* vb, int64_t j0, int64_t nk,
                      acc_t* pr, acc_t* ds) {
  const int64_t D = p.D;
  for (int64_t j = 0; j < nk; ++j) {
    if (!p.visible(b, i, j0 + j)) {
      pr[j] = 0;
      ds[j] = 0;
      continue;
    }
    const acc_t s = p.scale * dot(qi, kb + j * D, D);
    pr[j] = std::exp(s - lse_i);
    ds[j] = pr[j] * (dot(doi, vb + j * D, D) - delta_i);
  }
}

// dK, dV of kv head hk in batch b: key block by key block, summed over the query heads that read hk.
// K and V rows [j0, j0 + nk) of kv head hk in batch b, as acc_t, into kb and vb (rows of D).
template <typename scalar_t, typename acc_t>
void load_kv_block(const Rows<scalar_t>& k, const Rows<scalar_t>& v, int64_t b, int64_t hk, int64_t j0, int64_t nk,
                   int64_t D, acc_t* kb, acc_t* vb) {
  for (int64_t j = 0; j < nk; ++j) {
    k.load(b, j0 + j, hk, D, kb + j * D);
    v.load(b, j0 + j, hk, D, vb + j * D);
  }
}

template <typename scalar_t, typename acc_t>
void dkdv_task(const BwdProblem<acc_t>& p, const Rows<scalar_t>& q, const Rows<scalar_t>& k,
               const Rows<scalar_t>& v, const Rows<scalar_t>& dout, acc_t* dk, acc_t* dv, int64_t b, int64_t hk) {
  const int64_t D = p.D, group = p.H / p.Hkv, off = p.Sk - p.Sq;
  std::vector<acc_t> kb(kBlock * D), vb(kBlock * D), dkb(kBlock * D), dvb(kBlock * D), qi(D), doi(D);
  std::vector<acc_t> pr(kBlock), ds(kBlock);
  for (int64_t j0 = 0; j0 < p.Sk; j0 += kBlock) {
    const int64_t nk = std::min(kBlock, p.Sk - j0);
    load_kv_block(k, v, b, hk, j0, nk, D, kb.data(), vb.data());
    std::fill(dkb.begin(), dkb.end(), acc_t(0));
    std::fill(dvb.begin(), dvb.end(), acc_t(0));
    // Under causal masking query i sees key j0 only if i >= j0 - off.
    const int64_t i_begin = p.causal ? std::clamp<int64_t>(j0 - off, 0, p.Sq) : 0;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t i = i_begin; i < p.Sq; ++i) {
        const int64_t r = (b * p.H + h) * p.Sq + i;
        const acc_t lse_i = p.lse[r];
        if (std::isinf(lse_i) && lse_i < 0) continue;  // the row sees no key: no gradient flows
        q.load(b, i, h, D, qi.data());
        dout.load(b, i, h, D, doi.data());
        row_probs(p, b, i, lse_i, p.delta[r], qi.data(), doi.data(), kb.data(), vb.data(), j0, nk, pr.data(),
                  ds.data());
        for (int64_t j = 0; j < nk; ++j) {
          if (pr[j] == acc_t(0) && ds[j] == acc_t(0)) continue;
          const acc_t pj = pr[j], dsj = p.scale * ds[j];
          acc_t* dvr = dvb.data() + j * D;
          acc_t* dkr = dkb.data() + j * D;
          for (int64_t d = 0; d < D; ++d) {
            dvr[d] += pj * doi[d];
            dkr[d] += dsj * qi[d];
          }
        }
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t o = ((b * p.Sk + j0 + j) * p.Hkv + hk) * D;
      std::copy_n(dkb.data() + j * D, D, dk + o);
      std::copy_n(dvb.data() + j * D, D, dv + o);
    }
  }
}

// dQ of the queries [i0, i0 + nq) of head h in batch b.
// With delta_from_p, first computes Delta of these rows into delta (see run_bwd).
template <typename scalar_t, typename acc_t>
void dq_task(const BwdProblem<acc_t>& p, const Rows<scalar_t>& q, const Rows<scalar_t>& k, const Rows<scalar_t>& v,
             const Rows<scalar_t>& dout, acc_t* dq, bool delta_from_p, acc_t* delta, int64_t b, int64_t h,
             int64_t i0) {
  const int64_t D = p.D, hk = h / (p.H / p.Hkv), off = p.Sk - p.Sq;
  const int64_t nq = std::min(kBlock, p.Sq - i0);
  std::vector<acc_t> qb(kBlock * D), dob(kBlock * D), dqb(kBlock * D, acc_t(0)), kb(kBlock * D), vb(kBlock * D);
  std::vector<acc_t> pr(kBlock), ds(kBlock);
  for (int64_t i = 0; i < nq; ++i) {
    q.load(b, i0 + i, h, D, qb.data() + i * D);
    dout.load(b, i0 + i, h, D, dob.data() + i * D);
  }
  const int64_t j_end = p.causal ? std::clamp<int64_t>(i0 + nq + off, 0, p.Sk) : p.Sk;
  if (delta_from_p) {
    // Delta_i = sum_j p_ij dp_ij - dlse_i (equal to rowsum(dout_i * out_i) - dlse_i with the exact out): one
    // more sweep over the keys, with ds = p * dp (Delta 0) summed per row. On entry delta holds -dlse_i.
    std::vector<acc_t> sum(nq, acc_t(0));
    for (int64_t j0 = 0; j0 < j_end; j0 += kBlock) {
      const int64_t nk = std::min(kBlock, j_end - j0);
      load_kv_block(k, v, b, hk, j0, nk, D, kb.data(), vb.data());
      for (int64_t i = 0; i < nq; ++i) {
        const acc_t lse_i = p.lse[(b * p.H + h) * p.Sq + i0 + i];
        if (std::isinf(lse_i) && lse_i < 0) continue;
        row_probs(p, b, i0 + i, lse_i, acc_t(0), qb.data() + i * D, dob.data() + i * D, kb.data(), vb.data(), j0,
                  nk, pr.data(), ds.data());
        for (int64_t j = 0; j < nk; ++j) sum[i] += ds[j];
      }
    }
    for (int64_t i = 0; i < nq; ++i) delta[(b * p.H + h) * p.Sq + i0 + i] += sum[i];
  }
  for (int64_t j0 = 0; j0 < j_end; j0 += kBlock) {
    const int64_t nk = std::min(kBlock, j_end - j0);
    load_kv_block(k, v, b, hk, j0, nk, D, kb.data(), vb.data());
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t r = (b * p.H + h) * p.Sq + i0 + i;
      const acc_t lse_i = p.lse[r];
      if (std::isinf(lse_i) && lse_i < 0) continue;
      row_probs(p, b, i0 + i, lse_i, p.delta[r], qb.data() + i * D, dob.data() + i * D, kb.data(), vb.data(), j0,
                nk, pr.data(), ds.data());
      acc_t* dqr = dqb.data() + i * D;
      for (int64_t j = 0; j < nk; ++j) {
        if (ds[j] == acc_t(0)) continue;
        const acc_t dsj = p.scale * ds[j];
        const acc_t* kr = kb.data() + j * D;
        for (int64_t d = 0; d < D; ++d) dqr[d] += dsj * kr[d];
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) std::copy_n(dqb.data() + i * D, D, dq + ((b * p.Sq + i0 + i) * p.H + h) * D);
}

template <typename scalar_t, typename acc_t>
void run_bwd(const AttnDims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse, double scale,
             bool causal, const std::optional<at::Tensor>& kv_mask, const at::Tensor& dq, const at::Tensor& dk,
             const at::Tensor& dv) {
  const at::ScalarType acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const at::Tensor lse_a = lse.to(acc_type).contiguous();
  at::Tensor delta = at::empty({d.B, d.H, d.Sq}, lse_a.options());
  const Rows<scalar_t> qr(q), kr(k), vr(v), outr(out), doutr(dout);
  // Delta_i = rowsum(dout_i * out_i) - dlse_i from out as FlashAttention-2 does, for float32 and float64.
  // A float16 or bfloat16 out carries one rounding of the dtype, which through Delta would put dq and dk up
  // to ~3x further from the exact gradient than torch's math path (float32 inside) is; there Delta is
  // recomputed in float32 as sum_j p_ij dp_ij, its exact-out value, by the dq pass (one more sweep over K, V).
  const bool delta_from_p = !std::is_same_v<scalar_t, acc_t>;
  acc_t* dp = delta.mutable_data_ptr<acc_t>();
  {
    const at::Tensor dlse_a = dlse.has_value() ? dlse->to(acc_type).contiguous() : at::Tensor();
    const acc_t* dl = dlse_a.defined() ? dlse_a.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, d.B * d.H * d.Sq, 256, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> o(d.D), g(d.D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (d.H * d.Sq), h = (r / d.Sq) % d.H, i = r % d.Sq;
        acc_t rowsum = 0;
        if (!delta_from_p) {
          outr.load(b, i, h, d.D, o.data());
          doutr.load(b, i, h, d.D, g.data());
          rowsum = dot(o.data(), g.data(), d.D);
        }
        dp[r] = rowsum - (dl ? dl[r] : acc_t(0));
      }
    });
  }
  BwdProblem<acc_t> p{d.B, d.Sq, d.Sk, d.H, d.Hkv, d.D, static_cast<acc_t>(scale), causal, nullptr, 0, 0,
                      lse_a.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>()};
  if (kv_mask.has_value()) {
    p.mask = kv_mask->const_data_ptr<bool>();
    p.mask_s0 = kv_mask->stride(0);
    p.mask_s1 = kv_mask->stride(1);
  }
  acc_t* dqp = dq.mutable_data_ptr<acc_t>();
  const int64_t n_qblocks = (d.Sq + kBlock - 1) / kBlock;
  at::parallel_for(0, d.B * d.H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / n_qblocks;
      dq_task<scalar_t, acc_t>(p, qr, kr, vr, doutr, dqp, delta_from_p, dp, bh / d.H, bh % d.H, (t % n_qblocks) * kBlock);
    }
  });
  // dK, dV after dQ: they need every row's Delta.
  acc_t* dkp = dk.mutable_data_ptr<acc_t>();
  acc_t* dvp = dv.mutable_data_ptr<acc_t>();
  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) dkdv_task<scalar_t, acc_t>(p, qr, kr, vr, doutr, dkp, dvp, t / d.Hkv, t % d.Hkv);
  });
}

// dout and out like q (shape, dtype, device, last dim contiguous); lse and dlse [B, H, Sq] float32, or
// float64 with float64 inputs (a float64 LSE keeps gradcheck's finite differences exact).
void check_bwd_inputs(const char* op, const AttnDims& d, const at::Tensor& dout, const at::Tensor& q,
                      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout}, {"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), op, ": ", name, " must have q's shape [B, Sq, H, D] = ", q.sizes(),
                      ", got ", t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype (",
                      q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t->device());
    TORCH_CHECK_VALUE(t->stride(3) == 1 || d.D == 1, op, ": ", name,
                      "'s last dimension must be contiguous (stride 1), got strides ", t->strides());
  }
  const bool f64 = q.scalar_type() == at::kDouble;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse},
                                {"dlse", dlse.has_value() ? &*dlse : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat || (f64 && t->scalar_type() == at::kDouble), op, ": ", name,
                      " must be float32", f64 ? " or float64" : "", ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == d.B && t->size(1) == d.H && t->size(2) == d.Sq, op, ": ",
                      name, " must have shape [B, H, Sq] = [", d.B, ", ", d.H, ", ", d.Sq, "], got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t->device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> scale, bool causal, const std::optional<at::Tensor>& kv_mask,
    const std::optional<at::Tensor>& dlse) {
  constexpr const char* op = "cp_attention.flash_attn_bwd";
  check_cpu_isa(op);
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask, /*allow_double=*/true);
  check_bwd_inputs(op, d, dout, q, out, lse, dlse);
  const bool f64 = q.scalar_type() == at::kDouble;
  const auto acc = q.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor dq = at::zeros({d.B, d.Sq, d.H, d.D}, acc);
  at::Tensor dk = at::zeros({d.B, d.Sk, d.Hkv, d.D}, acc);
  at::Tensor dv = at::zeros({d.B, d.Sk, d.Hkv, d.D}, acc);
  if (q.numel() > 0 && k.numel() > 0) {
    const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
    switch (q.scalar_type()) {
      case at::kDouble: run_bwd<double, double>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
      case at::kFloat: run_bwd<float, float>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
      case at::kHalf: run_bwd<at::Half, float>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
      default: run_bwd<at::BFloat16, float>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
    }
  }
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace
}  // namespace cp_attention::cpu

TORCH_LIBRARY_IMPL(cp_attention, CPU, m) {
  m.impl("flash_attn_bwd", &cp_attention::cpu::flash_attn_bwd_cpu);
}
