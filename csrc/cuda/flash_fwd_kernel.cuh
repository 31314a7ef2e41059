// Device code of the CUDA flash-attention forward (host side: flash_attn_fwd.cu; launches: flash_fwd_launch.h).
//
// Tensor-core kernel (float16 / bfloat16), FlashAttention-2 style. One CTA owns kBlockM query rows of one
// (batch, head); each warp owns kMTiles 16-row m-tiles of those rows, so the whole softmax of a row lives
// in the four lanes of one quad and needs no shared memory. Per key block of kBlockN keys:
//   S = Q K^T   mma.sync m16n8k16 (fp32 accumulate), Q and K fragments by ldmatrix from shared memory
//   online softmax in registers, exp2 with log2(e) folded into the scale
//   O += P V    P re-packed from the S accumulators in registers, V fragments by ldmatrix.trans
// K/V blocks are double-buffered: block n + 1 streams in by cp.async while block n is computed. Shared
// rows are padded by 16 bytes, which puts the 8 rows of every ldmatrix phase in 8 different bank groups.
// The epilogue stages the finished rows in shared memory and writes them along rows (stage_rows,
// write_staged).
// Head dims are compiled for kD in {32, 64, 96, 128, 256}; a smaller D is zero-padded up to kD by the
// loads (zeros change neither q.k nor the unused output columns, which are never stored).
//
// Fragment layouts used below (PTX ISA, mma.m16n8k16 with 16-bit inputs; g = lane / 4, t = lane % 4):
//   A (16 x 16): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, same cols), a2/a3 = a0/a1 at cols + 8
//   B (16 x 8):  b0 = (rows 2t, 2t+1, col g), b1 = same at rows + 8
//   C (16 x 8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols)
// ldmatrix.x4 hands lanes 8i..8i+7 the row addresses of matrix i and returns matrix i in register i, lane l
// holding row l/4, elements 2(l%4), 2(l%4)+1 (with .trans: column l/4, rows 2(l%4), 2(l%4)+1).
//
// The float32 kernel (flash_fwd_f32_kernel.cuh) is a plain SIMT fallback that shares the epilogue helpers
// here; the Hopper wgmma kernel (flash_fwd_sm90_kernel.cuh) shares the tile loads, masking, softmax and
// epilogue helpers, since its accumulators give each warp the same fragment layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/cuda_utils.cuh"

