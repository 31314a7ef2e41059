// Small helpers shared by the CUDA kernels: float32 conversion of the three attention dtypes, 16-byte vector
// loads/stores of row segments, and host-side dtype dispatch and alignment tests.
//
// Kernels work on CUDA's own element types (float, __half, __nv_bfloat16) rather than c10::Half/BFloat16:
// the build defines __CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion here is an explicit
// intrinsic with round-to-nearest-even, and nothing depends on implicit operator overloads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace cp_attention {
namespace cuda_util {

// ---------------------------------------------------------------------------------------------------------
// Scalar conversions.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------------------
// Vector access: N consecutive elements through 16-byte (128-bit) transactions, converted to/from float32.
// p must be 16-byte aligned and N * sizeof(T) a multiple of 16; the caller proves both on the host.
// Each 16-byte word is moved as a uint4 so the compiler emits one LDG.128/STG.128 per word.

namespace detail {

template <typename To, typename From>
__device__ __forceinline__ To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs equal sizes");
  To y;
  memcpy(&y, &x, sizeof(To));  // a register move after optimization; avoids type-punning through pointers
  return y;
}

__device__ __forceinline__ float2 unpack2(uint32_t w, __half) { return __half22float2(bits_as<__half2>(w)); }
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16) {
  return __bfloat1622float2(bits_as<__nv_bfloat162>(w));
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  return bits_as<uint32_t>(__float22half2_rn(make_float2(a, b)));
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  return bits_as<uint32_t>(__float22bfloat162_rn(make_float2(a, b)));
}

}  // namespace detail

template <int N>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[N]) {
  static_assert(N % 4 == 0, "float vectors move 4 elements per 16 bytes");
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const uint4 w = q[i];
    v[4 * i + 0] = __uint_as_float(w.x);
    v[4 * i + 1] = __uint_as_float(w.y);
    v[4 * i + 2] = __uint_as_float(w.z);
    v[4 * i + 3] = __uint_as_float(w.w);
  }
}

template <int N>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[N]) {
  static_assert(N % 4 == 0, "float vectors move 4 elements per 16 bytes");
  uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    q[i] = make_uint4(__float_as_uint(v[4 * i + 0]), __float_as_uint(v[4 * i + 1]), __float_as_uint(v[4 * i + 2]),
                      __float_as_uint(v[4 * i + 3]));
  }
}

// __half and __nv_bfloat16: 8 elements per 16 bytes, converted two at a time with the paired intrinsics.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[N]) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  static_assert(N % 8 == 0, "16-bit vectors move 8 elements per 16 bytes");
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < N / 8; ++i) {
    const uint4 w = q[i];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = detail::unpack2(words[j], T{});
      v[8 * i + 2 * j + 0] = f.x;
      v[8 * i + 2 * j + 1] = f.y;
    }
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[N]) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  static_assert(N % 8 == 0, "16-bit vectors move 8 elements per 16 bytes");
  uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int i = 0; i < N / 8; ++i) {
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      words[j] = detail::pack2(v[8 * i + 2 * j + 0], v[8 * i + 2 * j + 1], T{});
    }
    q[i] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA element type of an attention dtype (float32, float16, bfloat16).
// Callers validate dtypes first (checks.h), so the default branch is an internal error.
template <typename F>
decltype(auto) with_cuda_elem_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(TypeTag<float>{});
    case at::kHalf:
      return f(TypeTag<__half>{});
    case at::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, "cp_attention: no CUDA element type for dtype ", t);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when every innermost row t[i, j, ..., :] is contiguous and starts on a `bytes` boundary, so rows can be
// walked with `bytes`-wide vector accesses. Dimensions of size 1 never move the pointer, so their strides
// do not matter. The row length itself is the caller's to check.
inline bool rows_aligned(const at::Tensor& t, int64_t bytes) {
  const int64_t nd = t.dim();
  if (nd == 0) return false;
  if (t.size(nd - 1) > 1 && t.stride(nd - 1) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % static_cast<uintptr_t>(bytes) != 0) return false;
  const int64_t esize = static_cast<int64_t>(t.element_size());
  for (int64_t i = 0; i + 1 < nd; ++i) {
    if (t.size(i) > 1 && (t.stride(i) * esize) % bytes != 0) return false;
  }
  return true;
}

}  // namespace cuda_util
}  // namespace cp_attention
