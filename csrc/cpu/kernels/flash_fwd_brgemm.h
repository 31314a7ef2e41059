#pragma once
// Flash-attention forward on oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm, the one
// torch's own CPU flash attention calls). Two routes for the products:
// - float32 products on oneDNN's FMA kernels for AVX2 or AVX-512, in the avx2, avx512 and amx copies. 16-bit
//   inputs take this route too where there are no AMX tiles of their type: K, V and each block of Q are
//   converted to float32 as they are packed (K and V packs then take twice the memory of K and V).
// - 16-bit products on AMX tiles, in the amx copy only (CPA_WITH_AMX), where oneDNN reports tiles of the
//   type (brgemm_tiles).
//
// Queries are rows here (the panel kernel of flash_attn_fwd.h puts them on the vector axis): one task is
// (batch, head, block of bq queries); per block of bk keys it computes S = Q K^T with brgemm, the online
// softmax row by row in the log2 domain, and O += P V with brgemm. K^T and V are first packed once per call
// into the layouts brgemm reads (VNNI pairs for 16-bit types), as contiguous blocks: extra memory the size
// of K and V. The results go through the same Sink as the panel kernel, so the fused ring step (accumulate)
// shares its merge rule.
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/kernels/flash_attn_fwd.h"

namespace cp_attention::cpu::CPA_ISA {
namespace {

namespace cpublas = at::native::cpublas;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kNBlock = 64;  // brgemm output columns per call: oneDNN's AMX kernels favour N <= 64
#ifdef CPA_WITH_AMX
constexpr bool kWith16Bit = true;
#else
constexpr bool kWith16Bit = false;
#endif

// 2^f for |f| <= 1/2 from its degree-6 Taylor polynomial (relative error about 1e-7 on that interval).
inline Vec exp2_reduced(const Vec& f) {
  Vec p(1.5403530393381606e-4f);  // ln2^6 / 6!
  p = at::vec::fmadd(p, f, Vec(1.3333558146428443e-3f));
  p = at::vec::fmadd(p, f, Vec(9.618129107628477e-3f));
  p = at::vec::fmadd(p, f, Vec(5.550410866482158e-2f));
  p = at::vec::fmadd(p, f, Vec(0.2402265069591007f));
  p = at::vec::fmadd(p, f, Vec(0.6931471805599453f));
  return at::vec::fmadd(p, f, Vec(1.f));
}

// 2^x for x <= 0, with 2^-inf = 0: x = n + f with n = round(x), 2^f from exp2_reduced, scaled by 2^n.
// Masked scores (-inf) give exactly 0, not NaN.
#if CPA_VEC_FLOATS == 16
// AVX-512 scales by 2^n with vscalefps; clamping x at -160 sends -inf to 0 (2^-160 is below every float32).
inline Vec exp2_nonpositive(const Vec& xv) {
  const __m512 x = _mm512_max_ps(xv, _mm512_set1_ps(-160.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return Vec(_mm512_scalef_ps(exp2_reduced(Vec(_mm512_sub_ps(x, n))), n));
}
inline Vec max_raw(const Vec& a, const Vec& b) { return Vec(_mm512_max_ps(a, b)); }
inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }
inline float reduce_max(const Vec& v) { return _mm512_reduce_max_ps(v); }
inline float reduce_add(const Vec& v) { return _mm512_reduce_add_ps(v); }
#else
// AVX2 builds 2^n in the exponent bits, for n >= -126 (a normal float); x below -126 gives 0 (2^x < 2^-126
// is a denormal, negligible beside the row's maximum term, 1).
inline Vec exp2_nonpositive(const Vec& xv) {
  const __m256 lo = _mm256_set1_ps(-126.f);
  const __m256 tiny = _mm256_cmp_ps(xv, lo, _CMP_LT_OQ);
  const __m256 x = _mm256_max_ps(xv, lo);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(exp2_reduced(Vec(_mm256_sub_ps(x, n))), _mm256_castsi256_ps(bits));
  return Vec(_mm256_andnot_ps(tiny, y));
}
inline Vec max_raw(const Vec& a, const Vec& b) { return Vec(_mm256_max_ps(a, b)); }
inline float reduce_max(const Vec& v) {
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
}
inline float reduce_add(const Vec& v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#endif

#ifdef CPA_WITH_AMX
inline __mmask32 tail32(int64_t n) { return n >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << n) - 1); }
#endif

struct RowsProblem {
  int64_t B, Sq, Sk, H, Hkv, D;
  int64_t bq, bk;  // queries per task; keys per block (a multiple of kNBlock)
  int64_t Dp;      // the QK^T reduction length: D, rounded up to even for VNNI pairs
  int64_t bkp;     // the PV reduction length per block: bk (a multiple of 64, so even)
  int64_t nkb;     // key blocks
  int64_t ldk;     // row stride of packed K^T, in words (bk + pad; bk in the backward's use)
  int64_t lds;     // row stride of the scores S and of P, in elements (bk + pad)
  float scale2;    // scale * log2(e): scores go straight to the log2 domain
  bool causal;
  const bool* mask;
  int64_t mask_s0, mask_s1;
};

// K^T of key block (b, hk, jb) as brgemm's B operand, [Dp words][ldk]: a word is one float32, or the VNNI
// pair (d, d+1) of a 16-bit type, which is two adjacent elements of a key row. Either way the block is a
// 32-bit transpose of the key rows (with gathers on AVX-512 where nothing is converted); keys past the end
// and the pad dimension are zero.
template <typename src_t, typename mm_t>
void pack_k_block(const RowsProblem& p, const src_t* krow0, int64_t ks1, int64_t nk, mm_t* dst) {
#if CPA_VEC_FLOATS == 16
  if constexpr (std::is_same_v<src_t, mm_t>) {
    constexpr bool kF32 = std::is_same_v<mm_t, float>;
    const int64_t full_words = kF32 ? p.D : p.D / 2;  // words made of two real elements
    const int64_t words = kF32 ? p.D : p.Dp / 2;
    int32_t* out = reinterpret_cast<int32_t*>(dst);
    const bool word_rows = kF32 || ks1 % 2 == 0;  // rows start on a word boundary: gather words
    const int64_t stride_words = kF32 ? ks1 : ks1 / 2;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(stride_words)));
    for (int64_t j = 0; j < p.bk; j += 16) {
      const int64_t rows = std::clamp<int64_t>(nk - j, 0, 16);
      const __mmask16 m = tail16(rows);
      if (word_rows && rows > 0) {
        const int32_t* base = reinterpret_cast<const int32_t*>(krow0 + j * ks1);
        for (int64_t w = 0; w < full_words; ++w)
          _mm512_storeu_si512(out + w * p.ldk + j,
                              _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, base + w, 4));
      } else {
        for (int64_t w = 0; w < full_words; ++w) _mm512_storeu_si512(out + w * p.ldk + j, _mm512_setzero_si512());
        for (int64_t r = 0; r < rows; ++r) {
          const src_t* row = krow0 + (j + r) * ks1;
          for (int64_t w = 0; w < full_words; ++w) {
            mm_t* pair = dst + (w * p.ldk + j + r) * 2;
            pair[0] = row[2 * w];
            pair[1] = row[2 * w + 1];
          }
        }
      }
      if (words > full_words) {  // odd D (16-bit types): the last word pairs element D-1 with a zero
        for (int64_t r = 0; r < 16; ++r) {
          mm_t* pair = dst + (full_words * p.ldk + j + r) * 2;
          pair[0] = r < rows ? krow0[(j + r) * ks1 + p.D - 1] : mm_t(0.f);
          pair[1] = mm_t(0.f);
        }
      }
    }
  } else
