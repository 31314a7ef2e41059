// CPU stand-ins for the PTX wrappers and CUDA built-ins of csrc/cuda/flash_fwd_kernel.cuh, so the
// tensor-core kernel's own source runs on the CPU, lane by lane, with every thread of a CTA a real thread.
//
// Warp-collective instructions (ldmatrix, mma.sync, shuffles) exchange their operands through per-warp
// slots between two barriers of the warp's 32 threads; each lane then computes what the PTX ISA says that
// lane receives. Shared memory is one buffer per CTA, addressed by 32-bit offsets as on the GPU. cp.async
// lands either at once or at the cp.async.wait that retires its group (the earliest and the latest the
// hardware allows; the launch picks one): the first exposes refills of memory still being read, the second
// reads of copies not yet waited for. __syncthreads is a barrier of the CTA's threads. Fragment layouts are
// those quoted at the top of flash_fwd_kernel.cuh.
//
// wgmma (the sm_90a kernel, flash_fwd_sm90_kernel.cuh) reads its shared-memory operands through matrix
// descriptors, decoded here from the PTX ISA's canonical layouts (128-byte swizzle only; anything else is
// refused). An issued wgmma waits in its thread's queue and completes at the wgmma_wait that retires its
// group: the latest moment the hardware may complete it. It reads its operands (shared memory, the A
// registers, the accumulators) only then, so a kernel that touches any of them before that wait computes
// wrong results here, as it could on the GPU.
//
// mbarriers and TMA (the warp-specialized sm_90a kernel, flash_fwd_sm90_tma_kernel.cuh) live beside shared
// memory: arrivals, announced and delivered transaction bytes, completed phases and parity waits as the PTX
// ISA defines them. A TMA copy reads the emulation's own encoding of a tensor map (the CPU stand-in of the
// encoder is in emulated_fwd.cpp), writes its box 128-byte swizzled with zeros outside the tensor, and
// lands either at once or only when a thread waits on its barrier (the launch picks, as for cp.async).
// wgmma.wait_group is warp-synchronous, so the whole warp's products are complete once any lane is past it.
// Named barriers (bar.sync / bar.arrive with an id and a count) count threads per id as the ISA does.
//
// Included by the kernel header in place of its PTX wrappers when CP_ATTENTION_LANE_EMULATION is defined,
// and by the emulation's own sources before any kernel header (cuda_utils.cuh needs the built-ins below).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace cp_attention {
namespace lane_emulation {

// A kernel bug that leaves a collective or __syncthreads without some of its threads would hang the
// emulation (and the test run): a wait gives up once nothing at all has progressed for this long (no
// barrier of any kind completed: threads of a warp-specialized kernel may rightly wait at __syncthreads
// for the whole kernel), breaks its barrier for the threads still waiting, and they all leave the kernel
// by throwing Stalled.
constexpr auto kStallTimeout = std::chrono::seconds(120);

// Completed barriers, warp collectives and mbarrier phases so far (CTAs run one at a time).
inline std::atomic<uint64_t> g_progress{0};

// Waits on cv until done() holds; false once kStallTimeout passes without progress anywhere.
template <typename Done>
inline bool wait_with_progress(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, Done done) {
  uint64_t seen = g_progress.load();
  while (!cv.wait_for(lock, kStallTimeout, done)) {
    const uint64_t now = g_progress.load();
    if (now == seen) return false;
    seen = now;
  }
  return true;
}

struct Stalled : std::runtime_error {
  Stalled() : std::runtime_error("a warp collective or __syncthreads was not reached by all of its threads") {}
};

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_) throw Stalled();
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      ++g_progress;
      cv_.notify_all();
      return;
    }
    if (!wait_with_progress(cv_, lock, [&] { return gen_ != gen || broken_; })) broken_ = true;
    if (broken_) {
      cv_.notify_all();
      throw Stalled();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  int count_ = 0;
  uint64_t gen_ = 0;
  bool broken_ = false;
};

struct Warp {
  Barrier bar{32};
  uint32_t words[32][6];  // what each lane hands to the collective in flight
  float value[32];
};

