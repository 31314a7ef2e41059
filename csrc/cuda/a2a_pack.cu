// CUDA pack/unpack kernels around the two Ulysses all-to-alls: the same ops, checks and buffer layouts as
// cpu/a2a_pack.cpp (see the layouts there and in a2a_layout.h). Each op is one launch that moves every
// element once between the BSHD tensors and the flat all_to_all_single buffer.
//
// The copies are memory-bound. Each thread moves "units" of W bytes (16 where the row lengths, strides and
// base addresses allow, else 8, 4 or 2) and walks the contiguous side of the copy in memory order, so that
// both sides are coalesced: the other side is contiguous within a head row (D elements) at least. Index
// math runs in 32 bits whenever the unit count allows it, since 64-bit division is a long software sequence
// and each unit needs a few divisions.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "a2a_layout.h"
#include "checks.h"
#include "cuda/cuda_utils.cuh"

namespace cp_attention {
namespace {

constexpr int kThreads = 256;

template <int W>
struct Unit;
template <>
struct Unit<2> {
  using type = uint16_t;
};
template <>
struct Unit<4> {
  using type = uint32_t;
};
template <>
struct Unit<8> {
  using type = uint2;
};
template <>
struct Unit<16> {
  using type = uint4;
};

template <int W>
__device__ __forceinline__ void copy_unit(char* dst, const char* src) {
  using U = typename Unit<W>::type;
  *reinterpret_cast<U*>(dst) = *reinterpret_cast<const U*>(src);
}

int64_t addr(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr())); }

// Byte strides of dims 0..2 that can move the pointer (a dimension of size 1 never does).
void push_strides(std::vector<int64_t>& q, const at::Tensor& t) {
  for (int64_t i = 0; i < 3; ++i)
    if (t.size(i) > 1) q.push_back(t.stride(i) * static_cast<int64_t>(t.element_size()));
}

// Largest access width in {16, 8, 4, 2} bytes dividing every given byte count or address. Every count the
// callers pass is a multiple of the element size (>= 2 bytes), so 2 always qualifies.
int64_t unit_bytes(const std::vector<int64_t>& quantities) {
  int64_t w = 16;
  for (int64_t x : quantities)
    while (w > 2 && x % w != 0) w /= 2;
  return w;
}

// Grid-stride launches: enough blocks to fill the GPU several times over, no more (each thread then loops).
unsigned int grid_for(int64_t units) {
  const int64_t fill = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(cuda_util::ceil_div(units, kThreads), fill)));
}

// 32-bit indices are safe when every index, including one grid stride past the last unit, stays below 2^32.
bool fits_u32(int64_t units) { return units <= (int64_t{1} << 31); }

// Largest s with start[s] <= j, for 0 <= j < start[P]: the rank whose chunk holds global position j
// (empty chunks share their start with the next chunk and are never chosen).
__device__ __forceinline__ int owner_of(const int64_t* __restrict__ start, int P, int64_t j) {
  int lo = 0, hi = P - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(start + mid) <= j) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Chunk starts on the device (P + 1 entries). The host copy is pinned so the transfer is asynchronous on the
