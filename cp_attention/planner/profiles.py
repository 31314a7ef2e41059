"""Built-in hardware profiles for the planner, and `get_profile`, which turns a `hardware` argument into one.

Every number is per device. Attention rates are a FlashAttention-class forward kernel on large non-causal
shapes (not the tensor-core peak); float32 attention runs this project's IEEE-exact dots on the CUDA cores
(triton_kernels/configs.py), so its rate is a fraction of the non-tensor FP32 peak. Dense matmul rates
(gemm_tflops) are what cuBLAS sustains, about 70-80% of the datasheet's dense peak; float32 matmuls are
CUDA-core SGEMM (PyTorch leaves TF32 off for matmul by default). Link bandwidths are per device, one
direction, achievable by collectives whose ranks all send at once (NCCL busbw-like), GB/s; latencies are the
fixed cost of one ring hop or all-to-all round, us, and are estimates everywhere (NCCL's small-message
latency: NVLink 6-8, InfiniBand 10, PCIe P2P 10-15, RoCE 20, host-staged copies 25-30).

Common to every profile (estimates): kernel_half_len 256 tokens. The FlashAttention-3 sweep (fixed 16k
tokens per batch, so the grid is always full) implies about 100 for the tile fill alone (H100 D=128: 467
TFLOP/s at 512 tokens vs 648 at 16k); 256 also covers the under-filled grids of small batch x heads
(B=1-2, 24 heads) that diffusion transformers run per ring step. `python -m cp_attention.profile` measures it.
overlap: 0.9 on NVLink, 0.8 over PCIe P2P, 0.7 through host memory (the copy competes with the kernel).

The h100-sxm profile's gemm rate, kernel_overhead_us and launch_us are calibrated on two published 4 x H100
FLUX.1-dev tables (_CALIBRATION); h200-sxm takes them over. The other profiles keep their estimates: their
gemm rates are cuBLAS-class matmul rates, which FLUX's compiled transformer ran at 55% of the H100's dense
peak rather than the 73% the H100 profile first assumed.

Each profile names its sources in the comment above it and in `sources`; "estimate" marks a number that no
source gives directly.
"""

from __future__ import annotations

import math
import os

from .hardware import HardwareProfile, Link

_FA3 = ("FlashAttention-3, Shah et al. 2024 (arXiv:2407.08608), Fig. 5: H100 80GB SXM5, FP16 forward, "
        "non-causal, 16k tokens: 497 / 648 / 756 TFLOP/s at head dim 64 / 128 / 256")
_FA2 = ("FlashAttention-2, Dao 2023 (arXiv:2307.08691): 50-73% of the A100's theoretical peak, the forward "
        "pass at the top of that range")
_NCCL = ("nccl-tests all_reduce busbw reference (docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests): "
         "8x H100 SXM5 460-480 GB/s (NVLink SHARP), 8x A100 SXM4 230-250 GB/s")
_CALIBRATION = ("calibrated on FLUX.1-dev 1024x1024 on 4x H100 (benchmarks/calibrate_planner.py, "
                "docs/planner.md): xDiT docs/performance/flux.md (28 steps, torch.compile: 1 GPU 4.30 s, "
                "Ulysses-4 1.63, Ulysses-2 x Ring-2 1.80, Ring-4 1.98) and the diffusers "
                "distributed-inference docs (50 steps, eager: Ulysses 6670.8 ms, ring 13076.5, unified "
                "11068.7)")
_PCIE = ("measured PCIe Gen5 x16 P2P write bandwidth 54-56 GB/s one way within a NUMA node, 39-51 across "
         "(github.com/voipmonitor/rtx6kpro, hardware/pcie-bandwidth.md); Gen4 x16 has half the lanes' rate")


def _nvlink_node(nvlink_gbs: float, nvlink_us: float, ib_gbs: float, ib_us: float) -> tuple:
    """An 8-GPU NVSwitch node (HGX/DGX), one InfiniBand NIC per GPU between nodes."""
    return (Link("nvlink", 8, nvlink_gbs, nvlink_us), Link("infiniband", math.inf, ib_gbs, ib_us))