// The mbarriers of a CTA (kept beside shared memory, keyed by their shared address): expected and pending
// arrivals, transaction bytes still due, completed phases, and the TMA copies that have not landed yet
// (late mode: they land when a thread first waits on their barrier).
struct Mbarrier {
  int expected = 0, pending = 0;
  int64_t tx = 0;
  uint32_t completed = 0;
  std::vector<std::function<void()>> deferred;
};

struct MbarTable {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint32_t, Mbarrier> bars;
  bool broken = false;
};

// The named barriers of a CTA (bar.sync / bar.arrive with an id and a thread count): per id, the threads
// counted in so far and the completed uses. Every use of an id must name the same count, as on the GPU.
struct NamedBarriers {
  struct Bar {
    int threads = 0, arrived = 0;
    uint64_t completed = 0;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::map<int, Bar> bars;
  bool broken = false;

  // Counts this thread in at barrier id of `threads` threads; wait: then also waits for that use to complete.
  void arrive(int id, int threads, bool wait) {
    std::unique_lock<std::mutex> lock(mu);
    if (broken) throw Stalled();
    Bar& b = bars[id];
    if (b.threads == 0) b.threads = threads;
    if (b.threads != threads) throw std::runtime_error("a named barrier was used with two thread counts");
    const uint64_t use = b.completed;
    if (++b.arrived == threads) {
      b.arrived = 0;
      ++b.completed;
      ++g_progress;
      cv.notify_all();
      return;
    }
    if (!wait) return;
    if (!wait_with_progress(cv, lock, [&] { return b.completed != use || broken; })) broken = true;
    if (broken) {
      cv.notify_all();
      throw Stalled();
    }
  }
};

// One CTA being emulated: its threads' barrier, its warps, its shared memory and its mbarriers.
struct Cta {
  explicit Cta(int threads, unsigned char* smem_base, bool late_copies_)
      : bar(threads), warps(new Warp[threads / 32]), smem(smem_base), late_copies(late_copies_) {}
  Barrier bar;
  std::unique_ptr<Warp[]> warps;
  unsigned char* smem;
  bool late_copies;  // cp.async and TMA copies land at their wait (else at once)
  MbarTable mbars;
  NamedBarriers named;
};

inline thread_local Cta* tls_cta = nullptr;
inline thread_local uint3 tls_thread_idx{0, 0, 0};
inline thread_local uint3 tls_block_idx{0, 0, 0};

inline int lane_id() { return static_cast<int>(tls_thread_idx.x) & 31; }
inline Warp& this_warp() { return tls_cta->warps[tls_thread_idx.x >> 5]; }

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - tls_cta->smem);
}

inline uint32_t load_u32(uint32_t addr) {
  uint32_t x;
  std::memcpy(&x, tls_cta->smem + addr, 4);
  return x;
}

inline uint32_t load_u16(uint32_t addr) {
  uint16_t x;
  std::memcpy(&x, tls_cta->smem + addr, 2);
  return x;
}

// Retires the oldest committed groups of an in-flight queue until at most `keep` remain: complete(op) for
// each of their operations, oldest first. groups[i] counts the operations issued up to commit i; operations
// issued after the last commit stay in flight (cp.async and wgmma waits alike count committed groups only).
template <typename Op, typename Complete>
inline void retire_groups(std::vector<Op>& ops, std::vector<size_t>& groups, size_t keep, Complete complete) {
  while (groups.size() > keep) {
    const size_t n = groups.front();
    for (size_t i = 0; i < n; ++i) complete(ops[i]);
    ops.erase(ops.begin(), ops.begin() + static_cast<std::ptrdiff_t>(n));
    groups.erase(groups.begin());
    for (size_t& x : groups) x -= n;
  }
}

struct PendingCopy {
  uint32_t dst;
  const void* src;
  int bytes;
};

inline thread_local std::vector<PendingCopy> tls_copies;       // issued, not yet landed (late mode)
inline thread_local std::vector<size_t> tls_copy_groups;       // copies issued up to each commit

