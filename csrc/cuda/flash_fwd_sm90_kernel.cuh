// Device code of the Hopper (sm_90a) flash-attention forward: warpgroup MMA (wgmma) on the tensor cores,
// float16 / bfloat16, head dims 64 and 128 (smaller D zero-padded up to 64, D in (96, 128] up to 128).
// Host side: flash_attn_fwd.cu picks it on sm_90 devices where the warp-specialized variant that loads by
// TMA (flash_fwd_sm90_tma_kernel.cuh, which shares the per-block work below) cannot take the tensors;
// launches: flash_fwd_launch.h.
//
// One CTA owns 128 query rows of one (batch, head): two warpgroups of four warps, 64 rows each. Per key
// block of 128 keys, each warpgroup computes
//   S = Q K^T   wgmma m64n128k16, Q and K both read from shared memory by descriptor (K-major)
//   online softmax in registers: wgmma's accumulator gives each warp its 16 rows in the layout of mma.sync
//               m16n8k16, so masking, softmax and the epilogue are the ldmatrix kernel's (flash_fwd_kernel.cuh)
//   O += P V    wgmma m64n{D}k16 with P from registers (the S accumulators re-packed) and V by descriptor,
//               read transposed (V is [keys, D] with D contiguous: N-major for this product)
// All of Q, K and V lie in shared memory in the 128-byte-swizzled layout (Swizzled128): 64-column panels of
// 128-byte rows, groups of 8 rows 1024 bytes apart. wgmma reads shared memory through the async proxy, so
// every refill is fenced (fence.proxy.async) before the barrier that publishes it.
//
// Per key block n, a warpgroup issues S_n = Q K_n^T and O += P_{n-1} V_{n-1} together, waits for S_n only,
// and runs the softmax of S_n while the tensor cores work on P_{n-1} V_{n-1}; then it waits for that, scales
// O by the softmax's correction and packs P_n for the next block. Meanwhile block n + 1 streams in by
// cp.async into the third K/V stage (block n - 1's V is still being read).
//
// Matrix descriptors (PTX ISA, wgmma shared-memory matrix descriptor; 16-byte units): start address in
// bits 0-13, leading-dimension byte offset in 16-29, stride-dimension byte offset in 32-45, swizzle mode
// in 62-63 (1 = 128 bytes). With 128-byte swizzling, a K-major operand (Q, K) is 8-row groups of 128-byte
// rows, SBO apart, its 16-element k-step a 32-byte offset within the row; an N-major one (V) is rows of 64
// contiguous N-elements (128 bytes), 8 k-rows per group, groups SBO apart and 64-element N-panels LBO apart.
#pragma once

#include "cuda/flash_fwd_kernel.cuh"

namespace cp_attention {
namespace flash {

template <int kD_>
struct Sm90Tiles {
  static constexpr int kD = kD_;
  static constexpr int kBlockM = 128, kBlockN = 128;
  static constexpr int kWarpGroups = kBlockM / 64;
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kNTiles = kBlockN / 8;  // 8-column tiles of S per warp
  static constexpr int kDTiles = kD / 8;       // 8-column tiles of O per warp
  // K/V stages: block n + 1 streams in while block n's S = QK^T and block n - 1's O += PV run.
  static constexpr int kStages = 3;
  static constexpr int kQElems = kBlockM * kD, kKVElems = kBlockN * kD;
  // Q, the K stages, the V stages; plus 1 KB to align the start to 1024 bytes (the swizzle pattern repeats
  // every 1024 bytes of address). At D = 128: 225 KB of the 227 KB a CTA may have.
  static constexpr int kSmemBytes = (kQElems + 2 * kStages * kKVElems) * 2 + 1024;
  // Swizzled128 tiles: a row of a 64-column panel is 128 bytes, groups of 8 rows (SBO) 1024 bytes, a panel
  // (LBO of the N-major V) all rows of its 64 columns.
  static constexpr uint32_t kRowBytes = 128, kGroupBytes = 8 * kRowBytes;
  static constexpr uint32_t kQPanelBytes = kBlockM * kRowBytes, kKVPanelBytes = kBlockN * kRowBytes;
  static_assert(kD == 64 || kD == 128, "compiled head dims");
};

// The compiled head dim the wgmma kernel runs D at (D <= 64: 64; 96 < D <= 128: 128), or 0 where it has
// none (the mma.sync kernel's D 96 and 256 tiles waste less there).
__host__ __device__ constexpr int sm90_head_dim(int64_t D) {
  return D <= 64 ? 64 : (D > 96 && D <= 128 ? 128 : 0);
}

#ifndef CP_ATTENTION_LANE_EMULATION

// Compiled only where wgmma exists (sm_90a); other targets get empty stubs the host never launches.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CP_ATTENTION_SM90_DEVICE 1

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N of the warpgroup's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// A barrier of all kThreads threads of the CTA that may be reached from different places in the code
// (bar.sync with an explicit thread count; warp-uniform, unlike __syncthreads in divergent branches).
template <int kThreads>
__device__ __forceinline__ void cta_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
}

// Named barrier kId of kThreads threads: bar.sync waits for all of them, bar.arrive counts this thread in
// and goes on (the producer/consumer pattern of the TMA kernel's turn-taking, Sm90Turns).
template <int kId, int kThreads>
__device__ __forceinline__ void named_bar_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
}
template <int kId, int kThreads>
__device__ __forceinline__ void named_bar_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
}

