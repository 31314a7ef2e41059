// The Ulysses pack/unpack ops' argument checks and head split, shared by the CPU and CUDA kernels so that
// both accept the same inputs, reject bad ones with the same messages and agree on the buffer layouts
// (described in cpu/a2a_pack.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace cp_attention {

// The even split the CUDA pack kernel implements: every rank the same number of query and of kv heads.
struct HeadSplit {
  int64_t h, hk;           // query / kv heads per rank
  int64_t kv_group;        // ranks sharing one kv head (1 when P divides Hkv)
  int64_t kv_start(int64_t r) const { return kv_group == 1 ? r * hk : r / kv_group; }
};

// h = H / P; hk = Hkv / P when P divides Hkv, else (Hkv dividing P) one kv head per rank, r / (P / Hkv).
// Where it holds, rank_heads below gives the same heads to every rank, so both kernels fill one layout.
inline HeadSplit head_split(const char* op, int64_t H, int64_t Hkv, int64_t P) {
  TORCH_CHECK_VALUE(P >= 1, op, ": world_size must be >= 1, got ", P);
  TORCH_CHECK_VALUE(H % P == 0, op, ": the CUDA kernel splits heads evenly: the number of query heads H=", H,
                    " must be divisible by world_size=", P,
                    " (cp_attention.ops.a2a_seq_to_head packs uneven splits with torch ops)");
  if (Hkv % P == 0) return {H / P, Hkv / P, 1};
  TORCH_CHECK_VALUE(P % Hkv == 0, op, ": the CUDA kernel splits heads evenly: the number of k/v heads Hkv=",
                    Hkv, " must be a multiple or a divisor of world_size=", P,
                    " (cp_attention.ops.a2a_seq_to_head packs other splits with torch ops)");
  return {H / P, 1, P / Hkv};
}

// Rank r's heads in the general split: query heads [q0, q0 + nq) in torch.tensor_split order (the first
// H % P ranks one more), and kv heads [kv0, kv0 + nkv), exactly the ones those query heads read (query head
// g reads kv head g / (H / Hkv)). A kv head read by several ranks goes to each of them.
struct RankHeads {
  int64_t q0, nq, kv0, nkv;
};

inline std::vector<RankHeads> rank_heads(const char* op, int64_t H, int64_t Hkv, int64_t P) {
  TORCH_CHECK_VALUE(P >= 1, op, ": world_size must be >= 1, got ", P);
  // A rank without a query head would have nothing to attend for; refused rather than special-cased.
  TORCH_CHECK_VALUE(P <= H, op, ": world_size=", P, " exceeds the number of query heads H=", H,
                    ": every rank needs at least one query head");
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, op, ": the number of query heads H=", H,
                    " must be a multiple of the number of k/v heads Hkv=", Hkv);
  const int64_t base = H / P, extra = H % P, group = H / Hkv;
  std::vector<RankHeads> out(P);
  for (int64_t r = 0; r < P; ++r) {
    const int64_t q0 = r * base + std::min(r, extra), nq = base + (r < extra ? 1 : 0);
    const int64_t kv0 = q0 / group, kv_end = (q0 + nq - 1) / group + 1;
    out[r] = {q0, nq, kv0, kv_end - kv0};
  }
  return out;
}

inline void check_seq_lens(const char* op, at::IntArrayRef seq_lens) {
  TORCH_CHECK_VALUE(!seq_lens.empty(), op, ": seq_lens must list one length per rank, got an empty list");
  for (int64_t s : seq_lens)
    TORCH_CHECK_VALUE(s >= 0, op, ": seq_lens must be >= 0, got ", seq_lens);
}

// Start of every rank's chunk in the global sequence: P + 1 entries, the last one the total length.
inline std::vector<int64_t> seq_starts(at::IntArrayRef seq_lens) {
  std::vector<int64_t> start(seq_lens.size() + 1, 0);
  for (size_t s = 0; s < seq_lens.size(); ++s) start[s + 1] = start[s] + seq_lens[s];
  return start;
}

inline void check_recv(const char* op, const at::Tensor& recv, int64_t expected) {
  TORCH_CHECK_VALUE(is_attn_dtype(recv.scalar_type()), op, ": recv must be float32, float16 or bfloat16, got ",
                    recv.scalar_type());
  TORCH_CHECK_VALUE(recv.is_contiguous(), op, ": recv must be contiguous (it is read in memory order)");
  TORCH_CHECK_VALUE(recv.numel() == expected, op, ": recv must hold ", expected,
                    " elements for the given sizes, got ", recv.numel(), " (shape ", recv.sizes(), ")");
}

// a2a_pack_seq_to_head: q, k, v are this rank's shards of one sequence.
inline AttnDims check_pack_seq_to_head(const char* op, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v) {
  const AttnDims d = check_attn_inputs(op, q, k, v, std::nullopt);
  TORCH_CHECK_VALUE(d.Sq == d.Sk, op, ": q, k and v must be shards of one sequence (same length), got q ",
                    q.sizes(), ", k ", k.sizes());
  return d;
}

inline void check_unpack_seq_to_head_sizes(const char* op, int64_t batch, int64_t heads, int64_t kv_heads,
                                           int64_t head_dim) {
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 1 && kv_heads >= 1 && head_dim >= 1, op,
                    ": batch must be >= 0 and heads, kv_heads, head_dim >= 1, got batch=", batch, ", heads=",
                    heads, ", kv_heads=", kv_heads, ", head_dim=", head_dim);
}

// a2a_pack_head_to_seq: out [B, sum(seq_lens), h, D], any strides with the last dimension contiguous.
inline void check_pack_head_to_seq(const char* op, const at::Tensor& out, at::IntArrayRef seq_lens) {
  check_seq_lens(op, seq_lens);
  TORCH_CHECK_VALUE(out.dim() == 4, op, ": out must be a 4-D tensor [B, S, h, D], got shape ", out.sizes());
  TORCH_CHECK_VALUE(is_attn_dtype(out.scalar_type()), op, ": out must be float32, float16 or bfloat16, got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.stride(3) == 1 || out.size(3) == 1, op,
                    ": out's last dimension must be contiguous (stride 1), got strides ", out.strides());
  int64_t total = 0;
  for (int64_t s : seq_lens) total += s;
  TORCH_CHECK_VALUE(total == out.size(1), op, ": seq_lens must sum to out's sequence length ", out.size(1),
                    ", got ", seq_lens);
}

// a2a_unpack_head_to_seq: heads lists every source rank's head count. Returns their sum.
inline int64_t check_unpack_head_to_seq_sizes(const char* op, at::IntArrayRef heads, int64_t batch,
                                              int64_t seq_len, int64_t head_dim) {
  TORCH_CHECK_VALUE(!heads.empty(), op, ": heads must list one head count per source rank, got an empty list");
  int64_t total = 0;
  for (int64_t h : heads) {
    TORCH_CHECK_VALUE(h >= 1, op, ": heads must be >= 1 (one count per source rank), got ", heads);
    total += h;
  }
  TORCH_CHECK_VALUE(batch >= 0 && seq_len >= 0 && head_dim >= 1, op,
                    ": batch and seq_len must be >= 0 and head_dim >= 1, got batch=", batch,
                    ", seq_len=", seq_len, ", head_dim=", head_dim);
  return total;
}

}  // namespace cp_attention
