#pragma once
// Flash-attention forward on the CPU, returning the log-sum-exp (docs/design.md, "LSE").
//
// One task is (batch, head, block of bq queries). For each block of bk keys the task computes
// S^T = K Q^T (keys x queries), applies the masks, updates the running max m and sum l per query with the
// online softmax, and accumulates O^T += V^T P^T, all in float32 and in per-thread buffers: the Sq x Sk
// score matrix never exists. Queries sit on the vector axis (see vec_tiles.h), so reductions over keys are
// element-wise maxima and sums across rows of S^T.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <memory>
#include <new>

#include "checks.h"
#include "cpu/kernels/vec_tiles.h"

namespace cp_attention::cpu::CPA_ISA {
namespace {


// Per-thread scratch: Q^T, S^T (reused as P^T), O^T, the softmax state, and float copies of K/V blocks.
struct Scratch {
  Buffer qt, st, ot, kf, vf, m, l, alpha;
  Scratch(int64_t D, int64_t bq, int64_t bk)
      : qt(make_buffer(D * bq)), st(make_buffer(bk * bq)), ot(make_buffer(D * bq)), kf(make_buffer(bk * D)),
        vf(make_buffer(bk * D)), m(make_buffer(bq)), l(make_buffer(bq)), alpha(make_buffer(bq)) {}
};

struct Problem {
  int64_t B, Sq, Sk, H, Hkv, D;
  int64_t bq, bk;  // queries per task (a multiple of kTileCols) and keys per inner step
  float scale;
  bool causal;
  const bool* mask;  // [B, Sk] or nullptr
  int64_t mask_s0, mask_s1;
};

// Where a block's results go. Plain forward: out (fresh, contiguous) and lse are written. Accumulate
// (flash_attn_fwd_acc_): the block's partial (o, l) is merged into the running (out, lse) in place, with the
// merge rule of docs/design.md, "Merging partial results", so a ring step needs no second pass over a
// partial out.
template <typename out_t>
struct Sink {
  out_t* out;
  int64_t os[3];  // strides of out's B, S, H dims (D is contiguous)
  float* lse;
  int64_t ls[3];  // strides of lse's B, H, S dims
  bool accumulate;

  // Row (b, h, i): src[d * src_stride] is the unnormalized O row, m and l its running max and sum.
  void write(int64_t b, int64_t h, int64_t i, const float* src, int64_t src_stride, float m, float l,
             int64_t D) const {
    out_t* orow = out + b * os[0] + i * os[1] + h * os[2];
    float& lrow = lse[b * ls[0] + h * ls[1] + i * ls[2]];
    const float old = accumulate ? lrow : kNegInf;
    if (l == 0.f) {  // saw no key: an accumulator keeps its state (an empty one is zeroed, never NaN)
      if (old == kNegInf) {
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<out_t>(0.f);
        lrow = kNegInf;
      }
      return;
    }
    const float lnew = m + std::log(l);
    if (old == kNegInf) {  // nothing to merge with; the old out is not read (it may be garbage)
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<out_t>(src[d * src_stride] * inv);
      lrow = lnew;
      return;
    }
    const float mx = std::max(old, lnew);
    const float wa = std::exp(old - mx), wb = std::exp(lnew - mx), sum = wa + wb;
    const float ca = wa / sum, cb = wb / (sum * l);  // cb also normalizes the new side by its sum l
    for (int64_t d = 0; d < D; ++d)
      orow[d] = static_cast<out_t>(static_cast<float>(orow[d]) * ca + src[d * src_stride] * cb);
    lrow = mx + std::log(sum);
  }
};

// Online-softmax update for one key block. `st` holds S^T in panel layout (vec_tiles.h): panel p, key j,
// query p * kTileCols + x at st[p * ps + j * kTileCols + x]. Turns it into P^T = exp(S^T - m_new), updates
// m and l, and leaves the O^T rescale factor exp(m_old - m_new) in alpha.
inline void softmax_block(float* st, int64_t ps, int64_t nk, int64_t panels, float* m, float* l, float* alpha) {
  const Vec neg_inf(kNegInf), zero(0.f);
  for (int64_t c = 0; c < panels * kTileCols; c += kVecLen) {
    float* col = st + (c / kTileCols) * ps + c % kTileCols;
    Vec mx = neg_inf;
    for (int64_t j = 0; j < nk; ++j) mx = at::vec::maximum(mx, Vec::loadu(col + j * kTileCols));
    const Vec m_old = Vec::loadu(m + c);
    const Vec m_new = at::vec::maximum(m_old, mx);
    // A query that has seen no key yet keeps m = -inf; exponentiate against 0 so that its masked scores
    // (-inf) give 0 instead of NaN from (-inf) - (-inf).
    const Vec m_use = Vec::blendv(m_new, zero, m_new == neg_inf);
    Vec sum = zero;
    for (int64_t j = 0; j < nk; ++j) {
      const Vec p = (Vec::loadu(col + j * kTileCols) - m_use).exp_u20();
      p.store(col + j * kTileCols);
      sum = sum + p;
    }
    const Vec a = (m_old - m_use).exp_u20();
    (Vec::loadu(l + c) * a + sum).store(l + c);
    m_new.store(m + c);
    a.store(alpha + c);
  }
}

// Prefetches the cache lines of the next K/V block a few at a time, called between micro tiles. K/V rows
// are one head-stride apart, a pattern the hardware prefetchers follow poorly, and a burst of hundreds of
// prefetches overflows the miss buffers (most are dropped); spread out, they land in L2 in time. Measured:
// copying the K/V rows was ~19% of the kernel time before.
template <typename scalar_t>
struct NextBlockPrefetch {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  const scalar_t *k = nullptr, *v = nullptr;
  int64_t k_rs = 0, v_rs = 0, rows = 0, lines_per_row = 0, per_call = 0, next = 0, total = 0;