// Orders this thread's generic-proxy writes to shared memory (cp.async, st.shared) before later reads of
// the same memory by the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins the compiler's view of accumulator registers at this point: wgmma writes them asynchronously, so
// their reads must not move above the wait that completes it.
template <int N>
__device__ __forceinline__ void fence_regs(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(x[i][j])::"memory");
  }
}

// d (+)= A B for one m64nNk16 tile per warpgroup, fp32 accumulators; scale_d == 0 overwrites d.
// wgmma_ss (N = 128): A and B by descriptor, both K-major; operands %64 (desc_a), %65 (desc_b), %66 (scale_d).
// wgmma_rs (N = 64, 128): A from registers (the m16n8k16 A fragment of each warp's 16 rows), B by descriptor
// read N-major (imm-trans-b = 1); operands a in %(N/2)..%(N/2 + 3), then desc_b and scale_d.
// Accumulator operands of an m64nNk16 wgmma with N = 64 or 128 (N / 2 fp32 registers per thread), and
// their placeholders in the instruction text.
#define CP_ATTENTION_WGMMA_ACC_N64 "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),        \
  "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),           \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]),           \
  "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]),           \
  "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define CP_ATTENTION_WGMMA_D_N64                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CP_ATTENTION_WGMMA_ACC_N128 "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),       \
  "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),           \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]),           \
  "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]),           \
  "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]),           \
  "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),           \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]),    \
  "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),    \
  "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]),    \
  "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define CP_ATTENTION_WGMMA_D_N128                                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                 \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define CP_ATTENTION_DEFINE_WGMMA_SS_N128(T, TY)                                                                     \
  __device__ __forceinline__ void wgmma_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                        \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " CP_ATTENTION_WGMMA_D_N128              \
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                   \
                 : CP_ATTENTION_WGMMA_ACC_N128                                                                       \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                          \
  }
#define CP_ATTENTION_DEFINE_WGMMA_RS(N, T, TY, OPERANDS, SCALE)                                                      \
  __device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b,            \
                                           int scale_d, T) {                                                         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " CP_ATTENTION_WGMMA_D_N##N           \
                 ", " OPERANDS ", p, 1, 1, 1;\n}\n"                                                                  \
                 : CP_ATTENTION_WGMMA_ACC_N##N                                                                       \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                           \
  }

CP_ATTENTION_DEFINE_WGMMA_SS_N128(__half, "f16")
CP_ATTENTION_DEFINE_WGMMA_SS_N128(__nv_bfloat16, "bf16")
CP_ATTENTION_DEFINE_WGMMA_RS(64, __half, "f16", "{%32, %33, %34, %35}, %36", "%37")
CP_ATTENTION_DEFINE_WGMMA_RS(64, __nv_bfloat16, "bf16", "{%32, %33, %34, %35}, %36", "%37")
CP_ATTENTION_DEFINE_WGMMA_RS(128, __half, "f16", "{%64, %65, %66, %67}, %68", "%69")
CP_ATTENTION_DEFINE_WGMMA_RS(128, __nv_bfloat16, "bf16", "{%64, %65, %66, %67}, %68", "%69")

#undef CP_ATTENTION_DEFINE_WGMMA_RS
#undef CP_ATTENTION_DEFINE_WGMMA_SS_N128
#undef CP_ATTENTION_WGMMA_D_N128
#undef CP_ATTENTION_WGMMA_ACC_N128
#undef CP_ATTENTION_WGMMA_D_N64
#undef CP_ATTENTION_WGMMA_ACC_N64

