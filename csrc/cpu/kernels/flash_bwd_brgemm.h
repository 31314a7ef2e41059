#pragma once
// The backward of bfloat16 (and, with AMX-FP16, float16) attention on oneDNN's brgemm with AMX tiles: the
// AMX copy's replacement of run_bwd_f32 (flash_attn_bwd.h) for these inputs, with the same task layout and
// results (dq, dk, dv written through GradRows; per-head dK, dV summed over a GQA group afterwards).
//
// One task per (b, h); keys in blocks of 128 (outer), queries in blocks of 128 (inner): of the block sizes
// timed, the five products ran fastest at 128 x 128. Keys are the rows of every per-block matrix, so that
// P^T and dS^T, which two of the five products take as their A operand, come out of the element-wise pass
// as stored, with the queries on the vector axis:
//   S^T = K_j Q_i^T, dP^T = V_j dO_i^T                       (A: K_j, V_j rows as stored)
//   P^T = 2^(scale2 S^T - lse2), dS^T = scale P^T (dP^T - Delta)
//   dV_j += P^T dO_i, dK_j += dS^T Q_i, dQ_i^T += K_j^T dS^T  (dQ kept transposed, [D][kBQ] per query block)
// P is rounded to the inputs' dtype for dV += P^T dO, as GPU kernels do; dS goes into dK and dQ as two
// 16-bit parts (store_split), which keeps those within the float32 math path's error bound. Delta comes as
// the float32 kernel's does (run_bwd): for half inputs a first sweep sums p * dp exactly.
#include "cpu/kernels/flash_fwd_brgemm.h"

namespace cp_attention::cpu::CPA_ISA {
namespace {

constexpr int64_t kBK = 128;  // keys per block: the rows of S^T, dP^T, P^T, dS^T
constexpr int64_t kBQ = 128;  // queries per block: their columns

template <typename scalar_t>
inline __m256i to_half_bits(__m512 x) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return (__m256i)_mm512_cvtneps_pbh(x);
  else return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// x as hi + lo, both in the 16-bit type: the products take each as its own operand, so dS reaches them
// with about 16 bits of mantissa instead of 8 (bfloat16).
template <typename scalar_t>
inline void store_split(__m512 x, scalar_t* hi, scalar_t* lo) {
  const __m256i h = to_half_bits<scalar_t>(x);
  __m512 back;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    back = _mm512_cvtph_ps(h);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), h);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), to_half_bits<scalar_t>(_mm512_sub_ps(x, back)));
}

// Per-thread buffers of one head (Sqp = Sq rounded up to kBQ; D even), 64-byte aligned.
template <typename scalar_t>
struct BwdBrScratch {
  BufferOf<scalar_t> qt, dot, qv, dov;  // Q^T, dO^T per query block (VNNI [D/2][kBQ][2]);
                                        // Q, dO (VNNI [kBQ/2][D][2])
  BufferOf<scalar_t> kt;                // K_j^T [D][kBK] plain rows (A of dQ^T)
  BufferOf<scalar_t> pt, dst, dsv;      // P^T, dS^T [kBK][kBQ]; dS^T as VNNI [kBK/2][kBQ][2] (B of dQ^T)
  BufferOf<scalar_t> dstl, dsvl;        // the same of what rounding dS to the dtype left over (x - hi)
  Buffer s, dp;                         // S^T, dP^T [kBK][kBQ]
  Buffer dkf, dvf, dqt;                 // dK_j, dV_j [kBK][D]; dQ^T [Sqp / kBQ][D][kBQ] (a row stride of Sqp
                                        // put its rows in the same cache sets: 1.6x slower products)
  Buffer lse2, delta, sum;              // per query [Sqp]
  BwdBrScratch(int64_t Sqp, int64_t D)
      : qt(make_buffer<scalar_t>(Sqp * D)), dot(make_buffer<scalar_t>(Sqp * D)),
        qv(make_buffer<scalar_t>(Sqp * D)), dov(make_buffer<scalar_t>(Sqp * D)), kt(make_buffer<scalar_t>(D * kBK)),
        pt(make_buffer<scalar_t>(kBK * kBQ)), dst(make_buffer<scalar_t>(kBK * kBQ)),
        dsv(make_buffer<scalar_t>(kBK * kBQ)), dstl(make_buffer<scalar_t>(kBK * kBQ)),
        dsvl(make_buffer<scalar_t>(kBK * kBQ)), s(make_buffer(kBK * kBQ)), dp(make_buffer(kBK * kBQ)),
        dkf(make_buffer(kBK * D)), dvf(make_buffer(kBK * D)), dqt(make_buffer(D * Sqp)), lse2(make_buffer(Sqp)),
        delta(make_buffer(Sqp)), sum(make_buffer(Sqp)) {}
};

