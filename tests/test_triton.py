"""The Triton kernels: a representative small-shape subset of the contract against the float64 reference, the
fused accumulate op (attend and merge in the epilogue), wiring, torch.compile, and compile-level checks for
the GPU architectures.

Where they run: on CUDA tensors when a GPU is present (the `gpu` marker), and on CPU tensors under Triton's
interpreter. Triton picks the interpreter when the kernels are first imported, from TRITON_INTERPRET, and a
test cannot switch it on for itself without leaking it into every other test of the run. So when this module
runs without TRITON_INTERPRET=1, its CPU cases are skipped and `test_interpreter_subprocess` runs them, with
the Triton cases of test_ops_contract.py (opcheck and friends) and test_merge.py, in a child pytest with
TRITON_INTERPRET=1. `TRITON_INTERPRET=1 pytest tests/test_triton.py` runs them directly; with
TRITON_INTERPRET=1 every suite that takes a `target` also runs the "cpu-triton" backend (slow: about 5 min
for test_flash_attn.py here). The interpreter has no bfloat16 dot; the kernels do bfloat16 dots in float32
there, so bfloat16 is only sampled on the CPU and fully covered on GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA, NO_CUDA, make_kv_mask, randn
from reference import assert_lse_float32_grade, attention_ref, check_attention, same_dtype_math_path
from test_flash_attn import _views
from torch._subclasses.fake_tensor import FakeTensorMode

import cp_attention
from cp_attention import triton_kernels
from cp_attention.distributed._step import attend_chunk, new_accumulator

OPS = torch.ops.cp_attention
INTERPRETING = triton_kernels.interpret_requested()
HAS_TRITON = triton_kernels.triton_importable()
NO_TRITON = "triton is not importable here"
IN_SUBPROCESS = "CPU cases run under TRITON_INTERPRET=1, in test_interpreter_subprocess"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NEG_INF = float("-inf")


def _device_params():
    cpu_skip = NO_TRITON if not HAS_TRITON else None if INTERPRETING else IN_SUBPROCESS
    cuda_skip = (NO_CUDA if not HAS_CUDA else NO_TRITON if not HAS_TRITON
                 else "the interpreter run covers the CPU only" if INTERPRETING else None)
    cpu_marks = [pytest.mark.skip(reason=cpu_skip)] if cpu_skip else []
    cuda_marks = [pytest.mark.gpu] + ([pytest.mark.skip(reason=cuda_skip)] if cuda_skip else [])
    return [pytest.param("cpu", id="cpu", marks=cpu_marks), pytest.param("cuda", id="cuda", marks=cuda_marks)]


DEVICES = _device_params()


def _inputs(B, Sq, Sk, H, Hkv, D, dtype, dev, seed, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, Sq, H, D, dtype=dtype, device=dev, gen=gen, scale=q_scale)
    k = randn(B, Sk, Hkv, D, dtype=dtype, device=dev, gen=gen)
    v = randn(B, Sk, Hkv, D, dtype=dtype, device=dev, gen=gen)
    return q, k, v, gen


def _kernel(dev) -> str:
    """Whose kernel, as reference.check_attention takes it: on the CPU, Triton's interpreter runs ours."""
    return "interpreted" if torch.device(dev).type == "cpu" else "ours"


def _attend(q, k, v, scale=None, causal=False, kv_mask=None):
    out, lse = cp_attention.flash_attn(q, k, v, scale=scale, causal=causal, kv_mask=kv_mask, return_lse=True,
                                       backend="triton")
    check_attention(out, lse, q, k, v, scale, causal, kv_mask, kernel=_kernel(q.device))
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# The forward kernel.
HEAD_DIM_CASES = [(D, F16) for D in (1, 16, 40, 64, 72, 128, 256)] + [(D, F32) for D in (1, 72, 256)]