  void reset(const scalar_t* k_, int64_t k_rs_, const scalar_t* v_, int64_t v_rs_, int64_t rows_, int64_t D,
             int64_t calls) {
    k = k_, v = v_, k_rs = k_rs_, v_rs = v_rs_, rows = rows_;
    lines_per_row = (D + kLine - 1) / kLine;
    total = 2 * rows * lines_per_row;
    per_call = calls > 0 ? (total + calls - 1) / calls : total;
    next = 0;
  }
  void operator()() {
    for (int64_t n = 0; n < per_call && next < total; ++n, ++next) {
      const int64_t line = next % lines_per_row, row = (next / lines_per_row) % rows;
      const scalar_t* base = next < total / 2 ? k + row * k_rs : v + row * v_rs;
      __builtin_prefetch(base + line * kLine, 0, 2);
    }
  }
};

template <typename scalar_t, typename out_t>
void attend_block_of_queries(const Problem& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                             const int64_t* qs, const int64_t* ks, const int64_t* vs, int64_t b, int64_t h,
                             int64_t i0, Scratch& w, const Sink<out_t>& sink) {
  const int64_t D = p.D, bq = p.bq, bk = p.bk;
  const int64_t nq = std::min(bq, p.Sq - i0);
  const int64_t cols = (nq + kTileCols - 1) / kTileCols * kTileCols;
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t off = p.Sk - p.Sq;  // causal: query i sees key j iff j <= i + off

  // Q^T, O^T and S^T live in panel layout (vec_tiles.h): query i is column i % T of panel i / T.
  constexpr int64_t T = kTileCols;
  const int64_t panels = cols / T;
  const int64_t qo_ps = D * T, s_ps = bk * T;  // floats between panels

  // Q^T, scaled once here so scores need no extra pass; padded columns are zero.
  float* qt = w.qt.get();
  for (int64_t i = 0; i < cols; ++i) {
    float* dst = qt + (i / T) * qo_ps + i % T;
    if (i < nq) {
      const scalar_t* row = q + b * qs[0] + (i0 + i) * qs[1] + h * qs[2];
      for (int64_t d = 0; d < D; ++d) dst[d * T] = static_cast<float>(row[d]) * p.scale;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * T] = 0.f;
    }
  }
  float *m = w.m.get(), *l = w.l.get(), *alpha = w.alpha.get(), *ot = w.ot.get(), *st = w.st.get();
  for (int64_t i = 0; i < cols; ++i) {
    m[i] = kNegInf;
    l[i] = 0.f;
  }
  std::fill(ot, ot + panels * qo_ps, 0.f);

