// Device code of the warp-specialized Hopper (sm_90a) flash-attention forward: the wgmma kernel of
// flash_fwd_sm90_kernel.cuh with its loads handed to a producer warpgroup that drives the TMA copy engine.
// Host side: flash_attn_fwd.cu picks it on sm_90 devices where q, k and v have tensor maps (flash_fwd_tma.h).
//
// Three warpgroups per CTA. Warpgroup 0 produces: one of its threads loads the CTA's Q tile and then, key
// block after key block, K and V into a ring of three stages, each tile a few TMA boxes (64 columns x 128
// rows, 128-byte swizzled: the Swizzled128 layout the wgmma descriptors read). The copy engine fills rows
// past Sq or Sk and columns past D with zeros. Warpgroups 1 and 2 compute 64 query rows each, exactly as
// the two warpgroups of the cp.async kernel do (sm90_issue_qk, sm90_issue_pv, sm90_softmax): S_n and
// P_{n-1} V_{n-1} issued together, the softmax of S_n while the second runs.
//
// Data is handed over by mbarriers in shared memory, not by CTA-wide barriers, so no compute warpgroup
// waits for the other to be done with a block, and the producer runs up to three blocks ahead:
//   q_full        the Q tile has landed (transaction bytes counted by the copy engine)
//   k_full[st]    K of the block in stage st has landed; v_full[st] likewise for V, so S = QK^T can start
//                 before V is in
//   empty[st]     every compute warp is done with the block in stage st (its S and its O += PV have
//                 completed): one arrival per compute warp, after the wgmma wait that covers both
// Phases alternate per use of a stage: the j-th block in stage st completes phase j of k_full[st] and
// v_full[st] (parity j & 1); the producer refills stage st for the j-th time (j >= 1) once phase j - 1 of
// empty[st] has completed.
//
// The producer warpgroup gives registers back (setmaxnreg) to the compute warpgroups, which need about 200.
//
// Left alone, the two compute warpgroups drift into step (they wait on the same barriers), so both run their
// softmax, on the multi-function units, at the same time while the tensor cores idle, and then both want
// the tensor cores. With p.pingpong (the default; sm90_tma_no_pingpong turns it off) they take turns to
// issue their products instead (Sm90Turns): one warpgroup's S_n and P_{n-1} V_{n-1} are issued, and run,
// while the other does its softmax.
#pragma once

#include <cuda.h>

#include "cuda/flash_fwd_sm90_kernel.cuh"

