"""The CUDA flash kernels without a GPU: their own source (csrc/cuda/flash_fwd_kernel.cuh, the mma.sync
tensor-core kernel for float16/bfloat16; flash_fwd_sm90_kernel.cuh and flash_fwd_sm90_tma_kernel.cuh, the
Hopper wgmma ones, loading by cp.async and by TMA from a producer warpgroup; and flash_fwd_f32_kernel.cuh,
the float32 SIMT one), built for the CPU with the lane-level stand-ins of
tests/cuda_emulation/lane_emulation.h (every CUDA thread a real thread; ldmatrix, mma.sync and shuffles
exchange operands between the 32 threads of a warp as the PTX ISA specifies; wgmma decodes its
shared-memory descriptors by the ISA's canonical layouts and completes at its wait; mbarriers count
arrivals and transaction bytes per phase; TMA copies boxes from an emulated tensor map), checked against
the float64 reference: every compiled head dim and the padding between them, ragged query and key blocks,
causal, masks, GQA, the element-load path, and the fused accumulation into a running state. This checks
the kernels' index and fragment arithmetic, their masking and their epilogue, and their asynchronous
copies and products at the two extremes of their timing (cp.async and TMA copies landing at once or at
their wait; wgmma completing at its wait); not their speed, nor orders in between that only the GPU's
timing would produce.

The extension compiles on first use (about a minute); it needs the CUDA toolkit's headers, which any
machine that builds the CUDA kernels has."""

from __future__ import annotations

import functools
import glob
import os
import shutil

import pytest
import torch
from conftest import make_kv_mask, randn
from reference import check_attention

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _cuda_include() -> str | None:
    """The CUDA toolkit's include folder (crt/host_defines.h and the fp16/bf16 headers): CUDA_HOME, the
    toolkit the nvcc on the PATH runs (possibly through a wrapper script), or /usr/local/cuda*."""
    roots = [os.environ.get("CUDA_HOME", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script names the real nvcc
            head = f.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode(errors="replace").split():
                if word.endswith("/bin/nvcc"):
                    roots.append(os.path.dirname(os.path.dirname(word)))
    roots += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for r in roots:
        inc = os.path.join(r, "include")
        if r and all(os.path.exists(os.path.join(inc, f)) for f in ("crt/host_defines.h", "cuda_fp16.h")):
            return inc
    return None


CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None, reason="no CUDA toolkit headers on this machine")


@functools.cache
def _emulated():
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build, exist_ok=True)
    return load(name="cp_attention_cuda_emulation",
                sources=[os.path.join(HERE, "cuda_emulation", "emulated_fwd.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(HERE, "cuda_emulation"),
                                     CUDA_INCLUDE],
                extra_cflags=["-O1", "-std=c++20", "-DCP_ATTENTION_LANE_EMULATION", "-Wno-attributes"],
                build_directory=build, verbose=False)


def _fwd(q, k, v, scale=None, causal=False, kv_mask=None, kernel="mma", late_copies=False):
    """kernel: "mma" (the mma.sync kernel), "sm90" (the wgmma one), "sm90_tma" (the warp-specialized wgmma
    one, which needs q, k and v that TMA can address) or "sm90_tma_no_pingpong" (the same without turns
    between its compute warpgroups); float32 runs the SIMT kernel either way.
    late_copies: cp.async lands at the wait that retires it, TMA copies when their barrier is first waited
    on, instead of at once."""
    B, Sq, H, D = q.shape
    out = torch.full((B, Sq, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, Sq), float("nan"))
    _emulated().flash_fwd(q, k, v, out, lse, kv_mask, scale, causal, False, kernel, late_copies)
    return out, lse


def _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed, unaligned=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for S, n in ((Sq, H), (Sk, Hkv), (Sk, Hkv)):
        x = randn(B, S, n, D, dtype=dtype, gen=gen)
        if unaligned:  # rows one element off 16-byte alignment: the element-load path
            wide = torch.zeros(B, S, n, D + 1, dtype=dtype)
            wide[..., 1:] = x
            x = wide[..., 1:]
        out.append(x)
    return (*out, gen)


# (D, dtype): every compiled head dim (32, 64, 96, 128, 256) and D padded up to one (1, 40, 72, 200); the
# float32 kernel at odd and large D.
HEAD_DIMS = [(32, F16), (64, BF16), (96, F16), (128, BF16), (256, F16), (1, F16), (40, BF16), (72, F16),
             (200, BF16), (1, F32), (40, F32), (256, F32)]


@pytest.mark.parametrize("D,dtype", HEAD_DIMS, ids=[f"{d}-{str(t)[6:]}" for d, t in HEAD_DIMS])
def test_head_dims(D, dtype):
    # Sq spans a full and a ragged query block of the D <= 128 tile (128 rows), Sk a ragged key block.
    Sq, Sk = (70, 45) if D > 128 else (131, 77)
    q, k, v, _ = _qkv(1, Sq, Sk, 1, 1, D, dtype, seed=D)
    check_attention(*_fwd(q, k, v), q, k, v)


# The Hopper wgmma kernel (compiled D 64 and 128; smaller D padded to 64, D in (96, 128] to 128): Sq spans a
# full and a ragged 128-row query block, Sk a full and a ragged 128-key block.
SM90_HEAD_DIMS = [(64, F16), (128, BF16), (8, BF16), (40, F16), (100, BF16), (128, F16)]


@pytest.mark.parametrize("kernel", ["sm90", "sm90_tma"])
@pytest.mark.parametrize("D,dtype", SM90_HEAD_DIMS, ids=[f"{d}-{str(t)[6:]}" for d, t in SM90_HEAD_DIMS])
def test_sm90_head_dims(D, dtype, kernel):
    q, k, v, _ = _qkv(1, 131, 200, 1, 1, D, dtype, seed=D + 1)
    if kernel == "sm90_tma" and D % 8:  # rows of D elements are not whole 16-byte strides: no tensor map
        with pytest.raises(RuntimeError, match="TMA can address"):
            _fwd(q, k, v, kernel=kernel)
        return
    check_attention(*_fwd(q, k, v, kernel=kernel), q, k, v)


CASES = [  # (B, Sq, Sk, H, Hkv, D, causal, masked, unaligned)
    (2, 37, 70, 4, 2, 64, True, False, False),   # Sq < Sk: bottom-right causal, GQA
    (1, 70, 37, 2, 1, 64, True, True, False),    # Sq > Sk: rows that see nothing; a mask
    (2, 33, 50, 2, 2, 40, False, True, True),    # the element-load path, an all-masked batch
    (1, 129, 129, 2, 1, 32, True, False, False),  # two query blocks on the diagonal
]
# (kernel, dtype): the mma.sync kernel, the float32 SIMT one, the wgmma one in both 16-bit dtypes and the
# warp-specialized (TMA) wgmma one.
KERNEL_DTYPES = [("mma", F16), ("mma", F32), ("sm90", F16), ("sm90", BF16), ("sm90_tma", BF16),
                 ("sm90_tma_no_pingpong", F16)]


@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,causal,masked,unaligned", CASES,
                         ids=[f"{c[1]}x{c[2]}-D{c[5]}{'-causal' if c[6] else ''}{'-mask' if c[7] else ''}"
                              f"{'-unaligned' if c[8] else ''}" for c in CASES])