  int64_t j_end = p.Sk;
  if (p.causal) j_end = std::clamp<int64_t>(i0 + nq + off, 0, p.Sk);
  const bool* mask = p.mask ? p.mask + b * p.mask_s0 : nullptr;
  NextBlockPrefetch<scalar_t> pf;

  for (int64_t j0 = 0; j0 < j_end; j0 += bk) {
    const int64_t nk = std::min(bk, j_end - j0);
    int64_t visible = nk;
    if (mask) {
      visible = 0;
      for (int64_t j = 0; j < nk; ++j) visible += mask[(j0 + j) * p.mask_s1];
      if (visible == 0) continue;  // nothing to see in this block
    }
    // K and V blocks are copied (and widened) into contiguous float32 rows, so the micro tiles read rows
    // that sit in L1 instead of rows one head-stride apart.
    float* kb = w.kf.get();
    float* vb = w.vf.get();
    for (int64_t j = 0; j < nk; ++j) {
      row_to_float(k + b * ks[0] + (j0 + j) * ks[1] + hk * ks[2], kb + j * D, D);
      row_to_float(v + b * vs[0] + (j0 + j) * vs[1] + hk * vs[2], vb + j * D, D);
    }
    if (j0 + bk < j_end) {
      pf.reset(k + b * ks[0] + (j0 + bk) * ks[1] + hk * ks[2], ks[1], v + b * vs[0] + (j0 + bk) * vs[1] + hk * vs[2],
               vs[1], std::min(bk, j_end - j0 - bk), D, panel_gemm_tiles(nk, panels) + panel_gemm_tiles(D, panels));
    } else {
      pf.total = 0;
    }
    // S^T[j, i] = sum_d K[j, d] * Q^T[d, i]
    panel_gemm<false>(nk, D, panels, kb, D, 1, qt, qo_ps, st, s_ps, pf);
    if (visible < nk) {
      for (int64_t j = 0; j < nk; ++j)
        if (!mask[(j0 + j) * p.mask_s1])
          for (int64_t pi = 0; pi < panels; ++pi) std::fill_n(st + pi * s_ps + j * T, T, kNegInf);
    }
    if (p.causal && j0 + nk - 1 > i0 + off) {
      for (int64_t j = 0; j < nk; ++j) {
        // queries i < j0 + j - off - i0 of this block do not see key j0 + j
        const int64_t hide = std::min(cols, j0 + j - off - i0);
        for (int64_t i = 0; i < hide; ++i) st[(i / T) * s_ps + j * T + i % T] = kNegInf;
      }
    }
    softmax_block(st, s_ps, nk, panels, m, l, alpha);
    for (int64_t pi = 0; pi < panels; ++pi) {
      float* o = ot + pi * qo_ps;
      const Vec a0 = Vec::loadu(alpha + pi * T), a1 = Vec::loadu(alpha + pi * T + kVecLen);
      for (int64_t d = 0; d < D; ++d) {
        (Vec::loadu(o + d * T) * a0).store(o + d * T);
        (Vec::loadu(o + d * T + kVecLen) * a1).store(o + d * T + kVecLen);
      }
    }
    // O^T[d, i] += sum_j V[j, d] * P^T[j, i]
    panel_gemm<true>(D, nk, panels, vb, 1, D, st, s_ps, ot, qo_ps, pf);
  }

