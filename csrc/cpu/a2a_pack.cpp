// CPU pack/unpack kernels around the two Ulysses all-to-alls (docs/design.md, "Sequence sharding" and
// "Ulysses"). Each op moves every element exactly once, straight between the BSHD tensors and the flat
// all_to_all_single buffer, instead of permute + contiguous + split + cat (several full copies).
//
// Buffer layouts (all contiguous, in the tensors' dtype):
// - seq -> head send buffer: for destination r = 0..P-1 in order, q's heads of r as [B, S_local, nq_r, D],
//   then k's kv heads of r as [B, S_local, nkv_r, D], then v's likewise. Destination r's block holds
//   B * S_local * (nq_r + 2 nkv_r) * D elements; the blocks differ in size when the heads split unevenly.
// - seq -> head receive buffer: the same blocks from source s = 0..P-1, each over s's S_s positions.
// - head -> seq send buffer: for destination s, positions [start_s, start_s + S_s) of out as [B, S_s, h, D].
// - head -> seq receive buffer: from source r, this rank's positions of r's heads as [B, S_local, h_r, D];
//   source r's heads follow those of the ranks before it.
// Head split (rank_heads in a2a_layout.h): rank r gets query heads [q0_r, q0_r + nq_r) in
// torch.tensor_split order (the first H % P ranks one more) and the kv heads [kv0_r, kv0_r + nkv_r) that
// those query heads read (query head g reads kv head g / (H / Hkv)); ranks whose query heads read one kv
// head each get a copy of it. P <= H; no padding heads are sent.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "a2a_layout.h"
#include "checks.h"

namespace cp_attention::cpu {
namespace {

// Copies n heads [h0, h0 + n) of row (b, s) of a BSHD tensor (last dim contiguous) to dst, densely.
inline void copy_heads(char* dst, const at::Tensor& t, const char* base, int64_t b, int64_t s, int64_t h0,
                       int64_t n, int64_t D, int64_t elem) {
  const char* src = base + (b * t.stride(0) + s * t.stride(1) + h0 * t.stride(2)) * elem;
  if (n == 1 || t.stride(2) == D) {
    std::memcpy(dst, src, n * D * elem);
    return;
  }
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * D * elem, src + i * t.stride(2) * elem, D * elem);
}

at::Tensor a2a_pack_seq_to_head_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    int64_t world_size) {
  const char* op = "cp_attention.a2a_pack_seq_to_head";
  const AttnDims d = check_pack_seq_to_head(op, q, k, v);
  const std::vector<RankHeads> split = rank_heads(op, d.H, d.Hkv, world_size);
  const int64_t B = d.B, S = d.Sq, D = d.D, P = world_size, elem = q.element_size();
  // Destination r's block starts at block_start[r] (elements); within it q, then k, then v.
  std::vector<int64_t> block_start(P + 1, 0);
  int64_t widest = 1;
  for (int64_t r = 0; r < P; ++r) {
    block_start[r + 1] = block_start[r] + B * S * (split[r].nq + 2 * split[r].nkv) * D;
    widest = std::max(widest, split[r].nq);
  }
  at::Tensor buf = at::empty({block_start[P]}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (buf.numel() == 0) return buf;
  char* dst = static_cast<char*>(buf.mutable_data_ptr());
  const at::Tensor* src[3] = {&q, &k, &v};
  const char* base[3] = {static_cast<const char*>(q.const_data_ptr()),
                         static_cast<const char*>(k.const_data_ptr()),
                         static_cast<const char*>(v.const_data_ptr())};
  // One row = one (destination, tensor, b, s): a dense run of n * D elements on the buffer side.
  const int64_t rows = P * 3 * B * S;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / ((widest + 1) * D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row % S, b = (row / S) % B, t = (row / (S * B)) % 3, r = row / (S * B * 3);
      const RankHeads& rh = split[r];
      const int64_t n = t == 0 ? rh.nq : rh.nkv;
      const int64_t h0 = t == 0 ? rh.q0 : rh.kv0;
      const int64_t t_off = t == 0 ? 0 : B * S * (rh.nq + (t - 1) * rh.nkv) * D;
      char* out = dst + (block_start[r] + t_off + (b * S + s) * n * D) * elem;
      copy_heads(out, *src[t], base[t], b, s, h0, n, D, elem);
    }
  });
  return buf;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> a2a_unpack_seq_to_head_cpu(const at::Tensor& recv,
                                                                         at::IntArrayRef seq_lens,
                                                                         int64_t batch, int64_t heads,
                                                                         int64_t kv_heads, int64_t head_dim) {
  const char* op = "cp_attention.a2a_unpack_seq_to_head";
  check_seq_lens(op, seq_lens);
  check_unpack_seq_to_head_sizes(op, batch, heads, kv_heads, head_dim);
  const int64_t P = static_cast<int64_t>(seq_lens.size()), B = batch, D = head_dim;
  const int64_t width = heads + 2 * kv_heads;
  std::vector<int64_t> start(P + 1, 0), src_base(P + 1, 0);
  for (int64_t s = 0; s < P; ++s) {
    start[s + 1] = start[s] + seq_lens[s];
    src_base[s + 1] = src_base[s] + B * seq_lens[s] * width * D;
  }
  check_recv(op, recv, src_base[P]);
  const int64_t Sg = start[P], elem = recv.element_size();
  at::Tensor q = at::empty({B, Sg, heads, D}, recv.options());
  at::Tensor k = at::empty({B, Sg, kv_heads, D}, recv.options());
  at::Tensor v = at::empty({B, Sg, kv_heads, D}, recv.options());
  if (B * Sg == 0) return {q, k, v};
  std::vector<int64_t> owner(Sg);  // global position -> source rank
  for (int64_t s = 0; s < P; ++s)
    for (int64_t j = start[s]; j < start[s + 1]; ++j) owner[j] = s;
  const char* src = static_cast<const char*>(recv.const_data_ptr());
  char* dst[3] = {static_cast<char*>(q.mutable_data_ptr()), static_cast<char*>(k.mutable_data_ptr()),
                  static_cast<char*>(v.mutable_data_ptr())};
  const int64_t nheads[3] = {heads, kv_heads, kv_heads};
  const int64_t rows = 3 * B * Sg;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / ((heads + 1) * D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row % Sg, b = (row / Sg) % B, t = row / (Sg * B);
      const int64_t s = owner[j], Ss = seq_lens[s], i = j - start[s], n = nheads[t];
      const int64_t t_off = t == 0 ? 0 : B * Ss * (heads + (t - 1) * kv_heads) * D;
      std::memcpy(dst[t] + (b * Sg + j) * n * D * elem,
                  src + (src_base[s] + t_off + (b * Ss + i) * n * D) * elem, n * D * elem);
    }
  });
  return {q, k, v};
}