// The element-wise pass of one (key block, query block): key rows r < nk, query lanes. Masked keys (bias
// -inf) and, under the causal rule, queries before a key's diagonal get P = 0; so do padded queries, whose
// lse2 is +inf. with_ds: dS^T into w.dst (rows) and w.dsv (VNNI pairs of rows), P^T into w.pt; else the
// column sums of p * dp into w.sum (Delta's terms).
template <typename scalar_t>
void probs_rows(const BwdF32& p, BwdBrScratch<scalar_t>& w, const float* bias, int64_t i0, int64_t j0, int64_t nk,
                bool with_ds) {
  const float scale2 = p.scale * kLog2e;
  const int64_t off = p.Sk - p.Sq;
  const __m512 vs2 = _mm512_set1_ps(scale2), vscale = _mm512_set1_ps(p.scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r = 0; r < kBK; ++r) {
    float* sr = w.s.get() + r * kBQ;
    float* dr = w.dp.get() + r * kBQ;
    // Causal: key j0 + r is seen by queries i >= j0 + r - off.
    const int64_t first_q = p.causal ? j0 + r - off - i0 : std::numeric_limits<int64_t>::min();
    const bool hidden = r >= nk || bias[r] == kNegInf;
    for (int64_t c = 0; c < kBQ; c += 16) {
      __m512 pr = _mm512_setzero_ps(), ds = _mm512_setzero_ps();
      if (!hidden) {
        const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + c), vs2, _mm512_loadu_ps(w.lse2.get() + i0 + c));
        pr = exp2_nonpositive(_mm512_min_ps(x, _mm512_setzero_ps()));
        if (p.causal) {
          const __mmask16 seen = _mm512_cmpge_epi32_mask(
              _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(c))),
              _mm512_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(first_q, -1, kBQ))));
          pr = _mm512_maskz_mov_ps(seen, pr);
        }
        const __m512 dpr = _mm512_loadu_ps(dr + c);
        if (with_ds) {
          ds = _mm512_mul_ps(_mm512_mul_ps(vscale, pr), _mm512_sub_ps(dpr, _mm512_loadu_ps(w.delta.get() + i0 + c)));
        } else {
          _mm512_storeu_ps(w.sum.get() + i0 + c, _mm512_fmadd_ps(pr, dpr, _mm512_loadu_ps(w.sum.get() + i0 + c)));
        }
      }
      if (with_ds) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.pt.get() + r * kBQ + c), to_half_bits<scalar_t>(pr));
        store_split<scalar_t>(ds, w.dst.get() + r * kBQ + c, w.dstl.get() + r * kBQ + c);
      }
    }
  }
  if (!with_ds) return;
  // dS^T as VNNI pairs of key rows: [r / 2][query][r % 2].
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (const auto& [rows, vnni] : {std::pair{&w.dst, &w.dsv}, std::pair{&w.dstl, &w.dsvl}}) {
    for (int64_t r = 0; r < kBK; r += 2) {
      const auto* a = reinterpret_cast<const uint16_t*>(rows->get() + r * kBQ);
      const auto* b = reinterpret_cast<const uint16_t*>(rows->get() + (r + 1) * kBQ);
      auto* o = reinterpret_cast<uint16_t*>(vnni->get() + (r / 2) * kBQ * 2);
      for (int64_t c = 0; c < kBQ; c += 32) {
        const __m512i xa = _mm512_loadu_si512(a + c), xb = _mm512_loadu_si512(b + c);
        _mm512_storeu_si512(o + 2 * c, _mm512_permutex2var_epi16(xa, lo, xb));
        _mm512_storeu_si512(o + 2 * c + 32, _mm512_permutex2var_epi16(xa, hi, xb));
      }
    }
  }
}

