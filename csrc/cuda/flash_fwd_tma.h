// Host side of the warp-specialized Hopper kernel (flash_fwd_sm90_tma_kernel.cuh): the TMA tensor maps of
// q, k and v. The encoder is the driver's cuTensorMapEncodeTiled, reached through the runtime's entry-point
// query (no link against libcuda); the CPU emulation of the kernels (tests/cuda_emulation/) supplies its own.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda.h>

#include <cstdint>

#include "cuda/flash_fwd_sm90_tma_kernel.cuh"  // the box shape the kernel loads (kTmaBoxCols, kTmaBoxRows)

#ifndef CP_ATTENTION_LANE_EMULATION
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#endif

namespace cp_attention {
namespace flash {

// The geometry of a BSHD tensor as a 4-D map, innermost first: D, then H and S in the order of their
// strides, then B. BSHD memory gives (D, H, S, B); BHSD memory seen as BSHD (x.transpose(1, 2) of a
// contiguous [B, H, S, D] tensor, what the SDPA layout hands over) gives (D, S, H, B), s_inner. Filled only
// where TMA can address the tensor: a 16-bit dtype, a 16-byte aligned base, unit stride along D and,
// outward, every stride a multiple of 16 bytes and at least the extent of the dimension inside it (no
// overlap, and each dimension's stride at least the one inside it: the layout the driver documents). A
// dimension of size 1 is only ever at coordinate 0, so its stride is free: it is set to that minimum,
// rounded up to 16 bytes.
struct BshdGeometry {
  void* base;
  uint64_t dims[4];
  uint64_t strides[3];
  bool s_inner;  // dims (D, S, H, B) instead of (D, H, S, B)
};

inline bool bshd_geometry(const at::Tensor& t, BshdGeometry& g) {
  if (t.dim() != 4 || t.element_size() != 2 || t.numel() == 0) return false;
  const uint64_t esize = 2;
  g.base = const_cast<void*>(t.const_data_ptr());
  if (reinterpret_cast<uintptr_t>(g.base) % 16 != 0) return false;
  if (t.size(3) > 1 && t.stride(3) != 1) return false;
  g.s_inner = t.size(1) > 1 && t.size(2) > 1 && t.stride(2) > t.stride(1);
  const int outer[3] = {g.s_inner ? 1 : 2, g.s_inner ? 2 : 1, 0};  // tensor axes of map dims 1, 2, 3
  g.dims[0] = static_cast<uint64_t>(t.size(3));
  uint64_t inner = g.dims[0] * esize;  // bytes spanned by the dimensions inside the next one
  for (int i = 1; i < 4; ++i) {
    const int axis = outer[i - 1];
    const uint64_t n = static_cast<uint64_t>(t.size(axis));
    uint64_t st = static_cast<uint64_t>(t.stride(axis)) * esize;
    if (n == 1) st = (inner + 15) / 16 * 16;
    if (t.stride(axis) < 0 || st % 16 != 0 || st < inner || st >= (uint64_t{1} << 40)) return false;
    g.dims[i] = n;
    g.strides[i - 1] = st;
    inner = st * n;
  }
  return true;
}

// The box of a map: kTmaBoxCols columns of D by kTmaBoxRows rows of S (one head, one batch), in the map's
// dimension order.
inline void bshd_box(const BshdGeometry& g, uint32_t (&box)[4]) {
  box[0] = kTmaBoxCols;
  box[1] = g.s_inner ? kTmaBoxRows : 1;
  box[2] = g.s_inner ? 1 : kTmaBoxRows;
  box[3] = 1;
}

#ifndef CP_ATTENTION_LANE_EMULATION

// cuTensorMapEncodeTiled from the driver, or nullptr where the runtime cannot provide it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // the query's error is not the caller's
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Encodes t (BSHD, float16 or bfloat16) into map and says whether its S lies inside H (s_inner); false
// where TMA cannot address it (bshd_geometry) or the driver refuses the map.
inline bool encode_bshd_map(CUtensorMap* map, bool& s_inner, const at::Tensor& t) {
  BshdGeometry g{};
  if (!bshd_geometry(t, g)) return false;
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const CUtensorMapDataType dtype = t.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                     : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  cuuint32_t box[4];
  bshd_box(g, box);
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, dtype, 4, g.base, g.dims, g.strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  s_inner = g.s_inner;
  return r == CUDA_SUCCESS;
}

#else

// The emulation's stand-in (tests/cuda_emulation/emulated_fwd.cpp).
bool encode_bshd_map(CUtensorMap* map, bool& s_inner, const at::Tensor& t);

#endif  // CP_ATTENTION_LANE_EMULATION

// The maps of q, k and v for the TMA kernel; false where any of them cannot be encoded.
inline bool encode_sm90_maps(Sm90TmaMaps& maps, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  bool sq = false, sk = false, sv = false;
  if (!encode_bshd_map(&maps.q, sq, q) || !encode_bshd_map(&maps.k, sk, k) || !encode_bshd_map(&maps.v, sv, v))
    return false;
  maps.s_inner = (sq ? Sm90TmaMaps::kQ : 0u) | (sk ? Sm90TmaMaps::kK : 0u) | (sv ? Sm90TmaMaps::kV : 0u);
  return true;
}

}  // namespace flash
}  // namespace cp_attention
