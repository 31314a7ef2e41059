// Register-blocked float32 tiles for the CPU attention kernels, written on at::vec so that the same code
// compiles to AVX2, AVX-512 or plain C++ (CP_ATTENTION_CPU_ISA picks which at build time).
//
// Every product in the kernel has the form C[r, 0:cols] (+)= sum_k A(r, k) * B[k, 0:cols], where the
// `cols` axis is the block of query rows. Keeping queries on the vector axis means that Q K^T needs K as
// it is stored (A(r, k) = K[j = r, d = k]) and P V needs V as it is stored (A(r, k) = V[j = k, d = r]):
// no transposes of K or V, and the softmax reductions over keys become element-wise vector ops.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cp_attention::cpu {

using Vec = at::vec::Vectorized<float>;
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

template <int R, bool kAccumulate, typename Between>
inline void tile_row_strip(int64_t K, int64_t cols, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                           int64_t ldb, float* C, int64_t ldc, Between& between) {
  for (int64_t c = 0; c < cols; c += kTileCols) {
    micro_tile<R, kAccumulate>(K, A, a_rs, a_ks, B + c, ldb, C + c, ldc);
    between();
  }
}

struct NoOp {
  void operator()() const {}
};

// C[M, cols] (+)= A(M x K) * B[K, cols] with A(r, k) = A[r * a_rs + k * a_ks]; cols is a multiple of
// kTileCols, B and C are row-major with leading dimensions ldb and ldc. `between()` runs after every micro
// tile: a place to interleave memory prefetches with the arithmetic.
inline int64_t panel_gemm_tiles(int64_t M, int64_t cols) {
  return (M + kTileRows - 1) / kTileRows * (cols / kTileCols);
}

template <bool kAccumulate, typename Between = NoOp>
inline void panel_gemm(int64_t M, int64_t K, int64_t cols, const float* A, int64_t a_rs, int64_t a_ks,
                       const float* B, int64_t ldb, float* C, int64_t ldc, Between&& between = Between{}) {
  int64_t r = 0;
  for (; r + kTileRows <= M; r += kTileRows)
    tile_row_strip<kTileRows, kAccumulate>(K, cols, A + r * a_rs, a_rs, a_ks, B, ldb, C + r * ldc, ldc, between);
  const float* a = A + r * a_rs;
  float* c = C + r * ldc;
  switch (M - r) {
    case 5: tile_row_strip<5, kAccumulate>(K, cols, a, a_rs, a_ks, B, ldb, c, ldc, between); break;
    case 4: tile_row_strip<4, kAccumulate>(K, cols, a, a_rs, a_ks, B, ldb, c, ldc, between); break;
    case 3: tile_row_strip<3, kAccumulate>(K, cols, a, a_rs, a_ks, B, ldb, c, ldc, between); break;
    case 2: tile_row_strip<2, kAccumulate>(K, cols, a, a_rs, a_ks, B, ldb, c, ldc, between); break;
    case 1: tile_row_strip<1, kAccumulate>(K, cols, a, a_rs, a_ks, B, ldb, c, ldc, between); break;
    default: break;
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

}  // namespace cp_attention::cpu
