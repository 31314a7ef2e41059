// Included first by every cpu/isa_*.cpp: the library headers the kernels use, parsed before the ISA's
// `#pragma GCC target`, so that their inline functions compile for the baseline ISA in every copy (the
// linker keeps one copy of each, which must run on any CPU). Only at::vec, which names its namespace after
// CPU_CAPABILITY, and the kernels themselves (namespace cp_attention::cpu::<isa>) get the wider ISA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/kernel_table.h"

// Whether this compiler builds the AVX2 / AVX-512 / AMX copies: GCC's per-region target pragmas on x86-64.
// Elsewhere only the generic copy exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CP_ATTENTION_ISA_COPIES 1
#else
#define CP_ATTENTION_ISA_COPIES 0
#endif
