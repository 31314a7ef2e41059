#pragma once
// Flash-attention backward on the CPU (docs/design.md, "Backward"): the gradients of flash_attn_fwd's
// (out, lse) with respect to q, k and v, FlashAttention-2 style. The probabilities are recomputed from the
// saved lse, P = exp(scale * q k^T - lse), block by block, so the Sq x Sk matrix never exists:
//   dV = P^T dO,  dP = dO V^T,  Delta_i = rowsum(dO_i * O_i) - dlse_i,  dS = P * (dP - Delta),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// Two passes, each writing every gradient element from one task only (no atomics, so the result does not
// depend on the number of threads): dK and dV per (batch, kv head), summed over that kv head's query heads
// (GQA) in a fixed order; dQ per (batch, head, block of queries). Accumulation is float32 for float32,
// float16 and bfloat16 inputs and float64 for float64 inputs (gradcheck).
//
// float64 runs the plain loops below (the reference path, kept simple for gradcheck). float32, float16 and
// bfloat16 run the blocked kernel further down (run_bwd_f32): one task per (batch, head), key blocks
// outer, its five products register-tiled float32 matmuls on the forward's micro tiles (vec_tiles.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/kernels/vec_tiles.h"

namespace cp_attention::cpu::CPA_ISA {

#ifdef CPA_WITH_AMX
// The AMX copy's backward for 16-bit inputs (flash_bwd_brgemm.h).
template <typename scalar_t>
bool bwd_brgemm_runs(const AttnDims& d);
template <typename scalar_t>
void run_bwd_brgemm(const AttnDims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, bool delta_from_p,
                    double scale, bool causal, const std::optional<at::Tensor>& kv_mask, const at::Tensor& dq,
                    const at::Tensor& dk, const at::Tensor& dv);
#endif

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

// ------------------------------------------------------------------------------ blocked float32 kernel
// One task per (b, h). For each block of kBwdKeys keys j and each block of kBwdQueries queries i:
//   S = Q_i K_j^T, dP = dO_i V_j^T                           (queries x keys: keys on the vector axis)
//   P = exp(scale * S - lse), dS = scale * P * (dP - Delta)  (element-wise; hidden keys give P = 0)
//   dV_j += P^T dO_i, dK_j += dS^T Q_i, dQ_i += dS K_j.
// dK_j and dV_j stay in per-thread buffers across the query blocks, and dQ of the whole head in a per-thread
// [Sq, Dp] buffer across the key blocks: O(S * D) scratch, never Sq x Sk. Every sum runs in a fixed order
// inside its task, so the result depends neither on the thread count nor on the run. With GQA each query
// head writes its own dK, dV into a [B, Sk, H, D] buffer, summed over the group in head order afterwards.

constexpr int64_t kBwdKeys = 64;     // keys per block: the vector axis of S and dP
constexpr int64_t kBwdQueries = 64;  // queries per block: the inner dimension of the dV and dK products

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[r, c] (+)= sum_k A(r, k) * B[k, c] for r < M, c < N (N a multiple of kTileCols), where
// A(r, k) = A[r * a_rs + k * a_ks] and B, C are row-major with row strides ldb, ldc.
template <bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
          float* C, int64_t ldc) {
  for (int64_t c = 0; c < N; c += kTileCols) {
    int64_t r = 0;
    for (; r + kTileRows <= M; r += kTileRows)
      micro_tile<kTileRows, kAccumulate>(K, A + r * a_rs, a_rs, a_ks, B + c, ldb, C + r * ldc + c, ldc);
    const float* a = A + r * a_rs;
    float* cr = C + r * ldc + c;
    switch (M - r) {
      case 5: micro_tile<5, kAccumulate>(K, a, a_rs, a_ks, B + c, ldb, cr, ldc); break;
      case 4: micro_tile<4, kAccumulate>(K, a, a_rs, a_ks, B + c, ldb, cr, ldc); break;
      case 3: micro_tile<3, kAccumulate>(K, a, a_rs, a_ks, B + c, ldb, cr, ldc); break;
      case 2: micro_tile<2, kAccumulate>(K, a, a_rs, a_ks, B + c, ldb, cr, ldc); break;
      case 1: micro_tile<1, kAccumulate>(K, a, a_rs, a_ks, B + c, ldb, cr, ldc); break;
      default: break;
    }
  }
}

