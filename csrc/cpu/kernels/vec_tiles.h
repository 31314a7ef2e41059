// Register-blocked float32 tiles for the CPU attention kernels, written on at::vec so that the same code
// compiles to AVX2, AVX-512 or plain C++: each ISA's translation unit (cpu/isa_*.cpp) includes it once.
//
// Every product in the kernel has the form C[r, i] (+)= sum_k A(r, k) * B[k, i], where the i axis is the
// block of queries. Keeping queries on the vector axis means that Q K^T needs K as
// it is stored (A(r, k) = K[j = r, d = k]) and P V needs V as it is stored (A(r, k) = V[j = k, d = r]):
// no transposes of K or V, and the softmax reductions over keys become element-wise vector ops.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <cstring>
#include <type_traits>

namespace cp_attention::cpu::CPA_ISA {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 64-byte aligned buffers for the kernels' per-thread scratch (uninitialised; trivial element types). AMX
// tile loads and stores that straddle cache lines ran oneDNN's brgemm 2-3x slower than aligned ones.
struct AlignedDelete {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
template <typename T>
using BufferOf = std::unique_ptr<T[], AlignedDelete>;
using Buffer = BufferOf<float>;
template <typename T = float>
inline BufferOf<T> make_buffer(int64_t n) {
  static_assert(std::is_trivially_copyable_v<T>);
  const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1));
  return BufferOf<T>(static_cast<T*>(::operator new[](bytes, std::align_val_t(64))));
}
constexpr int64_t kVecLen = Vec::size();
// A micro tile is kTileRows x (2 vectors): 2 * kTileRows accumulators + 2 B vectors + 1 broadcast fit the
// 16 vector registers of AVX2.
constexpr int64_t kTileCols = 2 * kVecLen;
constexpr int kTileRows = 6;

// The accumulators are named variables, not an array: GCC keeps an array of vector objects in memory and
// stores it back on every k step, which cost a factor of 3 in measured throughput.
#define CPA_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <int R, bool kAccumulate>
inline void micro_tile(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
                       float* C, int64_t ldc) {
  static_assert(R >= 1 && R <= kTileRows, "micro_tile handles 1 to kTileRows rows");
#define CPA_DECLARE(r) Vec c##r##0(0.f), c##r##1(0.f);
  CPA_TILE_ROWS(CPA_DECLARE)
#undef CPA_DECLARE
  if constexpr (kAccumulate) {
#define CPA_LOAD(r)                                 \
  if constexpr (r < R) {                            \
    c##r##0 = Vec::loadu(C + r * ldc);              \
    c##r##1 = Vec::loadu(C + r * ldc + kVecLen);    \
  }
    CPA_TILE_ROWS(CPA_LOAD)
#undef CPA_LOAD
  }
  // Unrolled, so that the loop's own counter and address updates do not compete with the FMAs.
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(B + k * ldb);
    const Vec b1 = Vec::loadu(B + k * ldb + kVecLen);
    const float* a = A + k * a_ks;
#define CPA_FMA(r)                                  \
  if constexpr (r < R) {                            \
    const Vec ar(a[r * a_rs]);                      \
    c##r##0 = at::vec::fmadd(ar, b0, c##r##0);      \
    c##r##1 = at::vec::fmadd(ar, b1, c##r##1);      \
  }
    CPA_TILE_ROWS(CPA_FMA)
#undef CPA_FMA
  }
#define CPA_STORE(r)                                \
  if constexpr (r < R) {                            \
    (c##r##0).store(C + r * ldc);                   \
    (c##r##1).store(C + r * ldc + kVecLen);         \
  }
  CPA_TILE_ROWS(CPA_STORE)
#undef CPA_STORE
}
#undef CPA_TILE_ROWS

struct NoOp {
  void operator()() const {}
};

// Panel layout: a matrix with `cols` query columns is stored as cols / kTileCols panels, each panel holding
// its rows of kTileCols contiguous floats. Every micro tile then reads B and reads/writes C as one
// contiguous stream, which the prefetchers follow and which stays in L1.
//
// C[p][r][:] (+)= sum_k A(r, k) * B[p][k][:] for panels p < panels and rows r < M, where
// A(r, k) = A[r * a_rs + k * a_ks], B's panels are b_ps floats apart and C's panels c_ps floats apart.
// `between()` runs after every micro tile: a place to interleave memory prefetches with the arithmetic.
inline int64_t panel_gemm_tiles(int64_t M, int64_t panels) {
  return (M + kTileRows - 1) / kTileRows * panels;
}

template <bool kAccumulate, typename Between = NoOp>
inline void panel_gemm(int64_t M, int64_t K, int64_t panels, const float* A, int64_t a_rs, int64_t a_ks,
                       const float* B, int64_t b_ps, float* C, int64_t c_ps, Between&& between = Between{}) {
  constexpr int64_t T = kTileCols;
  for (int64_t pi = 0; pi < panels; ++pi) {
    const float* b = B + pi * b_ps;
    float* c = C + pi * c_ps;
    int64_t r = 0;
    for (; r + kTileRows <= M; r += kTileRows) {
      micro_tile<kTileRows, kAccumulate>(K, A + r * a_rs, a_rs, a_ks, b, T, c + r * T, T);
      between();
    }
    const float* a = A + r * a_rs;
    float* cr = c + r * T;
    switch (M - r) {
      case 5: micro_tile<5, kAccumulate>(K, a, a_rs, a_ks, b, T, cr, T); break;
      case 4: micro_tile<4, kAccumulate>(K, a, a_rs, a_ks, b, T, cr, T); break;
      case 3: micro_tile<3, kAccumulate>(K, a, a_rs, a_ks, b, T, cr, T); break;
      case 2: micro_tile<2, kAccumulate>(K, a, a_rs, a_ks, b, T, cr, T); break;
      case 1: micro_tile<1, kAccumulate>(K, a, a_rs, a_ks, b, T, cr, T); break;
      default: continue;
    }
    between();
  }
}

// dst[0:n] = float(src[0:n]) for a contiguous row.
template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using VT = at::vec::Vectorized<T>;
    int64_t x = 0;
    for (; x + VT::size() <= n; x += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(src + x));
      lo.store(dst + x);
      hi.store(dst + x + kVecLen);
    }
    for (; x < n; ++x) dst[x] = static_cast<float>(src[x]);
  }
}

}  // namespace cp_attention::cpu::CPA_ISA
