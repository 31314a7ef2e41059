// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) with AVX2, FMA and F16C, the brgemm forward on float32 products included. cpu/dispatch.cpp runs this copy only on a CPU that has it.
#include "cpu/isa_prelude.h"

#if CP_ATTENTION_ISA_COPIES
#define CPA_ISA avx512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define CPA_VEC_FLOATS 16
#define CPA_WITH_BRGEMM
// GCC's target pragma does not define the ISA's feature macros, which Sleef's header (under at::vec)
// reads to declare its vector functions: define them for this copy.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "cpu/kernels/all.h"
#pragma GCC pop_options
#else
namespace cp_attention::cpu::avx512 {
const KernelTable* table() { return nullptr; }
}  // namespace cp_attention::cpu::avx512
#endif