namespace cp_attention {
namespace flash {

constexpr float kNegInf = -INFINITY;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a launch needs; strides are in elements. A CTA's work is (query block, batch, head).
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;                 // q's dtype, or float32 (accumulate only)
  float* lse;
  const uint8_t* mask;       // kv_mask [B, Sk] as bytes, or nullptr
  int64_t q_sb, q_ss, q_sh;  // [B, S, H] strides; the last dim is contiguous (checked on the host)
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh, o_sd;
  int64_t l_sb, l_sh, l_ss;  // lse [B, H, Sq]
  int64_t m_sb, m_ss;        // kv_mask [B, Sk]
  int B, H, group;           // group = H / Hkv: query head h reads kv head h / group
  int Sq, Sk, D;             // D is the real head dim (<= the kernel's kD)
  int n_mblocks;             // query blocks per (batch, head)
  float scale_log2;          // scale * log2(e); > 0 for the tensor-core kernel (see the host)
  bool causal;               // bottom-right: query i sees key j iff j <= i + Sk - Sq
  bool accumulate;           // merge into (out, lse) instead of overwriting them
  bool out_f32;              // out is float32 (else q's dtype)
  bool out_vec;              // out rows allow 16-byte access (o_sd == 1, aligned, D a whole number of them)
  bool q_vec, k_vec, v_vec;  // rows 16-byte aligned and D % 8 == 0: cp.async in 16-byte chunks
  bool pingpong;             // the TMA kernel's compute warpgroups take turns issuing (Sm90Turns)
};

// ---------------------------------------------------------------------------------------------------------
// PTX wrappers. A CPU build that emulates the kernels lane by lane (tests/cuda_emulation/) replaces them
// with stand-ins of the same names and semantics.
#ifdef CP_ATTENTION_LANE_EMULATION
}  // namespace flash
}  // namespace cp_attention
#include "lane_emulation.h"
namespace cp_attention {
namespace flash {
using namespace cp_attention::lane_emulation;
#else

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes == 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's most recent cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one m16n8k16 tile, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with the hardware approximation (relative error ~2^-22); 2^-inf = +0, which masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // CP_ATTENTION_LANE_EMULATION

// ---------------------------------------------------------------------------------------------------------
// Epilogue: how a row's new result (lse_new, out_new) combines with what is in (out, lse). Shared by both
// kernels so that they agree bit for bit on the merge decisions (the same rules as merge_attn_states_).

enum RowMode : int {
  kRowKeep = 0,  // leave out and lse as they are
  kRowZero,      // out = 0, lse = -inf: the row has seen no key at all
  kRowNew,       // out = out_new, lse = lse_new (the old side holds nothing, or is not accumulated)
  kRowBlend,     // out = out_old * ca + out_new * cb, lse as given
};

struct RowPlan {
  int mode;
  float lse, ca, cb;
};

__device__ __forceinline__ RowPlan plan_row(bool accumulate, float lse_new, float lse_old) {
  RowPlan r{kRowNew, lse_new, 0.f, 1.f};
  if (lse_new == kNegInf) {
    // This K/V chunk holds no visible key for the row: keep the old state, which only needs writing when it
    // is empty too (then out must read 0, whatever the buffer held).
    r.mode = (!accumulate || lse_old == kNegInf) ? kRowZero : kRowKeep;
    return r;
  }
  if (!accumulate || lse_old == kNegInf) return r;  // old side empty: the new one passes through unread
  // A side whose weight underflows to 0 is dropped without reading its out (as merge_attn_states_ does).
  const float m = fmaxf(lse_old, lse_new);
  const float wa = expf(lse_old - m), wb = expf(lse_new - m);
  if (wb == 0.f) {
    r.mode = kRowKeep;
    return r;
  }
  if (wa == 0.f) return r;
  const float sum = wa + wb;  // in (1, 2]
  r.mode = kRowBlend;
  r.lse = m + logf(sum);
  r.ca = wa / sum;
  r.cb = wb / sum;
  return r;
}

// out_old * ca + out_new * cb, products rounded separately as in merge_attn_states_.
__device__ __forceinline__ float blend(float old_v, float new_v, const RowPlan& pl) {
  return __fadd_rn(__fmul_rn(old_v, pl.ca), __fmul_rn(new_v, pl.cb));
}

// What an out element becomes under plan pl (not kRowKeep): 0, the new value, or the blend with the old
// one (read only for kRowBlend).
template <typename Old>
__device__ __forceinline__ float planned_value(Old old_v, float new_v, const RowPlan& pl) {
  if (pl.mode == kRowZero) return 0.f;
  return pl.mode == kRowBlend ? blend(old_v(), new_v, pl) : new_v;
}

// Element c of an out row (real columns only; the caller checks c < D).
template <typename TO>
__device__ __forceinline__ void write_elem(TO* row, int64_t sd, int c, float new_v, const RowPlan& pl) {
  TO* ptr = row + static_cast<int64_t>(c) * sd;
  *ptr = cuda_util::from_float<TO>(planned_value([&] { return cuda_util::to_float(*ptr); }, new_v, pl));
}

// The running lse of row i when accumulating (-inf otherwise, or past Sq): one leader lane per row (leader,
// at lane leader_lane) reads it and shares it with the row's other lanes (a full-warp shuffle: every lane of
// the warp must call this together).
__device__ __forceinline__ float old_lse(const FwdParams& p, int b, int h, int64_t i, bool leader,
                                         int leader_lane) {
  if (!p.accumulate) return kNegInf;
  float x = kNegInf;
  if (i < p.Sq && leader) x = p.lse[b * p.l_sb + h * p.l_sh + i * p.l_ss];
  return __shfl_sync(0xffffffffu, x, leader_lane);
}

// A row's end of the key loop, common to every kernel: l is the row's full sum of 2^(s - m), m its running
// max (log2 units), lse_old what old_lse returned. Plans how its result meets (out, lse); the leader lane
// writes the new lse. write: the caller must write the row's out with plan and inv (1 / l, 0 for an empty
// row).
struct RowEnd {
  RowPlan plan;
  float inv;
  bool write;
};

__device__ __forceinline__ RowEnd finish_row(const FwdParams& p, int b, int h, int64_t i, float l, float m,
                                             float lse_old, bool leader) {
  // l > 0 iff the row saw a visible key (its maximum contributes 2^0 = 1).
  const float lse_new = l > 0.f ? m * kLn2 + logf(l) : kNegInf;
  RowEnd e{plan_row(p.accumulate, lse_new, lse_old), l > 0.f ? 1.f / l : 0.f, false};
  e.write = i < p.Sq && e.plan.mode != kRowKeep;
  if (e.write && leader) p.lse[b * p.l_sb + h * p.l_sh + i * p.l_ss] = e.plan.lse;
  return e;
}

// The work of this CTA: query block mb of (batch b, head h), reading kv head hk. Query blocks of one head
// are adjacent, so CTAs running together share K/V in L2; under causal masking the heaviest (last) query
// blocks go first.
struct CtaWork {
  int b, h, hk, mb;
};

__device__ __forceinline__ CtaWork cta_work(const FwdParams& p) {
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.n_mblocks));
  int mb = static_cast<int>(blockIdx.x) - bh * p.n_mblocks;
  if (p.causal) mb = p.n_mblocks - 1 - mb;
  const int b = bh / p.H, h = bh - b * p.H;
  return {b, h, h / p.group, mb};
}