// current stream; the caching host allocator keeps the pinned block alive until the copy has run.
at::Tensor starts_on_device(const std::vector<int64_t>& start, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(start.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(start.begin(), start.end(), host.mutable_data_ptr<int64_t>());
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

// ---------------------------------------------------------------------------------------------------------
// a2a_pack_seq_to_head: q, k, v (strided) -> buffer [P][q: B,S,h,D | k: B,S,hk,D | v: B,S,hk,D].

struct SrcView {
  const char* ptr;
  int64_t sb, ss, sh;  // byte strides of [B, S, H]
};

template <typename Idx>
struct PackSeqParams {
  SrcView q, k, v;
  char* dst;
  Idx S, upd;            // sequence length; units per head row
  Idx h, hk;             // query / kv heads per rank
  Idx qU, kU, blockU;    // units of q's part, of k's (= v's) part, of one destination's block
  Idx total;             // P * blockU
  Idx kv_group;          // ranks per kv head (1: P divides Hkv)
};

template <int W, typename Idx>
__global__ void __launch_bounds__(kThreads) pack_seq_to_head_kernel(const PackSeqParams<Idx> p) {
  const Idx stride = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx idx = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; idx < p.total; idx += stride) {
    const Idx r = idx / p.blockU;
    Idx w = idx - r * p.blockU;
    // Which tensor's part of destination r's block this unit is in. (Fields are selected by value: taking
    // the address of a kernel parameter would copy the parameters to local memory.)
    SrcView t = p.q;
    Idx n = p.h, h0 = r * p.h;
    if (w >= p.qU) {
      w -= p.qU;
      t = p.k;
      if (w >= p.kU) {
        w -= p.kU;
        t = p.v;
      }
      n = p.hk;
      h0 = p.kv_group == 1 ? r * p.hk : r / p.kv_group;
    }
    // w = ((b * S + s) * n + i) * upd + u
    Idx rest = w / p.upd;
    const Idx u = w - rest * p.upd;
    const Idx i = rest % n;
    rest /= n;
    const Idx s = rest % p.S;
    const Idx b = rest / p.S;
    const char* src = t.ptr + static_cast<int64_t>(b) * t.sb + static_cast<int64_t>(s) * t.ss +
                      static_cast<int64_t>(h0 + i) * t.sh + static_cast<int64_t>(u) * W;
    copy_unit<W>(p.dst + static_cast<int64_t>(idx) * W, src);
  }
}

SrcView src_view(const at::Tensor& t) {
  const int64_t e = static_cast<int64_t>(t.element_size());
  return {static_cast<const char*>(t.const_data_ptr()), t.stride(0) * e, t.stride(1) * e, t.stride(2) * e};
}

template <typename Idx>
void launch_pack_seq(int64_t W, const PackSeqParams<Idx>& p, int64_t total) {
  const unsigned int grid = grid_for(total);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (W) {
    case 16: pack_seq_to_head_kernel<16, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: pack_seq_to_head_kernel<8, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: pack_seq_to_head_kernel<4, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    default: pack_seq_to_head_kernel<2, Idx><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor a2a_pack_seq_to_head_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     int64_t world_size) {
  const char* op = "cp_attention.a2a_pack_seq_to_head";
  const AttnDims d = check_pack_seq_to_head(op, q, k, v);
  const HeadSplit hs = head_split(op, d.H, d.Hkv, world_size);
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", q.device());
  c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t B = d.B, S = d.Sq, D = d.D, P = world_size;
  const int64_t block = B * S * (hs.h + 2 * hs.hk) * D;
  at::Tensor buf = at::empty({P * block}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (buf.numel() == 0) return buf;

  const int64_t e = q.element_size();
  std::vector<int64_t> quantities = {D * e, addr(q), addr(k), addr(v), addr(buf)};
  push_strides(quantities, q);
  push_strides(quantities, k);
  push_strides(quantities, v);
  const int64_t W = unit_bytes(quantities);
  const int64_t upd = D * e / W;
  const int64_t total = buf.numel() * e / W;

  auto fill = [&](auto& p) {
    using Idx = std::decay_t<decltype(p.S)>;
    p.q = src_view(q);
    p.k = src_view(k);
    p.v = src_view(v);
    p.dst = static_cast<char*>(buf.mutable_data_ptr());
    p.S = static_cast<Idx>(S);
    p.upd = static_cast<Idx>(upd);
    p.h = static_cast<Idx>(hs.h);
    p.hk = static_cast<Idx>(hs.hk);
    p.qU = static_cast<Idx>(B * S * hs.h * upd);
    p.kU = static_cast<Idx>(B * S * hs.hk * upd);
    p.blockU = static_cast<Idx>(block * e / W);
    p.total = static_cast<Idx>(total);
    p.kv_group = static_cast<Idx>(hs.kv_group);
  };
  if (fits_u32(total)) {
    PackSeqParams<uint32_t> p;
    fill(p);
    launch_pack_seq(W, p, total);
  } else {
    PackSeqParams<int64_t> p;
    fill(p);
    launch_pack_seq(W, p, total);
  }
  return buf;
}

// ---------------------------------------------------------------------------------------------------------
// a2a_unpack_seq_to_head: buffer [source s][q: B,S_s,h,D | k: B,S_s,hk,D | v] -> q, k, v [B, Sg, n, D].

template <typename Idx>
struct UnpackSeqParams {
  const char* src;
  char* dst[3];
  const int64_t* start;  // P + 1 chunk starts (device)
  int P;
  Idx B, Sg;
  Idx rq, rk;            // units per position: q's heads, kv heads
  Idx qU, kU;            // units of the q output, of the k (= v) output
  Idx total;             // qU + 2 kU
};

template <int W, typename Idx>
__global__ void __launch_bounds__(kThreads) unpack_seq_to_head_kernel(const UnpackSeqParams<Idx> p) {
  const Idx stride = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx idx = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; idx < p.total; idx += stride) {
    // The three outputs one after another, each walked in memory order.
    Idx w = idx;
    int t = 0;
    if (w >= p.qU) {
      w -= p.qU;
      t = 1;
      if (w >= p.kU) {
        w -= p.kU;
        t = 2;
      }
    }
    const Idx rl = t == 0 ? p.rq : p.rk;  // units of one position's heads
    const Idx row = w / rl;
    const Idx x = w - row * rl;
    const Idx j = row % p.Sg;
    const Idx b = row / p.Sg;
    const int s = owner_of(p.start, p.P, static_cast<int64_t>(j));
    const int64_t s0 = __ldg(p.start + s), Ss = __ldg(p.start + s + 1) - s0;
    // Source s's block: B * s0 positions of all three parts precede it; inside it the q part, then k, then v,
    // each [B, S_s, n, D].
    const int64_t width = static_cast<int64_t>(p.rq) + 2 * static_cast<int64_t>(p.rk);
    const int64_t part = t == 0 ? 0 : static_cast<int64_t>(p.B) * Ss * (p.rq + (t - 1) * static_cast<int64_t>(p.rk));
    const int64_t unit = static_cast<int64_t>(p.B) * s0 * width + part +
                         (static_cast<int64_t>(b) * Ss + (static_cast<int64_t>(j) - s0)) * rl + x;
    char* dst = t == 0 ? p.dst[0] : (t == 1 ? p.dst[1] : p.dst[2]);
    copy_unit<W>(dst + static_cast<int64_t>(w) * W, p.src + unit * W);
  }
}

template <typename Idx>
void launch_unpack_seq(int64_t W, const UnpackSeqParams<Idx>& p, int64_t total) {
  const unsigned int grid = grid_for(total);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (W) {
    case 16: unpack_seq_to_head_kernel<16, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: unpack_seq_to_head_kernel<8, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: unpack_seq_to_head_kernel<4, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    default: unpack_seq_to_head_kernel<2, Idx><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> a2a_unpack_seq_to_head_cuda(const at::Tensor& recv,
                                                                          at::IntArrayRef seq_lens,
                                                                          int64_t batch, int64_t heads,
                                                                          int64_t kv_heads, int64_t head_dim) {
  const char* op = "cp_attention.a2a_unpack_seq_to_head";
  check_seq_lens(op, seq_lens);
  check_unpack_seq_to_head_sizes(op, batch, heads, kv_heads, head_dim);
  const int64_t P = static_cast<int64_t>(seq_lens.size()), B = batch, D = head_dim;
  const std::vector<int64_t> start = seq_starts(seq_lens);
  check_recv(op, recv, B * start[P] * (heads + 2 * kv_heads) * D);
  TORCH_CHECK_VALUE(recv.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", recv.device());
  TORCH_CHECK_VALUE(P <= INT_MAX, op, ": seq_lens lists too many ranks (", P, ")");
  c10::cuda::CUDAGuard device_guard(recv.device());
  const int64_t Sg = start[P];
  at::Tensor q = at::empty({B, Sg, heads, D}, recv.options());
  at::Tensor k = at::empty({B, Sg, kv_heads, D}, recv.options());
  at::Tensor v = at::empty({B, Sg, kv_heads, D}, recv.options());
  if (B * Sg == 0) return {q, k, v};

  // Both sides are dense runs of one position's heads, so a unit may span heads.
  const int64_t e = recv.element_size();
  const int64_t W = unit_bytes({heads * D * e, kv_heads * D * e, addr(recv), addr(q), addr(k), addr(v)});
  const int64_t rq = heads * D * e / W, rk = kv_heads * D * e / W;
  const int64_t qU = B * Sg * rq, kU = B * Sg * rk, total = qU + 2 * kU;
  const at::Tensor start_dev = starts_on_device(start, recv.device());

  auto fill = [&](auto& p) {
    using Idx = std::decay_t<decltype(p.B)>;
    p.src = static_cast<const char*>(recv.const_data_ptr());
    p.dst[0] = static_cast<char*>(q.mutable_data_ptr());
    p.dst[1] = static_cast<char*>(k.mutable_data_ptr());
    p.dst[2] = static_cast<char*>(v.mutable_data_ptr());
    p.start = start_dev.const_data_ptr<int64_t>();
    p.P = static_cast<int>(P);
    p.B = static_cast<Idx>(B);
    p.Sg = static_cast<Idx>(Sg);
    p.rq = static_cast<Idx>(rq);
    p.rk = static_cast<Idx>(rk);
    p.qU = static_cast<Idx>(qU);
    p.kU = static_cast<Idx>(kU);
    p.total = static_cast<Idx>(total);
  };
  if (fits_u32(total)) {
    UnpackSeqParams<uint32_t> p;
    fill(p);
    launch_unpack_seq(W, p, total);
  } else {
    UnpackSeqParams<int64_t> p;
    fill(p);
    launch_unpack_seq(W, p, total);
  }
  return {q, k, v};
}

// ---------------------------------------------------------------------------------------------------------
// a2a_pack_head_to_seq: out [B, Sg, h, D] (strided) -> buffer [destination s][B, S_s, h, D].

template <typename Idx>
struct PackHeadParams {
  SrcView src;
  char* dst;
  const int64_t* start;
  int P;
  Idx B, Sg, h, upd;
  Idx total;  // B * Sg * h * upd
};

template <int W, typename Idx>
__global__ void __launch_bounds__(kThreads) pack_head_to_seq_kernel(const PackHeadParams<Idx> p) {
  const Idx stride = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx idx = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; idx < p.total; idx += stride) {
    // Walks the source in (b, j, i, u) order; consecutive positions of one chunk land in consecutive rows
    // of the destination too, so both sides stay coalesced.
    Idx rest = idx / p.upd;
    const Idx u = idx - rest * p.upd;
    const Idx i = rest % p.h;
    rest /= p.h;
    const Idx j = rest % p.Sg;
    const Idx b = rest / p.Sg;
    const int s = owner_of(p.start, p.P, static_cast<int64_t>(j));
    const int64_t s0 = __ldg(p.start + s), Ss = __ldg(p.start + s + 1) - s0;
    // Destination s's block starts after the blocks of ranks < s: B * s0 rows of h heads.
    const int64_t drow = static_cast<int64_t>(p.B) * s0 + static_cast<int64_t>(b) * Ss + (static_cast<int64_t>(j) - s0);
    const int64_t dunit = (drow * p.h + i) * static_cast<int64_t>(p.upd) + u;
    const char* src = p.src.ptr + static_cast<int64_t>(b) * p.src.sb + static_cast<int64_t>(j) * p.src.ss +
                      static_cast<int64_t>(i) * p.src.sh + static_cast<int64_t>(u) * W;
    copy_unit<W>(p.dst + dunit * W, src);
  }
}

template <typename Idx>
void launch_pack_head(int64_t W, const PackHeadParams<Idx>& p, int64_t total) {
  const unsigned int grid = grid_for(total);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (W) {
    case 16: pack_head_to_seq_kernel<16, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: pack_head_to_seq_kernel<8, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: pack_head_to_seq_kernel<4, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    default: pack_head_to_seq_kernel<2, Idx><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor a2a_pack_head_to_seq_cuda(const at::Tensor& out, at::IntArrayRef seq_lens) {
  const char* op = "cp_attention.a2a_pack_head_to_seq";
  check_pack_head_to_seq(op, out, seq_lens);
  TORCH_CHECK_VALUE(out.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", out.device());
  TORCH_CHECK_VALUE(seq_lens.size() <= static_cast<size_t>(INT_MAX), op, ": seq_lens lists too many ranks (",
                    seq_lens.size(), ")");
  c10::cuda::CUDAGuard device_guard(out.device());
  const int64_t B = out.size(0), Sg = out.size(1), h = out.size(2), D = out.size(3);
  const int64_t P = static_cast<int64_t>(seq_lens.size());
  at::Tensor buf = at::empty({B * Sg * h * D}, out.options().memory_format(at::MemoryFormat::Contiguous));
  if (buf.numel() == 0) return buf;

  const int64_t e = out.element_size();
  std::vector<int64_t> quantities = {D * e, addr(out), addr(buf)};
  push_strides(quantities, out);
  const int64_t W = unit_bytes(quantities);
  const int64_t upd = D * e / W, total = B * Sg * h * upd;
  const at::Tensor start_dev = starts_on_device(seq_starts(seq_lens), out.device());

  auto fill = [&](auto& p) {
    using Idx = std::decay_t<decltype(p.B)>;
    p.src = src_view(out);
    p.dst = static_cast<char*>(buf.mutable_data_ptr());
    p.start = start_dev.const_data_ptr<int64_t>();
    p.P = static_cast<int>(P);
    p.B = static_cast<Idx>(B);
    p.Sg = static_cast<Idx>(Sg);
    p.h = static_cast<Idx>(h);
    p.upd = static_cast<Idx>(upd);
    p.total = static_cast<Idx>(total);
  };
  if (fits_u32(total)) {
    PackHeadParams<uint32_t> p;
    fill(p);
    launch_pack_head(W, p, total);
  } else {
    PackHeadParams<int64_t> p;
    fill(p);
    launch_pack_head(W, p, total);
  }
  return buf;
}

// ---------------------------------------------------------------------------------------------------------
// a2a_unpack_head_to_seq: buffer [source r][B, S, h, D] -> out [B, S, P * h, D].

template <typename Idx>
struct UnpackHeadParams {
  const char* src;
  char* dst;
  Idx P, S, rl;  // ranks; positions; units of one source's heads at one position (h * D)
  Idx srcU;      // units of one source's block (B * S * rl)
  Idx total;     // P * srcU
};

template <int W, typename Idx>
__global__ void __launch_bounds__(kThreads) unpack_head_to_seq_kernel(const UnpackHeadParams<Idx> p) {
  const Idx stride = static_cast<Idx>(gridDim.x) * kThreads;
  for (Idx idx = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; idx < p.total; idx += stride) {
    // Output row (b, i, r): source r's heads of position i sit next to each other, so walking the output in
    // memory order reads runs of h * D elements from each source.
    const Idx row = idx / p.rl;
    const Idx x = idx - row * p.rl;
    const Idx r = row % p.P;
    const Idx bi = row / p.P;  // b * S + i
    const int64_t unit = static_cast<int64_t>(r) * p.srcU + static_cast<int64_t>(bi) * p.rl + x;
    copy_unit<W>(p.dst + static_cast<int64_t>(idx) * W, p.src + unit * W);
  }
}

template <typename Idx>
void launch_unpack_head(int64_t W, const UnpackHeadParams<Idx>& p, int64_t total) {
  const unsigned int grid = grid_for(total);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (W) {
    case 16: unpack_head_to_seq_kernel<16, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: unpack_head_to_seq_kernel<8, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: unpack_head_to_seq_kernel<4, Idx><<<grid, kThreads, 0, stream>>>(p); break;
    default: unpack_head_to_seq_kernel<2, Idx><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor a2a_unpack_head_to_seq_cuda(const at::Tensor& recv, at::IntArrayRef heads, int64_t batch,
                                       int64_t seq_len, int64_t head_dim) {
  const char* op = "cp_attention.a2a_unpack_head_to_seq";
  check_unpack_head_to_seq_sizes(op, heads, batch, seq_len, head_dim);
  // The kernel below reads equal blocks; uneven splits are unpacked with torch ops by the caller.
  for (int64_t n : heads)
    TORCH_CHECK_VALUE(n == heads[0], op, ": the CUDA kernel takes the same head count from every source, got ",
                      heads, " (cp_attention.ops.a2a_head_to_seq unpacks uneven splits with torch ops)");
  const int64_t P = static_cast<int64_t>(heads.size()), B = batch, S = seq_len, h = heads[0], D = head_dim;
  check_recv(op, recv, P * B * S * h * D);
  TORCH_CHECK_VALUE(recv.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", recv.device());
  c10::cuda::CUDAGuard device_guard(recv.device());
  at::Tensor out = at::empty({B, S, P * h, D}, recv.options());
  if (out.numel() == 0) return out;

  const int64_t e = recv.element_size();
  const int64_t W = unit_bytes({h * D * e, addr(recv), addr(out)});
  const int64_t rl = h * D * e / W, srcU = B * S * rl, total = P * srcU;

  auto fill = [&](auto& p) {
    using Idx = std::decay_t<decltype(p.P)>;
    p.src = static_cast<const char*>(recv.const_data_ptr());
    p.dst = static_cast<char*>(out.mutable_data_ptr());
    p.P = static_cast<Idx>(P);
    p.S = static_cast<Idx>(S);
    p.rl = static_cast<Idx>(rl);
    p.srcU = static_cast<Idx>(srcU);
    p.total = static_cast<Idx>(total);
  };
  if (fits_u32(total)) {
    UnpackHeadParams<uint32_t> p;
    fill(p);
    launch_unpack_head(W, p, total);
  } else {
    UnpackHeadParams<int64_t> p;
    fill(p);
    launch_unpack_head(W, p, total);
  }
  return out;
}

}  // namespace
}  // namespace cp_attention

TORCH_LIBRARY_IMPL(cp_attention, CUDA, m) {
  m.impl("a2a_pack_seq_to_head", &cp_attention::a2a_pack_seq_to_head_cuda);
  m.impl("a2a_unpack_seq_to_head", &cp_attention::a2a_unpack_seq_to_head_cuda);
  m.impl("a2a_pack_head_to_seq", &cp_attention::a2a_pack_head_to_seq_cuda);
  m.impl("a2a_unpack_head_to_seq", &cp_attention::a2a_unpack_head_to_seq_cuda);
}
