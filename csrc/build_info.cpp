// The Python module behind cp_attention._C. Ops register through TORCH_LIBRARY in ops.cpp and the kernel
// files; pybind11 serves only non-op helpers: the build facts, whether the CUDA kernels fit a device, and
// the tests' switch of the CPU kernels' ISA copy.
#include <torch/extension.h>

#include "cp_attention_build_config.h"
#include "cpu/dispatch.h"
#include "kernel_image.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda"] = static_cast<bool>(CP_ATTENTION_WITH_CUDA);
  info["cuda_archs"] = std::string(CP_ATTENTION_CUDA_ARCHS);
  info["cuda_ptx"] = std::string(CP_ATTENTION_CUDA_PTX);
  info["cuda_sources"] = std::string(CP_ATTENTION_CUDA_SOURCES);
  info["cpu_isa"] = std::string(cp_attention::cpu::kernels().isa);  // chosen for this CPU at run time
  info["cpu_isas"] = cp_attention::cpu::built_isas();
  info["torch_version"] = std::string(CP_ATTENTION_TORCH_VERSION);
  if (CP_ATTENTION_WITH_CUDA) {
    info["cuda_version"] = std::string(CP_ATTENTION_CUDA_VERSION);  // of the nvcc that compiled the kernels
  } else {
    info["cuda_version"] = pybind11::none();
  }
  return info;
}

bool cuda_kernel_image_fits(int64_t device) {
#if CP_ATTENTION_WITH_CUDA
  return cp_attention::cuda_kernel_image_fits(device);
#else
  (void)device;
  return false;  // no CUDA kernel in this build
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cp_attention compiled kernels (ops live under torch.ops.cp_attention)";
  m.def("build_info", &build_info, "What this build contains: CUDA on/off, CUDA archs, CPU vector ISA.");
  m.def("cuda_kernel_image_fits", &cuda_kernel_image_fits, pybind11::arg("device"),
        "Whether this build's CUDA kernels have an image (SASS or PTX) that loads on CUDA device `device`.");
  m.def("_limit_cpu_isa", &cp_attention::cpu::limit_isa, pybind11::arg("isa"),
        "Tests and benchmarks only: the CPU ops run at most this ISA copy of their kernels ('' lifts it).");
}