// Per-thread buffers. Dp is D rounded up to kTileCols; padding columns are zero, so they add nothing.
struct BwdScratch {
  Buffer qf, dof, dqf;    // [Sq, Dp]: the head's Q, dO and its dQ accumulator
  Buffer kf, vf, kt, vt;  // K_j, V_j [kBwdKeys, Dp]; K_j^T, V_j^T [Dp, kBwdKeys]
  Buffer dkf, dvf;        // dK_j, dV_j [kBwdKeys, Dp]
  Buffer s, dp;           // S then P, dP then dS [kBwdQueries, kBwdKeys]
  Buffer lse, bias, sum;  // [Sq], [kBwdKeys], [Sq]
  BwdScratch(int64_t Sq, int64_t Dp)
      : qf(make_buffer(Sq * Dp)), dof(make_buffer(Sq * Dp)), dqf(make_buffer(Sq * Dp)),
        kf(make_buffer(kBwdKeys * Dp)), vf(make_buffer(kBwdKeys * Dp)), kt(make_buffer(Dp * kBwdKeys)),
        vt(make_buffer(Dp * kBwdKeys)), dkf(make_buffer(kBwdKeys * Dp)), dvf(make_buffer(kBwdKeys * Dp)),
        s(make_buffer(kBwdQueries * kBwdKeys)), dp(make_buffer(kBwdQueries * kBwdKeys)), lse(make_buffer(Sq)),
        bias(make_buffer(kBwdKeys)), sum(make_buffer(Sq)) {}
};

// A gradient output [B, S, heads, D] (contiguous) that the float32-accumulating kernels write rows of
// float32 into: float32 outputs take them as they are, 16-bit outputs get them rounded once, so a
// backward of 16-bit inputs never holds float32 copies of dq, dk and dv.
struct GradRows {
  void* p;
  at::ScalarType dtype;
  explicit GradRows(const at::Tensor& t) : p(t.data_ptr()), dtype(t.scalar_type()) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "GradRows: float32, bfloat16 or float16 gradients, got ", dtype);
  }
  // n floats into the output from element `offset` on.
  void put(int64_t offset, const float* src, int64_t n) const {
    switch (dtype) {
      case at::kFloat: std::copy_n(src, n, static_cast<float*>(p) + offset); break;
      case at::kBFloat16: at::vec::convert(src, static_cast<at::BFloat16*>(p) + offset, n); break;
      default: at::vec::convert(src, static_cast<at::Half*>(p) + offset, n); break;  // kHalf (checked)
    }
  }
};

struct BwdF32 {
  int64_t B, Sq, Sk, H, Hkv, D, Dp;
  float scale;
  bool causal;
  const bool* mask;  // [B, Sk] or nullptr
  int64_t mask_s0, mask_s1;
  const float* lse;  // [B, H, Sq] contiguous
  float* delta;      // [B, H, Sq] contiguous: Delta, or -dlse on entry with delta_from_p (see run_bwd)
  bool delta_from_p;
};

// src[0:D] as float into dst[0:Dp], zero-padded.
template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t D, int64_t Dp, float* dst) {
  row_to_float(src, dst, D);
  std::fill(dst + D, dst + Dp, 0.f);
}

// Keys [j0, j0 + nk) of kv head hk as rows (kf, vf) and transposed (kt, vt: nkp columns, the padding zero),
// and the block's bias: 0 for a visible key, -inf for one hidden by kv_mask or past nk. Returns the
// number of visible keys.
template <typename scalar_t>
int64_t load_key_block(const BwdF32& p, const Rows<scalar_t>& k, const Rows<scalar_t>& v, int64_t b, int64_t hk,
                       int64_t j0, int64_t nk, int64_t nkp, BwdScratch& w) {
  const int64_t D = p.D, Dp = p.Dp;
  float *kf = w.kf.get(), *vf = w.vf.get(), *kt = w.kt.get(), *vt = w.vt.get(), *bias = w.bias.get();
  int64_t visible = 0;
  for (int64_t j = 0; j < nkp; ++j) {
    const bool on = j < nk && (p.mask == nullptr || p.mask[b * p.mask_s0 + (j0 + j) * p.mask_s1]);
    bias[j] = on ? 0.f : kNegInf;
    visible += on;
  }
  if (visible == 0) return 0;
  for (int64_t j = 0; j < nk; ++j) {
    load_row(k.p + b * k.s0 + (j0 + j) * k.s1 + hk * k.s2, D, Dp, kf + j * Dp);
    load_row(v.p + b * v.s0 + (j0 + j) * v.s1 + hk * v.s2, D, Dp, vf + j * Dp);
  }
  for (int64_t d = 0; d < Dp; ++d) {
    for (int64_t j = 0; j < nk; ++j) {
      kt[d * nkp + j] = kf[j * Dp + d];
      vt[d * nkp + j] = vf[j * Dp + d];
    }
    for (int64_t j = nk; j < nkp; ++j) kt[d * nkp + j] = vt[d * nkp + j] = 0.f;
  }
  return visible;
}

