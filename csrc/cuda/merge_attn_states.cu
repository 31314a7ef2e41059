// CUDA kernels of merge_attn_states and merge_attn_states_: combine two partial attention states over
// disjoint key sets, (o_a, l_a) and (o_b, l_b), into the state over both (docs/design.md, "Merging partial
// results"):
//   m = max(l_a, l_b), w_a = exp(l_a - m), w_b = exp(l_b - m), l = m + log(w_a + w_b),
//   o = o_a * (w_a / (w_a + w_b)) + o_b * (w_b / (w_a + w_b)),   all in float32.
// A side with lse -inf holds no keys: its out is never read (it may hold garbage or NaN), and the other side
// passes through unchanged; both -inf gives out 0 and lse -inf. The same skip applies to a side whose weight
// underflows to exactly 0 in float32.
//
// Layout: out tensors are [B, S, H, D] with any strides, lse tensors [B, H, S] float32 with any strides. The
// work unit is one row (b, s, h): its two lse values and D elements of each out.
//
// Thread layout: a group of G threads (a power of two, at most a warp) handles one row; a 256-thread block
// holds 256 / G rows, and blocks stride over the rows. Rows are numbered with h fastest, then s, then b, so
// consecutive groups touch consecutive rows of a contiguous BSHD out (the bulk of the traffic); the lse
// accesses, one float per row, are strided but a sector of lse is reused by neighbouring groups from L2.
// Lane 0 of a group reads the row's two lse values and broadcasts them with a shuffle, so in the in-place
// op (lse_a aliasing the lse being written) the one thread that reads an lse entry is also the one that
// overwrites it, with no cross-thread ordering to get right.
//
// Element access: when every out row is contiguous and 16-byte aligned and D is a multiple of the vector
// width, each thread moves a chunk of K elements with 16-byte loads/stores, K = 16 / (smallest element size)
// (8 when any of the three outs is 16-bit, else 4), and G = the power of two >= D / K (capped at 32), so a
// typical row (D = 64..256) is a single pass of the group. Otherwise (a strided last dimension, a view at an
// odd offset, D not a multiple of K) each thread handles single elements d = lane, lane + G, ..., which is
// still coalesced when stride(-1) == 1.
//
// The row's two reads wait on its lse values (to skip a side that holds no keys), so latency is hidden by
// occupancy: small register footprint, 256-thread blocks, 2048 resident threads per SM.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>

#include "checks.h"
#include "kernel_image.h"
#include "cuda/cuda_utils.cuh"

namespace cp_attention {
namespace {

using cuda_util::from_float;
using cuda_util::load_vec;
using cuda_util::store_vec;
using cuda_util::to_float;

constexpr int kBlockThreads = 256;
// 8 blocks of 256 = 2048 threads, a full SM on sm_80/sm_90: caps registers at 32. Occupancy is what hides
// the two dependent memory round trips of a row, and at this cap ptxas spills at most a word.
constexpr int kMinBlocksPerSm = 8;

// Strides are in elements. One struct serves the three out tensors (the pointer's constness differs).
template <typename T>
struct OutView {
  T* ptr;
  int64_t sb, ss, sh, sd;  // strides of [B, S, H, D]

  __device__ __forceinline__ T* row(int64_t b, int64_t s, int64_t h) const {
    return ptr + b * sb + s * ss + h * sh;
  }
};

template <typename T>
struct LseView {
  T* ptr;  // float or const float
  int64_t sb, sh, ss;  // strides of [B, H, S]

