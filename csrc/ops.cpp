// Every op schema of the cp_attention library. Kernel files register their own CPU/CUDA implementations.
// Layouts and the LSE convention: out [B, S, H, D] (BSHD), lse [B, H, S] float32, natural log of the sum of
// exp(scale * q.k) over the visible keys; a row that sees no key has out 0 and lse -inf.
#include <torch/library.h>

TORCH_LIBRARY(cp_attention, m) {
  // Flash-attention forward over one K/V set: returns (out [B,Sq,H,D] in q's dtype, lse [B,H,Sq] float32).
  // variant: which kernel runs. "default" is the one a GPU run has shown right (the mma.sync kernel on CUDA;
  // the CPU has only one); the CUDA op also takes "mma", "sm90", "sm90_tma", "sm90_tma_no_pingpong" and
  // "auto" (csrc/cuda/flash_attn_fwd.cu). cp_attention/kernel_variants.py records which have been proven.
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float? scale=None, bool causal=False, "
      "Tensor? kv_mask=None, str variant=\"default\") -> (Tensor out, Tensor lse)");
  // Gradients of flash_attn_fwd's (out, lse) w.r.t. q, k, v (dk, dv summed over each kv head's query heads); CPU.
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float? scale=None, "
      "bool causal=False, Tensor? kv_mask=None, Tensor? dlse=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Attends q to this K/V chunk and merges the result into the running (out, lse) in the kernel's epilogue:
  // the fused ring step. out [B,Sq,H,D] in q's dtype or float32, lse [B,H,Sq] float32. variant: as above.
  m.def(
      "flash_attn_fwd_acc_(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, float? scale=None, "
      "bool causal=False, Tensor? kv_mask=None, str variant=\"default\") -> ()");
  // Merges two partial attention states over disjoint key sets into a new (out, lse); float32 math.
  m.def("merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
  // Merges (out_b, lse_b) into the running state (out, lse) in place: the ring-step accumulate.
  m.def("merge_attn_states_(Tensor(a!) out, Tensor(b!) lse, Tensor out_b, Tensor lse_b) -> ()");
  // Ulysses send buffer (1-D): per destination rank, its heads of q, then k, then v, each [B, S, h(k), D].
  m.def("a2a_pack_seq_to_head(Tensor q, Tensor k, Tensor v, int world_size) -> Tensor");
  // Ulysses receive buffer (source s: sequence chunk s, seq_lens[s] long) -> q, k, v [B, sum(seq_lens), h(k), D].
  m.def("a2a_unpack_seq_to_head(Tensor recv, int[] seq_lens, int batch, int heads, int kv_heads, int head_dim) -> (Tensor q, Tensor k, Tensor v)");
  // Output send buffer (1-D): out [B, sum(seq_lens), h, D] cut into sequence chunks, chunk s for rank s.
  m.def("a2a_pack_head_to_seq(Tensor out, int[] seq_lens) -> Tensor");
  // Output receive buffer (source r: heads[r] heads, after those of sources < r) -> out [B, seq_len, sum(heads), D].
  m.def("a2a_unpack_head_to_seq(Tensor recv, int[] heads, int batch, int seq_len, int head_dim) -> Tensor");
}