def _pcie_node(*, switch, socket, upi, network, network_name: str) -> tuple:
    """An 8-GPU, two-socket PCIe server: GPUs paired under PCIe switches (span 2), 4 per CPU socket, 8 over
    the socket interconnect, then the network. Each level is (GB/s, us); switch None: no GPU peer-to-peer,
    so a shared switch saves nothing (the traffic goes through host memory)."""
    levels = (("pcie-switch", 2, switch), ("socket", 4, socket), ("upi", 8, upi),
              (network_name, math.inf, network))
    return tuple(Link(name, span, *rate) for name, span, rate in levels if rate is not None)


# PCIe Gen4 x16 trees (A100 PCIe, L40S, L20), estimates from _PCIE scaled to Gen4 (~27 GB/s one way P2P):
# 22 GB/s under one switch, 18 through a CPU root complex, 12 across sockets (P2P over UPI/xGMI is slow or
# staged through host memory by NCCL).
_GEN4_SWITCH, _GEN4_SOCKET, _GEN4_UPI = (22.0, 10.0), (18.0, 12.0), (12.0, 15.0)

BUILTIN: dict[str, HardwareProfile] = {p.name: p for p in (
    # H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity = 989 dense,
    # FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s both directions = 450 one way). Attention: FA3
    # paper (_FA3) at ~95% of its 16k-token figures. FP32 attention: estimate, ~40% of 67. NVLink 360 GB/s:
    # estimate, 80% of 450; _NCCL's 460-480 GB/s all-reduce uses NVLink SHARP, which all-to-all and
    # send/recv do not get. InfiniBand: NDR 400 Gb/s per GPU (DGX/HGX H100) = 50 GB/s line, 42 achievable
    # (estimate). copy_gbs: estimate, 80% of 3.35 TB/s. Calibrated (_CALIBRATION): gemm_tflops bf16/fp16
    # (FLUX's non-attention work compiled: 55% of 989) and kernel_overhead_us (one step of xDiT's ring:
    # kernel, P2P and merge launches) on xDiT's compiled rows; launch_us on diffusers' eager rows. sync_us
    # stays 0: fitted beside them it takes 9 us, which four rows do not tell apart from the kernel cost.
    HardwareProfile(
        name="h100-sxm", device="NVIDIA H100 80GB SXM5",
        attention_tflops={"bfloat16": {64: 470, 128: 615, 256: 720}, "float16": {64: 470, 128: 615, 256: 720},
                          "float32": {64: 24, 128: 27}},
        kernel_half_len=256, kernel_overhead_us=51.1,
        gemm_tflops={"bfloat16": 544, "float16": 544, "float32": 50},
        memory_gb=80, devices_per_node=8, links=_nvlink_node(360, 6, 42, 10), overlap=0.9, copy_gbs=2700,
        launch_us=63.9,
        sources=("NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100)", _FA3, _NCCL,
                 _CALIBRATION, "estimates: FP32 attention 40% of FP32 peak, NVLink 80% of 450 GB/s, NDR "
                 "400 Gb/s at 85%, copies at 80% of the HBM bandwidth")),
    # H200 SXM: same GH100 die, clocks and 700 W as the H100 SXM (compute-bound attention and matmul: the
    # H100 rates, estimate); NVIDIA H200 product page / datasheet (141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS
    # with sparsity, NVLink 900 GB/s); MLPerf Inference v4.1 system description H200-SXM-141GBx8 (8 GPUs
    # per node, 18x NVLink4 900 GB/s, 400 Gb/s InfiniBand NICs). Links as the H100 (estimates). The H100's
    # calibrated gemm rate, kernel and launch costs (same die, same software path; estimate); copy_gbs:
    # estimate, 80% of 4.8 TB/s.
    HardwareProfile(
        name="h200-sxm", device="NVIDIA H200 141GB SXM5",
        attention_tflops={"bfloat16": {64: 470, 128: 615, 256: 720}, "float16": {64: 470, 128: 615, 256: 720},
                          "float32": {64: 24, 128: 27}},
        kernel_half_len=256, kernel_overhead_us=51.1,
        gemm_tflops={"bfloat16": 544, "float16": 544, "float32": 50},
        memory_gb=141, devices_per_node=8, links=_nvlink_node(360, 6, 42, 10), overlap=0.9, copy_gbs=3800,
        launch_us=63.9,
        sources=("NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)",
                 "MLPerf Inference v4.1, NVIDIA system H200-SXM-141GBx8_TRT_MaxQ.json", _FA3, _NCCL,
                 _CALIBRATION, "estimates: compute rates and calibrated costs of the H100 SXM (same die and "
                 "power), links as the H100 SXM, copies at 80% of the HBM bandwidth")),
    # A100 SXM4 80GB: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf: BF16 312
    # TFLOPS dense, FP32 19.5, NVLink 600 GB/s = 300 one way, 400 W). Attention: FA2 paper (_FA2), ~70% of
    # 312 at D=128; D=64 estimate ~58%. gemm: estimate, 80% of 312. NVLink 230 GB/s: _NCCL's 8x A100
    # all-reduce busbw (230-250). InfiniBand: HDR 200 Gb/s per GPU (DGX A100) = 25 GB/s line, 22 achievable
    # (estimate).
    HardwareProfile(
        name="a100-sxm", device="NVIDIA A100 80GB SXM4",
        attention_tflops={"bfloat16": {64: 180, 128: 220}, "float16": {64: 180, 128: 220},
                          "float32": {64: 7, 128: 8}},
        kernel_half_len=256, kernel_overhead_us=15,
        gemm_tflops={"bfloat16": 250, "float16": 250, "float32": 16},
        memory_gb=80, devices_per_node=8, links=_nvlink_node(230, 8, 22, 10), overlap=0.9,
        sources=("NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)",
                 _FA2, _NCCL, "estimates: D=64 attention ~58% of peak, gemm 80% of peak, FP32 attention "
                 "40% of FP32 peak, HDR 200 Gb/s at 88%")),
    # A100 PCIe 80GB: same datasheet (BF16 312 dense, PCIe Gen4 x16 64 GB/s both directions, 300 W instead of
    # 400 W: estimate 90% of the SXM rates under sustained load). No NVLink bridges assumed. Links: the Gen4
    # tree above (estimates from _PCIE); network: one HDR 200 Gb/s NIC per PCIe switch (2 GPUs), 11 GB/s per
    # GPU (estimate).
    HardwareProfile(
        name="a100-pcie", device="NVIDIA A100 80GB PCIe",
        attention_tflops={"bfloat16": {64: 165, 128: 200}, "float16": {64: 165, 128: 200},
                          "float32": {64: 6.5, 128: 7}},
        kernel_half_len=256, kernel_overhead_us=15,
        gemm_tflops={"bfloat16": 225, "float16": 225, "float32": 15},
        memory_gb=80, devices_per_node=8, overlap=0.8,
        links=_pcie_node(switch=_GEN4_SWITCH, socket=_GEN4_SOCKET, upi=_GEN4_UPI, network=(11, 15),
                         network_name="infiniband"),
        sources=("NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)",
                 _FA2, _PCIE, "estimates: 90% of the A100 SXM compute rates (300 W), PCIe tree and network")),
    # L40S: NVIDIA L40S datasheet (BF16 362.05 TFLOPS dense, 733 with sparsity; FP32 91.6; 48 GB GDDR6;
    # PCIe Gen4 x16 64 GB/s both directions; no NVLink; 350 W). Attention: estimate, ~55% of 362 at D=128
    # (FlashAttention-2 class on Ada, 350 W cap). gemm: estimate, ~70% of 362. FP32 attention: estimate,
    # ~30% of 91.6 (Ada's FP32 peak counts dual issue). Network: 200G, like the L20 (taoguba.com.cn,
    # Article 2551318: "L20 ... like L40S, paired with 200G networking"), one NIC per 2 GPUs over RoCE,
    # 10 GB/s per GPU (estimate).
    HardwareProfile(
        name="l40s-pcie", device="NVIDIA L40S 48GB PCIe",
        attention_tflops={"bfloat16": {64: 170, 128: 200}, "float16": {64: 170, 128: 200},
                          "float32": {64: 24, 128: 27}},
        kernel_half_len=256, kernel_overhead_us=15,
        gemm_tflops={"bfloat16": 250, "float16": 250, "float32": 55},
        memory_gb=48, devices_per_node=8, overlap=0.8,
        links=_pcie_node(switch=_GEN4_SWITCH, socket=_GEN4_SOCKET, upi=_GEN4_UPI, network=(10, 20),
                         network_name="ethernet"),
        sources=("NVIDIA L40S datasheet (BF16 362.05 dense, FP32 91.6 TFLOPS, PCIe Gen4 x16, no NVLink)",
                 "taoguba.com.cn/Article/2551318 (L40S / L20 servers with 200G networking)", _PCIE,
                 "estimates: attention ~55% and gemm ~70% of dense BF16 peak, FP32 attention 30% of FP32 "
                 "peak, PCIe tree and network")),
    # L20: Tom's Hardware, "New Nvidia AI GPUs designed to get around US export bans come to China: H20,
    # L20 and L2" (vendor listing: 48 GB GDDR6, 864 GB/s, BF16/FP16 tensor 119.5 TFLOPS, TF32 59.8, PCIe
    # Gen4 x16); FP32 59.35 TFLOPS (topcpu.net / technical.city spec tables). gemm: xlite-dev/LeetCUDA hgemm
    # README measures cuBLAS FP16 (FP32 accumulate, HMMA.1688.F32) at 116.95 TFLOPS on an L20
    # (16384 x 16384 x 8192): 100 for transformer shapes (estimate). Attention: estimate, ~70% of 119.5 at
    # D=128 (the tensor rate is capped, so softmax and loads hide better). Network as the L40S.
    HardwareProfile(
        name="l20-pcie", device="NVIDIA L20 48GB PCIe",
        attention_tflops={"bfloat16": {64: 75, 128: 85}, "float16": {64: 75, 128: 85},
                          "float32": {64: 16, 128: 18}},
        kernel_half_len=256, kernel_overhead_us=15,
        gemm_tflops={"bfloat16": 100, "float16": 100, "float32": 36},
        memory_gb=48, devices_per_node=8, overlap=0.8,
        links=_pcie_node(switch=_GEN4_SWITCH, socket=_GEN4_SOCKET, upi=_GEN4_UPI, network=(10, 20),
                         network_name="ethernet"),
        sources=("tomshardware.com: H20, L20 and L2 specifications (L20 BF16/FP16 tensor 119.5 TFLOPS)",
                 "github.com/xlite-dev/LeetCUDA hgemm README: cuBLAS 116.95 TFLOPS FP16 on L20",
                 "taoguba.com.cn/Article/2551318 (L40S / L20 servers with 200G networking)", _PCIE,
                 "estimates: attention ~70% of dense peak, FP32 attention 30% of FP32 peak, PCIe tree and "
                 "network")),
    # RTX 4090: NVIDIA Ada GPU architecture whitepaper (FP16/BF16 tensor 165.2 TFLOPS dense with FP32
    # accumulate, which FlashAttention and cuBLAS BF16 use (330.3 with FP16 accumulate); FP32 82.6 TFLOPS;
    # 24 GB GDDR6X; PCIe Gen4 x16); waredb.com lists BF16 165.15 dense. Attention: estimate, ~65% of 165.
    # gemm: estimate, ~80% (the card boosts above its rated clock). No GPU peer-to-peer on GeForce
    # (blog.chlc.cc/p/rtx4090-gpudirect-p2p-unlocked; allanchan339.github.io/bug-fixes/2025/05/21/4090-P2P):
    # NCCL stages every intra-node transfer through pinned host memory, so there is no switch level and
    # bandwidth is lower, latency higher (estimates: 10 GB/s within a socket, 7 across). Network: one 100 GbE
    # NIC shared by 8 GPUs, 1.4 GB/s per GPU (estimate).
    HardwareProfile(
        name="rtx4090-pcie", device="NVIDIA GeForce RTX 4090 24GB",
        attention_tflops={"bfloat16": {64: 95, 128: 110}, "float16": {64: 95, 128: 110},
                          "float32": {64: 22, 128: 25}},
        kernel_half_len=256, kernel_overhead_us=15,
        gemm_tflops={"bfloat16": 130, "float16": 130, "float32": 50},
        memory_gb=24, devices_per_node=8, overlap=0.7,
        links=_pcie_node(switch=None, socket=(10, 25), upi=(7, 30), network=(1.4, 30),
                         network_name="ethernet"),
        sources=("NVIDIA Ada GPU architecture whitepaper (RTX 4090: 165.2 TFLOPS FP16/BF16 tensor, FP32 "
                 "accumulate)", "waredb.com/processor/nvidia-geforce-rtx-4090",
                 "blog.chlc.cc/p/rtx4090-gpudirect-p2p-unlocked (P2P disabled on RTX 4090)",
                 "estimates: attention ~65% and gemm ~80% of dense peak, host-staged links, network")),
)}

