"""Ahead-of-time compilation of the forward kernel for a GPU architecture, on any machine (no GPU needed:
triton ships ptxas). It catches what the interpreter cannot: GPU-only compile errors (for instance an
argument that triton specializes to the constant 1), shared memory per tile and register spills.

    python -m cp_attention.triton_kernels.aot --arch 90 --dtype bf16 --head-dim 128

prints, for every autotune candidate of that architecture, the shared memory and the register/stack use.
The signature mirrors a real launch on contiguous BSHD tensors: 16-byte aligned pointers, strides divisible
by 16 (what triton's launcher detects and specializes on), unit strides as constants.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs as cfg
from .flash_fwd import NOT_SPECIALIZED, _flash_fwd_kernel
from .merge import _merge_kernel

_CONSTEXPRS = ("BLOCK_D", "EVEN_D", "CAUSAL", "HAS_MASK", "ACCUMULATE", "DOT_PRECISION", "UPCAST", "TMA_OK",
               "BLOCK_M", "BLOCK_N", "TMA")
_DESCS = {"DESC_Q": "block_m", "DESC_K": "block_n", "DESC_V": "block_n", "DESC_O": "block_m"}
# Strides that are 1 in a typical launch (contiguous rows): triton turns them into constants.
_ONES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def compile_fwd(arch: int, dtype: str, block_d: int, config: cfg.FwdConfig, *, causal: bool = True,
                has_mask: bool = False, accumulate: bool = False, even_d: bool = True,
                ones: tuple[str, ...] = _ONES):
    """Compiles _flash_fwd_kernel for `arch` (e.g. 80, 90); dtype "fp16", "bf16" or "fp32". With accumulate
    the running out is float32. A TMA config gets tensor descriptors (out's only without accumulate), any
    other None for them. Returns triton's compiled kernel (asm, metadata)."""
    names = _flash_fwd_kernel.arg_names
    sig, consts = {}, {}
    for n in names:
        if n in _DESCS:
            rows = getattr(config, _DESCS[n])
            if config.tma and not (n == "DESC_O" and accumulate):
                sig[n] = f"tensordesc<{dtype}[1,{rows},1,{block_d}]>"
            else:
                sig[n] = "constexpr"
                consts[n] = None
        elif n in ("Q", "K", "V"):
            sig[n] = "*" + dtype
        elif n == "OUT":
            sig[n] = "*fp32" if accumulate else "*" + dtype
        elif n == "LSE":
            sig[n] = "*fp32"
        elif n == "KV_MASK":
            sig[n] = "*u8" if has_mask else "*" + dtype
        elif n == "qk_scale":
            sig[n] = "fp32"
        elif n in _CONSTEXPRS or n in ones:
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    consts.update({n: 1 for n in ones})
    consts.update(BLOCK_D=block_d, EVEN_D=even_d, CAUSAL=causal, HAS_MASK=has_mask, ACCUMULATE=accumulate,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, TMA_OK=config.tma,
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, TMA=config.tma)
    # Arguments the kernel does not specialize (do_not_specialize) get no alignment hint.
    div16 = [n for n in names if (sig[n].startswith("*") or sig[n] == "i32") and n not in NOT_SPECIALIZED]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(_flash_fwd_kernel, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def compile_merge(arch: int, out_dtype: str, block_d: int, rows: int, num_warps: int = 4,
                  even_d: bool = True):
    """Compiles _merge_kernel for `arch`: side a and the destination in out_dtype, side b float32, unit last
    strides."""
    names = _merge_kernel.arg_names
    ptr = {"OA": out_dtype, "OD": out_dtype, "OB": "fp32", "LA": "fp32", "LB": "fp32", "LD": "fp32"}
    ones = ("s_oa_d", "s_ob_d", "s_od_d", "s_la_s", "s_lb_s", "s_ld_s")
    constexprs = ones + ("ROWS", "BLOCK_D", "EVEN_D")
    sig = {n: "*" + ptr[n] if n in ptr else "constexpr" if n in constexprs else "i32" for n in names}
    consts = {n: 1 for n in ones} | {"ROWS": rows, "BLOCK_D": block_d, "EVEN_D": even_d}
    # Pointers and the strides of contiguous tensors are multiples of 16; S, H, D, n_sblk are not specialized.
    div16 = [n for n in names if n in ptr or (sig[n] == "i32" and n.startswith("s_"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return triton.compile(ASTSource(_merge_kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps))


def resource_usage(kernel) -> str:
    """cuobjdump's register / stack (spill) / shared line for a compiled kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    lines = [line.strip() for line in text.splitlines() if "REG:" in line]
    return lines[0] if lines else text.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--mask", action="store_true")
    p.add_argument("--accumulate", action="store_true")
    a = p.parse_args()
    block_d = max(16, triton.next_power_of_2(a.head_dim))
    for c in cfg.fwd_candidates((a.arch // 10, a.arch % 10), a.dtype == "fp32", block_d):
        k = compile_fwd(a.arch, a.dtype, block_d, c, causal=not a.no_causal, has_mask=a.mask,
                        accumulate=a.accumulate, even_d=block_d == a.head_dim)
        print(f"sm_{a.arch} {a.dtype} BLOCK_D={block_d} {tuple(c)}: shared {k.metadata.shared} B, "
              f"{resource_usage(k)}", flush=True)


if __name__ == "__main__":
    main()
