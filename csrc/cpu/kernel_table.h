// The CPU kernels are compiled once per vector ISA (cpu/isa_*.cpp), each copy in its own namespace, and
// cpu/dispatch.cpp picks one copy at run time from the CPU's features: one build runs at full width on
// every x86-64 CPU and never executes an instruction the CPU lacks. A KernelTable is one ISA's copy.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace cp_attention::cpu {

// The forward into out/lse, which the caller has checked and allocated (out: q's dtype, or float32 when
// accumulating; lse float32 [B, H, Sq]); `accumulate` merges into them instead (the fused ring step).
using FwdFn = void (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse, double scale, bool causal, const std::optional<at::Tensor>& kv_mask,
                       bool accumulate);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> scale, bool causal, const std::optional<at::Tensor>& kv_mask,
    const std::optional<at::Tensor>& dlse);
using MergeFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                      const at::Tensor& out_b, const at::Tensor& lse_b);
using MergeInplaceFn = void (*)(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_b,
                                const at::Tensor& lse_b);

struct KernelTable {
  const char* isa;                          // "generic", "avx2", "avx512" or "amx"
  FwdFn fwd_panels;                         // queries on the vector axis (kernels/flash_attn_fwd.h)
  FwdFn fwd_brgemm;                         // oneDNN brgemm (kernels/flash_fwd_brgemm.h); not in generic
  bool (*brgemm_tiles)(at::ScalarType);     // whether fwd_brgemm runs this dtype on AMX tiles here
  BwdFn bwd;
  MergeFn merge;
  MergeInplaceFn merge_inplace;
};

// Each ISA's copy; nullptr where this compiler could not build it (cpu/isa_prelude.h).
namespace generic { const KernelTable* table(); }
namespace avx2 { const KernelTable* table(); }
namespace avx512 { const KernelTable* table(); }
namespace amx { const KernelTable* table(); }

}  // namespace cp_attention::cpu