// Keys [0, n_end) can be visible to the query block starting at row m0 (bottom-right causal cuts the rest).
__device__ __forceinline__ int block_key_end(const FwdParams& p, int m0, int block_m) {
  if (!p.causal) return p.Sk;
  const int64_t end = static_cast<int64_t>(m0) + block_m + (static_cast<int64_t>(p.Sk) - p.Sq);
  return static_cast<int>(end < 0 ? 0 : (end > p.Sk ? p.Sk : end));
}

// A 16-bit kernel's CTA: its (batch, head, first query row), how many key blocks it visits, and the global
// bases of its Q rows, its kv head's K and V, and its batch's kv_mask row (nullptr: no mask).
struct CtaTile {
  int b, h, m0, n_blocks;
  const uint16_t *qg, *kg, *vg;
  const uint8_t* mrow;
};

__device__ __forceinline__ CtaTile cta_tile(const FwdParams& p, int block_m, int block_n) {
  const CtaWork w = cta_work(p);
  CtaTile c;
  c.b = w.b;
  c.h = w.h;
  c.m0 = w.mb * block_m;
  c.n_blocks = (block_key_end(p, c.m0, block_m) + block_n - 1) / block_n;
  c.qg = static_cast<const uint16_t*>(p.q) + w.b * p.q_sb + static_cast<int64_t>(c.m0) * p.q_ss + w.h * p.q_sh;
  c.kg = static_cast<const uint16_t*>(p.k) + w.b * p.k_sb + w.hk * p.k_sh;
  c.vg = static_cast<const uint16_t*>(p.v) + w.b * p.v_sb + w.hk * p.v_sh;
  c.mrow = p.mask != nullptr ? p.mask + w.b * p.m_sb : nullptr;
  return c;
}

