"""Reference math for the tests, and the one tolerance rule every numeric check goes through.

- `attention_ref` / `merge_ref`: the contract (DESIGN section 1) written out in float64 on the CPU, with
  nothing clever in it, so that a reader can check it line by line.
- `same_dtype_math_path` / `merge_math_path`: what plain PyTorch ops give when run in the working precision.
  Their error against the float64 reference is the yardstick: a kernel may be off by at most twice what
  PyTorch's own math path is off by (plus a small, dtype-dependent floor).
- `assert_close_to_ref`: that rule, in one place.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")

# Floor of the tolerance rule, relative to (1 + the largest reference magnitude). It only matters where the
# math path happens to be almost exact (small or easy inputs); elsewhere the 2x-baseline term dominates.
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def default_scale(D: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def visible_keys(B: int, Sq: int, Sk: int, causal: bool, kv_mask: torch.Tensor | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [B, Sq, Sk]: True where query i may attend key j (bottom-right causal, then the key mask)."""
    vis = torch.ones(B, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        vis &= (j <= i + (Sk - Sq))[None]
    if kv_mask is not None:
        vis &= kv_mask.to(device)[:, None, :]
    return vis


def kv_head_of(H: int, Hkv: int) -> torch.Tensor:
    """Index of the k/v head that each query head reads (GQA: h // (H // Hkv))."""
    return torch.arange(H) // (H // Hkv)


def attention_ref(q, k, v, scale=None, causal=False, kv_mask=None):
    """(out [B, Sq, H, D] float64, lse [B, H, Sq] float64) on the CPU.
    Rows that see no key: out 0, lse -inf."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    s = default_scale(D, scale)
    qd = q.detach().to("cpu", torch.float64)
    heads = kv_head_of(H, Hkv)
    kd = k.detach().to("cpu", torch.float64)[:, :, heads]  # [B, Sk, H, D]
    vd = v.detach().to("cpu", torch.float64)[:, :, heads]
    scores = torch.einsum("bihd,bjhd->bhij", qd, kd) * s  # [B, H, Sq, Sk]
    vis = visible_keys(B, Sq, Sk, causal, None if kv_mask is None else kv_mask.cpu())[:, None]
    scores = scores.masked_fill(~vis, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows without a visible key (and for Sk == 0)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(vis, torch.exp(scores - shift[..., None]), torch.zeros_like(scores))
    out = torch.einsum("bhij,bjhd->bihd", p, vd)
    return out, lse


def same_dtype_math_path(q, k, v, scale=None, causal=False, kv_mask=None):
    """PyTorch's math path in the inputs' own dtype and device: scores, softmax, logsumexp and P @ V all
    rounded to that dtype. Returns (out in q's dtype [B, Sq, H, D], lse float32 [B, H, Sq])."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    s = default_scale(D, scale)
    heads = kv_head_of(H, Hkv).to(q.device)
    qt = q.transpose(1, 2)  # [B, H, Sq, D]
    kt = k.index_select(2, heads).transpose(1, 2)
    vt = v.index_select(2, heads).transpose(1, 2)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * s
    vis = visible_keys(B, Sq, Sk, causal, kv_mask, q.device)[:, None]
    scores = scores.masked_fill(~vis, NEG_INF)
    p = torch.softmax(scores, dim=-1).masked_fill(~vis, 0.0)  # empty rows would be NaN: zero them
    out = torch.matmul(p, vt).transpose(1, 2)
    lse = torch.logsumexp(scores, dim=-1).float()
    return out, lse


def merge_ref(out_a, lse_a, out_b, lse_b):
    """Merge of two partial states in float64 on the CPU: (out [B, S, H, D], lse [B, H, S]). A side whose lse
    is -inf contributes nothing, whatever its out holds (even NaN)."""
    oa = out_a.detach().to("cpu", torch.float64)
    ob = out_b.detach().to("cpu", torch.float64)
    la = lse_a.detach().to("cpu", torch.float64)
    lb = lse_b.detach().to("cpu", torch.float64)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)  # exactly 0 on a -inf side
    total = wa + wb
    lse = m_safe + torch.log(total)  # -inf when both sides are -inf
    denom = torch.where(total > 0, total, torch.ones_like(total))
    wa = (wa / denom).transpose(1, 2)[..., None]  # [B, S, H, 1]
    wb = (wb / denom).transpose(1, 2)[..., None]
    dead_a = torch.isneginf(la).transpose(1, 2)[..., None]
    dead_b = torch.isneginf(lb).transpose(1, 2)[..., None]
    out = torch.where(dead_a, 0.0, oa * wa) + torch.where(dead_b, 0.0, ob * wb)
    return out, lse


def merge_math_path(out_a, lse_a, out_b, lse_b):
    """The merge formula in float32 with plain torch ops (DESIGN: merges compute in float32), result cast to
    the promoted dtype: the yardstick for merge kernels."""
    dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = m_safe + torch.log(torch.exp(la - m_safe) + torch.exp(lb - m_safe))
    l_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(la - l_safe).transpose(1, 2)[..., None]
    wb = torch.exp(lb - l_safe).transpose(1, 2)[..., None]
    dead_a = torch.isneginf(la).transpose(1, 2)[..., None]
    dead_b = torch.isneginf(lb).transpose(1, 2)[..., None]
    out = torch.where(dead_a, 0.0, out_a.float() * wa) + torch.where(dead_b, 0.0, out_b.float() * wb)
    return out.to(dtype), lse


# ---------------------------------------------------------------------------------------------------------
def _max_abs_err(x: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> tuple[float, int | None]:
    """Largest |x - ref| over the valid entries (NaN counts as infinitely wrong) and its flat index."""
    diff = (x.detach().to("cpu", torch.float64) - ref).abs()
    diff = torch.where(torch.isnan(diff), math.inf, diff)
    diff = torch.where(valid, diff, 0.0)
    if diff.numel() == 0:
        return 0.0, None
    idx = int(diff.flatten().argmax())
    return float(diff.flatten()[idx]), idx


def assert_close_to_ref(name: str, got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor,
                        dtype: torch.dtype, valid: torch.Tensor | None = None, extra_atol: float = 0.0):
    """THE tolerance rule: max|got - ref| <= 2 * max|base - ref| + EPS[dtype] * (1 + max|ref|) + extra_atol,
    over the `valid` entries (entries that have an answer), where `ref` is the float64 reference and `base`
    PyTorch's math path in the working precision. The baseline error must be finite, so that the bound is a
    real bound and the check can fail."""
    assert got.shape == ref.shape, f"{name}: shape {list(got.shape)}, expected {list(ref.shape)}"
    valid = torch.ones(ref.shape, dtype=torch.bool) if valid is None else valid.cpu().expand(ref.shape)
    base_err, _ = _max_abs_err(base, ref, valid)
    assert math.isfinite(base_err), f"{name}: the math-path baseline is not finite (err {base_err})"
    err, idx = _max_abs_err(got, ref, valid)
    scale_ref = float(torch.where(valid, ref.abs(), 0.0).max()) if ref.numel() else 0.0
    tol = 2.0 * base_err + EPS[dtype] * (1.0 + scale_ref) + extra_atol
    if not err <= tol:
        where = tuple(torch.unravel_index(torch.tensor(idx), ref.shape)) if idx is not None else ()
        where = tuple(int(i) for i in where)
        raise AssertionError(
            f"{name}: max abs error {err:.3g} > tolerance {tol:.3g} (math-path error {base_err:.3g}, "
            f"dtype {dtype}, max|ref| {scale_ref:.3g}); worst at index {where}: "
            f"got {float(got.detach().cpu().double().flatten()[idx]):.6g}, "
            f"reference {float(ref.flatten()[idx]):.6g}")


# Relative LSE error allowed whatever the input dtype: float32-grade. It sits well above what torch's own
# CPU flash kernel reaches from half inputs (about 5e-5) and below one rounding to float16 (2^-11 ~ 4.9e-4)
# or bfloat16 (2^-8).
LSE_REL_TOL = 2e-4


def assert_lse_float32_grade(lse: torch.Tensor, ref_lse: torch.Tensor):
    """|lse - ref| <= LSE_REL_TOL * (1 + |ref|) on rows that see keys, for any input dtype."""
    valid = torch.isfinite(ref_lse)
    rel = ((lse.detach().cpu().double() - ref_lse).abs() / (1 + ref_lse.abs()))[valid]
    worst = float(rel.max()) if rel.numel() else 0.0
    assert worst <= LSE_REL_TOL, f"lse relative error {worst:.3g} > {LSE_REL_TOL} (not float32-grade)"


def check_attention(out, lse, q, k, v, scale=None, causal=False, kv_mask=None):
    """Checks one attention result against the contract: shapes, dtypes, layout, empty rows exactly (out 0,
    lse -inf), no NaN anywhere, and values within the tolerance rule for out and lse."""
    B, Sq, H, D = q.shape
    assert out.shape == (B, Sq, H, D), f"out shape {list(out.shape)}, expected {[B, Sq, H, D]}"
    assert out.dtype == q.dtype, f"out dtype {out.dtype}, expected q's {q.dtype}"
    assert out.device == q.device and lse.device == q.device, "outputs must be on q's device"
    assert out.is_contiguous(), f"out must be contiguous, got strides {out.stride()}"
    assert lse.shape == (B, H, Sq), f"lse shape {list(lse.shape)}, expected {[B, H, Sq]}"
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, expected float32"

    ref_out, ref_lse = attention_ref(q, k, v, scale, causal, kv_mask)
    out_c, lse_c = out.detach().cpu(), lse.detach().cpu()
    empty = torch.isneginf(ref_lse)  # [B, H, Sq]: rows that see no key
    empty_bshd = empty.transpose(1, 2)[..., None].expand(B, Sq, H, D)

    assert not torch.isnan(out_c).any(), f"out has {int(torch.isnan(out_c).sum())} NaN"
    assert not torch.isnan(lse_c).any(), f"lse has {int(torch.isnan(lse_c).sum())} NaN"
    assert torch.isfinite(out_c).all(), "out has inf"
    bad_lse = torch.isinf(lse_c) & ~empty
    assert not bad_lse.any(), f"lse is infinite on {int(bad_lse.sum())} rows that see keys"
    assert (out_c[empty_bshd] == 0).all(), "rows that see no key must give out 0"
    assert torch.isneginf(lse_c[empty]).all(), (
        f"rows that see no key must give lse -inf, got {lse_c[empty][~torch.isneginf(lse_c[empty])][:5]}")

    base_out, base_lse = same_dtype_math_path(q, k, v, scale, causal, kv_mask)
    assert_close_to_ref("out", out, ref_out, base_out, q.dtype, ~empty_bshd)
    assert_close_to_ref("lse", lse, ref_lse, base_lse, q.dtype, ~empty)