  // Epilogue: normalize and write (or merge into) out [B, Sq, H, D] and lse [B, H, Sq].
  for (int64_t i = 0; i < nq; ++i) sink.write(b, h, i0 + i, ot + (i / T) * qo_ps + i % T, T, m[i], l[i], D);
}

template <typename scalar_t, typename out_t>
void flash_attn_fwd_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const Sink<out_t>& sink) {
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const int64_t n_qblocks = (p.Sq + p.bq - 1) / p.bq;
  at::parallel_for(0, p.B * p.H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p.D, p.bq, p.bk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / n_qblocks, r = t % n_qblocks;
      // Under causal masking later query blocks cost more; interleaving first and last blocks keeps the
      // contiguous task ranges that parallel_for hands each thread balanced.
      const int64_t qb = p.causal ? ((r % 2 == 0) ? r / 2 : n_qblocks - 1 - r / 2) : r;
      attend_block_of_queries<scalar_t, out_t>(p, qp, kp, vp, qs, ks, vs, bh / p.H, bh % p.H, qb * p.bq, w,
                                                sink);
    }
  });
}

// Block sizes: a larger query block reuses each K/V block for more queries (less K/V traffic from L3 and
// memory), as long as Q^T and O^T (D x bq floats each) and S^T (bk x bq) stay in L2; short query sequences
// get smaller blocks so that every thread has work. Measured on a 2-core AVX2 machine: bq 256 beat 128 and
// bk 64 beat 128 for D <= 128.
std::pair<int64_t, int64_t> pick_blocks(const AttnDims& d) {
  int64_t bq = d.D <= 128 ? 256 : 128;
  const int64_t bk = 64;
  const int64_t threads = at::get_num_threads();
  while (bq > kTileCols && d.B * d.H * ((d.Sq + bq - 1) / bq) < 2 * threads) bq /= 2;
  bq = std::max<int64_t>(kTileCols, bq / kTileCols * kTileCols);
  return {bq, bk};
}

Problem make_problem(const AttnDims& d, double scale, bool causal,
                     const std::optional<at::Tensor>& kv_mask) {
  const auto [bq, bk] = pick_blocks(d);
  Problem p{d.B, d.Sq, d.Sk, d.H, d.Hkv, d.D, bq, bk,
            static_cast<float>(scale),
            causal, nullptr, 0, 0};
  if (kv_mask.has_value()) {
    p.mask = kv_mask->const_data_ptr<bool>();
    p.mask_s0 = kv_mask->stride(0);
    p.mask_s1 = kv_mask->stride(1);
  }
  return p;
}

template <typename scalar_t, typename out_t>
void run(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
         const at::Tensor& lse, bool accumulate) {
  const Sink<out_t> sink{out.mutable_data_ptr<out_t>(), {out.stride(0), out.stride(1), out.stride(2)},
                         lse.mutable_data_ptr<float>(), {lse.stride(0), lse.stride(1), lse.stride(2)},
                         accumulate};
  flash_attn_fwd_kernel<scalar_t, out_t>(p, q, k, v, sink);
}

}  // namespace

// Calls f.template operator()<scalar_t, out_t>() with q's element type and out's: q's, or float32 (an
// accumulating state of half inputs). The dtypes were checked by the caller.
template <typename F>
void with_fwd_types(const at::Tensor& q, const at::Tensor& out, F&& f) {
  const bool f32_out = out.scalar_type() == at::kFloat;
  switch (q.scalar_type()) {
    case at::kFloat: f.template operator()<float, float>(); break;
    case at::kHalf:
      f32_out ? f.template operator()<at::Half, float>() : f.template operator()<at::Half, at::Half>();
      break;
    default:
      f32_out ? f.template operator()<at::BFloat16, float>()
              : f.template operator()<at::BFloat16, at::BFloat16>();
      break;
  }
}

// The forward into out/lse (allocated and checked by the caller, cpu/dispatch.cpp): written fresh, or
// merged into them when `accumulate` (the fused ring step). out is q's dtype or, when accumulating, float32.
void flash_fwd_panels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                      const at::Tensor& lse, double scale, bool causal, const std::optional<at::Tensor>& kv_mask,
                      bool accumulate) {
  const AttnDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  const Problem p = make_problem(d, scale, causal, kv_mask);
  with_fwd_types(q, out, [&]<typename scalar_t, typename out_t>() {
    run<scalar_t, out_t>(p, q, k, v, out, lse, accumulate);
  });
}

}  // namespace cp_attention::cpu::CPA_ISA