#endif
  {
    static_assert(std::is_same_v<mm_t, float>, "16-bit products are built into the amx copy only");
    for (int64_t j = 0; j < p.bk; j += 8) {  // 8 keys at a time: 32 contiguous bytes of each packed row
      const int64_t rows = std::clamp<int64_t>(nk - j, 0, 8);
      for (int64_t d = 0; d < p.D; ++d) {
        float* o = dst + d * p.ldk + j;
        for (int64_t r = 0; r < 8; ++r) o[r] = r < rows ? static_cast<float>(krow0[(j + r) * ks1 + d]) : 0.f;
      }
    }
  }
}

// V of key block (b, hk, jb) as brgemm's B operand of P V: [bk][D] float32 rows, or for 16-bit products
// VNNI [bk / 2][D][2] (keys 2r and 2r+1 interleaved), zero past the last key.
template <typename src_t, typename mm_t>
void pack_v_block(const RowsProblem& p, const src_t* vrow0, int64_t vs1, int64_t nk, mm_t* dst) {
  const int64_t D = p.D;
  if constexpr (std::is_same_v<mm_t, float>) {
    for (int64_t j = 0; j < p.bkp; ++j) {
      if (j >= nk) std::memset(dst + j * D, 0, D * sizeof(float));
      else if constexpr (std::is_same_v<src_t, float>) std::memcpy(dst + j * D, vrow0 + j * vs1, D * sizeof(float));
      else for (int64_t d = 0; d < D; ++d) dst[j * D + d] = static_cast<float>(vrow0[j * vs1 + d]);
    }
  } else {
#ifdef CPA_WITH_AMX
    static_assert(std::is_same_v<src_t, mm_t>);
    // Lanes 0..31 of the result interleave elements 0..15 of rows a and b; lanes 32..63 elements 16..31.
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                        6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t r = 0; r < p.bkp / 2; ++r) {
      const int64_t ja = 2 * r;
      const auto* ra = reinterpret_cast<const uint16_t*>(vrow0 + ja * vs1);
      const auto* rb = reinterpret_cast<const uint16_t*>(vrow0 + (ja + 1) * vs1);
      auto* o = reinterpret_cast<uint16_t*>(dst + r * D * 2);
      for (int64_t d = 0; d < D; d += 32) {
        const int64_t n = std::min<int64_t>(32, D - d);
        const __mmask32 m = tail32(n);
        const __m512i xa = ja < nk ? _mm512_maskz_loadu_epi16(m, ra + d) : _mm512_setzero_si512();
        const __m512i xb = ja + 1 < nk ? _mm512_maskz_loadu_epi16(m, rb + d) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi16(o + 2 * d, tail32(2 * n), _mm512_permutex2var_epi16(xa, lo, xb));
        if (2 * n > 32) _mm512_mask_storeu_epi16(o + 2 * d + 32, tail32(2 * n - 32), _mm512_permutex2var_epi16(xa, hi, xb));
      }
    }
#else
    static_assert(std::is_same_v<mm_t, float>, "16-bit products are built into the amx copy only");
#endif
  }
}