// Last key query row i may see (-1: none): Sk - 1, or under causal min(i + Sk - Sq, Sk - 1).
__device__ __forceinline__ int row_key_limit(const FwdParams& p, int64_t i) {
  if (!p.causal) return p.Sk - 1;
  const int64_t lim = i + (static_cast<int64_t>(p.Sk) - p.Sq);
  return static_cast<int>(lim < -1 ? -1 : (lim > p.Sk - 1 ? p.Sk - 1 : lim));
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core kernel.

template <int kD_, int kBlockM_, int kBlockN_, int kMTiles_>
struct TcConfig {
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kMTiles = kMTiles_;        // 16-row m-tiles per warp
  static constexpr int kWarpRows = 16 * kMTiles;  // query rows per warp
  static constexpr int kWarps = kBlockM / kWarpRows;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStride = kD + 8;  // shared row stride in elements: 16 bytes of padding
  static constexpr int kQElems = kBlockM * kStride;
  static constexpr int kKVElems = kBlockN * kStride;
  // Q, then K stage 0 and 1, then V stage 0 and 1.
  static constexpr int kSmemBytes = (kQElems + 4 * kKVElems) * 2;
  static constexpr int kKSteps = kD / 16;     // k-steps of Q K^T
  static constexpr int kNTiles = kBlockN / 8;  // 8-column tiles of S per m-tile
  static constexpr int kDTiles = kD / 8;       // 8-column tiles of O per m-tile
  // Q fragments stay in registers for the whole key loop while they take at most 32 registers (kD / 4 per
  // m-tile); beyond that they would crowd out O's kD / 2 registers per m-tile, so they are re-read from
  // shared memory per block instead.
  static constexpr bool kQInRegs = kD * kMTiles <= 128;
  static_assert(kD % 32 == 0 && kBlockM % kWarpRows == 0 && kBlockN % 16 == 0, "tile shapes");
  static_assert(kNTiles <= 16, "the per-thread kv_mask bits must fit in 32 bits");
};

// Tile shapes per head dim. D in {32, 64, 128}: 128-row blocks of 4 warps, each warp two 16-row m-tiles
// (32 rows). Every K and V fragment a warp loads from shared memory then feeds two mma.sync instead of
// one, which halves the shared-memory reads per tensor-core operation (with one m-tile per warp, ldmatrix
// traffic rather than the tensor cores bounds the loop). Key blocks: 64 keys, but 32 at D = 128, where 64
// needs more than 255 registers (ptxas spills 32-52 B per thread on sm_90a/sm_80; with 32 keys: 245
// registers, no spill). Two CTAs (8 warps) share an SM. D = 96 spills with two m-tiles, so it keeps one
// per warp (8 warps of 16 rows, 64-key blocks), as does D = 256 (64-row blocks of 4 warps, 32-key
// blocks), where O alone takes 128 registers per m-tile.
template <int kD>
struct TcTiles {
  static constexpr int kMTiles = (kD == 96 || kD == 256) ? 1 : 2;
  static constexpr int kBlockM = kD <= 128 ? 128 : 64;
  static constexpr int kBlockN = kD >= 128 ? 32 : 64;
  static constexpr int kMinBlocks = (kMTiles == 2 || kD <= 64) ? 2 : 1;
  using Cfg = TcConfig<kD, kBlockM, kBlockN, kMTiles>;
};

// Shared-memory tile layouts: the element offset of (row r, column d0), d0 a multiple of 8 (one 16-byte
// chunk). PaddedRows: rows of kD elements plus 16 bytes of padding (the ldmatrix kernel). Swizzled128:
// the layout wgmma reads with 128-byte swizzling (flash_fwd_sm90_kernel.cuh): 64-column panels of kRows
// rows of 128 bytes, one after the other, chunk c of row r stored at chunk c ^ (r % 8) of that row. The tile
// must start 1024-byte aligned, since the hardware swizzles the address bits themselves.
template <int kD>
struct PaddedRows {
  static constexpr int kStride = kD + 8;
  __device__ __forceinline__ static int at(int r, int d0) { return r * kStride + d0; }
};

template <int kRows>
struct Swizzled128 {
  __device__ __forceinline__ static int at(int r, int d0) {
    return (d0 >> 6) * (kRows * 64) + r * 64 + ((((d0 >> 3) & 7) ^ (r & 7)) << 3);
  }
};

// Loads a kRows x kD tile (rows [0, rows) of g, columns [0, D), the rest zero) into shared memory laid out
// by Layout. vec: 16-byte cp.async chunks (the caller must commit the group); else element loads.
template <int kRows, int kD, int kThreads, typename Layout = PaddedRows<kD>>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t row_stride, int rows, int D,
                                          bool vec, int tid) {
  constexpr int kChunksPerRow = kD / 8, kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
  if (vec) {
    // vec implies D % 8 == 0, so a chunk is wholly inside or outside the row. Out-of-range chunks copy 0
    // bytes from a valid address (the tile's first row) and zero-fill.
    if constexpr (kThreads % kChunksPerRow == 0) {
      // Every chunk of this thread sits in the same column, kThreads / kChunksPerRow rows further each time:
      // one running pointer instead of a 64-bit address per chunk, which the compiler would otherwise keep
      // live across the whole key loop.
      const int r0 = tid / kChunksPerRow, d0 = (tid % kChunksPerRow) * 8;
      constexpr int kRowStep = kThreads / kChunksPerRow;
      const uint16_t* src = g + r0 * row_stride + d0;
      const bool col_in = d0 < D;
#pragma unroll
      for (int i = 0; i < kChunks / kThreads; ++i) {
        const int r = r0 + i * kRowStep;
        const bool in = col_in && r < rows;
        cp_async_16(smem_u32(s + Layout::at(r, d0)), in ? src : g, in ? 16 : 0);
        src += kRowStep * row_stride;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kChunks / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int r = c / kChunksPerRow, d0 = (c % kChunksPerRow) * 8;
        const bool in = r < rows && d0 < D;
        cp_async_16(smem_u32(s + Layout::at(r, d0)), in ? g + r * row_stride + d0 : g, in ? 16 : 0);
      }
    }
  } else {
    // Unaligned rows or D % 8 != 0: element loads, one chunk at a time (unrolling would keep every chunk's
    // loads in flight at once and raise the register peak of the whole kernel for this rare path).
#pragma unroll 1
    for (int i = 0; i < kChunks / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunksPerRow, d0 = (c % kChunksPerRow) * 8;
      const bool in = r < rows;
      uint16_t x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = (in && d0 + e < D) ? g[r * row_stride + d0 + e] : uint16_t{0};
      uint4 w;
      w.x = x[0] | (static_cast<uint32_t>(x[1]) << 16);
      w.y = x[2] | (static_cast<uint32_t>(x[3]) << 16);
      w.z = x[4] | (static_cast<uint32_t>(x[5]) << 16);
      w.w = x[6] | (static_cast<uint32_t>(x[7]) << 16);
      *reinterpret_cast<uint4*>(s + Layout::at(r, d0)) = w;
    }
  }
}

