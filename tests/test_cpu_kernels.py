"""The CPU kernels' run-time dispatch (csrc/cpu/dispatch.cpp): the ISA copy chosen for this CPU, the
forward's variants ("default", "panels", "brgemm") against the float64 reference, and that no code outside
the ISA copies uses an instruction an older x86-64 CPU lacks.

Every copy this CPU can run also passes the whole attention, chunking, merge and backward suites
(tests/conftest.py, `Target.cpu_isa`)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cpu_isa, make_kv_mask, narrower_cpu_isas, randn, runnable_cpu_isas
from reference import check_attention, merge_math_path, same_dtype_math_path

import cp_attention
from cp_attention import _C, ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Sq, Sk, H, Hkv, D, causal, masked): odd head dims (VNNI pairs need padding), GQA, Sq > Sk and Sq < Sk
# under the causal rule, key blocks with a tail, and keys past one 512-key block.
CASES = [(1, 1, 1, 1, 1, 1, False, False), (2, 37, 61, 4, 2, 15, False, True),
         (1, 77, 600, 2, 1, 72, True, False), (1, 130, 40, 3, 3, 33, True, True),
         (2, 64, 1030, 4, 4, 64, False, True), (1, 300, 300, 2, 2, 128, True, False),
         (1, 20, 70, 2, 1, 256, False, False)]
CASE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-causal{}-mask{}".format(*c) for c in CASES]


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _expected_isa(flags: set[str]) -> str:
    """The copy dispatch must pick, from the kernel's own list of CPU flags (AMX also needs oneDNN to report
    usable tiles, which it does wherever the flags are there and the kernel grants the tile state)."""
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    amx = avx512 and {"avx512_bf16", "amx_tile", "amx_bf16"} <= flags
    return "amx" if amx else "avx512" if avx512 else "avx2" if avx2 else "generic"


def _copy_variants() -> list:
    """(ISA copy, forward variant) for every copy this CPU runs: brgemm is in every copy but the generic one
    (16-bit inputs on AMX tiles in the amx copy, else on float32 products)."""
    return [pytest.param(isa, v, id=f"{isa}-{v}") for isa in runnable_cpu_isas()
            for v in ["default", "panels"] + (["brgemm"] if isa != "generic" else [])]


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo to know the CPU")
def test_dispatch_picks_the_widest_copy_this_cpu_has():
    info = cp_attention.build_info()
    assert info["cpu_isas"][0] == "generic"
    assert info["cpu_isa"] in info["cpu_isas"]
    expected = _expected_isa(_cpu_flags())
    if expected in info["cpu_isas"]:
        assert info["cpu_isa"] == expected
    else:  # a compiler that builds only the generic copy
        assert info["cpu_isas"] == ["generic"] and info["cpu_isa"] == "generic"


def test_limit_selects_narrower_copies_and_rejects_unknown_names():
    widest = cp_attention.build_info()["cpu_isa"]
    try:
        for isa in narrower_cpu_isas():
            _C._limit_cpu_isa(isa)
            assert cp_attention.build_info()["cpu_isa"] == isa
    finally:
        _C._limit_cpu_isa("")
    assert cp_attention.build_info()["cpu_isa"] == widest
    with pytest.raises(ValueError,
                       match=r"limit_isa: isa must be '' or one of this build's copies \('generic'"):
        _C._limit_cpu_isa("sse9")


def test_unknown_variant_is_rejected():
    q = torch.zeros(1, 4, 2, 8)
    for call in (lambda: ops.flash_attn_fwd(q, q, q, None, False, None, "fast"),
                 lambda: ops.flash_attn_fwd_acc_(q, q, q, q.clone(), torch.zeros(1, 2, 4), None, False, None,
                                                 "fast")):
        with pytest.raises(ValueError, match=r"variant must be 'default', 'panels' or 'brgemm' on the CPU, "
                                             r"got 'fast'"):
            call()


@pytest.mark.parametrize("isa", runnable_cpu_isas())
def test_brgemm_variant_is_in_every_copy_but_the_generic_one(isa):
    # Every dtype: on AMX tiles of the type where the amx copy has them, else on float32 products.
    with cpu_isa(isa):
        for dtype in DTYPES:
            q = torch.ones(1, 4, 2, 8, dtype=dtype)
            if isa == "generic":
                with pytest.raises(ValueError, match=r"variant 'brgemm' needs a CPU with AVX2 \(avx2, fma, "
                                                     r"f16c\); this CPU runs the 'generic' kernels"):
                    ops.flash_attn_fwd(q, q, q, None, False, None, "brgemm")
            else:
                out, lse = ops.flash_attn_fwd(q, q, q, None, False, None, "brgemm")
                # Four equal scores of 8 / sqrt(8): the mean of V, and lse = sqrt(8) + log(4).
                assert torch.equal(out, q)
                torch.testing.assert_close(lse, torch.full_like(lse, math.sqrt(8) + math.log(4)))


def _inputs(case, dtype, seed):
    B, Sq, Sk, H, Hkv, D, causal, masked = case
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, H, Sq, D, dtype=dtype, gen=gen).transpose(1, 2)  # strided: a BHSD tensor viewed as BSHD
    k, v = randn(B, Sk, Hkv, D, dtype=dtype, gen=gen), randn(B, Sk, Hkv, D, dtype=dtype, gen=gen)
    kv_mask = make_kv_mask(B, Sk, gen) if masked else None
    return q, k, v, kv_mask, causal


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa,variant", _copy_variants())
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_variant_forward_matches_reference(case, isa, variant, dtype):
    with cpu_isa(isa):
        q, k, v, kv_mask, causal = _inputs(case, dtype, seed=sum(case[:6]))
        out, lse = ops.flash_attn_fwd(q, k, v, None, causal, kv_mask, variant)
    check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask)


@pytest.mark.parametrize("state_dtype", ["float32", "q"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa,variant", _copy_variants())
@pytest.mark.parametrize("case", [c for c in CASES if not c[6]], ids=[i for c, i in zip(CASES, CASE_IDS)
                                                                       if not c[6]])
def test_variant_fused_step_matches_reference(case, isa, variant, dtype, state_dtype):
    # Three chunks of keys (one empty) merged into a NaN-poisoned empty state: the whole attention.
    q, k, v, kv_mask, _ = _inputs(case, dtype, seed=3 + sum(case[:6]))
    B, Sq, Sk, H, Hkv, D = case[:6]
    sdt = torch.float32 if state_dtype == "float32" else dtype
    acc = torch.full((B, Sq, H, D), float("nan"), dtype=sdt)
    acc_lse = torch.full((B, H, Sq), float("-inf"))
    base = acc.clone(), acc_lse.clone()
    cuts = [0, Sk // 3, Sk // 3, Sk]
    for s, e in zip(cuts, cuts[1:]):
        mc = None if kv_mask is None else kv_mask[:, s:e]
        with cpu_isa(isa):
            ops.flash_attn_fwd_acc_(q, k[:, s:e], v[:, s:e], acc, acc_lse, None, False, mc, variant)
        part = same_dtype_math_path(q.float(), k[:, s:e].float(), v[:, s:e].float(), kv_mask=mc)
        base_out, base_lse = merge_math_path(*base, *part)
        base = base_out.to(sdt), base_lse
    check_attention(acc.to(dtype), acc_lse, q, k, v, kv_mask=kv_mask, base=(base[0].to(dtype), base[1]))


# --------------------------------------------------------------------------- no wide instruction outside
# The ISA copies' functions: their own namespaces, and at::vec's copy named after the ISA.
_COPY_NAMES = re.compile(r"cp_attention::cpu::(avx2|avx512|amx)::|at::vec::(AVX2|AVX512)::")
# Any use of a 256- or 512-bit register or an AVX-512 mask register.
_WIDE = re.compile(r"%[yz]mm\d+|%k[1-7]\b")


def _functions_using_wide_registers(lib: Path) -> tuple[list[str], list[str]]:
    """(functions outside the ISA copies that use wide registers, functions inside that do)."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], capture_output=True,
                          text=True, check=True).stdout
    outside, inside = set(), set()
    name = ""
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
        elif _WIDE.search(line):
            (inside if _COPY_NAMES.search(name) else outside).add(name)
    return sorted(outside), sorted(inside)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils) to read the library")
@pytest.mark.skipif(cp_attention.build_info()["cpu_isas"] == ["generic"],
                    reason="this build has only the generic copy: nothing wide to keep apart")
def test_only_the_isa_copies_use_wide_registers():
    # Everything outside the ISA copies runs before dispatch has looked at the CPU, or on any CPU; the
    # linker keeps one copy of each inline function the copies share with it, and it must be the baseline
    # one (setup.py links the copies last). An AVX or AVX-512 register anywhere else would be an illegal
    # instruction on an older x86-64 CPU.
    outside, inside = _functions_using_wide_registers(Path(_C.__file__))
    assert not outside, (f"{len(outside)} functions outside the ISA copies use AVX/AVX-512 registers: "
                         f"{outside[:10]}")
    assert any("::avx512::" in n for n in inside) and any("::avx2::" in n for n in inside), (
        "the ISA copies' own functions use wide registers; finding none means the check reads nothing")