// Per-thread scratch; mm_t is the products' input type.
template <typename scalar_t, typename mm_t>
struct RowsScratch {
  static constexpr bool kF32 = std::is_same_v<mm_t, float>;
  at::Tensor s_, o_, p_, q_, bias_;
  float *s, *o, *bias;  // S [bq][bk] (float32 P in place), O [bq][D], per-key mask bias [bk] (0 or -inf)
  mm_t *pb, *qpad;      // P as brgemm's A for 16-bit products [bq][bkp]; Q as A, converted or padded [bq][Dp]
  std::vector<float> m, l, coef;
  explicit RowsScratch(const RowsProblem& p)
      : s_(at::empty({p.bq * p.lds}, at::kFloat)), o_(at::empty({p.bq * p.D}, at::kFloat)),
        p_(at::empty({kF32 ? 0 : p.bq * p.lds}, c10::CppTypeToScalarType<mm_t>::value)),
        q_(at::empty({p.Dp != p.D || !std::is_same_v<scalar_t, mm_t> ? p.bq * p.Dp : 0},
                     c10::CppTypeToScalarType<mm_t>::value)),
        bias_(at::empty({p.bk}, at::kFloat)), m(p.bq), l(p.bq), coef(4 * p.bq) {
    s = s_.data_ptr<float>(), o = o_.data_ptr<float>(), bias = bias_.data_ptr<float>();
    pb = p_.data_ptr<mm_t>(), qpad = q_.data_ptr<mm_t>();
  }
};

// P's values e[0, count) of one row: float32 in place in the row of S, or rounded to the 16-bit type.
template <typename scalar_t>
inline void store_p(const Vec& e, float* row, scalar_t* prow, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    e.store(row, count);
  } else {
#ifdef CPA_WITH_AMX
    const __mmask16 t = tail16(count);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
      _mm256_mask_storeu_epi16(prow, t, (__m256i)_mm512_cvtneps_pbh(e));
    else
      _mm256_mask_storeu_epi16(prow, t, _mm512_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    static_assert(std::is_same_v<scalar_t, float>, "the 16-bit brgemm forward is built into the amx copy only");
#endif
  }
}