template <typename scalar_t>
void bwd_head_brgemm(const BwdF32& p, const Rows<scalar_t>& q, const Rows<scalar_t>& k, const Rows<scalar_t>& v,
                     const Rows<scalar_t>& dout, const GradRows& dq, const GradRows& dk, const GradRows& dv,
                     int64_t dkv_heads, int64_t b, int64_t h, BwdBrScratch<scalar_t>& w) {
  const int64_t D = p.D, Sq = p.Sq, Sqp = round_up(Sq, kBQ), hk = h / (p.H / p.Hkv), off = p.Sk - p.Sq;
  const int64_t dkv_h = dkv_heads == p.H ? h : hk;
  RowsProblem rp{};  // the forward's packers, for blocks of kBQ query rows
  rp.D = D, rp.Dp = D, rp.bk = kBQ, rp.bkp = kBQ, rp.ldk = kBQ;
  const scalar_t* q0 = q.p + b * q.s0 + h * q.s2;
  const scalar_t* do0 = dout.p + b * dout.s0 + h * dout.s2;
  for (int64_t i0 = 0; i0 < Sqp; i0 += kBQ) {
    const int64_t nq = std::clamp<int64_t>(Sq - i0, 0, kBQ);
    pack_k_block(rp, q0 + i0 * q.s1, q.s1, nq, w.qt.get() + i0 * D);
    pack_k_block(rp, do0 + i0 * dout.s1, dout.s1, nq, w.dot.get() + i0 * D);
    pack_v_block(rp, q0 + i0 * q.s1, q.s1, nq, w.qv.get() + i0 * D);
    pack_v_block(rp, do0 + i0 * dout.s1, dout.s1, nq, w.dov.get() + i0 * D);
  }
  for (int64_t i = 0; i < Sqp; ++i) {
    const float l = i < Sq ? p.lse[(b * p.H + h) * Sq + i] : kNegInf;
    w.lse2[i] = l == kNegInf ? std::numeric_limits<float>::infinity() : l * kLog2e;
    w.delta[i] = i < Sq ? p.delta[(b * p.H + h) * Sq + i] : 0.f;
  }
  std::fill_n(w.dqt.get(), D * Sqp, 0.f);
  // Causal: key block j0 is seen by queries i >= j0 - off only.
  auto q_begin = [&](int64_t j0) { return p.causal ? std::clamp<int64_t>(j0 - off, 0, Sq) / kBQ * kBQ : 0; };
  std::vector<float> bias(kBK);  // read by scalar code only
  auto key_block = [&](int64_t j0, int64_t nk) {  // the block's bias; false if it has no visible key
    int64_t visible = 0;
    for (int64_t r = 0; r < kBK; ++r) {
      const bool on = r < nk && (p.mask == nullptr || p.mask[b * p.mask_s0 + (j0 + r) * p.mask_s1]);
      bias[r] = on ? 0.f : kNegInf;
      visible += on;
    }
    return visible > 0;
  };
  const scalar_t* k0 = k.p + b * k.s0 + hk * k.s2;
  const scalar_t* v0 = v.p + b * v.s0 + hk * v.s2;
  auto scores = [&](int64_t j0, int64_t nk, int64_t i0) {  // S^T, dP^T of (key block j0, query block i0)
    cpublas::brgemm(nk, kBQ, D, k.s1, kBQ, kBQ, false, k0 + j0 * k.s1, w.qt.get() + i0 * D, w.s.get(), true);
    cpublas::brgemm(nk, kBQ, D, v.s1, kBQ, kBQ, false, v0 + j0 * v.s1, w.dot.get() + i0 * D, w.dp.get(), true);
  };

  if (p.delta_from_p) {
    std::fill_n(w.sum.get(), Sqp, 0.f);
    for (int64_t j0 = 0; j0 < p.Sk; j0 += kBK) {
      const int64_t nk = std::min(kBK, p.Sk - j0);
      if (!key_block(j0, nk)) continue;
      for (int64_t i0 = q_begin(j0); i0 < Sq; i0 += kBQ) {
        scores(j0, nk, i0);
        probs_rows(p, w, bias.data(), i0, j0, nk, /*with_ds=*/false);
      }
    }
    for (int64_t i = 0; i < Sq; ++i) w.delta[i] += w.sum[i];
  }

  for (int64_t j0 = 0; j0 < p.Sk; j0 += kBK) {
    const int64_t nk = std::min(kBK, p.Sk - j0);
    std::fill_n(w.dkf.get(), kBK * D, 0.f);
    std::fill_n(w.dvf.get(), kBK * D, 0.f);
    if (key_block(j0, nk)) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t r = 0; r < kBK; ++r) w.kt[d * kBK + r] = r < nk ? k0[(j0 + r) * k.s1 + d] : scalar_t(0.f);
      for (int64_t i0 = q_begin(j0); i0 < Sq; i0 += kBQ) {
        scores(j0, nk, i0);
        probs_rows(p, w, bias.data(), i0, j0, nk, /*with_ds=*/true);
        const scalar_t* qv = w.qv.get() + i0 * D;
        const scalar_t* dov = w.dov.get() + i0 * D;
        cpublas::brgemm(nk, D, kBQ, kBQ, D, D, true, w.pt.get(), dov, w.dvf.get(), true);  // dV_j += P^T dO_i
        for (int part = 0; part < 2; ++part) {  // the hi and the lo parts of dS
          const scalar_t* dst = part ? w.dstl.get() : w.dst.get();
          const scalar_t* dsv = part ? w.dsvl.get() : w.dsv.get();
          cpublas::brgemm(nk, D, kBQ, kBQ, D, D, true, dst, qv, w.dkf.get(), true);    // dK_j += dS^T Q_i
          cpublas::brgemm(D, kBQ, kBK, kBK, kBQ, kBQ, true, w.kt.get(), dsv,           // dQ_i^T += K_j^T dS^T
                          w.dqt.get() + i0 * D, true);
        }
      }
    }
    for (int64_t r = 0; r < nk; ++r) {
      const int64_t o = ((b * p.Sk + j0 + r) * dkv_heads + dkv_h) * D;
      dk.put(o, w.dkf.get() + r * D, D);
      dv.put(o, w.dvf.get() + r * D, D);
    }
  }
  float* row = w.dkf.get();  // free now: one row of dq at a time
  for (int64_t i = 0; i < Sq; ++i) {
    const float* col = w.dqt.get() + (i / kBQ) * kBQ * D + i % kBQ;
    for (int64_t d = 0; d < D; ++d) row[d] = col[d * kBQ];
    dq.put(((b * Sq + i) * p.H + h) * D, row, D);
  }
}

}  // namespace