PROFILE_NAMES = tuple(sorted(BUILTIN))


def get_profile(hardware) -> HardwareProfile:
    """The profile `hardware` names: a HardwareProfile (returned as is), a built-in name (PROFILE_NAMES,
    case-insensitive), or the path of a .json file saved by `python -m cp_attention.profile`."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    if isinstance(hardware, (str, os.PathLike)):
        name = os.fspath(hardware)
        if name.lower() in BUILTIN:
            return BUILTIN[name.lower()]
        if name.endswith(".json"):
            try:
                return HardwareProfile.load(name)
            except ValueError as e:
                raise ValueError(f"cp_attention.plan: hardware={name!r}: {e}") from None
    raise ValueError(f"cp_attention.plan: unknown hardware profile hardware={hardware!r}; built-in profiles: "
                     f"{', '.join(PROFILE_NAMES)}; or pass a HardwareProfile or a .json file saved by "
                     f"python -m cp_attention.profile")


# Substrings of torch.cuda.get_device_name() and the built-in profile each picks, first match wins.
DEVICE_NAMES = (("H200", "h200-sxm"), ("H100", "h100-sxm"), ("A100-PCIE", "a100-pcie"), ("A100", "a100-sxm"),
                ("L40S", "l40s-pcie"), ("L20", "l20-pcie"), ("4090", "rtx4090-pcie"))


def default_hardware() -> HardwareProfile:
    """The built-in profile of this process's CUDA device, by its name; ValueError where none matches or
    there is no CUDA device (name a profile, or measure one with `python -m cp_attention.profile`)."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("cp_attention.plan: hardware must be given on a machine without a CUDA device: a "
                         f"built-in profile ({', '.join(PROFILE_NAMES)}), a HardwareProfile, or a .json file "
                         "measured by python -m cp_attention.profile")
    name = torch.cuda.get_device_name()
    for pattern, profile in DEVICE_NAMES:
        if pattern.lower() in name.lower():
            return BUILTIN[profile]
    raise ValueError(f"cp_attention.plan: no built-in profile for the device {name!r}; pass hardware= (one "
                     f"of {', '.join(PROFILE_NAMES)}, a HardwareProfile, or a .json file measured by "
                     f"python -m cp_attention.profile)")