namespace cp_attention {
namespace flash {

// The tensor maps of one launch (flash_fwd_tma.h): q [B, Sq, H, D], k and v [B, Sk, Hkv, D] as 4-D maps
// with D innermost and B outermost, H inside S (BSHD memory) or, where the tensor's bit is set in s_inner, S
// inside H (BHSD memory); boxes of 64 columns x 128 rows of one head and batch, 128-byte swizzle. A kernel
// parameter (__grid_constant__), which the TMA instructions address directly; CUtensorMap brings its
// 128-byte alignment.
struct Sm90TmaMaps {
  static constexpr uint32_t kQ = 1, kK = 2, kV = 4;
  CUtensorMap q, k, v;
  uint32_t s_inner;
};

// The boxes the tensor maps describe (flash_fwd_tma.h): 64 columns (one 128-byte swizzled panel row) x
// kTmaBoxRows rows of one head and batch; one box fills one panel of a Q tile or of a K/V stage.
constexpr int kTmaBoxCols = 64;
constexpr int kTmaBoxRows = 128;

template <int kD>
struct Sm90TmaTiles {
  using Tl = Sm90Tiles<kD>;
  static constexpr int kThreads = Tl::kThreads + 128;  // the producer warpgroup, then the compute ones
  static constexpr int kComputeWarps = Tl::kThreads / 32;
  // q_full, then k_full, v_full and empty per stage, 8 bytes each, after the tiles.
  static constexpr int kBarriers = 1 + 3 * Tl::kStages;
  static constexpr int kSmemBytes = Tl::kSmemBytes + kBarriers * 8;
  // Registers per thread after setmaxnreg: 128 x (40 + 2 x 232) = 64,512 of the SM's 65,536.
  static constexpr int kProducerRegs = 40, kComputeRegs = 232;
  static constexpr uint32_t kQBytes = Tl::kBlockM * kD * 2, kKVBytes = Tl::kBlockN * kD * 2;
  static_assert(kTmaBoxCols * 2 == Tl::kRowBytes && kTmaBoxRows == Tl::kBlockM && kTmaBoxRows == Tl::kBlockN,
                "a box is one panel of a tile, so the bytes expected per tile are its boxes' bytes");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

#ifndef CP_ATTENTION_LANE_EMULATION
#if defined(CP_ATTENTION_SM90_DEVICE)

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialized barriers visible to the async proxy (the copy engine) and the other threads.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrives and announces `bytes` more bytes of transactions (TMA copies) for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// One TMA box of a 4-D map at coordinates (c0 innermost .. c3) into shared memory at dst, completing its
// bytes on barrier bar.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

#endif  // sm_90a device code
#endif  // CP_ATTENTION_LANE_EMULATION

#if defined(CP_ATTENTION_SM90_DEVICE) || defined(CP_ATTENTION_LANE_EMULATION)
// Turn-taking of the two compute warpgroups around the issue of their products (when `on`). Each issues
// n_blocks + 1 times (S_0; S_n with P_{n-1} V_{n-1}; the last P V) and alternates with the other: compute
// warpgroup cw waits on named barrier 2 + cw (bar.sync) for the other's arrival (bar.arrive) after its
// previous issue, 256 threads in all. Warpgroup 0 takes its first turn unasked and warpgroup 1 does not
// pass its last, so every use of either barrier gets its 256 threads and none is pending at exit. Ids 0
// (__syncthreads) and 1 (cta_sync) are taken.
struct Sm90Turns {
  static constexpr int kThreads = 256;
  int cw;    // this compute warpgroup, 0 or 1
  int last;  // the index of the last issue, n_blocks
  bool on;
  int issue = 0;
  __device__ __forceinline__ void take() {
    if (!on) return;
    if (cw == 0 && issue > 0) named_bar_sync<2, kThreads>();
    if (cw == 1) named_bar_sync<3, kThreads>();
  }
  __device__ __forceinline__ void pass() {
    if (on && cw == 0) named_bar_arrive<3, kThreads>();
    if (on && cw == 1 && issue < last) named_bar_arrive<2, kThreads>();
    ++issue;
  }
};
#endif

template <typename T, int kD>
__global__ void __launch_bounds__(Sm90TmaTiles<kD>::kThreads, 1)
    flash_fwd_sm90_tma_kernel(const FwdParams p, const __grid_constant__ Sm90TmaMaps maps) {
#if defined(CP_ATTENTION_SM90_DEVICE) || defined(CP_ATTENTION_LANE_EMULATION)
  using Tl = Sm90Tiles<kD>;
  using Tt = Sm90TmaTiles<kD>;
  constexpr int kBlockM = Tl::kBlockM, kBlockN = Tl::kBlockN, kStages = Tl::kStages;
  constexpr int kNTiles = Tl::kNTiles, kDTiles = Tl::kDTiles, kPanels = kD / 64;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t pad = ((raw_u + 1023u) & ~1023u) - raw_u;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw + pad);
  const uint32_t sQ_u = smem_u32(sQ);
  const uint32_t sK_u = sQ_u + Tl::kQElems * 2, sV_u = sK_u + kStages * Tl::kKVElems * 2;
  const uint32_t bars = sV_u + kStages * Tl::kKVElems * 2;
  const uint32_t q_full = bars;
  auto k_full = [&](int st) { return bars + 8u * (1 + st); };
  auto v_full = [&](int st) { return bars + 8u * (1 + kStages + st); };
  auto empty = [&](int st) { return bars + 8u * (1 + 2 * kStages + st); };
  auto k_stage = [&](int st) { return sK_u + st * Tl::kKVElems * 2; };
  auto v_stage = [&](int st) { return sV_u + st * Tl::kKVElems * 2; };

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;

