// The CPU kernels compiled for the baseline x86-64 / any CPU (plain C++ at::vec). cpu/dispatch.cpp runs this copy only on a CPU that has it.
#include "cpu/isa_prelude.h"

#define CPA_ISA generic
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define CPA_VEC_FLOATS 8
#include "cpu/kernels/all.h"
