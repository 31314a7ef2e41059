"""cp_attention.flash_attn against the float64 reference, on every backend (conftest's `target`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_kind, make_kv_mask, randn, skip_unsupported, unsupported_reason
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import (
    assert_lse_float32_grade,
    attention_ref,
    check_attention,
    lse_allowance,
    same_dtype_math_path,
    visible_keys,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import cp_attention
from cp_attention import triton_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every D from 1 to 256 must work: the DiT sizes (64, 72, 128), the edges, and odd sizes that no kernel
# tile divides.
HEAD_DIMS = [1, 3, 16, 33, 40, 64, 72, 80, 96, 128, 160, 255, 256]
# (Sq, Sk): empty sides, single tokens, odd lengths that are not multiples of any block size, Sq > Sk
# (causal rows that see nothing) and Sq < Sk, up to 300.
SEQ_PAIRS = [(0, 0), (0, 5), (5, 0), (1, 1), (1, 37), (37, 1), (7, 7), (33, 65), (65, 33), (64, 64),
             (127, 129), (150, 31), (31, 300), (300, 300)]
# (H, Hkv, B): MHA, MQA and GQA groups of 2, 3, 4, with batches of 1 to 3.
HEADS = [(1, 1, 2), (3, 3, 1), (4, 1, 3), (6, 3, 2), (8, 2, 1), (8, 8, 3), (6, 2, 2)]


def _inputs(B, Sq, Sk, H, Hkv, D, dtype, device, seed, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, Sq, H, D, dtype=dtype, device=device, gen=gen, scale=q_scale)
    k = randn(B, Sk, Hkv, D, dtype=dtype, device=device, gen=gen)
    v = randn(B, Sk, Hkv, D, dtype=dtype, device=device, gen=gen)
    return q, k, v, gen


def _run_and_check(target, q, k, v, scale=None, causal=False, kv_mask=None):
    skip_unsupported(target, q, k.shape[1], causal, kv_mask is not None)
    out, lse = cp_attention.flash_attn(q, k, v, scale=scale, causal=causal, kv_mask=kv_mask,
                                       return_lse=True, backend=target.backend)
    check_attention(out, lse, q, k, v, scale, causal, kv_mask, kernel=kernel_kind(target))
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(target, D, dtype):
    torch.manual_seed(0)
    q, k, v, _ = _inputs(1, 37, 53, 2, 2, D, dtype, target.device, seed=D)
    _run_and_check(target, q, k, v)


def _length_cases():
    # float32 for every pair; one half dtype per pair (alternating) keeps the count down.
    for n, (Sq, Sk) in enumerate(SEQ_PAIRS):
        for dtype in (torch.float32, (torch.float16, torch.bfloat16)[n % 2]):
            yield pytest.param(Sq, Sk, dtype, id=f"{Sq}-{Sk}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Sq,Sk,dtype", list(_length_cases()))
def test_lengths_causal_mask(target, Sq, Sk, dtype, causal, masked):
    torch.manual_seed(1)
    B = 2
    q, k, v, gen = _inputs(B, Sq, Sk, 2, 1, 32, dtype, target.device, seed=Sq * 1000 + Sk)
    kv_mask = make_kv_mask(B, Sk, gen, target.device) if masked else None
    _run_and_check(target, q, k, v, causal=causal, kv_mask=kv_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Hkv,B", HEADS)
def test_heads_and_batches(target, H, Hkv, B, dtype):
    torch.manual_seed(2)
    q, k, v, gen = _inputs(B, 19, 41, H, Hkv, 64, dtype, target.device, seed=H * 100 + Hkv * 10 + B)
    _run_and_check(target, q, k, v, causal=True, kv_mask=make_kv_mask(B, 41, gen, target.device))


@pytest.mark.parametrize("H,Hkv", [(4, 1), (6, 3), (8, 2), (6, 2)])
def test_gqa_head_mapping(target, H, Hkv):
    # Each k/v head holds a constant value equal to its index, and q . k is 0 everywhere, so out[..., h, :]
    # is the index of the k/v head that query head h read: it must be h // (H // Hkv).
    torch.manual_seed(3)
    B, Sq, Sk, D = 2, 5, 7, 16
    q = torch.zeros(B, Sq, H, D, device=target.device)
    k = torch.zeros(B, Sk, Hkv, D, device=target.device)
    heads = torch.arange(Hkv, dtype=torch.float32, device=target.device)
    v = heads[None, None, :, None].expand(B, Sk, Hkv, D)
    skip_unsupported(target, q, Sk, False, False)
    out = cp_attention.flash_attn(q, k, v.contiguous(), backend=target.backend)
    read = out[0, 0, :, 0].cpu()
    expected = (torch.arange(H) // (H // Hkv)).float()
    assert torch.allclose(read, expected, atol=1e-3), (
        f"query heads read k/v heads {read.tolist()}, expected {expected.tolist()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [16, 64, 128, 256])
def test_large_magnitude_inputs(target, D, causal, dtype):
    # |q| ~ 30 drives scores (and so the LSE) far from 0, where an LSE kept in low precision or a softmax
    # without max subtraction falls apart. Only q is scaled so the half-precision math path stays finite.
    torch.manual_seed(4)
    q, k, v, gen = _inputs(2, 45, 70, 4, 2, D, dtype, target.device, seed=D, q_scale=30.0)
    _, ref_lse = attention_ref(q, k, v, causal=causal)
    assert ref_lse[torch.isfinite(ref_lse)].abs().max() > 20, "the inputs must push the LSE far from 0"
    _run_and_check(target, q, k, v, causal=causal, kv_mask=make_kv_mask(2, 70, gen, target.device))


@pytest.mark.parametrize("q_scale", [1.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_give_float32_lse(target, dtype, q_scale):
    # The LSE is a float32 output even for half inputs: an LSE rounded to (or accumulated in) the input
    # dtype would pass a rule at the input dtype's grade but skews every merge weight exp(lse_a - lse).
    # Its check, the float32-grade rule, against a hand-rounded LSE first: the check itself must bite.
    torch.manual_seed(11)
    q, k, v, gen = _inputs(2, 57, 66, 4, 2, 72, dtype, target.device, seed=11, q_scale=q_scale)
    kv_mask = make_kv_mask(2, 66, gen, target.device)
    skip_unsupported(target, q, 66, True, True)
    _, lse = cp_attention.flash_attn(q, k, v, causal=True, kv_mask=kv_mask, return_lse=True,
                                     backend=target.backend)
    ref_lse = attention_ref(q, k, v, causal=True, kv_mask=kv_mask)[1]
    base_lse = same_dtype_math_path(q, k, v, causal=True, kv_mask=kv_mask)[1]
    allowance = lse_allowance(kernel_kind(target), dtype)
    with pytest.raises(AssertionError, match="lse"):
        assert_lse_float32_grade(ref_lse.to(dtype).float(), ref_lse, base_lse, allowance)
    assert_lse_float32_grade(lse, ref_lse, base_lse, allowance)


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 2.5])
def test_scale(target, scale):
    torch.manual_seed(5)
    q, k, v, _ = _inputs(1, 23, 29, 2, 2, 40, torch.float32, target.device, seed=5)
    out, lse = _run_and_check(target, q, k, v, scale=scale)
    if scale is None:  # the default is 1/sqrt(D), not some other constant
        out_d, lse_d = cp_attention.flash_attn(q, k, v, scale=1 / math.sqrt(40), return_lse=True,
                                               backend=target.backend)
        torch.testing.assert_close(out, out_d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, lse_d, rtol=1e-6, atol=1e-6)


def _views(kind, B, Sq, Sk, H, Hkv, D, dtype, device, gen):
    """q, k, v with stride(-1) == 1 but other strides unusual; values drawn like _inputs."""
    def make(S, heads):
        if kind == "head_slice":  # a slice of a tensor with more heads
            return randn(B, S, heads + 3, D, dtype=dtype, device=device, gen=gen)[:, :, 1:heads + 1]
        if kind == "seq_step":  # every other token of a longer sequence
            return randn(B, 2 * S, heads, D, dtype=dtype, device=device, gen=gen)[:, ::2]
        if kind == "bhsd":  # a BHSD tensor seen as BSHD
            return randn(B, heads, S, D, dtype=dtype, device=device, gen=gen).transpose(1, 2)
        if kind == "dim_slice":  # rows padded past D (a packed qkv-style buffer)
            return randn(B, S, heads, D + 8, dtype=dtype, device=device, gen=gen)[..., 4:4 + D]
        if kind == "broadcast":  # stride 0 along batch and (for k/v) along heads
            x = randn(1, S, 1, D, dtype=dtype, device=device, gen=gen)
            return x.expand(B, S, heads, D)
        raise AssertionError(kind)
    return make(Sq, H), make(Sk, Hkv), make(Sk, Hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["head_slice", "seq_step", "bhsd", "dim_slice", "broadcast"])
def test_strided_inputs(target, kind, dtype):
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    B, Sq, Sk, H, Hkv, D = 2, 21, 34, 4, 2, 48
    q, k, v = _views(kind, B, Sq, Sk, H, Hkv, D, dtype, target.device, gen)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    # A strided mask (every other column of a wider one) goes with it.
    kv_mask = make_kv_mask(B, 2 * Sk, gen, target.device)[:, ::2]
    _run_and_check(target, q, k, v, causal=True, kv_mask=kv_mask)


def test_head_dim_one_with_any_last_stride(target):
    # With D == 1 the last stride carries no layout information, so the contract does not constrain it.
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    q = randn(2, 9, 2, 4, gen=gen, device=target.device)[..., 1::3]
    k = randn(2, 11, 2, 4, gen=gen, device=target.device)[..., 2::3]
    v = randn(2, 11, 2, 1, gen=gen, device=target.device)
    assert q.shape[-1] == 1 and q.stride(-1) == 3 and k.stride(-1) == 3
    _run_and_check(target, q, k, v, causal=True)


def test_outputs_fresh_and_inputs_untouched(target):
    torch.manual_seed(8)
    q, k, v, gen = _inputs(2, 17, 17, 2, 2, 32, torch.float32, target.device, seed=8)
    kv_mask = make_kv_mask(2, 17, gen, target.device)
    before = [t.clone() for t in (q, k, v, kv_mask)]
    skip_unsupported(target, q, 17, True, True)
    out = cp_attention.flash_attn(q, k, v, causal=True, kv_mask=kv_mask, backend=target.backend)
    assert isinstance(out, torch.Tensor), "return_lse=False must return the out tensor alone"
    out2, lse = cp_attention.flash_attn(q, k, v, causal=True, kv_mask=kv_mask, return_lse=True,
                                        backend=target.backend)
    for t, b in zip((q, k, v, kv_mask), before):
        assert torch.equal(t, b), "flash_attn must not modify its inputs"
    assert out.data_ptr() not in {t.data_ptr() for t in (q, k, v, out2, lse)}
    torch.testing.assert_close(out, out2)


def test_available_backends_cpu():
    names = cp_attention.available_backends("cpu")
    # Triton joins, last, only under its interpreter (TRITON_INTERPRET=1): a test vehicle, never "auto".
    triton = ["triton"] if triton_kernels.available_on("cpu") else []
    assert names == ["cpu", "aten", "aten_cpu_flash", *triton], names
    assert cp_attention.available_backends(torch.device("cpu")) == names
    names.append("mutated by the caller")  # the answer is looked up once; callers get copies
    assert cp_attention.available_backends("cpu") == names[:-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_runs_the_backend_auto_backend_names(target, dtype):
    q, k, v, _ = _inputs(1, 13, 26, 2, 1, 64, dtype, target.device, seed=9)
    chosen = cp_attention.auto_backend(target.device, dtype)
    assert chosen in cp_attention.available_backends(target.device)
    got = cp_attention.flash_attn(q, k, v, causal=True, return_lse=True)
    want = cp_attention.flash_attn(q, k, v, causal=True, return_lse=True, backend=chosen)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
def test_cpu_auto_is_the_faster_of_ours_and_torchs(train):
    # On the CPU "auto" times our kernel against torch's on a probe, once per dtype and mode, and keeps
    # ours unless torch's is faster by the margin: the record must show both timings and that choice.
    for dtype in (torch.float16, torch.bfloat16):  # torch's half-precision LSE is outside the bound
        assert cp_attention.auto_backend("cpu", dtype, train) == "cpu"
    for dtype in (torch.float32,):
        chosen = cp_attention.auto_backend("cpu", dtype, train)
        record = cp_attention.cpu_auto_choices()[(str(dtype).removeprefix("torch."), train)]
        assert set(record["probe_ms"]) == {"cpu", "aten"}
        assert all(ms > 0 for ms in record["probe_ms"].values())
        ms = record["probe_ms"]
        assert chosen == record["backend"] == ("aten" if ms["aten"] * record["margin"] < ms["cpu"] else "cpu")
        assert record["margin"] >= 1.0


def test_reference_matches_torch_sdpa():
    # The reference itself, checked against torch's float64 SDPA where their conventions agree
    # (Sq == Sk causal, GQA through enable_gqa, a boolean key mask without empty rows).
    torch.manual_seed(10)
    q = torch.randn(2, 12, 6, 8, dtype=torch.float64)
    k = torch.randn(2, 12, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 12, 2, 8, dtype=torch.float64)
    kv_mask = torch.rand(2, 12) < 0.6
    kv_mask[:, 0] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    want = sdpa(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(attention_ref(q, k, v, causal=True)[0], want)
    want = sdpa(qt, kt, vt, attn_mask=kv_mask[:, None, None, :], enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(attention_ref(q, k, v, kv_mask=kv_mask)[0], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_math_path_is_torchs(dtype):
    # The yardstick of the tolerance rule is PyTorch's math path: for half-precision inputs
    # same_dtype_math_path must give what torch's SDPA math backend gives, to within one rounding step of
    # the dtype (both compute in float32 and round once; float32 sums that differ in their last bits may
    # flip a rounding, and near 0 those bits are all there is: atol). A math path that rounded its
    # intermediates to the dtype misses this on about a fifth of the elements.
    gen = torch.Generator().manual_seed(12)
    q = randn(2, 29, 6, 40, dtype=dtype, gen=gen)
    k = randn(2, 37, 2, 40, dtype=dtype, gen=gen)
    v = randn(2, 37, 2, 40, dtype=dtype, gen=gen)
    kv_mask = make_kv_mask(2, 37, gen, empty_batch=False)
    mine = same_dtype_math_path(q, k, v, causal=True, kv_mask=kv_mask)[0]
    assert mine.dtype == dtype
    visible = visible_keys(2, 29, 37, True, kv_mask)[:, None]  # [B, 1, Sq, Sk]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        theirs = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(mine, theirs.transpose(1, 2), rtol=torch.finfo(dtype).eps, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Random shapes: whatever the fixed grids above miss.
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 3),
    Sq=st.integers(0, 70),
    Sk=st.integers(0, 70),
    Hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    D=st.integers(1, 256),
    causal=st.booleans(),
    mask=st.sampled_from(["none", "random", "empty_batch"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes(target, B, Sq, Sk, Hkv, group, D, causal, mask, dtype, seed):
    H = Hkv * group
    assume(unsupported_reason(target, dtype, D, Sq, Sk, causal, mask != "none") is None)
    torch.manual_seed(seed)
    q, k, v, gen = _inputs(B, Sq, Sk, H, Hkv, D, dtype, target.device, seed)
    kv_mask = None
    if mask != "none":
        kv_mask = make_kv_mask(B, Sk, gen, target.device, empty_batch=mask == "empty_batch")
    out, lse = cp_attention.flash_attn(q, k, v, causal=causal, kv_mask=kv_mask, return_lse=True,
                                       backend=target.backend)
    check_attention(out, lse, q, k, v, None, causal, kv_mask, kernel=kernel_kind(target))
