// Run-time choice of the CPU kernels' ISA copy (cpu/dispatch.h) and the CPU registrations of the ops those
// copies implement. Compiled for the baseline ISA, like every file outside cpu/isa_*.cpp.
#include "cpu/dispatch.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "checks.h"

namespace cp_attention::cpu {
namespace {

struct Copy {
  const char* name;
  const KernelTable* (*table)();
  bool (*cpu_has)();
};

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
// AMX: the BF16 instructions our softmax uses, and tiles that oneDNN reports usable (it also asks the
// kernel for permission to use the tile state).
bool has_amx() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-tile") &&
         __builtin_cpu_supports("amx-bf16") && at::native::cpublas::could_pack(at::kBFloat16);
}
bool always() { return true; }

// Narrowest first.
const Copy kCopies[] = {
    {"generic", &generic::table, &always},
#if defined(__x86_64__)
    {"avx2", &avx2::table, &has_avx2},
    {"avx512", &avx512::table, &has_avx512},
    {"amx", &amx::table, &has_amx},
#endif
};
constexpr int kNumCopies = sizeof(kCopies) / sizeof(kCopies[0]);

std::atomic<int> g_limit{kNumCopies - 1};  // index of the widest copy kernels() may return

int widest_supported() {
  static const int widest = [] {
    int best = 0;
    for (int i = 0; i < kNumCopies; ++i)
      if (kCopies[i].table() != nullptr && kCopies[i].cpu_has()) best = i;
    return best;
  }();
  return widest;
}

// Which forward "default" runs where the brgemm kernel can: it outran the panel kernel and torch's CPU
// flash attention side by side in benchmarks/bench_flash_fwd.py (benchmarks/results/flash_fwd-intel-*.json):
// bfloat16 on AMX tiles on an AMX Xeon; float32, and 16-bit inputs on float32 products, there and with that
// Xeon held to AVX-512 and to AVX2. float16 on AMX-FP16 tiles has run on no machine yet: opt-in.
bool brgemm_by_default(const KernelTable& t, at::ScalarType dtype) {
  return !(dtype == at::kHalf && t.brgemm_tiles(dtype));
}

FwdFn pick_fwd(const char* op, c10::string_view variant, at::ScalarType dtype) {
  const KernelTable& t = kernels();
  if (variant == "default") {
    if (t.fwd_brgemm != nullptr && brgemm_by_default(t, dtype)) return t.fwd_brgemm;
    return t.fwd_panels;
  }
  if (variant == "panels") return t.fwd_panels;
  if (variant == "brgemm") {
    TORCH_CHECK_VALUE(t.fwd_brgemm != nullptr, op,
                      ": variant 'brgemm' needs a CPU with AVX2 (avx2, fma, f16c); this CPU runs the '", t.isa,
                      "' kernels");
    return t.fwd_brgemm;
  }
  TORCH_CHECK_VALUE(false, op, ": variant must be 'default', 'panels' or 'brgemm' on the CPU, got '", variant,
                    "'");
}

double resolve_scale(std::optional<double> scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, std::optional<double> scale,
                                                      bool causal, const std::optional<at::Tensor>& kv_mask,
                                                      c10::string_view variant) {
  constexpr const char* op = "cp_attention.flash_attn_fwd";
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask);
  const FwdFn fwd = pick_fwd(op, variant, q.scalar_type());
  at::Tensor out = at::empty({d.B, d.Sq, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Sq}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) fwd(q, k, v, out, lse, resolve_scale(scale, d.D), causal, kv_mask, false);
  return {out, lse};
}

// out and lse are written through const references: the convention for mutated arguments (Tensor(a!)) that
// every backend's kernel of this op must share.
void flash_attn_fwd_acc_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse, std::optional<double> scale, bool causal,
                            const std::optional<at::Tensor>& kv_mask, c10::string_view variant) {
  constexpr const char* op = "cp_attention.flash_attn_fwd_acc_";
  const AttnDims d = check_attn_inputs(op, q, k, v, kv_mask);
  check_acc_state(op, d, q, k, v, kv_mask, out, lse);
  const FwdFn fwd = pick_fwd(op, variant, q.scalar_type());
  if (out.numel() > 0) fwd(q, k, v, out, lse, resolve_scale(scale, d.D), causal, kv_mask, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> scale, bool causal, const std::optional<at::Tensor>& kv_mask,
    const std::optional<at::Tensor>& dlse) {
  return kernels().bwd(dout, q, k, v, out, lse, scale, causal, kv_mask, dlse);
}

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  return kernels().merge(out_a, lse_a, out_b, lse_b);
}

void merge_attn_states_inplace_cpu(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_b,
                                   const at::Tensor& lse_b) {
  kernels().merge_inplace(out, lse, out_b, lse_b);
}

}  // namespace

const KernelTable& kernels() {
  // Each copy's ISA contains the narrower ones', so every built copy up to the widest supported runs here:
  // no CPU feature is asked again (this runs on every op call).
  for (int j = std::min(widest_supported(), g_limit.load(std::memory_order_relaxed)); j > 0; --j)
    if (kCopies[j].table() != nullptr) return *kCopies[j].table();
  return *kCopies[0].table();
}

std::vector<std::string> built_isas() {
  std::vector<std::string> names;
  for (const Copy& c : kCopies)
    if (c.table() != nullptr) names.emplace_back(c.name);
  return names;
}

void limit_isa(const std::string& isa) {
  if (isa.empty()) {
    g_limit.store(kNumCopies - 1);
    return;
  }
  for (int i = 0; i < kNumCopies; ++i) {
    if (isa == kCopies[i].name && kCopies[i].table() != nullptr) {
      g_limit.store(i);
      return;
    }
  }
  std::string names;
  for (const std::string& n : built_isas()) names += (names.empty() ? "'" : ", '") + n + "'";
  TORCH_CHECK_VALUE(false, "limit_isa: isa must be '' or one of this build's copies (", names, "), got '", isa,
                    "'");
}

}  // namespace cp_attention::cpu

TORCH_LIBRARY_IMPL(cp_attention, CPU, m) {
  m.impl("flash_attn_fwd", &cp_attention::cpu::flash_attn_fwd_cpu);
  m.impl("flash_attn_fwd_acc_", &cp_attention::cpu::flash_attn_fwd_acc_cpu);
  m.impl("flash_attn_bwd", &cp_attention::cpu::flash_attn_bwd_cpu);
  m.impl("merge_attn_states", &cp_attention::cpu::merge_attn_states_cpu);
  m.impl("merge_attn_states_", &cp_attention::cpu::merge_attn_states_inplace_cpu);
}