#endif  // sm_90a device code
#endif  // CP_ATTENTION_LANE_EMULATION

// The 64-bit wgmma descriptor of a 128-byte-swizzled operand starting at shared address addr.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo_bytes >> 4) << 16) |
         (static_cast<uint64_t>(sbo_bytes >> 4) << 32) | (1ull << 62);
}

#if defined(CP_ATTENTION_SM90_DEVICE) || defined(CP_ATTENTION_LANE_EMULATION)
// The work of one warpgroup per key block, shared by both Hopper kernels. Stage addresses are shared-memory
// byte addresses of Swizzled128 tiles (64-column panels of 128-byte rows).

// S = Q K^T over one key block: Q (this warpgroup's 64 rows, at q_base) and K (at k_base) by descriptor,
// kD / 16 k-steps, the first overwriting s; one commit group.
template <typename T, int kD>
__device__ __forceinline__ void sm90_issue_qk(float (&s)[Sm90Tiles<kD>::kNTiles][4], uint32_t q_base,
                                              uint32_t k_base) {
  using Tl = Sm90Tiles<kD>;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    const uint32_t koff = (ks & 3) * 32;  // 16 elements = 32 bytes within the 128-byte row
    const uint64_t da = sw128_desc(q_base + (ks >> 2) * Tl::kQPanelBytes + koff, 16, Tl::kGroupBytes);
    const uint64_t db = sw128_desc(k_base + (ks >> 2) * Tl::kKVPanelBytes + koff, 16, Tl::kGroupBytes);
    wgmma_ss(s, da, db, ks > 0 ? 1 : 0, T{});
  }
  wgmma_commit();
}

// O += P V over one key block (V at v_base): keys [16 kk, 16 kk + 16) are V rows 16 kk.., two 8-key groups
// of 1024 bytes, so a k-step starts 2048 bytes further; N = D spans the 64-column panels, LBO apart. P comes
// packed (sm90_pack) before the wgmma fence: registers written between a fence and the wgmma that reads
// them make ptxas insert a fence of its own before every wgmma. One commit group.
template <typename T, int kD>
__device__ __forceinline__ void sm90_issue_pv(float (&o)[kD / 8][4],
                                              const uint32_t (&pa)[Sm90Tiles<kD>::kBlockN / 16][4],
                                              uint32_t v_base) {
  using Tl = Sm90Tiles<kD>;
#pragma unroll
  for (int kk = 0; kk < Tl::kBlockN / 16; ++kk) {
    const uint64_t dv = sw128_desc(v_base + kk * 2 * Tl::kGroupBytes, Tl::kKVPanelBytes, Tl::kGroupBytes);
    wgmma_rs(o, pa[kk], dv, 1, T{});
  }
  wgmma_commit();
}

// P (the softmaxed S) as the A fragments of O += PV, one per 16 keys.
template <typename T, int kD>
__device__ __forceinline__ void sm90_pack(uint32_t (&pa)[Sm90Tiles<kD>::kBlockN / 16][4],
                                          const float (&s)[Sm90Tiles<kD>::kNTiles][4]) {
#pragma unroll
  for (int kk = 0; kk < Sm90Tiles<kD>::kBlockN / 16; ++kk) pack_p<T, Sm90Tiles<kD>::kNTiles>(pa[kk], s, kk);
}

// Masks S of key block n0 where needed (mbits: kv_mask_bits, loaded before the matrix products so the
// loads overlap them; row: this lane's row g), runs its softmax and returns the correction for O in alpha.
template <int kNTiles>
__device__ __forceinline__ void sm90_softmax(float (&s)[kNTiles][4], float (&row_m)[2], float (&row_l)[2],
                                             const FwdParams& p, bool masked, int64_t row, int n0, int tq,
                                             uint32_t mbits, float (&alpha)[2]) {
  if (masked) mask_scores<kNTiles>(s, p, row, n0, tq, mbits);
  softmax_scores<kNTiles>(s, row_m, row_l, p.scale_log2, alpha);
}

// Issuing without turns (the cp.async kernel, whose warpgroups meet at a CTA barrier every block anyway).
struct NoTurns {
  __device__ __forceinline__ void take() {}
  __device__ __forceinline__ void pass() {}
};

