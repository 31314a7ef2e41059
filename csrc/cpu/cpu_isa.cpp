// check_cpu_isa (cpu_isa.h). This file gets the build's vector ISA flags like every CPU source, so the
// functions that run before the check has passed are compiled with target("no-avx") (which also drops
// AVX2, FMA, F16C and AVX-512), keep out of inlining, and format their message with snprintf rather than
// with inline templates that another translation unit may have compiled for the wider ISA.
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdio>

namespace cp_attention::cpu {
namespace {

bool g_pretend_lacking = false;  // read and written with __atomic builtins (no inline template calls)

#if defined(__x86_64__) || defined(__i386__)
#define CP_ATTENTION_BASELINE __attribute__((target("no-avx"), noinline))
#else
#define CP_ATTENTION_BASELINE __attribute__((noinline))
#endif

// The features the build requires, in the order they are checked, and the build's name for its ISA.
#if defined(CPU_CAPABILITY_AVX512) && (defined(__x86_64__) || defined(__i386__))
constexpr const char* kIsa = "avx512";
constexpr const char* kInstead = "avx2 or generic";
#define CP_ATTENTION_FEATURES X("avx512f") X("avx512bw") X("avx512vl") X("avx512dq") X("fma") X("f16c")
#elif defined(CPU_CAPABILITY_AVX2) && (defined(__x86_64__) || defined(__i386__))
constexpr const char* kIsa = "avx2";
constexpr const char* kInstead = "generic";
#define CP_ATTENTION_FEATURES X("avx2") X("fma") X("f16c")
#else
constexpr const char* kIsa = "generic";  // plain C++: nothing to check
constexpr const char* kInstead = "generic";
#endif

// The first required feature this CPU lacks, or nullptr.
CP_ATTENTION_BASELINE const char* missing_feature() {
#ifdef CP_ATTENTION_FEATURES
  const bool pretend = __atomic_load_n(&g_pretend_lacking, __ATOMIC_RELAXED);
#define X(name) \
  if (pretend || !__builtin_cpu_supports(name)) return name;
  CP_ATTENTION_FEATURES
#undef X
#endif
  return nullptr;
}

}  // namespace

CP_ATTENTION_BASELINE void check_cpu_isa(const char* op) {
  const char* missing = missing_feature();
  if (missing == nullptr) return;
  char msg[384];
  std::snprintf(msg, sizeof(msg),
                "%s: the CPU kernels of this build use the %s instruction set (CP_ATTENTION_CPU_ISA=%s), but "
                "this CPU lacks %s; rebuild with CP_ATTENTION_CPU_ISA=%s",
                op, kIsa, kIsa, missing, kInstead);
  c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__), msg);
}

void pretend_cpu_lacks_isa(bool on) { __atomic_store_n(&g_pretend_lacking, on, __ATOMIC_RELAXED); }

}  // namespace cp_attention::cpu