// For queries [i0, i0 + nq) of the loaded key block (nkp columns): P into w.s and, with with_ds, dS =
// scale * P * (dP - Delta) into w.dp, else P * dP (Delta's terms). Rows without a key carry lse +inf in
// w.lse, so their P is 0 like that of hidden keys. Causal: query i sees key j0 + j iff j <= i + off - j0.
inline void probs_block(const BwdF32& p, BwdScratch& w, const float* delta, int64_t i0, int64_t nq, int64_t j0,
                        int64_t nkp, bool with_ds) {
  const int64_t Dp = p.Dp, ld = kBwdKeys, off = p.Sk - p.Sq;
  float *s = w.s.get(), *dp = w.dp.get();
  const float *lse = w.lse.get(), *bias = w.bias.get();
  gemm<false>(nq, nkp, Dp, w.qf.get() + i0 * Dp, Dp, 1, w.kt.get(), nkp, s, ld);    // S = Q_i K_j^T
  gemm<false>(nq, nkp, Dp, w.dof.get() + i0 * Dp, Dp, 1, w.vt.get(), nkp, dp, ld);  // dP = dO_i V_j^T
  const Vec scale(p.scale);
  for (int64_t i = 0; i < nq; ++i) {
    float* sr = s + i * ld;
    float* dr = dp + i * ld;
    const Vec l(lse[i0 + i]), dl(delta[i0 + i]);
    for (int64_t j = 0; j < nkp; j += kVecLen) {
      const Vec pr = (at::vec::fmadd(Vec::loadu(sr + j), scale, Vec::loadu(bias + j)) - l).exp_u20();
      pr.store(sr + j);
      const Vec dpr = Vec::loadu(dr + j);
      (with_ds ? scale * pr * (dpr - dl) : pr * dpr).store(dr + j);
    }
    if (p.causal) {
      for (int64_t j = std::max<int64_t>(i0 + i + off - j0 + 1, 0); j < nkp; ++j) sr[j] = dr[j] = 0.f;
    }
  }
}

