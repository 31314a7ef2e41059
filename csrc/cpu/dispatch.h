// Which copy of the CPU kernels runs (cpu/kernel_table.h): the widest one this CPU supports, chosen once.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernel_table.h"

namespace cp_attention::cpu {

// The copy for this CPU: "amx" (AVX-512 with BF16, and AMX tiles that oneDNN can use), else "avx512",
// "avx2", "generic"; never one whose instructions the CPU lacks.
const KernelTable& kernels();

// The ISA copies this build contains, narrowest first.
std::vector<std::string> built_isas();

// Tests and benchmarks only: while set to an ISA name, kernels() returns at most that copy, as on a CPU
// without the wider ISAs; "" lifts the limit. Raises for a name that is not a built copy.
void limit_isa(const std::string& isa);

}  // namespace cp_attention::cpu