@pytest.mark.parametrize("D,dtype", HEAD_DIM_CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in HEAD_DIM_CASES])
@pytest.mark.parametrize("dev", DEVICES)
def test_head_dims(dev, D, dtype):
    # Every padding case: D below the dot's minimum of 16, powers of two, and D padded to the next one.
    S = 9 if D == 256 else 37
    q, k, v, _ = _inputs(1, S, S + 16, 2, 1, D, dtype, dev, seed=D)
    _attend(q, k, v)


# (Sq, Sk): empty sides, one token, odd lengths that leave ragged query and key blocks, Sq > Sk (causal rows
# that see nothing) and Sq < Sk.
LENGTHS = [(0, 5), (5, 0), (1, 1), (37, 1), (1, 37), (33, 65), (65, 33), (48, 48)]


@pytest.mark.parametrize("causal,masked", [(False, True), (True, False), (True, True)],
                         ids=["mask", "causal", "causal-mask"])
@pytest.mark.parametrize("Sq,Sk", LENGTHS, ids=[f"{a}-{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("dev", DEVICES)
def test_lengths_causal_mask(dev, Sq, Sk, causal, masked):
    dtype = (F32, F16)[(Sq + Sk) % 2]
    B = 2
    q, k, v, gen = _inputs(B, Sq, Sk, 4, 2, 24, dtype, dev, seed=Sq * 100 + Sk)
    kv_mask = make_kv_mask(B, Sk, gen, dev) if masked else None  # batch 1 hides every key
    _attend(q, k, v, causal=causal, kv_mask=kv_mask)


@pytest.mark.parametrize("kind", ["head_slice", "seq_step", "bhsd", "dim_slice", "broadcast"])
@pytest.mark.parametrize("dev", DEVICES)
def test_strided_gqa_inputs(dev, kind):
    gen = torch.Generator().manual_seed(6)
    q, k, v = _views(kind, 2, 21, 34, 6, 2, 48, F16, dev, gen)
    kv_mask = make_kv_mask(2, 2 * 34, gen, dev)[:, ::2]  # a strided mask too
    _attend(q, k, v, causal=True, kv_mask=kv_mask)


@pytest.mark.parametrize("dev", DEVICES)
def test_head_dim_one_with_any_last_stride(dev):
    gen = torch.Generator().manual_seed(7)
    q = randn(2, 9, 2, 4, gen=gen, device=dev)[..., 1::3]
    k = randn(2, 11, 2, 4, gen=gen, device=dev)[..., 2::3]
    v = randn(2, 11, 2, 1, gen=gen, device=dev)
    _attend(q, k, v, causal=True)


@pytest.mark.parametrize("scale", [0.05, 2.5, -0.7, 0.0])
@pytest.mark.parametrize("dev", DEVICES)
def test_scale(dev, scale):
    # A negative scale takes the launcher's sign flip; 0 makes every score equal.
    q, k, v, gen = _inputs(1, 23, 29, 2, 2, 40, F32, dev, seed=5)
    _attend(q, k, v, scale=scale, causal=True, kv_mask=make_kv_mask(1, 29, gen, dev))


@pytest.mark.parametrize("dev", DEVICES)
def test_large_magnitude_half_inputs(dev):
    # Scores far from 0 (|lse| > 20): the max subtraction and a float32 LSE matter.
    q, k, v, gen = _inputs(2, 45, 70, 4, 2, 64, F16, dev, seed=4, q_scale=30.0)
    kv_mask = make_kv_mask(2, 70, gen, dev)
    _, lse = _attend(q, k, v, causal=True, kv_mask=kv_mask)
    ref_lse = attention_ref(q, k, v, causal=True, kv_mask=kv_mask)[1]
    assert ref_lse[torch.isfinite(ref_lse)].abs().max() > 20
    assert_lse_float32_grade(lse, ref_lse, same_dtype_math_path(q, k, v, causal=True, kv_mask=kv_mask)[1])


@pytest.mark.parametrize("dev", DEVICES)
def test_bfloat16_sample(dev):
    q, k, v, gen = _inputs(2, 30, 41, 4, 2, 72, BF16, dev, seed=12)
    _attend(q, k, v, causal=True, kv_mask=make_kv_mask(2, 41, gen, dev))


# ---------------------------------------------------------------------------------------------------------
# The fused accumulate op.
def _bounds(Sk: int, gen: torch.Generator, n: int = 4) -> list[int]:
    """n chunks covering [0, Sk) at random cuts, the second one empty."""
    cuts = sorted(torch.randint(0, Sk + 1, (n - 1,), generator=gen).tolist())
    cuts[1] = cuts[0]
    return [0, *cuts, Sk]


def _poisoned_state(q, dtype):
    """The empty state (lse -inf) with out full of NaN: the op must never read those rows."""
    B, Sq, H, D = q.shape
    out = torch.full((B, Sq, H, D), float("nan"), dtype=dtype, device=q.device)
    return out, torch.full((B, H, Sq), NEG_INF, device=q.device)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("dev", DEVICES)
def test_acc_chunks_equal_whole(dev, dtype, causal, masked):
    # The ring invariant through the fused op: chunk by chunk (one chunk empty), in a shuffled order, into a
    # float32 accumulator, equals attention over the whole. attend_chunk cuts causal chunks into row slices,
    # so the op also writes through strided views of the accumulator.
    B, Sq, Sk, H, Hkv, D = 2, 37, 61, 4, 2, 40
    seed = 10 + causal * 2 + masked
    q, k, v, gen = _inputs(B, Sq, Sk, H, Hkv, D, dtype, dev, seed)
    kv_mask = make_kv_mask(B, Sk, gen, dev) if masked else None
    bounds = _bounds(Sk, gen)
    chunks = list(zip(bounds, bounds[1:]))
    order = torch.randperm(len(chunks), generator=gen).tolist()
    acc, acc_lse = new_accumulator(q)
    acc.fill_(float("nan"))  # rows with lse -inf are never read
    for i in order:
        s, e = chunks[i]
        attend_chunk(q, k[:, s:e], v[:, s:e], acc, acc_lse, causal_offset=(Sk - Sq - s) if causal else None,
                     kv_mask_chunk=None if kv_mask is None else kv_mask[:, s:e], backend="triton")
    check_attention(acc.to(dtype), acc_lse, q, k, v, causal=causal, kv_mask=kv_mask, kernel=_kernel(dev))


@pytest.mark.parametrize("dev", DEVICES)
def test_acc_into_q_dtype_state(dev):
    # out in q's dtype (float16) rather than float32, starting from a NaN-poisoned empty state; non-causal
    # chunks with a key mask that hides everything from batch 1.
    q, k, v, gen = _inputs(2, 29, 50, 4, 1, 64, F16, dev, seed=21)
    kv_mask = make_kv_mask(2, 50, gen, dev)
    out, lse = _poisoned_state(q, F16)
    bounds = _bounds(50, gen)
    for s, e in zip(bounds, bounds[1:]):
        OPS.triton_flash_attn_fwd_acc_(q, k[:, s:e], v[:, s:e], out, lse, None, False, kv_mask[:, s:e])
    check_attention(out, lse, q, k, v, kv_mask=kv_mask, kernel=_kernel(dev))


@pytest.mark.parametrize("dev", DEVICES)
def test_acc_merge_cases_exact(dev):
    # Row by row: (state alive, chunk sees nothing) passes the state through bit for bit; (state dead with
    # NaN out, chunk sees keys) gives the chunk's own result; (both empty) gives out 0, lse -inf.
    B, Sq, Sk, H, D = 2, 12, 20, 2, 32
    q, k, v, gen = _inputs(B, Sq, Sk, H, H, D, F32, dev, seed=22)
    kv_mask = torch.ones(B, Sk, dtype=torch.bool, device=dev)
    kv_mask[1] = False  # batch 1: the chunk sees nothing
    out = randn(B, Sq, H, D, device=dev, gen=gen)
    lse = (torch.randn(B, H, Sq, generator=gen) * 3).to(dev)
    dead = torch.zeros(B, H, Sq, dtype=torch.bool)
    dead[:, :, ::2] = True  # even rows: the state is empty
    lse = lse.masked_fill(dead.to(dev), NEG_INF)
    out = out.masked_fill(dead.transpose(1, 2)[..., None].to(dev), float("nan"))
    out0, lse0 = out.clone(), lse.clone()
    OPS.triton_flash_attn_fwd_acc_(q, k, v, out, lse, None, False, kv_mask)
    fresh_out, fresh_lse = OPS.triton_flash_attn_fwd(q, k, v, None, False, kv_mask)

    dead = dead.to(dev)
    rows = lambda o, b: o[b].transpose(0, 1)  # out of batch b as [H, Sq, D], indexable by a [H, Sq] mask
    alive_b1 = ~dead[1]
    assert torch.equal(lse[1][alive_b1], lse0[1][alive_b1]), "an alive state must pass through exactly"
    assert torch.equal(rows(out, 1)[alive_b1], rows(out0, 1)[alive_b1]), "... out too"
    assert torch.isneginf(lse[1][dead[1]]).all() and (rows(out, 1)[dead[1]] == 0).all()
    torch.testing.assert_close(lse[0][dead[0]], fresh_lse[0][dead[0]], rtol=0, atol=0)
    torch.testing.assert_close(rows(out, 0)[dead[0]], rows(fresh_out, 0)[dead[0]], rtol=1e-6, atol=1e-6)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("dev", DEVICES)
def test_acc_writes_only_its_view(dev):
    # The state is a row slice of a larger accumulator laid out BHSD (lse [B, S, H]): the sentinels around
    # it stay.
    B, Sq, Sk, H, D = 1, 10, 17, 3, 16
    q, k, v, _ = _inputs(B, Sq, Sk, H, H, D, F32, dev, seed=23)
    sentinel = 7.25
    big_out = torch.full((B, H, Sq + 6, D), sentinel, device=dev)
    big_lse = torch.full((B, Sq + 6, H), sentinel, device=dev)
    out = big_out.transpose(1, 2)[:, 3:3 + Sq]
    lse = big_lse.transpose(1, 2)[:, :, 3:3 + Sq]
    out.zero_()
    lse.fill_(NEG_INF)
    OPS.triton_flash_attn_fwd_acc_(q, k, v, out, lse, None, True, None)
    check_attention(out.contiguous(), lse, q, k, v, causal=True, kernel=_kernel(dev))
    assert (big_out[:, :, :3] == sentinel).all() and (big_out[:, :, 3 + Sq:] == sentinel).all()
    assert (big_lse[:, :3] == sentinel).all() and (big_lse[:, 3 + Sq:] == sentinel).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_acc_rejects_bad_state(dev):
    q, k, v, _ = _inputs(1, 4, 5, 2, 2, 8, F16, dev, seed=24)
    out, lse = new_accumulator(q)
    with pytest.raises(ValueError, match=r"\bout\b.*q's dtype.*or float32"):
        OPS.triton_flash_attn_fwd_acc_(q, k, v, out.to(BF16), lse, None, False, None)
    with pytest.raises(ValueError, match=r"\bout\b.*shape"):
        OPS.triton_flash_attn_fwd_acc_(q, k, v, out[:, :3], lse[:, :, :3], None, False, None)
    with pytest.raises(ValueError, match=r"\blse\b.*float32"):
        OPS.triton_flash_attn_fwd_acc_(q, k, v, out, lse.double(), None, False, None)


# ---------------------------------------------------------------------------------------------------------
# The TMA variant (loads and stores through tensor descriptors), called through the launcher with tma=True:
# the autotuner only offers it on sm_90+ GPUs, and small problems never reach the autotuner.
def _tma_dev(dev):
    if dev == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs an sm_90+ GPU")
    from cp_attention.triton_kernels import flash_fwd
    return flash_fwd


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors, so outputs the kernel fails to write show."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


# (B, Sq, Sk, H, Hkv, D, causal, masked): ragged query and key blocks, D below 16, between powers of two and
# 256, GQA, Sq > Sk with causal rows that see nothing, an all-masked batch.
TMA_CASES = [(2, 37, 53, 4, 2, 64, False, True), (1, 40, 33, 2, 1, 72, True, False),
             (2, 33, 33, 2, 2, 128, True, True), (1, 9, 25, 2, 1, 256, False, False),
             (1, 20, 5, 2, 1, 8, True, False)]


@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,causal,masked", TMA_CASES,
                         ids=[f"D{c[5]}-{c[1]}x{c[2]}{'-causal' if c[6] else ''}{'-mask' if c[7] else ''}"
                              for c in TMA_CASES])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("dev", DEVICES)
def test_tma_variant(dev, dtype, B, Sq, Sk, H, Hkv, D, causal, masked, poisoned_empty):
    if dev == "cpu" and dtype == BF16 and D != 64:
        pytest.skip("the interpreter samples bfloat16 once (its dots run in float32)")
    kernels = _tma_dev(dev)
    q, k, v, gen = _inputs(B, Sq, Sk, H, Hkv, D, dtype, dev, seed=D + Sq)
    kv_mask = make_kv_mask(B, Sk, gen, dev) if masked else None
    out, lse = kernels.flash_fwd(q, k, v, None, causal, kv_mask, tma=True)
    check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask, kernel=_kernel(dev))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dev", DEVICES)