inline void land_copy(const PendingCopy& c) {
  std::memset(tls_cta->smem + c.dst, 0, 16);
  if (c.bytes > 0) std::memcpy(tls_cta->smem + c.dst, c.src, static_cast<size_t>(c.bytes));
}

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  if (tls_cta->late_copies) tls_copies.push_back(PendingCopy{dst, src, src_bytes});
  else land_copy(PendingCopy{dst, src, src_bytes});
}

inline void cp_async_commit() {
  if (tls_cta->late_copies) tls_copy_groups.push_back(tls_copies.size());
}

// Lands every committed group but the newest N.
template <int N>
inline void cp_async_wait() {
  retire_groups(tls_copies, tls_copy_groups, N, land_copy);
}

// Lanes 8i..8i+7 address the rows of matrix i; lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of each
// (with trans: column l/4, rows 2(l%4), 2(l%4)+1), the lower index in the low half.
inline void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  Warp& w = this_warp();
  const int l = lane_id();
  w.words[l][0] = addr;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      r[i] = load_u32(w.words[8 * i + l / 4][0] + (l % 4) * 4);
    } else {
      const uint32_t lo = load_u16(w.words[8 * i + 2 * (l % 4)][0] + (l / 4) * 2);
      const uint32_t hi = load_u16(w.words[8 * i + 2 * (l % 4) + 1][0] + (l / 4) * 2);
      r[i] = lo | (hi << 16);
    }
  }
  w.bar.arrive_and_wait();
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, true); }

inline float half_bits_to_float(uint32_t bits, __half) {
  __half h;
  const uint16_t b = static_cast<uint16_t>(bits);
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}

inline float half_bits_to_float(uint32_t bits, __nv_bfloat16) {
  __nv_bfloat16 h;
  const uint16_t b = static_cast<uint16_t>(bits);
  std::memcpy(&h, &b, 2);
  return __bfloat162float(h);
}

// Unpacks lane `lane`'s m16n8k16 A fragment x[0..3] (16-bit pairs, lower column in the low half) into its
// places of the 16 x 16 matrix A: a0 = (row g, cols 2t, 2t+1), a1 = row g + 8, a2/a3 = cols + 8.
template <typename T>
inline void unpack_a_fragment(float (&A)[16][16], const uint32_t* x, int lane, T) {
  const int g = lane / 4, t = lane % 4;
  for (int half = 0; half < 2; ++half) {
    const int shift = 16 * half;
    A[g][2 * t + half] = half_bits_to_float(x[0] >> shift, T{});
    A[g + 8][2 * t + half] = half_bits_to_float(x[1] >> shift, T{});
    A[g][2 * t + 8 + half] = half_bits_to_float(x[2] >> shift, T{});
    A[g + 8][2 * t + 8 + half] = half_bits_to_float(x[3] >> shift, T{});
  }
}

// c += A B for one m16n8k16 tile: the warp's fragments are gathered into whole matrices, and each lane
// accumulates its own four elements of C (in double, rounded once to float).
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, T) {
  Warp& w = this_warp();
  const int l = lane_id();
  for (int i = 0; i < 4; ++i) w.words[l][i] = a[i];
  w.words[l][4] = b0;
  w.words[l][5] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t* x = w.words[lane];
    unpack_a_fragment(A, x, lane, T{});
    for (int half = 0; half < 2; ++half) {
      const int shift = 16 * half;
      B[2 * t + half][g] = half_bits_to_float(x[4] >> shift, T{});
      B[2 * t + 8 + half][g] = half_bits_to_float(x[5] >> shift, T{});
    }
  }
  w.bar.arrive_and_wait();
  const int g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
    double dot = 0.0;
    for (int k = 0; k < 16; ++k) dot += static_cast<double>(A[row][k]) * B[k][col];
    c[e] = static_cast<float>(static_cast<double>(c[e]) + dot);
  }
}

// ---------------------------------------------------------------------------------------------------------
// wgmma.

struct WgmmaOp {
  float* d;         // the issuing thread's accumulators, n_tiles x 4
  int n_tiles;      // N / 8
  const uint32_t* a;  // A from the issuing thread's registers (read at completion), else nullptr: by
                      // descriptor desc_a (K-major)
  uint64_t desc_a, desc_b;
  bool trans_b;     // B read N-major (imm-trans-b = 1), else K-major
  bool accumulate;  // scale-d != 0
  bool bf16;
};