  const CtaTile c = cta_tile(p, kBlockM, kBlockN);
  const int b = c.b, h = c.h, m0 = c.m0, n_blocks = c.n_blocks;
  const uint8_t* mrow = c.mrow;

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(k_full(st), 1);
      mbar_init(v_full(st), 1);
      mbar_init(empty(st), Tt::kComputeWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // The two branches below run to their ends separately: ptxas allocates registers per setmaxnreg region,
  // and code the producer and the compute warpgroups shared after the branch would be held to the
  // producer's budget. They meet only at the CTA-wide barriers of the epilogue (cta_sync), 2 for each.
  if (wg == 0) {
    setmaxnreg_dec<Tt::kProducerRegs>();
    if (tid == 0 && n_blocks > 0) {
      const int hk = h / p.group;
      // The boxes of a tile: rows [row, row + 128) of one head, its 64-column panels one after another.
      auto load_boxes = [&](uint32_t dst, uint32_t panel_bytes, const CUtensorMap* map, uint32_t which,
                           uint32_t bar, int head, int row) {
        const bool s_inner = (maps.s_inner & which) != 0;
#pragma unroll
        for (int pn = 0; pn < kPanels; ++pn) {
          if (s_inner) tma_load_4d(dst + pn * panel_bytes, map, bar, 64 * pn, row, head, b);
          else tma_load_4d(dst + pn * panel_bytes, map, bar, 64 * pn, head, row, b);
        }
      };
      mbar_arrive_expect_tx(q_full, Tt::kQBytes);
      load_boxes(sQ_u, Tl::kQPanelBytes, &maps.q, Sm90TmaMaps::kQ, q_full, h, m0);
      for (int n = 0; n < n_blocks; ++n) {
        const int st = n % kStages;
        if (n >= kStages) mbar_wait(empty(st), ((n / kStages) - 1) & 1);
        mbar_arrive_expect_tx(k_full(st), Tt::kKVBytes);
        load_boxes(k_stage(st), Tl::kKVPanelBytes, &maps.k, Sm90TmaMaps::kK, k_full(st), hk, n * kBlockN);
        mbar_arrive_expect_tx(v_full(st), Tt::kKVBytes);
        load_boxes(v_stage(st), Tl::kKVPanelBytes, &maps.v, Sm90TmaMaps::kV, v_full(st), hk, n * kBlockN);
      }
    }
    // The epilogue's two barriers; every copy has been consumed once the compute warpgroups reach them.
    cta_sync<Tt::kThreads>();
    cta_sync<Tt::kThreads>();
  } else {
    setmaxnreg_inc<Tt::kComputeRegs>();
    float o[kDTiles][4];
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_m[2] = {kNegInf, kNegInf}, row_l[2] = {0.f, 0.f};
    const int cw = wg - 1;  // compute warpgroup: rows 64 cw .. 64 cw + 63 of the block
    const int64_t row0 = static_cast<int64_t>(m0) + cw * 64 + warp * 16 + (lane >> 2);
    const int block_lim = row_key_limit(p, m0);
    const uint32_t q_base = sQ_u + cw * 64 * Tl::kRowBytes;
    auto masked = [&](int n0) { return mrow != nullptr || n0 + kBlockN - 1 > block_lim; };
    float s[kNTiles][4];
    uint32_t pa[kBlockN / 16][4];
    Sm90Turns turns{cw, n_blocks, p.pingpong};

    if (n_blocks > 0) {
      const uint32_t mbits = kv_mask_bits<kNTiles>(p, mrow, 0, tq);
      mbar_wait(q_full, 0);
      mbar_wait(k_full(0), 0);
      turns.take();
      wgmma_fence();
      sm90_issue_qk<T, kD>(s, q_base, k_stage(0));
      turns.pass();
      wgmma_wait<0>();
      fence_regs(s);
      float alpha[2];
      sm90_softmax<kNTiles>(s, row_m, row_l, p, masked(0), row0, 0, tq, mbits, alpha);  // O is 0
      sm90_pack<T, kD>(pa, s);
    }
    for (int it = 1; it < n_blocks; ++it) {
      const int st = it % kStages, prev = (it - 1) % kStages;
      const int n0 = it * kBlockN;
      const uint32_t mbits = kv_mask_bits<kNTiles>(p, mrow, n0, tq);
      mbar_wait(k_full(st), (it / kStages) & 1);
      mbar_wait(v_full(prev), ((it - 1) / kStages) & 1);
      // Once both products have completed, this warp's reads of block it - 1 (its K by S_{it-1}, its V by
      // the product just issued) are over: the stage may be refilled as far as this warp is concerned.
      sm90_block_step<T, kD>(s, o, pa, row_m, row_l, p, masked(n0), row0, n0, tq, mbits, q_base, k_stage(st),
                             v_stage(prev), turns, [&] {
                               if (lane == 0) mbar_arrive(empty(prev));
                             });
    }
    if (n_blocks > 0) {
      const int last = (n_blocks - 1) % kStages;
      mbar_wait(v_full(last), ((n_blocks - 1) / kStages) & 1);
      turns.take();
      wgmma_fence();
      sm90_issue_pv<T, kD>(o, pa, v_stage(last));
      turns.pass();
      wgmma_wait<0>();
      fence_regs(o);
    }
    // Epilogue: every wgmma has completed and every copy has landed once all threads are here.
    static_assert(StagedTile<kBlockM, kD>::kBytes <= Tl::kSmemBytes - 1024, "the staged tile fits");
    cta_sync<Tt::kThreads>();
    sm90_epilogue<T, kD, Tt::kThreads>(p, b, h, m0, cw, warp, lane, tid - 128, o, row_m, row_l,
                                       reinterpret_cast<float*>(sQ));
  }
#endif
}

}  // namespace flash
}  // namespace cp_attention