// Online softmax of one row of S for keys [0, n): scales to the log2 domain (adding the mask bias),
// updates the row's max m and sum l, writes P (float32 in place, or 16-bit into prow, zero up to bkp) and
// returns the factor 2^(m_old - m_new) that rescales the row's O.
template <typename scalar_t>
inline float softmax_row(float* row, int64_t n, int64_t bkp, const float* bias, float scale2, float& m, float& l,
                         scalar_t* prow) {
  constexpr int64_t V = Vec::size();
  const Vec vs(scale2), neg_inf(kNegInf);
  Vec vmax = neg_inf;
  for (int64_t j = 0; j < n; j += V) {
    const int64_t c = std::min(V, n - j);
    Vec x = Vec::loadu(row + j, c) * vs;
    if (bias) x = x + Vec::loadu(bias + j, c);
    x.store(row + j, c);
    vmax = max_raw(vmax, c == V ? x : Vec::set(neg_inf, x, c));
  }
  const float m_new = std::max(m, reduce_max(vmax));
  // A row that has seen no visible key keeps m = -inf; exponentiate against 0 so that its scores (-inf)
  // give 0 rather than NaN from (-inf) - (-inf).
  const float m_use = m_new == kNegInf ? 0.f : m_new;
  const Vec vm(m_use);
  Vec sum(0.f);
  for (int64_t j = 0; j < n; j += V) {
    const int64_t c = std::min(V, n - j);
    Vec e = exp2_nonpositive(Vec::loadu(row + j, c) - vm);
    if (c < V) e = Vec::set(Vec(0.f), e, c);
    sum = sum + e;
    store_p<scalar_t>(e, row + j, prow + j, c);
  }
  if constexpr (!std::is_same_v<scalar_t, float>) std::fill(prow + n, prow + bkp, scalar_t(0.f));
  const float alpha = m == kNegInf ? 0.f : std::exp2(m - m_use);
  l = l * alpha + reduce_add(sum);
  m = m_new;
  return alpha;
}

// The fused ring step reads the state's rows in the epilogue, from memory (a ring step's state is far
// bigger than the caches). Their lines are prefetched during the key loop instead, a share per key block,
// so the epilogue finds them in L2.
template <typename out_t>
inline void prefetch_state_rows(const Sink<out_t>& sink, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t D,
                                int64_t jb, int64_t nkb) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(out_t));
  const int64_t per = (nq + nkb - 1) / nkb;
  for (int64_t i = jb * per; i < std::min(nq, (jb + 1) * per); ++i) {
    const out_t* orow = sink.out + b * sink.os[0] + (i0 + i) * sink.os[1] + h * sink.os[2];
    for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(orow + d, 1, 2);
  }
}