@pytest.mark.parametrize("kernel,dtype", KERNEL_DTYPES, ids=[f"{k}-{str(t)[6:]}" for k, t in KERNEL_DTYPES])
def test_causal_mask_gqa(kernel, dtype, B, Sq, Sk, H, Hkv, D, causal, masked, unaligned):
    q, k, v, gen = _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=Sq + Sk, unaligned=unaligned)
    kv_mask = make_kv_mask(B, Sk, gen) if masked else None
    # Rows off 16-byte alignment have no tensor map (the op falls back to another kernel).
    if kernel.startswith("sm90_tma") and unaligned:
        with pytest.raises(RuntimeError, match="TMA can address"):
            _fwd(q, k, v, causal=causal, kv_mask=kv_mask, kernel=kernel)
        return
    out, lse = _fwd(q, k, v, causal=causal, kv_mask=kv_mask, kernel=kernel)
    check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask)


@pytest.mark.parametrize("kernel", ["sm90", "sm90_tma", "sm90_tma_no_pingpong"])
@pytest.mark.parametrize("late_copies", [False, True], ids=["copies-early", "copies-late"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sm90_many_key_blocks(causal, late_copies, kernel):
    # Five key blocks: each of the three K/V stages is refilled while the blocks before it are still in use.
    # Causal with Sq < Sk: the query blocks start mid-way through the key blocks, so blocks both before and
    # on the diagonal. Copies landing at once expose a refill of a stage still being read, copies landing
    # at their wait a read of a block not yet waited for.
    q, k, v, _ = _qkv(1, 150, 530, 2, 1, 128, BF16, seed=17)
    out, lse = _fwd(q, k, v, causal=causal, kernel=kernel, late_copies=late_copies)
    check_attention(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("late_copies", [False, True], ids=["copies-early", "copies-late"])
def test_sm90_tma_head_major_memory(late_copies):
    # [B, H, S, D] memory seen as BSHD (the SDPA layout): the tensor maps put S inside H, and the boxes come
    # from the other coordinates. q head-major, k in BSHD memory, v head-major; GQA, causal, a mask.
    q, k, v, gen = _qkv(2, 150, 300, 4, 2, 64, BF16, seed=23)
    q, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, v))
    kv_mask = make_kv_mask(2, 300, gen)
    out, lse = _fwd(q, k, v, causal=True, kv_mask=kv_mask, kernel="sm90_tma", late_copies=late_copies)
    check_attention(out, lse, q, k, v, causal=True, kv_mask=kv_mask)


@pytest.mark.parametrize("kernel", ["sm90_tma", "sm90_tma_no_pingpong"])
def test_sm90_tma_turns(kernel):
    # The TMA kernel's compute warpgroups take turns to issue (ping-pong): per CTA with n key blocks each
    # issues n + 1 times, warpgroup 1 waits on barrier 3 before every issue (n + 1 uses), warpgroup 0 on
    # barrier 2 before all but its first (n uses). Without turns neither barrier is used.
    B, Sq, Sk, H = 1, 150, 530, 2
    q, k, v, _ = _qkv(B, Sq, Sk, H, 1, 64, F16, seed=21)
    check_attention(*_fwd(q, k, v, kernel=kernel, late_copies=True), q, k, v)
    ctas, n = B * H * -(-Sq // 128), -(-Sk // 128)
    want = {2: ctas * n, 3: ctas * (n + 1)} if kernel == "sm90_tma" else {}
    assert _emulated().named_barrier_uses() == want


@pytest.mark.parametrize("D", [32, 64, 128])
def test_mma_copies_land_late(D):
    # The mma.sync kernel's double buffer with copies landing at their wait: several key and query blocks.
    q, k, v, _ = _qkv(1, 140, 300, 2, 1, D, F16, seed=D + 3)
    check_attention(*_fwd(q, k, v, causal=True, late_copies=True), q, k, v, causal=True)


@pytest.mark.parametrize("kernel", ["mma", "sm90", "sm90_tma"])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_scale_folding(scale, kernel):
    # A negative scale runs on -q, a zero scale on a tiny one (make_fwd_params): both exact.
    q, k, v, _ = _qkv(1, 20, 30, 2, 2, 64, BF16, seed=5)
    check_attention(*_fwd(q, k, v, scale=scale, kernel=kernel), q, k, v, scale=scale)


# (kernel, dtype, state dtype, state layout): "dense" states move in 16-byte chunks, "unaligned" ones (rows
# one element off 16-byte alignment) element by element.
ACC_CASES = [("mma", BF16, F32, "dense"), ("mma", BF16, BF16, "dense"), ("mma", F32, F32, "dense"),
             ("sm90", F16, F32, "dense"), ("sm90", BF16, BF16, "dense"), ("mma", F16, F32, "unaligned"),
             ("sm90", BF16, BF16, "unaligned"), ("sm90_tma", BF16, F32, "dense"),
             ("sm90_tma", F16, F16, "unaligned")]


@pytest.mark.parametrize("kernel,dtype,state_dtype,layout", ACC_CASES,
                         ids=[f"{k}-{str(t)[6:]}-{str(s)[6:]}-{lay}" for k, t, s, lay in ACC_CASES])
def test_acc_chunks_equal_whole(kernel, dtype, state_dtype, layout):
    # The fused ring step: chunks of keys (one empty) merged in the kernel's epilogue into a NaN-poisoned
    # state equal attention over all keys.
    B, Sq, Sk, H, Hkv, D = 2, 45, 90, 2, 1, 64
    q, k, v, gen = _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=9)
    kv_mask = make_kv_mask(B, Sk, gen)
    out = torch.full((B, Sq, H, D + (layout == "unaligned")), float("nan"), dtype=state_dtype)
    out = out[..., 1:] if layout == "unaligned" else out
    lse = torch.full((B, H, Sq), float("-inf"))
    for s, e in ((0, 30), (30, 30), (30, 90)):
        if e > s:
            _emulated().flash_fwd(q, k[:, s:e], v[:, s:e], out, lse, kv_mask[:, s:e], None, False, True,
                                  kernel, False)
    check_attention(out.to(dtype).contiguous(), lse, q, k, v, kv_mask=kv_mask)