def test_tma_acc_chunks_equal_whole(dev, masked):
    # The fused op's TMA path (out through pointers, K/V chunks through descriptors), chunk by chunk into a
    # NaN-poisoned float32 state, one chunk empty (it takes the pointer path: no descriptor of an empty K).
    kernels = _tma_dev(dev)
    B, Sq, Sk, H, Hkv, D = 2, 37, 61, 4, 2, 40
    q, k, v, gen = _inputs(B, Sq, Sk, H, Hkv, D, F16, dev, seed=31 + masked)
    kv_mask = make_kv_mask(B, Sk, gen, dev) if masked else None
    out, lse = _poisoned_state(q, F32)
    bounds = _bounds(Sk, gen)
    for s, e in zip(bounds, bounds[1:]):
        chunk_mask = None if kv_mask is None else kv_mask[:, s:e]
        kernels.flash_fwd(q, k[:, s:e], v[:, s:e], None, False, chunk_mask, out=out, lse=lse,
                          tma=e > s or None)
    check_attention(out.to(F16), lse, q, k, v, kv_mask=kv_mask, kernel=_kernel(dev))


@pytest.mark.parametrize("kind", ["head_slice", "seq_step"])
@pytest.mark.parametrize("dev", DEVICES)
def test_tma_strided_views(dev, kind, poisoned_empty):
    # Views the TMA path takes: BSHD order, strides multiples of 16 bytes, aligned bases.
    kernels = _tma_dev(dev)
    gen = torch.Generator().manual_seed(33)
    q, k, v = _views(kind, 2, 21, 34, 6, 2, 48, F16, dev, gen)
    out, lse = kernels.flash_fwd(q, k, v, None, True, None, tma=True)
    check_attention(out, lse, q, k, v, causal=True, kernel=_kernel(dev))