// The epilogue of one query block: rows [i0, i0 + nq) of (out, lse) from the block's unnormalized O
// [nq][D], running max m (log2 domain) and sum l, written fresh or merged into the state (Sink's rule,
// docs/design.md, "Merging partial results"). The per-row exp/log work runs 16 rows at a time and the
// rows 16 floats at a time: done row by row in scalar code it cost several % of a fused ring step.
template <typename out_t>
void write_block(const Sink<out_t>& sink, int64_t b, int64_t h, int64_t i0, int64_t nq, const float* o,
                 int64_t D, const float* m, const float* l, float* coef) {
  float *old = coef, *ca = coef + nq, *cb = coef + 2 * nq, *lse_new = coef + 3 * nq;
  float* lse = sink.lse + b * sink.ls[0] + h * sink.ls[1] + i0 * sink.ls[2];
  for (int64_t i = 0; i < nq; ++i) old[i] = sink.accumulate ? lse[i * sink.ls[2]] : kNegInf;
  const Vec ln2(kLn2), neg_inf(kNegInf), zero(0.f), one(1.f);
  for (int64_t i = 0; i < nq; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), nq - i);
    const Vec lv = Vec::loadu(l + i, n), vold = Vec::loadu(old + i, n);
    // A row that saw no key has l = 0, so lnew = -inf: it keeps the state (ca = 1, cb = 0), or stays empty.
    const Vec lnew = Vec::blendv(at::vec::fmadd(Vec::loadu(m + i, n), ln2, lv.log()), neg_inf, lv == zero);
    const Vec mx = at::vec::maximum(vold, lnew);
    const Vec mx_use = Vec::blendv(mx, zero, mx == neg_inf);
    const Vec wa = (vold - mx_use).exp(), wb = (lnew - mx_use).exp(), sum = wa + wb;
    const Vec inv = Vec::blendv(one / sum, zero, sum == zero);
    (wa * inv).store(ca + i, n);
    Vec::blendv(wb * inv / lv, zero, lv == zero).store(cb + i, n);  // also normalizes O by its sum l
    Vec::blendv(mx + sum.log(), neg_inf, sum == zero).store(lse_new + i, n);
  }
  for (int64_t i = 0; i < nq; ++i) {
    out_t* orow = sink.out + b * sink.os[0] + (i0 + i) * sink.os[1] + h * sink.os[2];
    // cb = 0: nothing of this block's O counts (a row that saw no key, whose O may be uninitialized).
    static constexpr float kZeros[kMaxHeadDim] = {};
    const float* src = cb[i] != 0.f ? o + i * D : kZeros;
    lse[i * sink.ls[2]] = lse_new[i];
    const bool keep_old = old[i] != kNegInf;  // else the old out is not read: it may be garbage
    const Vec va(ca[i]), vb(cb[i]);
    int64_t d = 0;
    if constexpr (std::is_same_v<out_t, float>) {
      for (; d + Vec::size() <= D; d += Vec::size()) {
        Vec x = Vec::loadu(src + d) * vb;
        if (keep_old) x = at::vec::fmadd(Vec::loadu(orow + d), va, x);
        x.store(orow + d);
      }
    } else {  // 32 values at a time: one full vector of the 16-bit type
      using VT = at::vec::Vectorized<out_t>;
      for (; d + VT::size() <= D; d += VT::size()) {
        Vec x0 = Vec::loadu(src + d) * vb, x1 = Vec::loadu(src + d + Vec::size()) * vb;
        if (keep_old) {
          auto [o0, o1] = at::vec::convert_to_float<out_t>(VT::loadu(orow + d));
          x0 = at::vec::fmadd(o0, va, x0);
          x1 = at::vec::fmadd(o1, va, x1);
        }
        at::vec::convert_from_float<out_t>(x0, x1).store(orow + d);
      }
    }
    for (; d < D; ++d) {
      const float x = src[d] * cb[i] + (keep_old ? static_cast<float>(orow[d]) * ca[i] : 0.f);
      orow[d] = static_cast<out_t>(x);
    }
  }
}

