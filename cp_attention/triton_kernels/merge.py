"""Triton merge of two partial attention states (docs/design.md, "Merging partial results").

out_a, out_b: [B, S, H, D] float32/float16/bfloat16, any strides (the last one included); lse_a, lse_b:
[B, H, S] float32, any strides, natural log. Per row (b, s, h), in float32:
    m = max(lse_a, lse_b);  lse = m + log(exp(lse_a - m) + exp(lse_b - m))
    out = out_a * exp(lse_a - m) / sum + out_b * exp(lse_b - m) / sum
A side with lse -inf is not loaded (its out may hold NaN) and gets weight 0; both sides -inf give out 0,
lse -inf; one -inf side passes the other through exactly (weight exp(0) / 1 = 1). The destination may be
side a itself (the in-place merge): every program reads its rows completely before writing them.

Memory-bound: each program moves a [ROWS, BLOCK_D] tile, ROWS consecutive positions of one (batch, head),
so its lse loads are one contiguous run, its D-contiguous rows load with wide vectors, and the index math is
one scalar division per program (no per-row divisions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs as cfg
from . import interpret_requested

INTERPRETED = interpret_requested()


@triton.jit(do_not_specialize=["S", "H", "D", "n_sblk"])
def _merge_kernel(
    OA, LA, OB, LB, OD, LD,
    s_oa_b, s_oa_s, s_oa_h, s_oa_d,
    s_la_b, s_la_h, s_la_s,
    s_ob_b, s_ob_s, s_ob_h, s_ob_d,
    s_lb_b, s_lb_h, s_lb_s,
    s_od_b, s_od_s, s_od_h, s_od_d,
    s_ld_b, s_ld_h, s_ld_s,
    S, H, D, n_sblk,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Grid: (B * H * n_sblk,), n_sblk = cdiv(S, ROWS): program (b, h, block of ROWS positions). OD/LD: the
    destination (may alias OA/LA). Row indices stay 32-bit (positions < S); offsets are 64-bit."""
    pid = tl.program_id(0)
    bh = pid // n_sblk
    s = (pid % n_sblk) * ROWS + tl.arange(0, ROWS)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    s64 = s.to(tl.int64)
    row_ok = s < S
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:  # a mask constant along D lets rows load as wide vectors
        tile_ok = row_ok[:, None] & (offs_d < BLOCK_D)[None, :]
    else:
        tile_ok = row_ok[:, None] & (offs_d < D)[None, :]

    la = tl.load(LA + b * s_la_b + h * s_la_h + s64 * s_la_s, mask=row_ok, other=float("-inf"))
    lb = tl.load(LB + b * s_lb_b + h * s_lb_h + s64 * s_lb_s, mask=row_ok, other=float("-inf"))
    m = tl.maximum(la, lb)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # both -inf: never subtract -inf from -inf
    e_a = tl.exp(la - m_use)
    e_b = tl.exp(lb - m_use)
    total = e_a + e_b  # 0 only when both sides are -inf
    t_safe = tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_use + tl.log(t_safe))
    w_a = e_a / t_safe
    w_b = e_b / t_safe

    # Only rows with a finite lse are read: a -inf side's out may be NaN and NaN * 0 is NaN.
    oa_ptrs = OA + b * s_oa_b + h * s_oa_h + s64[:, None] * s_oa_s + offs_d[None, :] * s_oa_d
    ob_ptrs = OB + b * s_ob_b + h * s_ob_h + s64[:, None] * s_ob_s + offs_d[None, :] * s_ob_d
    oa = tl.load(oa_ptrs, mask=tile_ok & (la != float("-inf"))[:, None], other=0.0).to(tl.float32)
    ob = tl.load(ob_ptrs, mask=tile_ok & (lb != float("-inf"))[:, None], other=0.0).to(tl.float32)
    out = oa * w_a[:, None] + ob * w_b[:, None]
    od_ptrs = OD + b * s_od_b + h * s_od_h + s64[:, None] * s_od_s + offs_d[None, :] * s_od_d
    tl.store(od_ptrs, out.to(OD.dtype.element_ty), mask=tile_ok)
    tl.store(LD + b * s_ld_b + h * s_ld_h + s64 * s_ld_s, lse, mask=row_ok)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
          out: torch.Tensor, lse: torch.Tensor) -> None:
    """Writes merge((out_a, lse_a), (out_b, lse_b)) into (out, lse) on checked inputs (cp_attention._checks);
    out/lse may be out_a/lse_a (in place) or fresh tensors, any strides."""
    B, S, H, D = out_a.shape
    if B * S * H == 0:
        return
    if out_a.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("cp_attention: Triton kernels run on CPU tensors only under Triton's interpreter; "
                           "set TRITON_INTERPRET=1 before cp_attention's Triton kernels are first used")
    block_d = triton.next_power_of_2(D)
    rows = max(1, cfg.MERGE_ELEMS_PER_PROGRAM // block_d)
    n_sblk = triton.cdiv(S, rows)
    grid = (B * H * n_sblk,)
    args = (out_a, lse_a, out_b, lse_b, out, lse, *out_a.stride(), *lse_a.stride(), *out_b.stride(),
            *lse_b.stride(), *out.stride(), *lse.stride(), S, H, D, n_sblk)
    if INTERPRETED:
        _merge_kernel[grid](*args, ROWS=rows, BLOCK_D=block_d, EVEN_D=block_d == D)
    else:
        with torch.cuda.device(out_a.device):
            _merge_kernel[grid](*args, ROWS=rows, BLOCK_D=block_d, EVEN_D=block_d == D,
                                num_warps=cfg.MERGE_NUM_WARPS)