inline thread_local std::vector<WgmmaOp> tls_wgmma_ops;      // issued, not yet completed
inline thread_local std::vector<size_t> tls_wgmma_groups;    // ops issued up to each commit, oldest first

struct BadDescriptor : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Shared-memory byte address of element (mn, k) of a 16-bit wgmma operand (mn: its M or N index, k < 16)
// under a 128-byte-swizzle descriptor. In 16-byte units the canonical layouts are, for K-major,
// ((8, m), 2) : ((8, SBO), 1), and for M/N-major ((8, n), (8, k)) : ((1, LBO), (8, SBO)), eight 16-bit
// elements per unit; the swizzle then XORs address bits 4-6 with bits 7-9.
inline uint32_t wgmma_elem_addr(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  if ((desc >> 62) != 1 || ((desc >> 49) & 7u) != 0)
    throw BadDescriptor("emulated wgmma: only the 128-byte swizzle with base offset 0 is modelled");
  uint32_t off;
  if (mn_major) {
    off = static_cast<uint32_t>(mn % 64) * 2 + static_cast<uint32_t>(mn / 64) * lbo +
          static_cast<uint32_t>(k % 8) * 128 + static_cast<uint32_t>(k / 8) * sbo;
  } else {
    off = static_cast<uint32_t>(mn % 8) * 128 + static_cast<uint32_t>(mn / 8) * sbo + static_cast<uint32_t>(k) * 2;
  }
  const uint32_t addr = start + off;
  return addr ^ (((addr >> 7) & 7u) << 4);
}

inline float bits_to_float(uint32_t bits, bool bf16) {
  return bf16 ? half_bits_to_float(bits, __nv_bfloat16{}) : half_bits_to_float(bits, __half{});
}

// Completes one wgmma for this thread: its accumulators (rows 16 w + g and + 8 of the warpgroup's 64, w
// the warp within the warpgroup; columns 8 i + 2 t, + 1) get the dot products over k < 16, in double,
// rounded once to float. A from registers comes from the warp's lanes in the m16n8k16 A layout.
inline void wgmma_run(const WgmmaOp& op) {
  const int l = lane_id(), g = l / 4, t = l % 4;
  const int wrow = 16 * static_cast<int>((tls_thread_idx.x >> 5) & 3);
  float A[16][16];
  if (op.a != nullptr) {
    Warp& w = this_warp();
    for (int i = 0; i < 4; ++i) w.words[l][i] = op.a[i];
    w.bar.arrive_and_wait();
    for (int lane = 0; lane < 32; ++lane) {
      if (op.bf16) unpack_a_fragment(A, w.words[lane], lane, __nv_bfloat16{});
      else unpack_a_fragment(A, w.words[lane], lane, __half{});
    }
    w.bar.arrive_and_wait();
  } else {
    for (int r = 0; r < 16; ++r) {
      for (int k = 0; k < 16; ++k)
        A[r][k] = bits_to_float(load_u16(wgmma_elem_addr(op.desc_a, false, wrow + r, k)), op.bf16);
    }
  }
  for (int i = 0; i < op.n_tiles; ++i) {
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 8 * i + 2 * t + (e % 2);
      double dot = 0.0;
      for (int k = 0; k < 16; ++k)
        dot += static_cast<double>(A[row][k]) *
               bits_to_float(load_u16(wgmma_elem_addr(op.desc_b, op.trans_b, col, k)), op.bf16);
      float& acc = op.d[4 * i + e];
      acc = static_cast<float>((op.accumulate ? static_cast<double>(acc) : 0.0) + dot);
    }
  }
}

inline void wgmma_fence() {}
inline void fence_proxy_async() {}
template <int N>
inline void fence_regs(float (&)[N][4]) {}

inline void wgmma_commit() { tls_wgmma_groups.push_back(tls_wgmma_ops.size()); }

// wgmma.wait_group is .sync.aligned: the warp's lanes leave it together, so once any lane is past it the
// whole warp's retired products have read their operands (a kernel may signal that with one lane).
template <int N>
inline void wgmma_wait() {
  retire_groups(tls_wgmma_ops, tls_wgmma_groups, N, wgmma_run);
  this_warp().bar.arrive_and_wait();
}

