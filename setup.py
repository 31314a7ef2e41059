"""Builds the single extension ``cp_attention._C``.

C++ (CPU) sources are always compiled. CUDA sources are compiled whenever a CUDA toolkit (nvcc) is found,
whether or not a GPU is present, so a GPU-less machine still compiles and links the CUDA code.

Environment knobs:
  CP_ATTENTION_SKIP_CUDA=1        build the CPU kernels only
  CP_ATTENTION_CUDA_ARCHS="8.0;9.0a"  GPU architectures to compile machine code (SASS) for, ';'-separated
                                  "X.Y" (or "X.Ya" for the arch-specific features of sm_90a and later);
                                  "X.Y+PTX" also embeds that architecture's PTX
  CP_ATTENTION_CUDA_PTX=9.0       the virtual architecture whose PTX is embedded for GPUs newer than every
                                  SASS target (the driver compiles it for them); "none" embeds none. An
                                  arch-specific target ("9.0a") does not qualify: its PTX runs on that
                                  architecture only
  CUDA_HOME                       the CUDA toolkit; found through nvcc when unset
  MAX_JOBS                        parallel compile jobs (read by torch's build helper)
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The toolkit that the nvcc on the PATH really runs (it may be a wrapper script elsewhere)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc's dry run prints the toolkit root it resolved (TOP=...), which a wrapper script cannot hide.
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write("__global__ void probe() {}\n")
        try:
            text = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, text=True, timeout=60).stderr
        except (OSError, subprocess.TimeoutExpired):
            text = ""
    match = re.search(r"^#\$ TOP=(.+)$", text, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def pip_cuda_include_dirs():
    """Headers of the CUDA pip packages torch was built against (cusparse.h and friends live there)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    return dirs


def gencode_flags(archs: str, ptx: str) -> list[str]:
    """nvcc's -gencode flags for CP_ATTENTION_CUDA_ARCHS and CP_ATTENTION_CUDA_PTX (syntax above). Given
    here rather than through TORCH_CUDA_ARCH_LIST, which has no way to embed PTX without SASS of the same
    architecture: SASS for sm_90 next to sm_90a's would hold stubs of the wgmma kernels."""
    flags = []
    for entry in filter(None, (a.strip() for a in archs.split(";"))):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not match:
            sys.exit(f"CP_ATTENTION_CUDA_ARCHS: entries look like 8.0, 9.0a or 8.0+PTX, got {entry!r}")
        name = f"{match[1]}{match[2]}{match[3]}"
        flags.append(f"-gencode=arch=compute_{name},code=sm_{name}")
        if match[4]:
            if match[3]:
                sys.exit(f"CP_ATTENTION_CUDA_ARCHS: {entry!r}: PTX of an arch-specific target runs on that "
                         "architecture only; embed PTX of a plain one (CP_ATTENTION_CUDA_PTX)")
            flags.append(f"-gencode=arch=compute_{name},code=compute_{name}")
    if not flags:
        sys.exit("CP_ATTENTION_CUDA_ARCHS names no architecture")
    if ptx != "none":
        match = re.fullmatch(r"(\d+)\.(\d+)", ptx)
        if not match:
            sys.exit(f"CP_ATTENTION_CUDA_PTX must be a plain architecture such as 9.0 (not arch-specific: "
                     f"that PTX runs on its own architecture only) or none, got {ptx!r}")
        flags.append(f"-gencode=arch=compute_{match[1]}{match[2]},code=compute_{match[1]}{match[2]}")
    return flags


cuda_home = None if _truthy("CP_ATTENTION_SKIP_CUDA") else find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so it must be set first.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
cuda_archs = os.environ.get("CP_ATTENTION_CUDA_ARCHS", "8.0;9.0a").strip() if with_cuda else ""
cuda_ptx = os.environ.get("CP_ATTENTION_CUDA_PTX", "9.0").strip() if with_cuda else ""
# torch adds no -gencode of its own when these are given (it looks for "arch" among the nvcc flags).
cuda_gencode = gencode_flags(cuda_archs, cuda_ptx) if with_cuda else []

# The CPU kernels' ISA copies (csrc/cpu/isa_*.cpp, chosen at run time) link last and narrowest first, so
# that of the inline functions they share with the baseline files the linker keeps the baseline's copy.
ISA_COPIES = [os.path.join("csrc", "cpu", f"isa_{isa}.cpp") for isa in ("generic", "avx2", "avx512", "amx")]
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
sources = [s for s in sources if s not in ISA_COPIES] + ISA_COPIES
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
if with_cuda:
    sources += cuda_sources

def nvcc_version(home):
    try:
        text = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else ""


cuda_version = nvcc_version(cuda_home) if with_cuda else ""
compiled_cuda = " ".join(os.path.basename(s) for s in cuda_sources) if with_cuda else ""
# Build facts readable from Python (cp_attention.build_info()); a header avoids quoting them through ninja.
os.makedirs(os.path.join(HERE, "build", "generated"), exist_ok=True)
config_text = (
    "#pragma once\n"
    f"#define CP_ATTENTION_WITH_CUDA {int(with_cuda)}\n"
    f'#define CP_ATTENTION_CUDA_ARCHS "{cuda_archs}"\n'
    f'#define CP_ATTENTION_CUDA_PTX "{cuda_ptx}"\n'
    f'#define CP_ATTENTION_TORCH_VERSION "{torch.__version__}"\n'
    f'#define CP_ATTENTION_CUDA_VERSION "{cuda_version}"\n'
    f'#define CP_ATTENTION_CUDA_SOURCES "{compiled_cuda}"\n'
)
config_path = os.path.join(HERE, "build", "generated", "cp_attention_build_config.h")
if not os.path.exists(config_path) or open(config_path).read() != config_text:
    with open(config_path, "w") as f:
        f.write(config_text)

# No ISA flags: every file compiles for the baseline x86-64 (or other) target; the ISA copies raise it for
# their kernels with target pragmas.
cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
extra_compile_args = {"cxx": cxx_flags}
if with_cuda:
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *cuda_gencode]
include_dirs = [os.path.join(HERE, "csrc"), os.path.join(HERE, "build", "generated")]
if with_cuda:
    include_dirs += pip_cuda_include_dirs()

Extension = CUDAExtension if with_cuda else CppExtension
ext = Extension(
    name="cp_attention._C",
    sources=sources,
    include_dirs=include_dirs,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
