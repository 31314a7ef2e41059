"""The CPU backward of flash_attn_fwd (op flash_attn_bwd, and autograd through cp_attention.flash_attn with
backend="cpu"): gradients against a float64 reference under the tolerance rule of tests/reference.py,
gradcheck in float64, rows that see no key, determinism and the op contract (opcheck)."""

from __future__ import annotations

import pytest
import torch
from conftest import narrower_cpu_isas
from reference import (
    EPS,
    assert_close_to_ref,
    attention_bwd_ref,
    attention_ref,
    same_dtype_math_path_bwd,
    visible_keys,
)

import cp_attention
from cp_attention import ops

OPS = torch.ops.cp_attention
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, Sq, Sk, H, Hkv, D, causal, mask, strided, scale). mask: None, "random" (some keys hidden) or
# "empty_batch" (random, and batch 1 sees no key at all). Causal with Sq > Sk leaves the first Sq - Sk rows
# without a key.
CASES = [
    (1, 1, 1, 1, 1, 1, False, None, False, None),
    (2, 37, 53, 4, 2, 5, False, "random", False, None),
    (2, 65, 130, 2, 1, 64, True, None, False, None),
    (2, 100, 30, 4, 4, 33, True, None, True, None),
    (3, 40, 70, 6, 2, 72, False, "empty_batch", True, 0.3),
    (1, 20, 150, 2, 2, 128, True, "random", True, None),
    (1, 9, 17, 2, 1, 256, False, None, False, None),
    # Several blocks of queries and keys, with tails (the AMX kernel's blocks: 128 queries, 128 keys).
    (1, 300, 200, 2, 1, 64, True, "random", True, None),
]
CASE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-causal{}-mask{}-strided{}-scale{}".format(*c) for c in CASES]

# Small shapes for gradcheck in float64 (every row sees at least one key: finite differences of an lse of
# -inf are not defined). (B, Sq, Sk, H, Hkv, D, causal, mask)
GRADCHECK_CASES = [
    (1, 3, 5, 2, 1, 4, False, False),
    (2, 4, 4, 2, 2, 3, True, False),
    (1, 5, 7, 4, 2, 2, True, True),
]