// The gradients of head h in batch b: dq [B, Sq, H, D] float32, and dk, dv [B, Sk, dkv_heads, D] float32
// at head hk (dkv_heads = Hkv) or, with GQA, at head h of the per-head buffers (dkv_heads = H).
template <typename scalar_t>
void bwd_head(const BwdF32& p, const Rows<scalar_t>& q, const Rows<scalar_t>& k, const Rows<scalar_t>& v,
              const Rows<scalar_t>& dout, const GradRows& dq, const GradRows& dk, const GradRows& dv,
              int64_t dkv_heads, int64_t b, int64_t h, BwdScratch& w) {
  const int64_t D = p.D, Dp = p.Dp, Sq = p.Sq, hk = h / (p.H / p.Hkv), off = p.Sk - p.Sq;
  const int64_t dkv_h = dkv_heads == p.H ? h : hk;
  float *qf = w.qf.get(), *dof = w.dof.get(), *dqf = w.dqf.get(), *lse = w.lse.get();
  for (int64_t i = 0; i < Sq; ++i) {
    load_row(q.p + b * q.s0 + i * q.s1 + h * q.s2, D, Dp, qf + i * Dp);
    load_row(dout.p + b * dout.s0 + i * dout.s1 + h * dout.s2, D, Dp, dof + i * Dp);
    const float l = p.lse[(b * p.H + h) * Sq + i];
    lse[i] = l == kNegInf ? std::numeric_limits<float>::infinity() : l;
  }
  std::fill(dqf, dqf + Sq * Dp, 0.f);
  float* delta = p.delta + (b * p.H + h) * Sq;
  // Causal: query i sees key j0 iff i >= j0 - off, so the queries before that skip the block.
  auto q_begin = [&](int64_t j0) { return p.causal ? std::clamp<int64_t>(j0 - off, 0, Sq) : int64_t(0); };

  if (p.delta_from_p) {
    // Delta_i = sum_j p_ij dp_ij - dlse_i in float32 (see run_bwd): one sweep over the keys first.
    float* sum = w.sum.get();
    std::fill(sum, sum + Sq, 0.f);
    for (int64_t j0 = 0; j0 < p.Sk; j0 += kBwdKeys) {
      const int64_t nk = std::min(kBwdKeys, p.Sk - j0), nkp = round_up(nk, kVecLen);
      if (load_key_block(p, k, v, b, hk, j0, nk, nkp, w) == 0) continue;
      for (int64_t i0 = q_begin(j0); i0 < Sq; i0 += kBwdQueries) {
        const int64_t nq = std::min(kBwdQueries, Sq - i0);
        probs_block(p, w, delta, i0, nq, j0, nkp, /*with_ds=*/false);
        for (int64_t i = 0; i < nq; ++i) {
          const float* r = w.dp.get() + i * kBwdKeys;
          float acc = 0.f;
          for (int64_t j = 0; j < nkp; ++j) acc += r[j];
          sum[i0 + i] += acc;
        }
      }
    }
    for (int64_t i = 0; i < Sq; ++i) delta[i] += sum[i];
  }

  float *dkf = w.dkf.get(), *dvf = w.dvf.get(), *pm = w.s.get(), *ds = w.dp.get();
  for (int64_t j0 = 0; j0 < p.Sk; j0 += kBwdKeys) {
    const int64_t nk = std::min(kBwdKeys, p.Sk - j0), nkp = round_up(nk, kVecLen);
    std::fill(dkf, dkf + nk * Dp, 0.f);
    std::fill(dvf, dvf + nk * Dp, 0.f);
    if (load_key_block(p, k, v, b, hk, j0, nk, nkp, w) > 0) {
      for (int64_t i0 = q_begin(j0); i0 < Sq; i0 += kBwdQueries) {
        const int64_t nq = std::min(kBwdQueries, Sq - i0);
        probs_block(p, w, delta, i0, nq, j0, nkp, /*with_ds=*/true);
        gemm<true>(nk, Dp, nq, pm, 1, kBwdKeys, dof + i0 * Dp, Dp, dvf, Dp);            // dV_j += P^T dO_i
        gemm<true>(nk, Dp, nq, ds, 1, kBwdKeys, qf + i0 * Dp, Dp, dkf, Dp);             // dK_j += dS^T Q_i
        gemm<true>(nq, Dp, nk, ds, kBwdKeys, 1, w.kf.get(), Dp, dqf + i0 * Dp, Dp);     // dQ_i += dS K_j
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t o = ((b * p.Sk + j0 + j) * dkv_heads + dkv_h) * D;
      dk.put(o, dkf + j * Dp, D);
      dv.put(o, dvf + j * Dp, D);
    }
  }
  for (int64_t i = 0; i < Sq; ++i) dq.put(((b * Sq + i) * p.H + h) * D, dqf + i * Dp, D);
}

void sum_gqa_heads(const AttnDims& d, const float* dkp, const float* dvp, const GradRows& dk, const GradRows& dv);

// The task loop every float32-accumulating backward kernel shares: one task per (b, h), each writing dq's
// rows of its head and dK, dV of its kv head (with GQA: of its query head, into [B, Sk, H, D] buffers summed
// over the group afterwards). thread_tasks(p, qr, kr, vr, doutr, dq, dk, dv, dkv_heads, begin, end) runs
// the tasks [begin, end) of one thread; Dp is the padded head dim of its buffers.
template <typename scalar_t, typename ThreadTasks>
void for_each_bwd_head(const AttnDims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, bool delta_from_p,
                       double scale, bool causal, const std::optional<at::Tensor>& kv_mask, const at::Tensor& dq,
                       const at::Tensor& dk, const at::Tensor& dv, int64_t Dp, ThreadTasks&& thread_tasks) {
  BwdF32 p{d.B, d.Sq, d.Sk, d.H, d.Hkv, d.D, Dp, static_cast<float>(scale), causal, nullptr, 0, 0,
           lse.const_data_ptr<float>(), delta.mutable_data_ptr<float>(), delta_from_p};
  if (kv_mask.has_value()) {
    p.mask = kv_mask->const_data_ptr<bool>();
    p.mask_s0 = kv_mask->stride(0);
    p.mask_s1 = kv_mask->stride(1);
  }
  const Rows<scalar_t> qr(q), kr(k), vr(v), doutr(dout);
  const bool gqa = d.H != d.Hkv;
  const at::Tensor dk_h = gqa ? at::empty({d.B, d.Sk, d.H, d.D}, dk.options().dtype(at::kFloat)) : dk;
  const at::Tensor dv_h = gqa ? at::empty({d.B, d.Sk, d.H, d.D}, dv.options().dtype(at::kFloat)) : dv;
  const GradRows dqw(dq), dkw(dk_h), dvw(dv_h);
  const int64_t dkv_heads = gqa ? d.H : d.Hkv;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    thread_tasks(p, qr, kr, vr, doutr, dqw, dkw, dvw, dkv_heads, begin, end);
  });
  if (gqa) sum_gqa_heads(d, dk_h.const_data_ptr<float>(), dv_h.const_data_ptr<float>(), GradRows(dk), GradRows(dv));
}

