// The body of every cpu/isa_*.cpp, after it has defined CPA_ISA (the namespace of its copy), CPU_CAPABILITY
// (at::vec's), CPA_VEC_FLOATS (the float32 lanes of that vector) and, for its ISA, a `#pragma GCC target`;
// CPA_WITH_BRGEMM adds the brgemm forward (float32 products, AVX2 and up) and CPA_WITH_AMX its 16-bit
// products on AMX tiles and the AMX backward.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

static_assert(at::vec::Vectorized<float>::size() == CPA_VEC_FLOATS,
              "at::vec was included before the ISA copy set CPU_CAPABILITY: see cpu/isa_prelude.h");

#include "cpu/kernels/flash_attn_bwd.h"
#include "cpu/kernels/flash_attn_fwd.h"
#include "cpu/kernels/merge_attn_states.h"
#ifdef CPA_WITH_AMX
#include "cpu/kernels/flash_bwd_brgemm.h"
#endif
#ifdef CPA_WITH_BRGEMM
#include "cpu/kernels/flash_fwd_brgemm.h"
#endif

namespace cp_attention::cpu::CPA_ISA {

const KernelTable* table() {
#define CPA_STR2(x) #x
#define CPA_STR(x) CPA_STR2(x)
  static const KernelTable t{CPA_STR(CPA_ISA),
                             &flash_fwd_panels,
#ifdef CPA_WITH_BRGEMM
                             &flash_fwd_brgemm,
                             &brgemm_tiles,
#else
                             nullptr,
                             nullptr,
#endif
                             &flash_attn_bwd_cpu,
                             &merge_attn_states_cpu,
                             &merge_attn_states_inplace_cpu};
#undef CPA_STR
#undef CPA_STR2
  return &t;
}

}  // namespace cp_attention::cpu::CPA_ISA
