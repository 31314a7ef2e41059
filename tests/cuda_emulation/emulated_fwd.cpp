// The CUDA flash-attention kernels (tensor-core: csrc/cuda/flash_fwd_kernel.cuh; Hopper wgmma:
// flash_fwd_sm90_kernel.cuh; float32 SIMT: flash_fwd_f32_kernel.cuh), compiled for the CPU with
// lane_emulation.h and run CTA by CTA, one real thread per CUDA thread, on CPU tensors. The parameters
// come from the CUDA op's own host code (flash_fwd_params.h), the tiles from the kernels' own constants:
// only the launch differs.
#include <torch/extension.h>

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "lane_emulation.h"  // first: the kernel headers rely on its stand-ins

#include "checks.h"
#include "cuda/flash_fwd_f32_kernel.cuh"
#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_fwd_params.h"
#include "cuda/flash_fwd_sm90_kernel.cuh"
#include "cuda/flash_fwd_sm90_tma_kernel.cuh"
#include "cuda/flash_fwd_tma.h"

namespace cp_attention {
namespace flash {
// The kernel's `extern __shared__` buffer; CTAs run one at a time, so one buffer serves them all.
alignas(1024) unsigned char smem_raw[256 * 1024];

// The emulation's stand-in for the driver's encoder (flash_fwd_tma.h): the same geometry checks and box,
// the map in the form lane_emulation.h's TMA reads.
bool encode_bshd_map(CUtensorMap* map, bool& s_inner, const at::Tensor& t) {
  BshdGeometry g{};
  if (!bshd_geometry(t, g)) return false;
  lane_emulation::EmulatedTensorMap m{static_cast<const unsigned char*>(g.base), {}, {}, {}};
  static_assert(sizeof(m) <= sizeof(CUtensorMap), "the emulated map fits the opaque one");
  std::memcpy(m.dims, g.dims, sizeof(m.dims));
  std::memcpy(m.strides, g.strides, sizeof(m.strides));
  bshd_box(g, m.box);
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  s_inner = g.s_inner;
  return true;
}
}  // namespace flash
}  // namespace cp_attention

namespace {

using cp_attention::flash::FwdParams;
namespace emu = cp_attention::lane_emulation;

// Runs kernel(p) for every CTA of a grid of `grid` blocks of `threads` threads, one CTA at a time, over
// shared memory poisoned with 0xff bytes (NaN halves and floats), so reads of unwritten shared memory show.
// late_copies: cp.async lands at its wait instead of at once (lane_emulation.h).
inline thread_local bool late_copies_for_launch = false;
// Completed uses of each named barrier id (bar.sync / bar.arrive with an id) over the CTAs of the last call.
std::map<int, uint64_t> named_barrier_uses;

template <typename Kernel>
void run_grid(Kernel kernel, const FwdParams& p, int grid, int threads, size_t smem_bytes) {
  TORCH_CHECK(smem_bytes <= sizeof(cp_attention::flash::smem_raw), "emulated shared memory too small");
  for (int block = 0; block < grid; ++block) {
    std::memset(cp_attention::flash::smem_raw, 0xff, smem_bytes);
    emu::Cta cta(threads, cp_attention::flash::smem_raw, late_copies_for_launch);
    std::atomic<bool> stalled{false};
    std::mutex error_mu;
    std::string error;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&cta, &p, &kernel, &stalled, &error_mu, &error, t, block] {
        emu::tls_cta = &cta;
        emu::tls_thread_idx = uint3{static_cast<unsigned>(t), 0, 0};
        emu::tls_block_idx = uint3{static_cast<unsigned>(block), 0, 0};
        try {
          kernel(p);
          if (!emu::tls_wgmma_ops.empty()) throw std::runtime_error("a wgmma was issued but never waited for");
        } catch (const emu::Stalled&) {
          stalled = true;
        } catch (const std::exception& e) {
          // Recorded, not rethrown: the thread's warp and CTA barriers then stall the others, which leave.
          std::lock_guard<std::mutex> lock(error_mu);
          if (error.empty()) error = e.what();
          stalled = true;
        }
      });
    }
    for (auto& th : pool) th.join();
    for (const auto& [id, bar] : cta.named.bars) {
      named_barrier_uses[id] += bar.completed;
      // A use left incomplete at exit: arrivals nobody waited for, which a later use would have miscounted.
      if (bar.arrived != 0 && error.empty())
        error = "named barrier " + std::to_string(id) + " left with " + std::to_string(bar.arrived) + " arrivals";
    }
    TORCH_CHECK(error.empty(), "emulated kernel failed in CTA ", block, ": ", error);
    TORCH_CHECK(!stalled, "emulated kernel stalled in CTA ", block, ": ", emu::Stalled().what());
  }
}

template <typename T, int kD>
void run_tc(FwdParams p) {
  using Tiles = cp_attention::flash::TcTiles<kD>;
  using Cfg = typename Tiles::Cfg;
  p.n_mblocks = static_cast<int>((p.Sq + Tiles::kBlockM - 1) / Tiles::kBlockM);
  run_grid(cp_attention::flash::flash_fwd_tc_kernel<T, Cfg, Tiles::kMinBlocks>, p, p.B * p.H * p.n_mblocks,
           Cfg::kThreads, Cfg::kSmemBytes);
}