at::Tensor a2a_pack_head_to_seq_cpu(const at::Tensor& out, at::IntArrayRef seq_lens) {
  const char* op = "cp_attention.a2a_pack_head_to_seq";
  check_pack_head_to_seq(op, out, seq_lens);
  const int64_t B = out.size(0), Sg = out.size(1), h = out.size(2), D = out.size(3);
  const int64_t P = static_cast<int64_t>(seq_lens.size()), elem = out.element_size();
  const std::vector<int64_t> start = seq_starts(seq_lens);
  at::Tensor buf = at::empty({B * Sg * h * D}, out.options().memory_format(at::MemoryFormat::Contiguous));
  if (buf.numel() == 0) return buf;
  std::vector<int64_t> owner(Sg);
  for (int64_t s = 0; s < P; ++s)
    for (int64_t j = start[s]; j < start[s + 1]; ++j) owner[j] = s;
  const char* base = static_cast<const char*>(out.const_data_ptr());
  char* dst = static_cast<char*>(buf.mutable_data_ptr());
  at::parallel_for(0, B * Sg, std::max<int64_t>(1, 16384 / (h * D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row % Sg, b = row / Sg, s = owner[j];
      // Destination s's block starts after the blocks of ranks < s: B * start[s] rows of h * D.
      char* o = dst + ((B * start[s] + b * seq_lens[s] + (j - start[s])) * h * D) * elem;
      copy_heads(o, out, base, b, j, 0, h, D, elem);
    }
  });
  return buf;
}

at::Tensor a2a_unpack_head_to_seq_cpu(const at::Tensor& recv, at::IntArrayRef heads, int64_t batch,
                                      int64_t seq_len, int64_t head_dim) {
  const char* op = "cp_attention.a2a_unpack_head_to_seq";
  const int64_t H = check_unpack_head_to_seq_sizes(op, heads, batch, seq_len, head_dim);
  const int64_t P = static_cast<int64_t>(heads.size()), B = batch, S = seq_len, D = head_dim;
  check_recv(op, recv, B * S * H * D);
  // Source r's heads start at head_start[r] in out; its block at B * S * head_start[r] * D in recv.
  std::vector<int64_t> head_start(P + 1, 0);
  for (int64_t r = 0; r < P; ++r) head_start[r + 1] = head_start[r] + heads[r];
  const int64_t elem = recv.element_size();
  at::Tensor out = at::empty({B, S, H, D}, recv.options());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(recv.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, B * S * P, std::max<int64_t>(1, 16384 / (H / P * D + D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      // Row (b, i, r): source r's heads land at [head_start[r], head_start[r + 1]) of position i, after
      // those of source r - 1, so consecutive rows write consecutive memory.
      const int64_t r = row % P, bi = row / P, h = heads[r];
      std::memcpy(dst + (bi * H + head_start[r]) * D * elem,
                  src + (B * S * head_start[r] + bi * h) * D * elem, h * D * elem);
    }
  });
  return out;
}

}  // namespace
}  // namespace cp_attention::cpu

TORCH_LIBRARY_IMPL(cp_attention, CPU, m) {
  m.impl("a2a_pack_seq_to_head", &cp_attention::cpu::a2a_pack_seq_to_head_cpu);
  m.impl("a2a_unpack_seq_to_head", &cp_attention::cpu::a2a_unpack_seq_to_head_cpu);
  m.impl("a2a_pack_head_to_seq", &cp_attention::cpu::a2a_pack_head_to_seq_cpu);
  m.impl("a2a_unpack_head_to_seq", &cp_attention::cpu::a2a_unpack_head_to_seq_cpu);
}