// Issues the loads of key block [n0, n0 + kBlockN) of K and V into one stage of their shared buffers (the
// caller commits the cp.async group).
template <int kBlockN, int kD, int kThreads, typename Layout = PaddedRows<kD>>
__device__ __forceinline__ void load_kv_block(uint16_t* sk, uint16_t* sv, const uint16_t* kg, const uint16_t* vg,
                                              const FwdParams& p, int n0, int tid) {
  const int rows = min(kBlockN, p.Sk - n0);
  load_tile<kBlockN, kD, kThreads, Layout>(sk, kg + n0 * p.k_ss, p.k_ss, rows, p.D, p.k_vec, tid);
  load_tile<kBlockN, kD, kThreads, Layout>(sv, vg + n0 * p.v_ss, p.v_ss, rows, p.D, p.v_vec, tid);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_rn(float a, float b) {
  return cuda_util::detail::pack2(a, b, T{});  // a in the low half: the lower column index
}

// The per-key-block steps both tensor-core kernels share (this one and flash_fwd_sm90_kernel.cuh). They work
// on one 16-row tile of S and O in the accumulator layout of mma.sync m16n8k16, which wgmma's m64nNk16 also
// gives each warp for its 16 rows: s[nt][2 r + e] is (row g + 8 r, key n0 + 8 nt + 2 tq + e), o[dt][2 r + e]
// the same rows at columns 8 dt + 2 tq + e.

// kv_mask bits of this lane's keys: bit 2 nt + e is key n0 + 8 nt + 2 tq + e (keys past Sk read as masked).
template <int kNTiles>
__device__ __forceinline__ uint32_t kv_mask_bits(const FwdParams& p, const uint8_t* mrow, int n0, int tq) {
  if (mrow == nullptr) return 0xffffffffu;
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = n0 + nt * 8 + 2 * tq + e;
      if (j < p.Sk && mrow[static_cast<int64_t>(j) * p.m_ss] != 0) bits |= 1u << (2 * nt + e);
    }
  }
  return bits;
}

// Sets the scores of keys a row may not see to -inf: past its causal limit or Sk, or masked out. row: the
// tile's row g (row g + 8 is its second half).
template <int kNTiles>
__device__ __forceinline__ void mask_scores(float (&s)[kNTiles][4], const FwdParams& p, int64_t row, int n0,
                                            int tq, uint32_t mbits) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // Recomputed per masked block rather than kept: registers are the scarce resource here.
    const int lim = row_key_limit(p, row + 8 * r);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = n0 + nt * 8 + 2 * tq + e;
        if (j > lim || ((mbits >> (2 * nt + e)) & 1u) == 0) s[nt][2 * r + e] = kNegInf;
      }
    }
  }
}

// Online softmax on raw scores: c = scale_log2 > 0 (the host makes it so), hence max(s) * c = max(s * c) and
// p = 2^(s c - m) is one FFMA and one MUFU per score. Replaces s by p and updates the running max m and this
// lane's part of the running sum l; alpha receives the factor the rows' earlier output must be scaled by.
template <int kNTiles>
__device__ __forceinline__ void softmax_scores(float (&s)[kNTiles][4], float (&row_m)[2], float (&row_l)[2],
                                               float c, float (&alpha)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = kNegInf;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    // The quad's four lanes hold the row's columns.
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(row_m[r], mx * c);
    // A row that has seen no visible key yet keeps m = -inf; exponentiating against 0 then gives 0 for its
    // (all -inf) scores instead of NaN from -inf - -inf.
    const float m_use = m_new == kNegInf ? 0.f : m_new;
    alpha[r] = fast_exp2(row_m[r] - m_use);
    row_m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pe = fast_exp2(fmaf(s[nt][2 * r + e], c, -m_use));
        s[nt][2 * r + e] = pe;
        sum += pe;
      }
    }
    row_l[r] = row_l[r] * alpha[r] + sum;
  }
}

template <int kDTiles>
__device__ __forceinline__ void rescale_rows(float (&o)[kDTiles][4], const float (&alpha)[2]) {
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
  }
}

// softmax_scores, then the rescaling of o.
template <int kNTiles, int kDTiles>
__device__ __forceinline__ void softmax_step(float (&s)[kNTiles][4], float (&o)[kDTiles][4], float (&row_m)[2],
                                             float (&row_l)[2], float c) {
  float alpha[2];
  softmax_scores<kNTiles>(s, row_m, row_l, c, alpha);
  rescale_rows<kDTiles>(o, alpha);
}