@pytest.fixture(autouse=True)
def poisoned_empty():
    """The op allocates its gradients uninitialised (the kernels write every element): here torch fills
    every new uninitialised tensor with NaN first, so an element a kernel skips fails the test."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def _make(B, Sq, Sk, H, Hkv, D, mask, strided, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    if strided:  # [B, S, H, D] views of other layouts, last dim contiguous
        q = randn(B, H, Sq, D).transpose(1, 2)
        k = randn(B, Sk, Hkv + 1, 2 * D)[:, :, 1:, :D]
        v = randn(Hkv, B, Sk, D).permute(1, 2, 0, 3)
    else:
        q, k, v = randn(B, Sq, H, D), randn(B, Sk, Hkv, D), randn(B, Sk, Hkv, D)
    kv_mask = None
    if mask is not None:
        kv_mask = torch.rand(B, Sk, generator=g) > 0.3
        kv_mask[:, 0] = True
        if mask == "empty_batch":
            kv_mask[1] = False
    dout = randn(B, Sq, H, D)
    dlse = torch.randn(B, H, Sq, generator=g)
    return q, k, v, kv_mask, dout, dlse


def _cpu_grads(q, k, v, dout, dlse, scale, causal, kv_mask, backend="cpu"):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = cp_attention.flash_attn(q, k, v, scale=scale, causal=causal, kv_mask=kv_mask, return_lse=True,
                                       backend=backend)
    grads = [dout] if dlse is None else [dout, dlse]
    torch.autograd.backward([out, lse][:len(grads)], grads)
    return q.grad, k.grad, v.grad


# (dtype, backend): "cpu" is our kernel; "aten" is torch's CPU flash backward run on our saved (out, lse),
# with the lse gradient folded in by cp_attention (aten_backend.aten_attention_bwd). In half precision that
# kernel rounds its per-head gradients to the dtype (up to about 2x our bound here): torch's accuracy, not
# held to the rule, so the aten backend is checked in float32 (where the ring runs it).
# "cpu[isa]": our kernel limited to a narrower ISA copy than this CPU's (tests/conftest.py, Target).
DTYPE_BACKENDS = ([(dtype, "cpu") for dtype in DTYPES] + [(torch.float32, "aten")]
                  + [(dtype, f"cpu[{isa}]") for isa in narrower_cpu_isas() for dtype in DTYPES])


@pytest.mark.parametrize("dtype,backend", DTYPE_BACKENDS, ids=lambda x: str(x).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grads_match_reference(case, dtype, backend):
    B, Sq, Sk, H, Hkv, D, causal, mask, strided, scale = case
    q, k, v, kv_mask, dout, dlse = _make(B, Sq, Sk, H, Hkv, D, mask, strided, dtype)
    isa = backend[4:-1] if backend.startswith("cpu[") else ""
    if isa:
        from cp_attention import _C

        _C._limit_cpu_isa(isa)
    try:
        got = _cpu_grads(q, k, v, dout, dlse, scale, causal, kv_mask, "cpu" if isa else backend)
    finally:
        if isa:
            _C._limit_cpu_isa("")
    ref = attention_bwd_ref(q, k, v, dout, dlse, scale, causal, kv_mask)
    base = same_dtype_math_path_bwd(q, k, v, dout, dlse, scale, causal, kv_mask)
    for name, x, t, r, b in zip(("dq", "dk", "dv"), got, (q, k, v), ref, base):
        assert x.shape == t.shape and x.dtype == dtype, f"{name}: {x.dtype} {list(x.shape)}"
        assert torch.isfinite(x).all(), f"{name} has NaN or inf"
        assert_close_to_ref(name, x, r, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grads_without_dlse(dtype):
    # Only out is used: the lse gets no gradient (autograd passes zeros), and the op takes dlse=None.
    B, Sq, Sk, H, Hkv, D = 2, 33, 47, 4, 2, 16
    q, k, v, kv_mask, dout, _ = _make(B, Sq, Sk, H, Hkv, D, "random", False, dtype, seed=1)
    got = _cpu_grads(q, k, v, dout, None, None, True, kv_mask)
    ref = attention_bwd_ref(q, k, v, dout, None, None, True, kv_mask)
    base = same_dtype_math_path_bwd(q, k, v, dout, None, None, True, kv_mask)
    for name, x, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert_close_to_ref(name, x, r, b, dtype)
    out, lse = ops.flash_attn_fwd(q, k, v, None, True, kv_mask)
    direct = ops.flash_attn_bwd(dout, q, k, v, out, lse, None, True, kv_mask, None)
    for x, y in zip(direct, got):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_give_zero_grads(dtype):
    # Causal with Sq > Sk: the first rows see no key; batch 1's mask hides every key.
    B, Sq, Sk, H, Hkv, D = 2, 24, 10, 2, 1, 8
    q, k, v, _, dout, dlse = _make(B, Sq, Sk, H, Hkv, D, None, False, dtype, seed=2)
    kv_mask = torch.ones(B, Sk, dtype=torch.bool)
    kv_mask[1] = False
    dq, dk, dv = _cpu_grads(q, k, v, dout, dlse, None, True, kv_mask)
    for name, x in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(x).any(), f"{name} has NaN"
    empty = ~visible_keys(B, Sq, Sk, True, kv_mask).any(-1)  # [B, Sq]
    assert (dq[empty] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    assert dq[0, Sq - 1].abs().sum() > 0


def test_deterministic_across_runs_and_threads():
    q, k, v, kv_mask, dout, dlse = _make(2, 150, 170, 4, 2, 40, "random", True, torch.float32, seed=3)
    first = _cpu_grads(q, k, v, dout, dlse, None, True, kv_mask)
    second = _cpu_grads(q, k, v, dout, dlse, None, True, kv_mask)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _cpu_grads(q, k, v, dout, dlse, None, True, kv_mask)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


class _RefForwardOurBackward(torch.autograd.Function):
    """float64 dense attention forward (the reference, float64 lse) with flash_attn_bwd as its backward: what
    gradcheck compares against finite differences. (The CPU forward kernel is float32, float16 and bfloat16
    only, and its lse is float32, too coarse for finite differences.)"""

    @staticmethod
    def forward(ctx, q, k, v, causal, kv_mask):
        out, lse = attention_ref(q, k, v, None, causal, kv_mask)
        ctx.save_for_backward(q, k, v, out, lse, kv_mask)
        ctx.causal = causal
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_mask = ctx.saved_tensors
        dq, dk, dv = ops.flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, None, ctx.causal, kv_mask,
                                        dlse.contiguous())
        return dq, dk, dv, None, None


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_float64(case):
    B, Sq, Sk, H, Hkv, D, causal, mask = case
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    kv_mask = None
    if mask:
        kv_mask = torch.ones(B, Sk, dtype=torch.bool)
        kv_mask[:, 1::3] = False
    assert torch.autograd.gradcheck(lambda q, k, v: _RefForwardOurBackward.apply(q, k, v, causal, kv_mask),
                                    (q, k, v), atol=1e-8, rtol=1e-6)


def _bwd_args(dtype=torch.float32, with_dlse=True, causal=True):
    q, k, v, kv_mask, dout, dlse = _make(2, 19, 23, 4, 2, 8, "empty_batch", True, dtype, seed=5)
    out, lse = ops.flash_attn_fwd(q, k, v, None, causal, kv_mask)
    return (dout, q, k, v, out, lse, 0.5, causal, kv_mask, dlse if with_dlse else None)


@pytest.mark.parametrize("with_dlse", [True, False])
def test_opcheck_flash_attn_bwd(with_dlse):
    torch.library.opcheck(OPS.flash_attn_bwd.default, _bwd_args(with_dlse=with_dlse))


def test_opcheck_flash_attn_fwd_with_grad():
    q, k, v, kv_mask, _, _ = _make(2, 19, 23, 4, 2, 8, "random", False, torch.float32, seed=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(OPS.flash_attn_fwd.default, (q, k, v, None, True, kv_mask, "default"))


def test_float64_only_in_the_backward():
    args = _bwd_args()
    f64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    dq, dk, dv = ops.flash_attn_bwd(*f64)
    assert dq.dtype == dk.dtype == dv.dtype == torch.float64
    q = args[1].double()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.flash_attn_fwd(q, q, q)


def test_bwd_rejects_bad_input():
    dout, q, k, v, out, lse, scale, causal, kv_mask, dlse = _bwd_args()
    op = "cp_attention.flash_attn_bwd"
    with pytest.raises(ValueError, match=f"{op}: dout must have q's shape"):
        ops.flash_attn_bwd(dout[:, 1:], q, k, v, out, lse)
    with pytest.raises(ValueError, match=f"{op}: out must have q's dtype"):
        ops.flash_attn_bwd(dout, q, k, v, out.half(), lse)
    with pytest.raises(ValueError, match=f"{op}: lse must be float32, got"):
        ops.flash_attn_bwd(dout, q, k, v, out, lse.double())
    with pytest.raises(ValueError, match=r"dlse must have shape \[B, H, Sq\]"):
        ops.flash_attn_bwd(dout, q, k, v, out, lse, dlse=dlse[:, :, 1:])
    with pytest.raises(ValueError, match=f"{op}: dout's last dimension must be contiguous"):
        ops.flash_attn_bwd(torch.randn(*dout.shape[:3], 2 * dout.shape[3])[..., ::2], q, k, v, out, lse)


# ---------------------------------------------------------------------------------------------------------
# On CUDA, "auto" trains through torch's kernels (backend "aten"): gradients through out, and a loss that
# uses the lse refuses at backward rather than treating it as a constant.
CUDA_CASES = [CASES[1], CASES[2], CASES[4]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: CASE_IDS[CASES.index(c)])
def test_cuda_auto_trains_through_out(case, dtype):
    B, Sq, Sk, H, Hkv, D, causal, mask, strided, scale = case
    q, k, v, kv_mask, dout, _ = _make(B, Sq, Sk, H, Hkv, D, mask, strided, dtype)
    q, k, v, dout = (t.cuda() for t in (q, k, v, dout))
    kv_mask = None if kv_mask is None else kv_mask.cuda()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = cp_attention.flash_attn(*leaves, scale=scale, causal=causal, kv_mask=kv_mask)
    out.backward(dout)
    ref = attention_bwd_ref(q, k, v, dout, None, scale, causal, kv_mask)
    base = same_dtype_math_path_bwd(q, k, v, dout, None, scale, causal, kv_mask)
    for name, leaf, r, b in zip(("dq", "dk", "dv"), leaves, ref, base):
        # torch's tensor-core kernels round P and dS to the dtype before their products: a first bound of
        # 4 EPS x max|ref| for half precision, to be tightened by what a GPU run shows.
        extra = 4.0 * EPS[dtype] * float(r.abs().max()) if dtype != torch.float32 else 0.0
        assert_close_to_ref(name, leaf.grad.cpu(), r, b, dtype, extra_atol=extra)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_lse_gradient_refuses():
    q, k, v, _, _, _ = _make(1, 8, 8, 2, 2, 16, None, False, torch.float16)
    leaves = [t.cuda().requires_grad_() for t in (q, k, v)]
    out, lse = cp_attention.flash_attn(*leaves, return_lse=True)
    with pytest.raises(RuntimeError, match="lse"):
        (out.float().sum() + lse.sum()).backward()