template <typename scalar_t, typename mm_t, typename out_t>
void attend_rows(const RowsProblem& p, const scalar_t* q, const int64_t* qs, const mm_t* kpack, const mm_t* vpack,
                 int64_t b, int64_t h, int64_t i0, RowsScratch<scalar_t, mm_t>& w, const Sink<out_t>& sink) {
  constexpr bool kF32 = std::is_same_v<mm_t, float>;
  const int64_t D = p.D, nq = std::min(p.bq, p.Sq - i0), hk = h / (p.H / p.Hkv);
  const int64_t off = p.Sk - p.Sq;  // causal: query i sees key j iff j <= i + off
  const scalar_t* q0 = q + b * qs[0] + i0 * qs[1] + h * qs[2];
  const mm_t* qa;
  int64_t lda = qs[1];
  if constexpr (!std::is_same_v<scalar_t, mm_t>) {  // 16-bit inputs on float32 products: convert the block
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t d = 0; d < D; ++d) w.qpad[i * D + d] = static_cast<float>(q0[i * qs[1] + d]);
    qa = w.qpad, lda = D;
  } else if (p.Dp != D) {  // odd D, 16-bit products: VNNI reduces in pairs; pad Q with a zero column
    for (int64_t i = 0; i < nq; ++i) {
      std::copy_n(q0 + i * qs[1], D, w.qpad + i * p.Dp);
      w.qpad[i * p.Dp + D] = mm_t(0.f);
    }
    qa = w.qpad, lda = p.Dp;
  } else {
    qa = q0;
  }
  std::fill_n(w.m.data(), nq, kNegInf);
  std::fill_n(w.l.data(), nq, 0.f);
  int64_t j_end = p.Sk;
  if (p.causal) j_end = std::clamp<int64_t>(i0 + nq + off, 0, p.Sk);
  const bool* mask = p.mask ? p.mask + b * p.mask_s0 : nullptr;
  bool first = true;
  for (int64_t jb = 0; jb * p.bk < j_end; ++jb) {
    const int64_t j0 = jb * p.bk, nk = std::min(p.bk, j_end - j0);
    const float* bias = nullptr;
    if (mask) {
      int64_t visible = 0;
      for (int64_t j = 0; j < nk; ++j) {
        const bool keep = mask[(j0 + j) * p.mask_s1];
        w.bias[j] = keep ? 0.f : kNegInf;
        visible += keep;
      }
      if (visible == 0) continue;
      if (visible < nk) bias = w.bias;
    }
    const int64_t blk = (b * p.Hkv + hk) * p.nkb + jb;
    const mm_t* kb = kpack + blk * p.Dp * p.ldk;
    const int64_t ncols = (nk + kNBlock - 1) / kNBlock * kNBlock;
    for (int64_t n = 0; n < ncols; n += kNBlock)
      cpublas::brgemm(nq, kNBlock, p.Dp, lda, p.ldk, p.lds, false, qa, kb + n * (kF32 ? 1 : 2), w.s + n, !kF32);
    for (int64_t i = 0; i < nq; ++i) {
      // causal: query i0 + i sees keys j0 + j <= i0 + i + off
      const int64_t n = p.causal ? std::clamp<int64_t>(i0 + i + off - j0 + 1, 0, nk) : nk;
      const float alpha = softmax_row<mm_t>(w.s + i * p.lds, n, p.bkp, bias, p.scale2, w.m[i], w.l[i],
                                                kF32 ? nullptr : w.pb + i * p.lds);
      if constexpr (kF32) std::fill(w.s + i * p.lds + n, w.s + i * p.lds + nk, 0.f);
      if (!first && alpha != 1.f) {
        float* orow = w.o + i * D;
        const Vec va(alpha);
        for (int64_t d = 0; d < D; d += Vec::size()) {
          const int64_t c = std::min<int64_t>(Vec::size(), D - d);
          (Vec::loadu(orow + d, c) * va).store(orow + d, c);
        }
      }
    }
    if (sink.accumulate) prefetch_state_rows(sink, b, h, i0, nq, D, jb, p.nkb);
    const mm_t* vb = vpack + blk * p.bkp * D;
    // O's columns in blocks of 64 where D splits evenly, else in one call (a narrow tail block, 8 columns
    // for D = 72, runs far below the kernel's rate).
    const int64_t pv_block = D % kNBlock == 0 ? kNBlock : D;
    for (int64_t n = 0; n < D; n += pv_block) {
      const int64_t cols = std::min(pv_block, D - n);
      if constexpr (kF32)
        cpublas::brgemm(nq, cols, nk, p.lds, D, D, !first, w.s, vb + n, w.o + n, false);
      else
        cpublas::brgemm(nq, cols, p.bkp, p.lds, D, D, !first, w.pb, vb + 2 * n, w.o + n, true);
    }
    first = false;
  }
  if (first) std::fill_n(w.l.data(), nq, 0.f);  // no visible key at all: O was never written
  write_block(sink, b, h, i0, nq, w.o, D, w.m.data(), w.l.data(), w.coef.data());
}