// The A fragment (m16n8k16 layout, 16-bit) of P for keys [16 kk, 16 kk + 16): S's n-tiles 2 kk and 2 kk + 1
// as they lie in the accumulators (C layout row g / g + 8, cols 2t, 2t + 1 = A layout of a0..a3).
template <typename T, int kNTiles>
__device__ __forceinline__ void pack_p(uint32_t (&a)[4], const float (&s)[kNTiles][4], int kk) {
  a[0] = pack_rn<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack_rn<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack_rn<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack_rn<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// ---------------------------------------------------------------------------------------------------------
// Epilogue of the 16-bit kernels, staged through shared memory. In the accumulator layout a row is spread
// over the four lanes of a quad, 4 or 8 bytes each, so writing (or, accumulating, reading and rewriting) out
// from there takes many narrow accesses, each a global round trip the warp waits on in turn. Instead each
// warp writes its rows, normalized, to shared memory as float32 together with each row's merge plan
// (stage_rows), and then the whole CTA moves the tile along rows in 16-byte accesses (write_staged): out is
// read (accumulating) and written in full 32-byte sectors, and a thread issues a batch of reads of the
// running out before any of the batch's writes.

// Shared-memory layout of the staged tile: kRows rows of kD float32, then a RowPlan per row (kRowKeep also
// for rows past Sq). Row r's
// 8-float granule j lies at granule j ^ (r % 4) of the row, so that the float2 writes of a half warp (rows
// g .. g + 3, the quad's four column pairs) fall in four different bank groups; kD / 8 is a multiple of 4,
// so the swizzle stays inside the row, and 16-byte reads along a row stay conflict-free.
template <int kRows, int kD>
struct StagedTile {
  static constexpr int kFloats = kRows * kD;
  static constexpr int kBytes = kFloats * 4 + kRows * static_cast<int>(sizeof(RowPlan));
  static_assert(kD % 32 == 0, "granules of 8 floats, swizzled in groups of 4");
  __device__ __forceinline__ static int at(int r, int c) {
    return r * kD + ((((c >> 3) ^ (r & 3)) << 3) | (c & 7));
  }
  __device__ __forceinline__ static RowPlan* plans(float* tile) {
    return reinterpret_cast<RowPlan*>(tile + kFloats);
  }
  __device__ __forceinline__ static const RowPlan* plans(const float* tile) {
    return reinterpret_cast<const RowPlan*>(tile + kFloats);
  }
};

// Phase 1 of the epilogue, for kMT 16-row m-tiles of one warp: m-tile mt holds block rows lrow + 16 mt
// (this lane's g) and + 8, at global row m0 + that. Writes the rows' lse, their plans and their normalized
// out (o / l) to the staged tile. The old lse of every row is read first, in one batch. Every lane of the
// warp must call this together (old_lse shuffles).
template <int kRows, int kD, int kMT>
__device__ __forceinline__ void stage_rows(const FwdParams& p, int b, int h, int m0, int lrow,
                                           const float (&o)[kMT][kD / 8][4], const float (&row_m)[kMT][2],
                                           const float (&row_l)[kMT][2], float* tile, int lane) {
  using Tile = StagedTile<kRows, kD>;
  const int tq = lane & 3;
  float lse_old[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      lse_old[mt][r] = old_lse(p, b, h, static_cast<int64_t>(m0) + lrow + 16 * mt + 8 * r, tq == 0, lane & ~3);
  }
  RowPlan* plans = Tile::plans(tile);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_l[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int lr = lrow + 16 * mt + 8 * r;
      const int64_t i = static_cast<int64_t>(m0) + lr;
      const RowEnd e = finish_row(p, b, h, i, l, row_m[mt][r], lse_old[mt][r], tq == 0);
      if (tq == 0) {
        plans[lr] = e.plan;
        if (!e.write) plans[lr].mode = kRowKeep;
      }
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        float2* dst = reinterpret_cast<float2*>(tile + Tile::at(lr, dt * 8 + 2 * tq));
        *dst = make_float2(o[mt][dt][2 * r] * e.inv, o[mt][dt][2 * r + 1] * e.inv);
      }
    }
  }
}

