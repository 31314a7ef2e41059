"""merge_attn_states and merge_attn_states_ against the float64 merge of docs/design.md, "Merging partial
results", on every merge backend of every device (conftest's `merge_target`: the compiled kernel, and Triton
where it runs)."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_kind, randn
from reference import (
    assert_close_to_ref,
    merge_bwd_ref,
    merge_math_path,
    merge_math_path_bwd,
    merge_ref,
    out_allowance,
)

import cp_attention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAN, NEG_INF = float("nan"), float("-inf")

# [B, S, H, D]: single elements, odd sizes that leave vector tails, a large one for the threaded path,
# and empty ones.
SHAPES = [(1, 1, 1, 1), (2, 17, 3, 64), (1, 33, 4, 72), (3, 5, 2, 5), (2, 257, 4, 96), (1, 0, 2, 8),
          (0, 4, 2, 8)]
# (out_a dtype, out_b dtype): the result takes the promoted dtype (bf16 with fp16 gives float32).
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (F32, BF16), (BF16, F16)]
# (destination dtype, out_b dtype) of the in-place merge: a float32 accumulator takes half chunks.
INPLACE_DTYPES = [(F32, F32), (F32, F16), (F32, BF16), (F16, F16), (BF16, BF16)]


def _ids(pair):
    return "-".join(str(t).removeprefix("torch.") for t in pair)


def _state(shape, dtype, device, gen, center=0.0, spread=3.0, dead=0.15):
    """A partial state (out [B, S, H, D], lse [B, H, S]). A `dead` fraction of rows has lse -inf, and their
    out is NaN: a merge must not read it."""
    B, S, H, D = shape
    out = randn(B, S, H, D, gen=gen)
    lse = torch.randn(B, H, S, generator=gen) * spread + center
    dead_rows = torch.rand(B, H, S, generator=gen) < dead
    lse[dead_rows] = NEG_INF
    out = out.masked_fill(dead_rows.transpose(1, 2)[..., None], NAN)
    return out.to(device=device, dtype=dtype), lse.to(device)


def _bshd(rows: torch.Tensor, shape) -> torch.Tensor:
    """A [B, H, S] row mask as a [B, S, H, D] element mask."""
    return rows.transpose(1, 2)[..., None].expand(shape)


def check_merge(out, lse, out_a, lse_a, out_b, lse_b, dtype, kernel="ours"):
    """The result of merging (out_a, lse_a) with (out_b, lse_b): layout, exact handling of -inf sides, no NaN,
    and the tolerance rule elsewhere. kernel: whose merge (reference.KERNELS; conftest.kernel_kind)."""
    B, S, H, D = out_a.shape
    assert out.shape == out_a.shape and out.dtype == dtype, f"out {list(out.shape)} {out.dtype}, want {dtype}"
    assert lse.shape == (B, H, S) and lse.dtype == F32, f"lse {list(lse.shape)} {lse.dtype}"
    oc, lc = out.detach().cpu(), lse.detach().cpu()
    assert not torch.isnan(oc).any(), f"out has {int(torch.isnan(oc).sum())} NaN (a -inf side was read?)"
    assert not torch.isnan(lc).any(), "lse has NaN"
    assert torch.isfinite(oc).all(), "out has inf"

    dead_a, dead_b = torch.isneginf(lse_a.cpu()), torch.isneginf(lse_b.cpu())
    both, live = dead_a & dead_b, ~dead_a & ~dead_b
    assert (oc[_bshd(both, oc.shape)] == 0).all(), "both sides -inf must give out 0"
    assert torch.isneginf(lc[both]).all(), "both sides -inf must give lse -inf"
    # One side -inf: the other passes through unchanged (cast to the result dtype).
    sides = ((dead_a & ~dead_b, out_b, lse_b, "b"), (dead_b & ~dead_a, out_a, lse_a, "a"))
    for dead, o_live, l_live, name in sides:
        m = _bshd(dead, oc.shape)
        assert torch.equal(oc[m], o_live.detach().cpu().to(dtype)[m]), f"out of side {name} must pass through"
        assert torch.equal(lc[dead], l_live.cpu()[dead]), f"lse of side {name} must pass through"
    assert torch.isfinite(lc[live]).all(), "lse must be finite where a side is finite"

    ref_out, ref_lse = merge_ref(out_a, lse_a, out_b, lse_b)
    base_out, base_lse = merge_math_path(out_a, lse_a, out_b, lse_b)
    # Any float32 merge rounds the merged lse to float32 before it weighs the outs; with |lse| ~ 1e4 that
    # rounding alone moves out by about |out| * |lse| * 2^-24.
    lse_mag = float(ref_lse[live].abs().max()) if live.any() else 0.0
    out_mag = float(ref_out[_bshd(live, ref_out.shape)].abs().max()) if live.any() else 0.0
    extra = 2.0**-22 * lse_mag * (1.0 + out_mag) + out_allowance(kernel, dtype, out.device.type, out_mag)
    assert_close_to_ref("out", out, ref_out, base_out, dtype, _bshd(live, ref_out.shape), extra)
    assert_close_to_ref("lse", lse, ref_lse, base_lse, F32, live)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_merge_matches_reference(merge_target, shape, dtypes):
    device, backend = merge_target.device, merge_target.backend
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(sum(shape))
    out_a, lse_a = _state(shape, dtypes[0], device, gen)
    out_b, lse_b = _state(shape, dtypes[1], device, gen)
    before = [t.clone() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = cp_attention.merge_attn_states(out_a, lse_a, out_b, lse_b, backend=backend)
    assert out.is_contiguous(), f"out must be contiguous, got strides {out.stride()}"
    for t, b in zip((out_a, lse_a, out_b, lse_b), before):
        assert torch.equal(t.nan_to_num(), b.nan_to_num()), "merge_attn_states must not modify its inputs"
    check_merge(out, lse, out_a, lse_a, out_b, lse_b, torch.promote_types(*dtypes), kernel_kind(merge_target))


# lse pairs far from 0 or far apart, where exp without max subtraction overflows and a careless
# difference of infinities gives NaN.
HUGE_CASES = {
    "gap_1e4": lambda x, y: (x, x - 1e4),
    "gap_-1e4": lambda x, y: (x - 1e4, x),
    "both_near_1e4": lambda x, y: (x + 1e4, y + 1e4),
    "both_near_-1e4": lambda x, y: (x - 1e4, y - 1e4),
    "plus_minus_1e4": lambda x, y: (x + 1e4, y - 1e4),
}


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("case", list(HUGE_CASES))
def test_merge_huge_lse(merge_target, case, dtype):
    device, backend = merge_target.device, merge_target.backend
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    shape = (2, 40, 3, 24)
    out_a, x = _state(shape, dtype, device, gen, dead=0.0)
    out_b, y = _state(shape, dtype, device, gen, dead=0.0)
    lse_a, lse_b = HUGE_CASES[case](x, y)
    out, lse = cp_attention.merge_attn_states(out_a, lse_a, out_b, lse_b, backend=backend)
    check_merge(out, lse, out_a, lse_a, out_b, lse_b, dtype, kernel_kind(merge_target))


def test_merge_strided_inputs(merge_target):
    device, backend = merge_target.device, merge_target.backend
    # lse laid out [B, S, H] and transposed, lse with a step, out in BHSD seen as BSHD, and out whose last
    # dimension is not contiguous (merge takes any strides).
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    B, S, H, D = 2, 19, 3, 10
    out_a, lse_a = _state((B, S, H, D), F16, device, gen)
    out_b, lse_b = _state((B, S, H, D), F32, device, gen)
    out_a = out_a.transpose(1, 2).contiguous().transpose(1, 2)
    lse_a = lse_a.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(B, S, H, 2 * D, device=device)
    wide[..., ::2] = out_b
    out_b = wide[..., ::2]
    step = torch.zeros(B, H, 2 * S, device=device)
    step[..., ::2] = lse_b
    lse_b = step[..., ::2]
    assert not any(t.is_contiguous() for t in (out_a, lse_a, out_b, lse_b))
    out, lse = cp_attention.merge_attn_states(out_a, lse_a, out_b, lse_b, backend=backend)
    check_merge(out, lse, out_a, lse_a, out_b, lse_b, F32, kernel_kind(merge_target))


def test_merge_with_empty_side_is_identity(merge_target):
    device, backend = merge_target.device, merge_target.backend
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    shape = (2, 13, 4, 32)
    out_a, lse_a = _state(shape, F16, device, gen, dead=0.0)
    out_b = torch.full(shape, NAN, dtype=F16, device=device)  # never read
    lse_b = torch.full((2, 4, 13), NEG_INF, device=device)
    for args in ((out_a, lse_a, out_b, lse_b), (out_b, lse_b, out_a, lse_a)):
        out, lse = cp_attention.merge_attn_states(*args, backend=backend)
        assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = cp_attention.merge_attn_states(out_b, lse_b, out_b, lse_b, backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all(), "both sides empty must give out 0, lse -inf"


@pytest.mark.parametrize("dtypes", INPLACE_DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 17, 3, 64), (3, 5, 2, 5), (2, 257, 4, 96), (1, 0, 2, 8)],
                         ids=str)
def test_merge_inplace(merge_target, shape, dtypes):
    device, backend = merge_target.device, merge_target.backend
    # The destination's own -inf rows hold NaN too: in place, the destination is one of the two sides.
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4 + sum(shape))
    out, lse = _state(shape, dtypes[0], device, gen)
    out_b, lse_b = _state(shape, dtypes[1], device, gen)
    out_a, lse_a = out.clone(), lse.clone()
    ptrs = (out.data_ptr(), lse.data_ptr())
    assert cp_attention.merge_attn_states_(out, lse, out_b, lse_b, backend=backend) is None
    assert (out.data_ptr(), lse.data_ptr()) == ptrs and out.dtype == dtypes[0]
    check_merge(out, lse, out_a, lse_a, out_b, lse_b, dtypes[0], kernel_kind(merge_target))
    # The raw op is the same operation.
    out2, lse2 = out_a.clone(), lse_a.clone()
    ops = torch.ops.cp_attention
    raw = ops.triton_merge_attn_states_ if backend == "triton" else ops.merge_attn_states_
    raw(out2, lse2, out_b, lse_b)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


def test_merge_inplace_strided_destination(merge_target):
    device, backend = merge_target.device, merge_target.backend
    # The destination is a view into larger buffers (BHSD out seen as BSHD with spare heads, lse laid out
    # [B, S, H]): results must land in the view and nowhere else.
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    B, S, H, D = 2, 23, 3, 12
    out_a, lse_a = _state((B, S, H, D), F32, device, gen)
    out_b, lse_b = _state((B, S, H, D), F16, device, gen)
    sentinel = 7.25
    big_out = torch.full((B, H + 2, S, D), sentinel, device=device)
    out = big_out[:, 1:H + 1].transpose(1, 2)
    out.copy_(out_a)
    big_lse = torch.full((B, S, H + 1), sentinel, device=device)
    lse = big_lse[:, :, :H].transpose(1, 2)
    lse.copy_(lse_a)
    cp_attention.merge_attn_states_(out, lse, out_b, lse_b, backend=backend)
    check_merge(out, lse, out_a, lse_a, out_b, lse_b, F32, kernel_kind(merge_target))
    assert (big_out[:, 0] == sentinel).all() and (big_out[:, H + 1] == sentinel).all(), "wrote outside out"
    assert (big_lse[:, :, H] == sentinel).all(), "wrote outside lse"


# ---------------------------------------------------------------------------------------------------------
# The backward of merge_attn_states (docs/design.md, "Backward"): chunks merged in Python backpropagate.
GRAD_SHAPES = [(1, 1, 1, 1), (2, 17, 3, 64), (3, 5, 2, 5)]


@pytest.mark.parametrize("with_dlse", [True, False], ids=["dlse", "no_dlse"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_merge_backward_matches_reference(merge_target, shape, dtypes, with_dlse):
    device, backend = merge_target.device, merge_target.backend
    gen = torch.Generator().manual_seed(7 + sum(shape))
    out_a, lse_a = _state(shape, dtypes[0], device, gen, dead=0.2)
    out_b, lse_b = _state(shape, dtypes[1], device, gen, dead=0.2)
    lse_b[:, :, :1] = NEG_INF  # some rows dead on both sides too
    lse_a[:, :, :1] = NEG_INF
    B, S, H, D = shape
    dout = randn(B, S, H, D, dtype=torch.promote_types(*dtypes), device=device, gen=gen)
    dlse = torch.randn(B, H, S, generator=gen).to(device) if with_dlse else None
    leaves = [t.detach().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = cp_attention.merge_attn_states(*leaves, backend=backend)
    loss = (out.float() * dout.float()).sum()
    if with_dlse:
        loss = loss + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()
    loss.backward()
    ref = merge_bwd_ref(out_a, lse_a, out_b, lse_b, dout, dlse)
    base = merge_math_path_bwd(out_a, lse_a, out_b, lse_b, dout, dlse)
    for name, leaf, r, b in zip(("dout_a", "dlse_a", "dout_b", "dlse_b"), leaves, ref, base):
        g = leaf.grad
        assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype, f"{name}: {g}"
        assert torch.isfinite(g).all(), f"{name} has NaN or inf (a -inf side's out was read?)"
        assert_close_to_ref(name, g.cpu(), r, b, g.dtype if name.startswith("dout") else F32)
    dead_a = torch.isneginf(lse_a).cpu()
    assert (leaves[0].grad.cpu()[_bshd(dead_a, shape)] == 0).all(), "a -inf side's out must get 0"
    assert (leaves[1].grad.cpu()[dead_a] == 0).all(), "a -inf side's lse must get 0"