template <typename scalar_t, typename mm_t, typename out_t>
void run_rows(const RowsProblem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, bool accumulate) {
  constexpr bool kF32 = std::is_same_v<mm_t, float>;
  const auto dtype = c10::CppTypeToScalarType<mm_t>::value;
  at::Tensor kpack = at::empty({p.B * p.Hkv * p.nkb * p.Dp * p.ldk}, q.options().dtype(dtype));
  at::Tensor vpack = at::empty({p.B * p.Hkv * p.nkb * p.bkp * p.D}, q.options().dtype(dtype));
  mm_t* kp = kpack.data_ptr<mm_t>();
  mm_t* vp = vpack.data_ptr<mm_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  at::parallel_for(0, p.B * p.Hkv * p.nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.Hkv * p.nkb), hk = (t / p.nkb) % p.Hkv, j0 = (t % p.nkb) * p.bk;
      const int64_t nk = std::min(p.bk, p.Sk - j0);
      pack_k_block(p, kd + b * k.stride(0) + j0 * k.stride(1) + hk * k.stride(2), k.stride(1), nk,
                   kp + t * p.Dp * p.ldk);
      pack_v_block(p, vd + b * v.stride(0) + j0 * v.stride(1) + hk * v.stride(2), v.stride(1), nk,
                   vp + t * p.bkp * p.D);
    }
  });
  const Sink<out_t> sink{out.mutable_data_ptr<out_t>(), {out.stride(0), out.stride(1), out.stride(2)},
                         lse.mutable_data_ptr<float>(), {lse.stride(0), lse.stride(1), lse.stride(2)},
                         accumulate};
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const int64_t nqb = (p.Sq + p.bq - 1) / p.bq;
  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    RowsScratch<scalar_t, mm_t> w(p);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, r = t % nqb;
      // Causal: interleave first and last query blocks so each thread's contiguous range is balanced.
      const int64_t qb = p.causal ? ((r % 2 == 0) ? r / 2 : nqb - 1 - r / 2) : r;
      attend_rows<scalar_t, mm_t, out_t>(p, qd, qs, kp, vp, bh / p.H, bh % p.H, qb * p.bq, w, sink);
    }
    cpublas::brgemm_release(!kF32);
  });
}

}  // namespace

// Whether flash_fwd_brgemm runs 16-bit inputs of this dtype on AMX tiles here (oneDNN's could_pack tells),
// rather than on float32 products.
bool brgemm_tiles(at::ScalarType dtype) {
  return kWith16Bit && dtype != at::kFloat && cpublas::could_pack(dtype);
}

// As flash_fwd_panels (flash_attn_fwd.h): the forward into checked, allocated out/lse, or the fused ring
// step into them when `accumulate`.
void flash_fwd_brgemm(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                      const at::Tensor& lse, double scale, bool causal, const std::optional<at::Tensor>& kv_mask,
                      bool accumulate) {
  const bool tiles = brgemm_tiles(q.scalar_type());
  RowsProblem p{};
  p.B = q.size(0), p.Sq = q.size(1), p.Sk = k.size(1), p.H = q.size(2), p.Hkv = k.size(2), p.D = q.size(3);
  // Measured with torch's block sizes as the starting point: 256 queries x 512 keys per step for long
  // sequences; shorter query sequences get smaller blocks so that every thread has tasks.
  p.bq = p.Sq >= 768 ? 256 : p.Sq >= 192 ? 64 : 32;
  const int64_t threads = at::get_num_threads();
  while (p.bq > 32 && p.B * p.H * ((p.Sq + p.bq - 1) / p.bq) < 2 * threads) p.bq /= 2;
  p.bk = std::min<int64_t>(512, (std::max<int64_t>(p.Sk, 1) + kNBlock - 1) / kNBlock * kNBlock);
  p.bkp = p.bk;
  // Rows padded by 64 bytes: at a row stride of 2 KiB (bk = 512) the products' rows share cache sets.
  p.ldk = p.bk + 16;
  p.lds = p.bk + 32;
  p.Dp = tiles ? (p.D + 1) / 2 * 2 : p.D;
  p.nkb = (p.Sk + p.bk - 1) / p.bk;
  p.scale2 = static_cast<float>(scale) * kLog2e;
  p.causal = causal;
  if (kv_mask.has_value()) {
    p.mask = kv_mask->const_data_ptr<bool>();
    p.mask_s0 = kv_mask->stride(0);
    p.mask_s1 = kv_mask->stride(1);
  }
  with_fwd_types(q, out, [&]<typename scalar_t, typename out_t>() {
    if constexpr (!std::is_same_v<scalar_t, float> && kWith16Bit) {
      if (tiles) return run_rows<scalar_t, scalar_t, out_t>(p, q, k, v, out, lse, accumulate);
    }
    run_rows<scalar_t, float, out_t>(p, q, k, v, out, lse, accumulate);
  });
}

}  // namespace cp_attention::cpu::CPA_ISA