template <int N, typename T>
inline void wgmma_ss(float (&d)[N][4], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {
  tls_wgmma_ops.push_back(WgmmaOp{&d[0][0], N, nullptr, desc_a, desc_b, false, scale_d != 0,
                                  std::is_same_v<T, __nv_bfloat16>});
}

template <int N, typename T>
inline void wgmma_rs(float (&d)[N][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d, T) {
  tls_wgmma_ops.push_back(WgmmaOp{&d[0][0], N, &a[0], 0, desc_b, true, scale_d != 0,
                                  std::is_same_v<T, __nv_bfloat16>});
}

// ---------------------------------------------------------------------------------------------------------
// mbarriers and TMA (the warp-specialized sm_90a kernel, flash_fwd_sm90_tma_kernel.cuh).

// A phase completes when its arrivals and its announced transaction bytes are all in; the barrier then
// expects the same arrivals again. Call with the table's lock held.
inline void mbar_maybe_complete(MbarTable& t, Mbarrier& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.completed;
    ++g_progress;
    m.pending = m.expected;
    t.cv.notify_all();
  }
}

inline Mbarrier& mbar_at(MbarTable& t, uint32_t bar) {
  auto it = t.bars.find(bar);
  if (it == t.bars.end()) throw std::runtime_error("an mbarrier was used before mbarrier.init");
  return it->second;
}

inline void mbar_init(uint32_t bar, uint32_t count) {
  MbarTable& t = tls_cta->mbars;
  std::lock_guard<std::mutex> lock(t.mu);
  Mbarrier& m = t.bars[bar];
  m = Mbarrier{};
  m.expected = m.pending = static_cast<int>(count);
}

inline void mbar_init_fence() {}

inline void mbar_arrive_tx(uint32_t bar, int64_t bytes) {
  MbarTable& t = tls_cta->mbars;
  std::lock_guard<std::mutex> lock(t.mu);
  Mbarrier& m = mbar_at(t, bar);
  if (m.pending == 0) throw std::runtime_error("more arrivals on an mbarrier than its count");
  m.tx += bytes;
  --m.pending;
  mbar_maybe_complete(t, m);
}

inline void mbar_arrive(uint32_t bar) { mbar_arrive_tx(bar, 0); }
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { mbar_arrive_tx(bar, bytes); }

// Returns once the phase of parity `parity` has completed: the count of completed phases then has the
// other parity. In late mode the waiting thread lands the copies due on the barrier, also those issued while
// it waits.
inline void mbar_wait(uint32_t bar, uint32_t parity) {
  MbarTable& t = tls_cta->mbars;
  std::unique_lock<std::mutex> lock(t.mu);
  Mbarrier& m = mbar_at(t, bar);
  auto done = [&] {
    // Copies issued on this barrier (before or during the wait) land now, from the waiting thread.
    std::vector<std::function<void()>> due;
    due.swap(m.deferred);
    for (auto& land : due) land();
    return (m.completed & 1u) != (parity & 1u) || t.broken;
  };
  if (!wait_with_progress(t.cv, lock, done)) t.broken = true;
  if (t.broken) {
    t.cv.notify_all();
    throw Stalled();
  }
}

// The tensor map as this emulation encodes it (into the opaque CUtensorMap): a 16-bit tensor's base, its
// dims innermost first, the byte strides of dims 1-3, and the box (dims 1-3 of it: the box's rows).
struct EmulatedTensorMap {
  const unsigned char* base;
  uint64_t dims[4];
  uint64_t strides[3];
  uint32_t box[4];
};

// One box at coordinates (c0 innermost .. c3) into shared memory at dst, as the copy engine lays it out:
// dense in the map's dimension order, each 128-byte row of 64 elements (box[0] == 64) 128-byte swizzled
// (its 16-byte chunk j at chunk j ^ (r % 8), r the row within the box), elements outside the tensor zero;
// its bytes complete on bar, at once or (late mode) when a thread first waits on bar.
inline void tma_load_4d(uint32_t dst, const void* map, uint32_t bar, int c0, int c1, int c2, int c3) {
  EmulatedTensorMap mp;
  std::memcpy(&mp, map, sizeof(mp));
  if (mp.box[0] * 2 != 128 || dst % 1024 != 0)
    throw std::runtime_error("emulated TMA: 128-byte rows into 1024-byte aligned shared memory only");
  unsigned char* smem = tls_cta->smem;
  MbarTable* table = &tls_cta->mbars;
  auto land = [mp, dst, smem, table, bar, c0, c1, c2, c3] {
    auto inside = [&](int dim, int64_t x) { return x >= 0 && x < static_cast<int64_t>(mp.dims[dim]); };
    uint32_t r = 0;  // the row within the box
    for (uint32_t i3 = 0; i3 < mp.box[3]; ++i3) {
      for (uint32_t i2 = 0; i2 < mp.box[2]; ++i2) {
        for (uint32_t i1 = 0; i1 < mp.box[1]; ++i1, ++r) {
          const int64_t x1 = c1 + static_cast<int64_t>(i1), x2 = c2 + static_cast<int64_t>(i2),
                        x3 = c3 + static_cast<int64_t>(i3);
          const bool row_in = inside(1, x1) && inside(2, x2) && inside(3, x3);
          for (uint32_t j = 0; j < 8; ++j) {
            for (uint32_t e = 0; e < 8; ++e) {
              const int64_t x0 = c0 + 8 * j + e;
              uint16_t v = 0;
              if (row_in && inside(0, x0))
                std::memcpy(&v, mp.base + x0 * 2 + x1 * mp.strides[0] + x2 * mp.strides[1] + x3 * mp.strides[2], 2);
              std::memcpy(smem + dst + r * 128 + ((j ^ (r % 8)) * 16) + e * 2, &v, 2);
            }
          }
        }
      }
    }
    Mbarrier& m = mbar_at(*table, bar);
    m.tx -= static_cast<int64_t>(r) * 128;
    mbar_maybe_complete(*table, m);
  };
  std::lock_guard<std::mutex> lock(table->mu);
  if (tls_cta->late_copies) {
    mbar_at(*table, bar).deferred.push_back(land);
    table->cv.notify_all();  // a thread already waiting on bar lands it
  } else {
    land();
  }
}

inline void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2, int c3) {
  tma_load_4d(dst, static_cast<const void*>(map), bar, c0, c1, c2, c3);
}