// One key block after the first, for one warpgroup: S_n = Q K_n^T (K at k_base) and O += P_{n-1} V_{n-1}
// (V at v_prev_base) issued together, the softmax of S_n (key block n0) while the second runs, then the
// correction of O and P_n packed for the next block. The issue happens on this warpgroup's turn
// (turns.take() before, turns.pass() after: Sm90Turns or NoTurns). done_reading() runs once both products
// have completed (every read of K_n and V_{n-1} is over), before O is touched.
template <typename T, int kD, typename Turns, typename DoneReading>
__device__ __forceinline__ void sm90_block_step(float (&s)[Sm90Tiles<kD>::kNTiles][4], float (&o)[kD / 8][4],
                                                uint32_t (&pa)[Sm90Tiles<kD>::kBlockN / 16][4],
                                                float (&row_m)[2], float (&row_l)[2], const FwdParams& p,
                                                bool masked, int64_t row, int n0, int tq, uint32_t mbits,
                                                uint32_t q_base, uint32_t k_base, uint32_t v_prev_base,
                                                Turns& turns, DoneReading done_reading) {
  turns.take();
  wgmma_fence();
  sm90_issue_qk<T, kD>(s, q_base, k_base);
  sm90_issue_pv<T, kD>(o, pa, v_prev_base);
  turns.pass();
  wgmma_wait<1>();  // S_n is done; P_{n-1} V_{n-1} may still run
  fence_regs(s);
  float alpha[2];
  sm90_softmax<Sm90Tiles<kD>::kNTiles>(s, row_m, row_l, p, masked, row, n0, tq, mbits, alpha);
  wgmma_wait<0>();
  fence_regs(o);
  done_reading();
  rescale_rows<kD / 8>(o, alpha);
  sm90_pack<T, kD>(pa, s);  // pa is free again: its wgmma has completed
}

// The epilogue of both kernels, run by the two compute warpgroups (thread t of their 256) once no wgmma
// reads shared memory any more: stages the rows (warpgroup wg, warp w of it) through tile. Between the two
// phases a barrier of the CTA's kCtaThreads threads: __syncthreads, or where the CTA has threads that are
// not here (the TMA kernel's producer), a barrier they reach elsewhere (cta_sync).
template <typename T, int kD, int kCtaThreads = Sm90Tiles<kD>::kThreads>
__device__ __forceinline__ void sm90_epilogue(const FwdParams& p, int b, int h, int m0, int wg, int warp,
                                              int lane, int t, const float (&o)[kD / 8][4],
                                              const float (&row_m)[2], const float (&row_l)[2], float* tile) {
  using Tl = Sm90Tiles<kD>;
  // This warp's single 16-row m-tile, seen as an array of one.
  using OneTile = const float(&)[1][kD / 8][4];
  using OneRow = const float(&)[1][2];
  stage_rows<Tl::kBlockM, kD, 1>(p, b, h, m0, wg * 64 + warp * 16 + (lane >> 2), reinterpret_cast<OneTile>(o),
                                 reinterpret_cast<OneRow>(row_m), reinterpret_cast<OneRow>(row_l), tile, lane);
  if constexpr (kCtaThreads == Tl::kThreads) __syncthreads();
  else cta_sync<kCtaThreads>();
  write_staged<T, Tl::kBlockM, kD, Tl::kThreads>(p, b, h, m0, tile, t);
}
#endif  // sm_90a device code or the emulation