// Phase 2: the CTA's kThreads threads write the staged tile's rows of global rows m0 + r into out (of type
// TO), 16 bytes (kW elements) per access where out's rows allow it (p.out_vec), else element by element.
template <typename TO, int kRows, int kD, int kThreads>
__device__ __forceinline__ void write_staged_as(const FwdParams& p, int b, int h, int m0, const float* tile,
                                                int tid) {
  using Tile = StagedTile<kRows, kD>;
  constexpr int kW = 16 / static_cast<int>(sizeof(TO));
  constexpr int kChunksPerRow = kD / kW, kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread moves the same number of chunks");
  constexpr int kPer = kChunks / kThreads;
  // Reads of the running out in flight per thread: the largest divisor of kPer up to 8.
  constexpr int kBatch = kPer % 8 == 0 ? 8 : kPer % 6 == 0 ? 6 : kPer % 4 == 0 ? 4 : kPer % 2 == 0 ? 2 : 1;
  static_assert(kPer % kBatch == 0 && kBatch <= 8, "whole batches");
  const RowPlan* plans = Tile::plans(tile);
  TO* out = static_cast<TO*>(p.out) + b * p.o_sb + h * p.o_sh + static_cast<int64_t>(m0) * p.o_ss;
  const int rows = p.Sq - m0 < kRows ? p.Sq - m0 : kRows;  // the plans mark rows past Sq too; bounds first
#pragma unroll 1
  for (int c0 = 0; c0 < kPer; c0 += kBatch) {
    int rr[kBatch], cc[kBatch];
    uint4 old[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      // Consecutive threads take consecutive chunks of a row.
      const int c = tid + (c0 + j) * kThreads;
      rr[j] = c / kChunksPerRow;
      cc[j] = (c % kChunksPerRow) * kW;
      old[j] = make_uint4(0u, 0u, 0u, 0u);
      if (p.out_vec && rr[j] < rows && plans[rr[j]].mode == kRowBlend && cc[j] < p.D)
        old[j] = *reinterpret_cast<const uint4*>(out + rr[j] * p.o_ss + cc[j]);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (rr[j] >= rows || cc[j] >= p.D) continue;
      const RowPlan pl = plans[rr[j]];
      if (pl.mode == kRowKeep) continue;
      float v[kW];
#pragma unroll
      for (int e = 0; e < kW; e += 4) {
        const float4 f = *reinterpret_cast<const float4*>(tile + Tile::at(rr[j], cc[j] + e));
        v[e] = f.x;
        v[e + 1] = f.y;
        v[e + 2] = f.z;
        v[e + 3] = f.w;
      }
      TO* row = out + rr[j] * p.o_ss;
      if (p.out_vec) {
        float prev[kW];
        cuda_util::load_vec(reinterpret_cast<const TO*>(&old[j]), prev);
#pragma unroll
        for (int e = 0; e < kW; ++e) v[e] = planned_value([&] { return prev[e]; }, v[e], pl);
        cuda_util::store_vec(row + cc[j], v);
      } else {
#pragma unroll
        for (int e = 0; e < kW; ++e)
          if (cc[j] + e < p.D) write_elem(row, p.o_sd, cc[j] + e, v[e], pl);
      }
    }
  }
}

template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void write_staged(const FwdParams& p, int b, int h, int m0, const float* tile,
                                             int tid) {
  if (p.out_f32)
    write_staged_as<float, kRows, kD, kThreads>(p, b, h, m0, tile, tid);
  else
    write_staged_as<T, kRows, kD, kThreads>(p, b, h, m0, tile, tid);
}