  __device__ __forceinline__ T* at(int64_t b, int64_t s, int64_t h) const {
    return ptr + b * sb + h * sh + s * ss;
  }
};

template <typename TA, typename TB, typename TD>
struct MergeParams {
  OutView<const TA> a;
  OutView<const TB> b;
  OutView<TD> dst;
  LseView<const float> lse_a;
  LseView<const float> lse_b;
  LseView<float> lse_dst;
  int64_t S, H, D;
  int64_t rows;       // B * S * H
  int log2_group;     // G = 1 << log2_group threads per row
  bool vectorized;    // rows contiguous, 16-byte aligned and D % K == 0 for all three outs
  bool rows_fit_u32;  // rows < 2^32: split row indices with 32-bit division
};

// Chunk width of the vectorized path: 16 bytes of the narrowest of the three types. The wider types then take
// 32 bytes per chunk (two vector accesses), and every chunk start stays 16-byte aligned.
template <typename TA, typename TB, typename TD>
constexpr int kChunkElems = 16 / static_cast<int>(std::min({sizeof(TA), sizeof(TB), sizeof(TD)}));

// Which sides of a row hold keys; decided once per row from its two lse values.
enum class RowMode : int { kNone, kOnlyA, kOnlyB, kBoth };

template <typename TA, typename TB, typename TD>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    merge_attn_states_kernel(const MergeParams<TA, TB, TD> p) {
  constexpr int K = kChunkElems<TA, TB, TD>;
  constexpr float kNegInf = -INFINITY;

  const int group_size = 1 << p.log2_group;
  const int lane = static_cast<int>(threadIdx.x) & (group_size - 1);
  const int64_t group = static_cast<int64_t>(threadIdx.x >> p.log2_group);
  const int64_t rows_per_block = kBlockThreads >> p.log2_group;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * rows_per_block;

  // The loop bound depends only on the block, so every thread of a warp runs the same iterations and the
  // full-mask shuffles below are always reached by the whole warp; only the last iteration can have groups
  // past the end, and those just skip their row.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; row0 < p.rows; row0 += row_stride) {
    const int64_t row = row0 + group;
    const bool active = row < p.rows;

    // row = (b * S + s) * H + h. 64-bit division is a long software sequence, so use 32 bits when it fits.
    int64_t b = 0, s = 0, h = 0;
    if (active) {
      if (p.rows_fit_u32) {
        const uint32_t r = static_cast<uint32_t>(row);
        const uint32_t H = static_cast<uint32_t>(p.H), S = static_cast<uint32_t>(p.S);
        const uint32_t bs = r / H;
        h = r - bs * H;
        b = bs / S;
        s = bs - static_cast<uint32_t>(b) * S;
      } else {
        const int64_t bs = row / p.H;
        h = row - bs * p.H;
        b = bs / p.S;
        s = bs - b * p.S;
      }
    }

    float la = kNegInf, lb = kNegInf;
    if (active && lane == 0) {
      la = *p.lse_a.at(b, s, h);
      lb = *p.lse_b.at(b, s, h);
    }
    la = __shfl_sync(0xffffffffu, la, 0, group_size);
    lb = __shfl_sync(0xffffffffu, lb, 0, group_size);

    if (active) {
      // A side takes part only if its weight is nonzero: lse -inf (no keys) gives weight 0 by definition, and
      // exp underflow (a side ~104 or more below the other) gives 0 too. A weight-0 side is not read at all,
      // so whatever its out holds (garbage, inf, NaN) cannot leak in as 0 * NaN. The other side then passes
      // through bit-exactly, which is also what the formula gives (w = 1, factor 1, lse = m + log 1). A NaN
      // lse yields a NaN weight, which is nonzero, so NaN propagates rather than being dropped.
      RowMode mode;
      float lse_out, ca = 0.f, cb = 0.f;
      if (la == kNegInf && lb == kNegInf) {
        mode = RowMode::kNone;  // checked first: m would be -inf and la - m NaN
        lse_out = kNegInf;
      } else {
        const float m = fmaxf(la, lb);
        const float wa = la == kNegInf ? 0.f : expf(la - m);
        const float wb = lb == kNegInf ? 0.f : expf(lb - m);
        if (wb == 0.f) {
          mode = RowMode::kOnlyA;
          lse_out = la;
        } else if (wa == 0.f) {
          mode = RowMode::kOnlyB;
          lse_out = lb;
        } else {
          mode = RowMode::kBoth;
          const float sum = wa + wb;  // in (1, 2] for finite lse, so the log and the divisions are safe
          lse_out = m + logf(sum);
          ca = wa / sum;
          cb = wb / sum;
        }
      }

      // Lane 0 alone read this row's lse values (above), so in place this write cannot overtake a read. It
      // goes first so that b, s, h are dead during the element loop.
      if (lane == 0) *p.lse_dst.at(b, s, h) = lse_out;

      const TA* ra = p.a.row(b, s, h);
      const TB* rb = p.b.row(b, s, h);
      TD* rd = p.dst.row(b, s, h);

      // Products rounded separately and then added (no fused multiply-add): the result is then the same
      // bits whichever side is called a and which b, so swapping the operands is free (see the dispatch).
      if (p.vectorized) {
        // 32-bit chunk counter (the host keeps this path to D / K < 2^31): it saves registers in the loop.
        const int chunks = static_cast<int>(p.D / K);
#pragma unroll 1
        for (int c = lane; c < chunks; c += group_size) {
          const int64_t off = static_cast<int64_t>(c) * K;
          float o[K];
          if (mode == RowMode::kBoth) {
            float x[K], y[K];
            load_vec<K>(ra + off, x);
            load_vec<K>(rb + off, y);
#pragma unroll
            for (int i = 0; i < K; ++i) o[i] = __fadd_rn(__fmul_rn(x[i], ca), __fmul_rn(y[i], cb));
          } else if (mode == RowMode::kOnlyA) {
            load_vec<K>(ra + off, o);
          } else if (mode == RowMode::kOnlyB) {
            load_vec<K>(rb + off, o);
          } else {
#pragma unroll
            for (int i = 0; i < K; ++i) o[i] = 0.f;
          }
          store_vec<K>(rd + off, o);
        }
      } else {
#pragma unroll 1
        for (int64_t d = lane; d < p.D; d += group_size) {
          const TA* pa = ra + d * p.a.sd;
          const TB* pb = rb + d * p.b.sd;
          float o;
          if (mode == RowMode::kBoth) {
            o = __fadd_rn(__fmul_rn(to_float(*pa), ca), __fmul_rn(to_float(*pb), cb));
          } else if (mode == RowMode::kOnlyA) {
            o = to_float(*pa);
          } else if (mode == RowMode::kOnlyB) {
            o = to_float(*pb);
          } else {
            o = 0.f;
          }
          rd[d * p.dst.sd] = from_float<TD>(o);
        }
      }
    }
  }
}

template <typename T, typename U>
OutView<T> out_view(const at::Tensor& t, U* ptr) {
  return OutView<T>{reinterpret_cast<T*>(ptr), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
LseView<T> lse_view(const at::Tensor& t, T* ptr) {
  return LseView<T>{ptr, t.stride(0), t.stride(1), t.stride(2)};
}

int log2_ceil(int64_t n) {
  int k = 0;
  while ((int64_t{1} << k) < n) ++k;
  return k;
}

// Shapes, dtypes and devices are checked by the caller; dst/lse_dst may alias a/lse_a (the in-place op).
template <typename TA, typename TB, typename TD>
void launch_merge(const at::Tensor& a, const at::Tensor& lse_a, const at::Tensor& b, const at::Tensor& lse_b,
                  const at::Tensor& dst, const at::Tensor& lse_dst) {
  const int64_t B = a.size(0), S = a.size(1), H = a.size(2), D = a.size(3);
  const int64_t rows = B * S * H;
  if (rows == 0) return;  // nothing to merge (D == 0 alone still has lse entries, so it is not "empty")

  MergeParams<TA, TB, TD> p;
  p.a = out_view<const TA>(a, a.const_data_ptr());
  p.b = out_view<const TB>(b, b.const_data_ptr());
  p.dst = out_view<TD>(dst, dst.mutable_data_ptr());
  p.lse_a = lse_view<const float>(lse_a, lse_a.const_data_ptr<float>());
  p.lse_b = lse_view<const float>(lse_b, lse_b.const_data_ptr<float>());
  p.lse_dst = lse_view<float>(lse_dst, lse_dst.mutable_data_ptr<float>());
  p.S = S;
  p.H = H;
  p.D = D;
  p.rows = rows;
  p.rows_fit_u32 = rows <= static_cast<int64_t>(UINT32_MAX);

  constexpr int64_t K = kChunkElems<TA, TB, TD>;
  p.vectorized = D > 0 && D % K == 0 && D / K <= INT_MAX && cuda_util::rows_aligned(a, 16) &&
                 cuda_util::rows_aligned(b, 16) && cuda_util::rows_aligned(dst, 16);
  const int64_t per_row = p.vectorized ? D / K : D;  // work items of one row
  p.log2_group = std::min(log2_ceil(per_row), 5);     // at most one warp per row

  const int64_t rows_per_block = kBlockThreads >> p.log2_group;
  const int64_t blocks = std::min<int64_t>(cuda_util::ceil_div(rows, rows_per_block), INT_MAX);
  merge_attn_states_kernel<TA, TB, TD>
      <<<static_cast<unsigned int>(blocks), kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dst has a's dtype, except for the one promotion that matches neither input (float16 with bfloat16 ->
// float32); that keeps the instantiations to 9 + 1.
void dispatch_merge(const at::Tensor& a, const at::Tensor& lse_a, const at::Tensor& b, const at::Tensor& lse_b,
                    const at::Tensor& dst, const at::Tensor& lse_dst) {
  if (a.scalar_type() == dst.scalar_type()) {
    cuda_util::with_cuda_elem_type(dst.scalar_type(), [&](auto td) {
      using TD = typename decltype(td)::type;
      cuda_util::with_cuda_elem_type(b.scalar_type(), [&](auto tb) {
        using TB = typename decltype(tb)::type;
        launch_merge<TD, TB, TD>(a, lse_a, b, lse_b, dst, lse_dst);
      });
    });
  } else {
    TORCH_CHECK(
        a.scalar_type() == at::kHalf && b.scalar_type() == at::kBFloat16 && dst.scalar_type() == at::kFloat,
        "cp_attention: internal error: no merge kernel for ", a.scalar_type(), " + ", b.scalar_type(), " -> ",
        dst.scalar_type());
    launch_merge<__half, __nv_bfloat16, float>(a, lse_a, b, lse_b, dst, lse_dst);
  }
}

void check_on_cuda(const char* op, const at::Tensor& out) {
  // check_merge_inputs has already put all four tensors on out's device.
  TORCH_CHECK_VALUE(out.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", out.device());
}

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                          const at::Tensor& out_b, const at::Tensor& lse_b) {
  constexpr const char* op = "cp_attention.merge_attn_states";
  check_merge_inputs(op, "out_a", out_a, lse_a, out_b, lse_b);
  check_on_cuda(op, out_a);
  c10::cuda::CUDAGuard device_guard(out_a.device());

  const at::ScalarType dtype = c10::promoteTypes(out_a.scalar_type(), out_b.scalar_type());
  at::Tensor out = at::empty(out_a.sizes(), out_a.options().dtype(dtype));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());

  // The kernel computes the same bits for merge(a, b) and merge(b, a), so the side whose dtype is already
  // the result's is passed first; only float16 with bfloat16 (-> float32) has none, and that kernel takes
  // the float16 side first.
  bool swap = false;
  if (out_a.scalar_type() != dtype) {
    // out_b has the result dtype, or neither side has it and out_a is the bfloat16 one.
    swap = out_b.scalar_type() == dtype || out_a.scalar_type() == at::kBFloat16;
  }
  if (swap) {
    dispatch_merge(out_b, lse_b, out_a, lse_a, out, lse);
  } else {
    dispatch_merge(out_a, lse_a, out_b, lse_b, out, lse);
  }
  return {out, lse};
}

void merge_attn_states_inplace_cuda(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_b,
                                    const at::Tensor& lse_b) {
  constexpr const char* op = "cp_attention.merge_attn_states_";
  check_merge_inputs(op, "out", out, lse, out_b, lse_b);
  check_on_cuda(op, out);
  // Every element of out and lse is written by one thread from the same position of the inputs. Writes into
  // a tensor whose elements share memory, or inputs that partly overlap an output, would race.
  at::assert_no_internal_overlap(out);
  at::assert_no_internal_overlap(lse);
  at::assert_no_partial_overlap(out, out_b);
  at::assert_no_partial_overlap(lse, lse_b);
  at::assert_no_overlap(out, lse);
  at::assert_no_overlap(out, lse_b);
  at::assert_no_overlap(lse, out_b);
  c10::cuda::CUDAGuard device_guard(out.device());

  dispatch_merge(out, lse, out_b, lse_b, out, lse);
}

}  // namespace

// Every kernel file is compiled for the same targets (setup.py), so one kernel answers for all of them: the
// merge kernel, which every backend's ring step uses. Asking for its attributes loads its module on the
// device, which fails with cudaErrorNoKernelImageForDevice (or, from some runtimes, InvalidDeviceFunction)
// where neither SASS nor PTX of the build fits the device.
bool cuda_kernel_image_fits(int64_t device) {
  c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, merge_attn_states_kernel<float, float, float>);
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();  // not a sticky error: cleared, so that no later launch check reports it
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) return false;
  C10_CUDA_CHECK(err);
  return false;
}

}  // namespace cp_attention

TORCH_LIBRARY_IMPL(cp_attention, CUDA, m) {
  m.impl("merge_attn_states", &cp_attention::merge_attn_states_cuda);
  m.impl("merge_attn_states_", &cp_attention::merge_attn_states_inplace_cuda);
}