template <typename T, int kD>
void run_sm90(FwdParams p) {
  using Tl = cp_attention::flash::Sm90Tiles<kD>;
  p.n_mblocks = static_cast<int>((p.Sq + Tl::kBlockM - 1) / Tl::kBlockM);
  run_grid(cp_attention::flash::flash_fwd_sm90_kernel<T, kD>, p, p.B * p.H * p.n_mblocks, Tl::kThreads,
           Tl::kSmemBytes);
}

template <typename T, int kD>
void run_sm90_tma(FwdParams p, const cp_attention::flash::Sm90TmaMaps& maps) {
  using Tt = cp_attention::flash::Sm90TmaTiles<kD>;
  p.n_mblocks = static_cast<int>((p.Sq + Tt::Tl::kBlockM - 1) / Tt::Tl::kBlockM);
  auto kernel = [&maps](const FwdParams& q) { cp_attention::flash::flash_fwd_sm90_tma_kernel<T, kD>(q, maps); };
  run_grid(kernel, p, p.B * p.H * p.n_mblocks, Tt::kThreads, Tt::kSmemBytes);
}

void run_f32(FwdParams p) {
  namespace fl = cp_attention::flash;
  p.n_mblocks = static_cast<int>((p.Sq + fl::kF32BlockM - 1) / fl::kF32BlockM);
  run_grid(fl::flash_fwd_f32_kernel, p, p.B * p.H * p.n_mblocks, fl::kF32Threads, fl::f32_smem_bytes(p.D));
}

// maps: the TMA kernel's tensor maps, or nullptr for the cp.async one.
template <typename T>
void dispatch_sm90(const FwdParams& p, const cp_attention::flash::Sm90TmaMaps* maps) {
  const int kd = cp_attention::flash::sm90_head_dim(p.D);
  TORCH_CHECK(kd != 0, "the sm90 kernels take D <= 64 or 96 < D <= 128, got ", p.D);
  if (maps != nullptr) kd == 64 ? run_sm90_tma<T, 64>(p, *maps) : run_sm90_tma<T, 128>(p, *maps);
  else kd == 64 ? run_sm90<T, 64>(p) : run_sm90<T, 128>(p);
}

template <typename T>
void dispatch(const FwdParams& p) {
  if (p.D <= 32) run_tc<T, 32>(p);
  else if (p.D <= 64) run_tc<T, 64>(p);
  else if (p.D <= 96) run_tc<T, 96>(p);
  else if (p.D <= 128) run_tc<T, 128>(p);
  else run_tc<T, 256>(p);
}

// out [B, Sq, H, D] and lse [B, H, Sq] are written, or with accumulate merged into, as the CUDA op does.
void flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
               const at::Tensor& lse, const std::optional<at::Tensor>& kv_mask, std::optional<double> scale,
               bool causal, bool accumulate, const std::string& kernel, bool late_copies) {
  constexpr const char* op = "emulated flash_attn_fwd";
  const cp_attention::AttnDims d = cp_attention::check_attn_inputs(op, q, k, v, kv_mask);
  if (d.B * d.H * d.Sq == 0) return;
  at::Tensor q_used;
  const FwdParams p = cp_attention::flash::make_fwd_params(op, d, q, k, v, out, lse, scale, causal, kv_mask,
                                                           accumulate, q_used);
  const bool tma = kernel == "sm90_tma" || kernel == "sm90_tma_no_pingpong";
  TORCH_CHECK(kernel == "mma" || kernel == "sm90" || tma,
              "kernel must be 'mma', 'sm90', 'sm90_tma' or 'sm90_tma_no_pingpong', got '", kernel, "'");
  const bool sm90 = kernel != "mma";
  cp_attention::flash::Sm90TmaMaps maps;
  const cp_attention::flash::Sm90TmaMaps* use_maps = nullptr;
  FwdParams pk = p;
  pk.pingpong = kernel == "sm90_tma";  // as the CUDA op sets it for its TMA kernel
  if (tma) {
    namespace fl = cp_attention::flash;
    TORCH_CHECK(fl::encode_sm90_maps(maps, q_used, k, v), "the sm90_tma kernel needs q, k and v that TMA can address");
    use_maps = &maps;
  }
  late_copies_for_launch = late_copies;
  named_barrier_uses.clear();
  if (q.scalar_type() == at::kHalf) sm90 ? dispatch_sm90<__half>(pk, use_maps) : dispatch<__half>(pk);
  else if (q.scalar_type() == at::kBFloat16)
    sm90 ? dispatch_sm90<__nv_bfloat16>(pk, use_maps) : dispatch<__nv_bfloat16>(pk);
  else run_f32(pk);  // float32: the SIMT kernel, as the CUDA op dispatches
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("flash_fwd", &flash_fwd,
        "the CUDA flash forward (kernel 'mma': the mma.sync one, 'sm90': the wgmma one, 'sm90_tma': the "
        "warp-specialized wgmma one, 'sm90_tma_no_pingpong': that one without turns between its compute "
        "warpgroups; float32 always takes the SIMT kernel), emulated on CPU tensors; "
        "late_copies: cp.async and TMA copies land at their wait instead of at once");
  m.def("named_barrier_uses", [] { return named_barrier_uses; },
        "completed uses of each named barrier id (bar.sync / bar.arrive) over the CTAs of the last flash_fwd");
}