template <typename T, int kD>
__global__ void __launch_bounds__(Sm90Tiles<kD>::kThreads, 1) flash_fwd_sm90_kernel(const FwdParams p) {
#if defined(CP_ATTENTION_SM90_DEVICE) || defined(CP_ATTENTION_LANE_EMULATION)
  using Tl = Sm90Tiles<kD>;
  constexpr int kBlockM = Tl::kBlockM, kBlockN = Tl::kBlockN, kThreads = Tl::kThreads;
  constexpr int kNTiles = Tl::kNTiles, kDTiles = Tl::kDTiles;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t pad = ((raw_u + 1023u) & ~1023u) - raw_u;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw + pad);
  uint16_t* sK = sQ + Tl::kQElems;                // stage s at sK + s * kKVElems
  uint16_t* sV = sK + Tl::kStages * Tl::kKVElems;  // stage s at sV + s * kKVElems
  const uint32_t sQ_u = smem_u32(sQ), sK_u = smem_u32(sK), sV_u = smem_u32(sV);

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;

  const CtaTile c = cta_tile(p, kBlockM, kBlockN);
  const int b = c.b, h = c.h, m0 = c.m0, n_blocks = c.n_blocks;
  const uint16_t *qg = c.qg, *kg = c.kg, *vg = c.vg;
  const uint8_t* mrow = c.mrow;

  // This thread's rows: warpgroup wg's 64 rows, warp's 16 of them, g and g + 8.
  const int64_t row0 = static_cast<int64_t>(m0) + wg * 64 + warp * 16 + (lane >> 2);
  const int block_lim = row_key_limit(p, m0);

  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_m[2] = {kNegInf, kNegInf}, row_l[2] = {0.f, 0.f};

  using QLayout = Swizzled128<kBlockM>;
  using KVLayout = Swizzled128<kBlockN>;
  // This warpgroup's 64 rows of Q; stage st of K and V.
  const uint32_t q_base = sQ_u + wg * 64 * Tl::kRowBytes;
  auto k_stage = [&](int st) { return sK_u + st * Tl::kKVElems * 2; };
  auto v_stage = [&](int st) { return sV_u + st * Tl::kKVElems * 2; };
  auto masked = [&](int n0) { return mrow != nullptr || n0 + kBlockN - 1 > block_lim; };

  float s[kNTiles][4];
  uint32_t pa[kBlockN / 16][4];

  if (n_blocks > 0) {
    // Prologue: Q with key block 0, then block 1 behind it; S_0 and its softmax.
    load_tile<kBlockM, kD, kThreads, QLayout>(sQ, qg, p.q_ss, min(kBlockM, p.Sq - m0), p.D, p.q_vec, tid);
    load_kv_block<kBlockN, kD, kThreads, KVLayout>(sK, sV, kg, vg, p, 0, tid);
    cp_async_commit();
    if (n_blocks > 1) {
      load_kv_block<kBlockN, kD, kThreads, KVLayout>(sK + Tl::kKVElems, sV + Tl::kKVElems, kg, vg, p, kBlockN,
                                                     tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();  // this thread's landed copies, before wgmma reads them
    __syncthreads();
    const uint32_t mbits = kv_mask_bits<kNTiles>(p, mrow, 0, tq);
    wgmma_fence();
    sm90_issue_qk<T, kD>(s, q_base, k_stage(0));
    wgmma_wait<0>();
    fence_regs(s);
    float alpha[2];
    sm90_softmax<kNTiles>(s, row_m, row_l, p, masked(0), row0, 0, tq, mbits, alpha);  // O is 0: no correction
    sm90_pack<T, kD>(pa, s);
  }

  for (int it = 1; it < n_blocks; ++it) {
    const int st = it % Tl::kStages;
    // Block it is the only copy in flight (issued one iteration earlier, or in the prologue).
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    if (it + 1 < n_blocks) {
      // Block it + 1 goes into the stage block it - 2 used; both warpgroups finished reading it (block
      // it - 2's O += PV) in the previous iteration, before the barrier above.
      const int nx = (it + 1) % Tl::kStages;
      load_kv_block<kBlockN, kD, kThreads, KVLayout>(sK + nx * Tl::kKVElems, sV + nx * Tl::kKVElems, kg, vg, p,
                                                     (it + 1) * kBlockN, tid);
      cp_async_commit();
    }
    const int n0 = it * kBlockN;
    const uint32_t mbits = kv_mask_bits<kNTiles>(p, mrow, n0, tq);
    NoTurns turns;
    sm90_block_step<T, kD>(s, o, pa, row_m, row_l, p, masked(n0), row0, n0, tq, mbits, q_base, k_stage(st),
                           v_stage((it - 1) % Tl::kStages), turns, [] {});  // the next barrier frees the stage
  }

  if (n_blocks > 0) {
    wgmma_fence();
    sm90_issue_pv<T, kD>(o, pa, v_stage((n_blocks - 1) % Tl::kStages));
    wgmma_wait<0>();
    fence_regs(o);
  }

  // Epilogue, staged through shared memory once both warpgroups are done reading it.
  static_assert(StagedTile<kBlockM, kD>::kBytes <= Tl::kSmemBytes - 1024, "the staged tile fits");
  __syncthreads();
  sm90_epilogue<T, kD>(p, b, h, m0, wg, warp, lane, tid, o, row_m, row_l, reinterpret_cast<float*>(sQ));
#endif
}

}  // namespace flash
}  // namespace cp_attention