// bar.sync 1, kThreads: every thread of the CTA, wherever in the code it is reached.
template <int kThreads>
inline void cta_sync() {
  tls_cta->bar.arrive_and_wait();
}

// bar.sync kId, kThreads / bar.arrive kId, kThreads.
template <int kId, int kThreads>
inline void named_bar_sync() {
  tls_cta->named.arrive(kId, kThreads, true);
}
template <int kId, int kThreads>
inline void named_bar_arrive() {
  tls_cta->named.arrive(kId, kThreads, false);
}

template <int N>
inline void setmaxnreg_inc() {}
template <int N>
inline void setmaxnreg_dec() {}

inline float fast_exp2(float x) { return std::exp2(x); }

inline float warp_pick(float v, int src) {
  Warp& w = this_warp();
  w.value[lane_id()] = v;
  w.bar.arrive_and_wait();
  const float r = w.value[src & 31];
  w.bar.arrive_and_wait();
  return r;
}

}  // namespace lane_emulation
}  // namespace cp_attention

// CUDA built-ins the kernels use, for the emulated threads (full-warp masks only).
#define threadIdx (::cp_attention::lane_emulation::tls_thread_idx)
#define blockIdx (::cp_attention::lane_emulation::tls_block_idx)

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return ::cp_attention::lane_emulation::warp_pick(v, ::cp_attention::lane_emulation::lane_id() ^ lane_mask);
}
inline float __shfl_sync(unsigned, float v, int src_lane) {
  return ::cp_attention::lane_emulation::warp_pick(v, src_lane);
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline int min(int a, int b) { return a < b ? a : b; }
#undef __launch_bounds__
#define __launch_bounds__(...)
inline void __syncthreads() { ::cp_attention::lane_emulation::tls_cta->bar.arrive_and_wait(); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