@pytest.mark.parametrize("dev", DEVICES)
def test_tma_refuses_what_it_cannot_address(dev):
    # Unaligned bases, broadcast (stride 0) and permuted (BHSD memory) views, 2-byte head strides and
    # float32 take the pointer path when the launcher chooses, and raise when TMA is demanded.
    kernels = _tma_dev(dev)
    gen = torch.Generator().manual_seed(34)
    unfit = {"dim_slice": _views("dim_slice", 1, 9, 12, 2, 1, 48, F16, dev, gen),
             "bhsd": _views("bhsd", 1, 9, 12, 2, 1, 48, F16, dev, gen),
             "broadcast": _views("broadcast", 2, 9, 12, 2, 1, 48, F16, dev, gen),
             "D=1": _inputs(1, 9, 12, 2, 1, 1, F16, dev, seed=34)[:3],
             "float32": _inputs(1, 9, 12, 2, 1, 64, F32, dev, seed=34)[:3]}
    for q, k, v in unfit.values():
        with pytest.raises(ValueError, match="TMA variant needs"):
            kernels.flash_fwd(q, k, v, None, False, None, tma=True)
        out, lse = kernels.flash_fwd(q, k, v, None, False, None)
        check_attention(out, lse, q, k, v, kernel=_kernel(dev))