// Whether run_bwd_brgemm takes these inputs here: 16-bit types that oneDNN runs on AMX tiles, even D.
template <typename scalar_t>
bool bwd_brgemm_runs(const AttnDims& d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return false;
  } else {
    return d.D % 2 == 0 && cpublas::could_pack(c10::CppTypeToScalarType<scalar_t>::value);
  }
}

// As run_bwd_f32 (flash_attn_bwd.h), on AMX.
template <typename scalar_t>
void run_bwd_brgemm(const AttnDims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, bool delta_from_p,
                    double scale, bool causal, const std::optional<at::Tensor>& kv_mask, const at::Tensor& dq,
                    const at::Tensor& dk, const at::Tensor& dv) {
  for_each_bwd_head<scalar_t>(
      d, dout, q, k, v, lse, delta, delta_from_p, scale, causal, kv_mask, dq, dk, dv, d.D,
      [&](const BwdF32& p, const auto& qr, const auto& kr, const auto& vr, const auto& doutr, const GradRows& dqw,
          const GradRows& dkw, const GradRows& dvw, int64_t dkv_heads, int64_t begin, int64_t end) {
        BwdBrScratch<scalar_t> w(round_up(d.Sq, kBQ), d.D);
        for (int64_t t = begin; t < end; ++t)
          bwd_head_brgemm<scalar_t>(p, qr, kr, vr, doutr, dqw, dkw, dvw, dkv_heads, t / d.H, t % d.H, w);
        cpublas::brgemm_release(true);
      });
}

}  // namespace cp_attention::cpu::CPA_ISA
