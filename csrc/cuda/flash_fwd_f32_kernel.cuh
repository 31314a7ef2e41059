// float32 SIMT flash-attention forward (no tensor cores): the CUDA path for float32 inputs. It shares the
// parameters, causal/mask limits and (out, lse) epilogue with the tensor-core kernel in flash_fwd_kernel.cuh.
// Launched by flash_fwd_f32.cu; also compiled for the CPU by the lane-level emulation of the tests.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/flash_fwd_kernel.cuh"

namespace cp_attention {
namespace flash {

// kF32Warps warps, kF32RowsPerWarp query rows each, key blocks of 32 (one per lane).
constexpr int kF32Warps = 4;
constexpr int kF32RowsPerWarp = 4;
constexpr int kF32BlockM = kF32Warps * kF32RowsPerWarp;
constexpr int kF32BlockN = 32;
constexpr int kF32Threads = kF32Warps * 32;
constexpr int kF32MaxCols = 8;  // output columns per lane: d = lane + 32 c, D <= 256

// Shared memory: Q (pre-scaled) [kF32BlockM][D], K [32][D + 1] (odd stride: lane j reads row j without
// bank conflicts), V [32][D].
inline size_t f32_smem_bytes(int D) {
  return sizeof(float) * (static_cast<size_t>(kF32BlockM) * D + static_cast<size_t>(kF32BlockN) * (D + 1) +
                          static_cast<size_t>(kF32BlockN) * D);
}

__global__ void __launch_bounds__(kF32Threads) flash_fwd_f32_kernel(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = p.D;
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + kF32BlockM * D;
  float* sV = sK + kF32BlockN * (D + 1);

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const CtaWork w = cta_work(p);
  const int b = w.b, h = w.h, hk = w.hk;
  const int m0 = w.mb * kF32BlockM;
  const int n_end = block_key_end(p, m0, kF32BlockM);

  const float* qg = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh;
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const float* vg = static_cast<const float*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const uint8_t* mrow = p.mask != nullptr ? p.mask + b * p.m_sb : nullptr;

  for (int x = tid; x < kF32BlockM * D; x += kF32Threads) {
    const int r = x / D, d = x - r * D;
    const int i = m0 + r;
    sQ[x] = i < p.Sq ? qg[static_cast<int64_t>(i) * p.q_ss + d] * p.scale_log2 : 0.f;
  }

  float o[kF32RowsPerWarp][kF32MaxCols];
  float row_m[kF32RowsPerWarp], row_l[kF32RowsPerWarp];
  int lim[kF32RowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kF32RowsPerWarp; ++rr) {
    row_m[rr] = kNegInf;
    row_l[rr] = 0.f;
    lim[rr] = row_key_limit(p, static_cast<int64_t>(m0) + warp * kF32RowsPerWarp + rr);
#pragma unroll
    for (int c = 0; c < kF32MaxCols; ++c) o[rr][c] = 0.f;
  }
  const int n_cols = (D + 31) / 32;

  for (int n0 = 0; n0 < n_end; n0 += kF32BlockN) {
    __syncthreads();  // the previous block's K/V (and, first time round, nothing) are no longer read
    for (int x = tid; x < kF32BlockN * D; x += kF32Threads) {
      const int j = x / D, d = x - j * D;
      const bool in = n0 + j < p.Sk;
      sK[j * (D + 1) + d] = in ? kg[static_cast<int64_t>(n0 + j) * p.k_ss + d] : 0.f;
      sV[x] = in ? vg[static_cast<int64_t>(n0 + j) * p.v_ss + d] : 0.f;
    }
    __syncthreads();

    const int j = n0 + lane;  // this lane's key
    bool key_ok = j < p.Sk;
    if (key_ok && mrow != nullptr) key_ok = mrow[static_cast<int64_t>(j) * p.m_ss] != 0;
    const float* krow = sK + lane * (D + 1);

#pragma unroll
    for (int rr = 0; rr < kF32RowsPerWarp; ++rr) {
      const float* qrow = sQ + (warp * kF32RowsPerWarp + rr) * D;
      float sc = 0.f;
      for (int d = 0; d < D; ++d) sc = fmaf(qrow[d], krow[d], sc);
      const float x = (key_ok && j <= lim[rr]) ? sc : kNegInf;
      float mx = x;
#pragma unroll
      for (int w = 16; w > 0; w >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
      const float m_new = fmaxf(row_m[rr], mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = fast_exp2(row_m[rr] - m_use);
      row_m[rr] = m_new;
      const float pj = fast_exp2(x - m_use);
      float sum = pj;
#pragma unroll
      for (int w = 16; w > 0; w >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
      row_l[rr] = row_l[rr] * alpha + sum;
#pragma unroll
      for (int c = 0; c < kF32MaxCols; ++c) o[rr][c] *= alpha;
      for (int jj = 0; jj < kF32BlockN; ++jj) {
        const float pb = __shfl_sync(0xffffffffu, pj, jj);
        const float* vrow = sV + jj * D + lane;
#pragma unroll
        for (int c = 0; c < kF32MaxCols; ++c)
          if (c < n_cols && lane + 32 * c < D) o[rr][c] = fmaf(pb, vrow[32 * c], o[rr][c]);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kF32RowsPerWarp; ++rr) {
    const int64_t i = static_cast<int64_t>(m0) + warp * kF32RowsPerWarp + rr;
    const float l = row_l[rr];  // already the warp-wide sum
    // Lane 0 leads the row.
    const RowEnd e = finish_row(p, b, h, i, l, row_m[rr], old_lse(p, b, h, i, lane == 0, 0), lane == 0);
    if (!e.write) continue;
    const RowPlan& pl = e.plan;
    const float inv = e.inv;
    float* op = static_cast<float*>(p.out) + b * p.o_sb + i * p.o_ss + h * p.o_sh;
#pragma unroll
    for (int c = 0; c < kF32MaxCols; ++c)
      if (lane + 32 * c < D) write_elem(op, p.o_sd, lane + 32 * c, o[rr][c] * inv, pl);
  }
}

}  // namespace flash
}  // namespace cp_attention