template <typename T, typename Cfg, int kMinBlocks>
__global__ void __launch_bounds__(Cfg::kThreads, kMinBlocks) flash_fwd_tc_kernel(const FwdParams p) {
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kStride = Cfg::kStride, kKSteps = Cfg::kKSteps, kNTiles = Cfg::kNTiles, kDTiles = Cfg::kDTiles;
  constexpr int kMT = Cfg::kMTiles;
  constexpr bool kQInRegs = Cfg::kQInRegs;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + Cfg::kQElems;         // stage s at sK + s * kKVElems
  uint16_t* sV = sK + 2 * Cfg::kKVElems;    // stage s at sV + s * kKVElems

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;

  const CtaTile c = cta_tile(p, kBlockM, kBlockN);
  const int b = c.b, h = c.h, m0 = c.m0, n_blocks = c.n_blocks;
  const uint16_t *qg = c.qg, *kg = c.kg, *vg = c.vg;
  const uint8_t* mrow = c.mrow;

  // This thread's rows: (m-tile mt, half r) is block row warp * kWarpRows + 16 mt + g + 8 r.
  const int64_t row0 = static_cast<int64_t>(m0) + warp * Cfg::kWarpRows + g;
  // The block's first row sees the fewest keys: key blocks past its limit (or past Sk) need masking.
  const int block_lim = row_key_limit(p, m0);

  float o[kMT][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  }
  float row_m[kMT][2];  // running max of the scaled scores (log2 units)
  float row_l[kMT][2];  // this lane's part of the running sum (summed over the quad at the end)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    row_m[mt][0] = row_m[mt][1] = kNegInf;
    row_l[mt][0] = row_l[mt][1] = 0.f;
  }

  // Per-lane ldmatrix offsets (elements). Q/A operand: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in
  // the order a0..a3 (m-tile mt 16 rows further). K/B operand of two n-tiles: (keys 0-7, d 0-7), (keys 0-7,
  // d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) = b0, b1 of n-tile 0, then of n-tile 1. V (.trans)
  // likewise with keys as the k axis: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15,
  // d 8-15).
  const int q_off = (warp * Cfg::kWarpRows + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  const int k_off = ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
  const int v_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  const uint32_t sQ_u = smem_u32(sQ), sK_u = smem_u32(sK), sV_u = smem_u32(sV);

  uint32_t qf[kQInRegs ? kMT : 1][kQInRegs ? kKSteps : 1][4];

  if (n_blocks > 0) {
    load_tile<kBlockM, kD, kThreads>(sQ, qg, p.q_ss, min(kBlockM, p.Sq - m0), p.D, p.q_vec, tid);
    cp_async_commit();
    load_kv_block<kBlockN, kD, kThreads>(sK, sV, kg, vg, p, 0, tid);
    cp_async_commit();
    if constexpr (kQInRegs) {
      cp_async_wait<1>();  // Q has landed (K/V block 0 may still be in flight)
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks)
          ldmatrix_x4(qf[mt][ks], sQ_u + (q_off + mt * 16 * kStride + ks * 16) * 2);
      }
    }
  }

  for (int it = 0; it < n_blocks; ++it) {
    const int n0 = it * kBlockN;
    const int st = it & 1;
    if (it + 1 < n_blocks) {
      // Prefetch the next block into the other stage; the barrier that ended the previous iteration
      // guarantees every warp is done reading it.
      load_kv_block<kBlockN, kD, kThreads>(sK + (st ^ 1) * Cfg::kKVElems, sV + (st ^ 1) * Cfg::kKVElems, kg, vg,
                                           p, n0 + kBlockN, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Issued before the matrix products so the mask loads overlap them.
    const uint32_t mbits = kv_mask_bits<kNTiles>(p, mrow, n0, tq);
    const bool need_mask = mrow != nullptr || n0 + kBlockN - 1 > block_lim;

    // S = Q K^T over this block: kWarpRows x kBlockN per warp. Each K fragment serves every m-tile.
    float s[kMT][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
    }
    const uint32_t sK_st = sK_u + st * Cfg::kKVElems * 2, sV_st = sV_u + st * Cfg::kKVElems * 2;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (kQInRegs) {
#pragma unroll
          for (int x = 0; x < 4; ++x) a[mt][x] = qf[mt][ks][x];
        } else {
          ldmatrix_x4(a[mt], sQ_u + (q_off + mt * 16 * kStride + ks * 16) * 2);
        }
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, sK_st + (k_off + np * 16 * kStride + ks * 16) * 2);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(s[mt][2 * np], a[mt], bk[0], bk[1], T{});
          mma_16816(s[mt][2 * np + 1], a[mt], bk[2], bk[3], T{});
        }
      }
    }

    // Masking, in the key blocks that need it only (a block-uniform branch, not per-element predication).
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) mask_scores<kNTiles>(s[mt], p, row0 + 16 * mt, n0, tq, mbits);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
      softmax_step<kNTiles, kDTiles>(s[mt], o[mt], row_m[mt], row_l[mt], p.scale_log2);

    // O += P V, P straight from the S accumulators (pack_p). Each V fragment serves every m-tile.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) pack_p<T, kNTiles>(a[mt], s[mt], kk);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, sV_st + (v_off + kk * 16 * kStride + dp * 16) * 2);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(o[mt][2 * dp], a[mt], bv[0], bv[1], T{});
          mma_16816(o[mt][2 * dp + 1], a[mt], bv[2], bv[3], T{});
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // Epilogue: normalize, then write or merge into (out, lse), staged through shared memory (the key loop's
  // last barrier freed it).
  using Staged = StagedTile<kBlockM, kD>;
  static_assert(Staged::kBytes <= Cfg::kSmemBytes, "the staged out tile fits the kernel's shared memory");
  float* tile = reinterpret_cast<float*>(smem_raw);
  stage_rows<kBlockM, kD, kMT>(p, b, h, m0, warp * Cfg::kWarpRows + g, o, row_m, row_l, tile, lane);
  __syncthreads();
  write_staged<T, kBlockM, kD, kThreads>(p, b, h, m0, tile, tid);
}

}  // namespace flash
}  // namespace cp_attention