// float32, float16 and bfloat16: dq, dk, dv the gradients in the inputs' dtype; delta as run_bwd prepared it.
template <typename scalar_t>
void run_bwd_f32(const AttnDims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, bool delta_from_p, double scale,
                 bool causal, const std::optional<at::Tensor>& kv_mask, const at::Tensor& dq, const at::Tensor& dk,
                 const at::Tensor& dv) {
  for_each_bwd_head<scalar_t>(
      d, dout, q, k, v, lse, delta, delta_from_p, scale, causal, kv_mask, dq, dk, dv, round_up(d.D, kTileCols),
      [&](const BwdF32& p, const auto& qr, const auto& kr, const auto& vr, const auto& doutr, const GradRows& dqw,
          const GradRows& dkw, const GradRows& dvw, int64_t dkv_heads, int64_t begin, int64_t end) {
        BwdScratch w(d.Sq, p.Dp);
        for (int64_t t = begin; t < end; ++t)
          bwd_head<scalar_t>(p, qr, kr, vr, doutr, dqw, dkw, dvw, dkv_heads, t / d.H, t % d.H, w);
      });
}

// dk, dv [B, Sk, Hkv, D] from the per-query-head float32 dK, dV [B, Sk, H, D]: summed over each kv head's
// group of query heads, in head order.
void sum_gqa_heads(const AttnDims& d, const float* dkp, const float* dvp, const GradRows& dk, const GradRows& dv) {
  const int64_t group = d.H / d.Hkv;
  at::parallel_for(0, d.B * d.Sk * d.Hkv, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> ak(d.D), av(d.D);
    for (int64_t r = begin; r < end; ++r) {  // r = (b * Sk + j) * Hkv + hk; its query heads hk * group + g
      const int64_t bj = r / d.Hkv, hk = r % d.Hkv;
      const float* sk = dkp + (bj * d.H + hk * group) * d.D;
      const float* sv = dvp + (bj * d.H + hk * group) * d.D;
      for (int64_t x = 0; x < d.D; ++x) {
        float k_sum = 0.f, v_sum = 0.f;
        for (int64_t g = 0; g < group; ++g) {
          k_sum += sk[g * d.D + x];
          v_sum += sv[g * d.D + x];
        }
        ak[x] = k_sum;
        av[x] = v_sum;
      }
      dk.put(r * d.D, ak.data(), d.D);
      dv.put(r * d.D, av.data(), d.D);
    }
  });
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
  if constexpr (std::is_same_v<acc_t, float>) {
#ifdef CPA_WITH_AMX
    if (bwd_brgemm_runs<scalar_t>(d)) {
      run_bwd_brgemm<scalar_t>(d, dout, q, k, v, lse_a, delta, delta_from_p, scale, causal, kv_mask, dq, dk, dv);
      return;
    }
#endif
    run_bwd_f32<scalar_t>(d, dout, q, k, v, lse_a, delta, delta_from_p, scale, causal, kv_mask, dq, dk, dv);
    return;
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
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask, /*allow_double=*/true);
  check_bwd_inputs(op, d, dout, q, out, lse, dlse);
  // Gradients in q's dtype: the float32-accumulating kernels round their rows once as they write them.
  // The kernels write every element; with no query or no key, the gradients are zero.
  const bool run = q.numel() > 0 && k.numel() > 0;
  const auto make = [&](at::IntArrayRef size) {
    return run ? at::empty(size, q.options()) : at::zeros(size, q.options());
  };
  at::Tensor dq = make({d.B, d.Sq, d.H, d.D});
  at::Tensor dk = make({d.B, d.Sk, d.Hkv, d.D});
  at::Tensor dv = make({d.B, d.Sk, d.Hkv, d.D});
  if (run) {
    const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
    switch (q.scalar_type()) {
      case at::kDouble: run_bwd<double, double>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
      case at::kFloat: run_bwd<float, float>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
      case at::kHalf: run_bwd<at::Half, float>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
      default: run_bwd<at::BFloat16, float>(d, dout, q, k, v, out, lse, dlse, s, causal, kv_mask, dq, dk, dv); break;
    }
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cp_attention::cpu::CPA_ISA