# ---------------------------------------------------------------------------------------------------------
# The ops' `variant` argument picks the load path; a launch spy records which path each launch took.
class _LaunchSpy:
    """Stands in for the kernel object: records the TMA flag of every launch, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.tma = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.tma.append(kwargs["TMA"])
            return launch(*args, **kwargs)
        return call


@pytest.fixture
def launch_spy(monkeypatch):
    from cp_attention.triton_kernels import flash_fwd
    spy = _LaunchSpy(flash_fwd._flash_fwd_kernel)
    monkeypatch.setattr(flash_fwd, "_flash_fwd_kernel", spy)
    return spy


# (variant argument, TMA launched): small problems run untuned, on pointer tiles, unless TMA is named.
VARIANT_CASES = [(None, False), ("default", False), ("pointer", False), ("auto", False), ("tma", True)]


@pytest.mark.parametrize("variant,tma", VARIANT_CASES, ids=["omitted", "default", "pointer", "auto", "tma"])
@pytest.mark.parametrize("dev", DEVICES)
def test_fwd_variant_argument(dev, variant, tma, monkeypatch, launch_spy, poisoned_empty):
    # Both ops follow the argument; the environment variable that once chose per call is not read.
    if tma:
        _tma_dev(dev)
    monkeypatch.setenv("CP_ATTENTION_TRITON_FWD_LOADS", "pointer" if tma else "tma")
    named = {} if variant is None else {"variant": variant}
    q, k, v, gen = _inputs(2, 37, 53, 4, 2, 64, F16, dev, seed=41)
    kv_mask = make_kv_mask(2, 53, gen, dev)
    out, lse = OPS.triton_flash_attn_fwd(q, k, v, None, True, kv_mask, **named)
    check_attention(out, lse, q, k, v, causal=True, kv_mask=kv_mask, kernel=_kernel(dev))
    acc, acc_lse = _poisoned_state(q, F32)
    OPS.triton_flash_attn_fwd_acc_(q, k, v, acc, acc_lse, None, True, kv_mask, **named)
    check_attention(acc.to(F16), acc_lse, q, k, v, causal=True, kv_mask=kv_mask, kernel=_kernel(dev))
    assert launch_spy.tma == [tma, tma], f"variant={variant!r} launched TMA={launch_spy.tma}"


@pytest.mark.parametrize("dev", DEVICES)
def test_fwd_variant_argument_errors(dev):
    # Unknown names raise, naming the argument and its values (the fake kernels too); "tma" demands TMA, so
    # inputs it cannot address (float32) raise instead of quietly taking pointer tiles.
    q, k, v, _ = _inputs(1, 5, 7, 2, 2, 16, F16, dev, seed=43)
    args = (q, k, v, *_poisoned_state(q, F32))
    calls = (lambda q, k, v, o, lse, variant: OPS.triton_flash_attn_fwd(q, k, v, None, False, None, variant),
             lambda *a, variant: OPS.triton_flash_attn_fwd_acc_(*a, None, False, None, variant))
    allowed = "default, pointer, tma or auto"
    for call in calls:
        for bad in ("TMA", "pointers", "mma"):
            with pytest.raises(ValueError, match=f"variant must be {allowed}, got '{bad}'"):
                call(*args, variant=bad)
            with FakeTensorMode() as mode, pytest.raises(ValueError, match="variant must be"):
                call(*(mode.from_tensor(t) for t in args), variant=bad)
    with pytest.raises(ValueError, match="TMA variant needs"):
        OPS.triton_flash_attn_fwd(q.float(), k.float(), v.float(), None, False, None, variant="tma")


# ---------------------------------------------------------------------------------------------------------
# Wiring and torch.compile.
def test_available_backends():
    cpu = cp_attention.available_backends("cpu")
    assert ("triton" in cpu) == (INTERPRETING and HAS_TRITON), cpu
    assert cpu[0] == "cpu", "the Triton backend must not change what 'auto' picks"
    cuda = cp_attention.available_backends("cuda")
    assert ("triton" in cuda) == HAS_TRITON and cuda[0] != "triton", cuda


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_tuned_configs_keep_every_tuning(monkeypatch):
    # The autotuner keeps only its latest trials; the launcher's record keeps each key's, for the reports.
    from types import SimpleNamespace

    import triton

    from cp_attention.triton_kernels import flash_fwd
    monkeypatch.setattr(flash_fwd, "_TUNERS", {})
    monkeypatch.setattr(flash_fwd, "_TRIALS", {})
    a, b = triton.Config({"BLOCK_M": 128, "TMA": True}), triton.Config({"BLOCK_M": 64, "TMA": False})
    tuner = SimpleNamespace(cache={("k1",): a}, configs_timings={a: [0.5, 0.4, 0.6], b: [0.7, 0.6, 0.8]})
    flash_fwd._TUNERS[(9, 0)] = tuner
    flash_fwd._record_trials((9, 0), tuner)
    tuner.cache[("k2",)] = b
    tuner.configs_timings = {b: [0.25, 0.2, 0.3]}
    flash_fwd._record_trials((9, 0), tuner)
    got = flash_fwd.tuned_configs()
    assert got["sm_90 ('k1',)"] == {"chosen": str(a), "trials_ms": {str(a): 0.5, str(b): 0.7}}
    assert got["sm_90 ('k2',)"] == {"chosen": str(b), "trials_ms": {str(b): 0.25}}


def test_length_bucket_separates_sizes():
    # The autotuning key's size class: the benchmark's D-128 shapes (B * H * Sq = 2**18 each, with 1k, 4k and
    # 16k keys per row) must be tuned apart, and lengths between powers of two join the class above them.
    from cp_attention.triton_kernels.configs import length_bucket
    rows = 1 << 18
    assert len({length_bucket(rows, s) for s in (1024, 4096, 16384)}) == 3
    assert length_bucket(rows, 3000) == length_bucket(rows, 4096) != length_bucket(rows, 2048)
    assert length_bucket(rows, 5) == length_bucket(rows, 1024)
    assert length_bucket(rows, 1 << 20) == length_bucket(rows, 1 << 14)
    assert length_bucket(1 << 15, 4096) != length_bucket(1 << 16, 4096)
    assert length_bucket(1, 4096) == length_bucket(1 << 14, 4096)
    assert length_bucket(1 << 30, 4096) == length_bucket(1 << 20, 4096)
    # 7 row classes x 5 key classes, each its own value
    assert len({length_bucket(1 << r, 1 << k) for r in range(8, 26) for k in range(4, 20)}) == 7 * 5


@pytest.mark.skipif(INTERPRETING, reason="checks the CPU without the interpreter")
def test_triton_backend_refuses_cpu_without_interpreter():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="triton.*TRITON_INTERPRET"):
        cp_attention.flash_attn(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="triton"):
        cp_attention.merge_attn_states(q, torch.zeros(1, 2, 3), q, torch.zeros(1, 2, 3), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        cp_attention.merge_attn_states(q, torch.zeros(1, 2, 3), q, torch.zeros(1, 2, 3), backend="nope")


def _ring_step(q, k, v, kv_mask, split):
    o1, l1 = cp_attention.flash_attn(q, k[:, :split], v[:, :split], causal=True, kv_mask=kv_mask[:, :split],
                                     return_lse=True, backend="triton")
    o2, l2 = OPS.triton_flash_attn_fwd(q, k[:, split:], v[:, split:], None, False, kv_mask[:, split:])
    out, lse = OPS.triton_merge_attn_states(o1, l1, o2, l2)
    acc, acc_lse = o1.float(), l1.clone()
    cp_attention.merge_attn_states_(acc, acc_lse, o2, l2, backend="triton")
    OPS.triton_flash_attn_fwd_acc_(q, k[:, split:], v[:, split:], acc, acc_lse, None, False,
                                   kv_mask[:, split:])
    return out, lse, acc * 2.0, acc_lse


@pytest.mark.parametrize("dev", DEVICES)
def test_compile_fullgraph_aot_eager(dev):
    torch._dynamo.reset()
    q, k, v, gen = _inputs(2, 13, 29, 4, 2, 32, F16, dev, seed=25)
    mask = make_kv_mask(2, 29, gen, dev)
    compiled = torch.compile(_ring_step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(q, k, v, mask, 11), _ring_step(q, k, v, mask, 11)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# GPU compilation without a GPU (triton ships ptxas): GPU-only compile errors, shared memory, spills.
@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs triton's compiler (not the interpreter)")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    from cp_attention.triton_kernels import aot, configs

    limit = {80: 166912, 90: 232448}[arch]  # the largest shared memory a block may opt into
    for dtype, head_dim, extra in (("bf16", 128, {}), ("fp16", 72, dict(has_mask=True, accumulate=True)),
                                   ("fp32", 40, dict(causal=False))):
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        config = configs.fwd_candidates((arch // 10, 0), dtype == "fp32", block_d)[0]
        kernel = aot.compile_fwd(arch, dtype, block_d, config, even_d=block_d == head_dim, **extra)
        assert kernel.metadata.shared <= limit, (dtype, head_dim, config, kernel.metadata.shared)
        assert "STACK:0" in aot.resource_usage(kernel), (dtype, head_dim, config, aot.resource_usage(kernel))
    merge = aot.compile_merge(arch, "bf16", 128, 32)
    assert "STACK:0" in aot.resource_usage(merge)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs triton's compiler (not the interpreter)")
def test_tma_tiles_compile_to_tma_for_sm90():
    # The first two TMA tiles of the Hopper list at D 128, plain and accumulating (with causal and a mask):
    # they fit shared memory and load through the copy engine (cp.async.bulk.tensor), not through per-thread
    # cp.async; the first spills nothing (the 128 x 128 one spills 8 bytes when accumulating).
    from cp_attention.triton_kernels import aot, configs

    tiles = [c for c in configs.fwd_candidates((9, 0), False, 128) if c.tma]
    assert len(tiles) >= 2
    for i, config in enumerate(tiles[:2]):
        for accumulate in (False, True):
            kernel = aot.compile_fwd(90, "bf16", 128, config, causal=True, has_mask=accumulate,
                                     accumulate=accumulate)
            ptx = kernel.asm["ptx"]
            assert kernel.metadata.shared <= 232448, (config, kernel.metadata.shared)
            assert "cp.async.bulk.tensor" in ptx and "cp.async.cg" not in ptx, config
            if i == 0:
                assert "STACK:0" in aot.resource_usage(kernel), (config, accumulate,
                                                                 aot.resource_usage(kernel))


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_interpreter_subprocess():
    """Runs the CPU cases of this module, and the Triton cases of test_ops_contract.py (opcheck, fake and
    meta kernels, autograd refusal) and test_merge.py, under TRITON_INTERPRET=1 in a child pytest."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f) for f in ("test_triton.py", "test_ops_contract.py", "test_merge.py")]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           "-m", "not gpu", "-k", "triton", *files]
    res = subprocess.run(cmd, cwd=os.path.dirname(here), env=env, capture_output=True, text=True,
                         timeout=1500)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"interpreter run failed (rc {res.returncode}):\n{tail}"
    assert " passed" in tail and "no tests ran" not in tail, tail
