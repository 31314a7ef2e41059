// The run-time CPU check of every CPU op. The CPU sources are compiled for one vector ISA
// (CP_ATTENTION_CPU_ISA, setup.py: AVX2 with FMA and F16C by default), so on a CPU without it any of them
// could stop the process with an illegal instruction. Each CPU op calls check_cpu_isa first, which raises
// a RuntimeError naming the op, the ISA of the build and the missing feature instead.
#pragma once

namespace cp_attention::cpu {

// Raises unless this CPU has every instruction set extension the CPU kernels were compiled for. Defined in
// cpu_isa.cpp, compiled for the baseline ISA so that the check itself runs anywhere.
void check_cpu_isa(const char* op);

// Tests only: while set, check_cpu_isa behaves as on a CPU that lacks the build's first required feature
// (a build for the generic ISA requires none, so nothing changes there).
void pretend_cpu_lacks_isa(bool on);

}  // namespace cp_attention::cpu
