"""Reference math for the tests, and the one tolerance rule every numeric check goes through.

- `attention_ref` / `merge_ref`: the contract (docs/design.md, "LSE", "Empty rows" and "Merging partial
  results") written out in float64 on the CPU, with nothing clever in it, so that a reader can check it line
  by line.
- `same_dtype_math_path` / `merge_math_path`: what PyTorch's math path gives for inputs of the working dtype.
  Their error against the float64 reference is the yardstick: a kernel may be off by at most twice what
  PyTorch's own math path is off by, plus about one rounding step of the dtype at the result's magnitude.
- `assert_close_to_ref`: that rule, in one place. The LSE is float32 in every kernel, so it is held to the
  rule at float32 grade whatever the inputs' dtype (`assert_lse_float32_grade`). Allowances beyond the rule,
  each bounded and each for named kinds of kernels only (KERNELS): half-precision P rounded for P @ V on
  tensor cores, the truncating bfloat16 conversions of Triton's interpreter (`out_allowance`), and the LSE
  of torch's own kernels from half-precision inputs (`lse_allowance`).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")

# Floor of the tolerance rule, in two terms. About one rounding step of the dtype at the result's magnitude:
# EPS[dtype], the unit roundoff (2^-24 for float32, 2^-11 for float16, 2^-8 for bfloat16), times the root
# mean square of the reference, the size of a typical entry (the largest entry's own rounding is already in
# the math path's error, which counts twice). Plus float32 arithmetic at the largest magnitude, F32_NOISE x
# max|ref|, 16 float32 epsilons: every kernel computes in float32, and sums over keys taken in another order
# (blocks, chunks, ranks) than the math path's differ by several float32 roundings, which the 2x term need
# not cover when the math path happens to be lucky. Over tests/test_flash_attn.py the whole tolerance comes
# to at most 0.75% of max|ref| in bfloat16 and about 0.1% in float16, so an output 1% off fails in every
# dtype (tests/test_mutations.py shows it).
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32_NOISE = 2.0**-19


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


def attention_ref(q, k, v, scale=None, causal=False, kv_mask=None, p_abs_v=False):
    """(out [B, Sq, H, D] float64, lse [B, H, Sq] float64) on the CPU.
    Rows that see no key: out 0, lse -inf. With p_abs_v, also sum_j p_ij |v_j| [B, Sq, H, D] (what bounds
    the error of rounding the probabilities P before P @ V, see out_allowance)."""
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
    if p_abs_v:
        return out, lse, torch.einsum("bhij,bjhd->bihd", p, vd.abs())
    return out, lse


def same_dtype_math_path(q, k, v, scale=None, causal=False, kv_mask=None):
    """PyTorch's math path for inputs of q's dtype, on their device, as torch's own SDPA math backend runs
    it: float16 and bfloat16 inputs are computed in float32 (torch upcasts them, see
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp) and the output is rounded to the dtype once.
    Scores, softmax, logsumexp and P @ V in float32. Returns (out in q's dtype [B, Sq, H, D], lse float32
    [B, H, Sq]); test_flash_attn.py checks the out against torch's SDPA math backend."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    s = default_scale(D, scale)
    heads = kv_head_of(H, Hkv).to(q.device)
    qt = q.float().transpose(1, 2)  # [B, H, Sq, D]
    kt = k.float().index_select(2, heads).transpose(1, 2)
    vt = v.float().index_select(2, heads).transpose(1, 2)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * s
    vis = visible_keys(B, Sq, Sk, causal, kv_mask, q.device)[:, None]
    scores = scores.masked_fill(~vis, NEG_INF)
    p = torch.softmax(scores, dim=-1).masked_fill(~vis, 0.0)  # empty rows would be NaN: zero them
    out = torch.matmul(p, vt).transpose(1, 2).to(q.dtype)
    lse = torch.logsumexp(scores, dim=-1)
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
    """The merge formula in float32 with plain torch ops (docs/design.md, "Merging partial results": the
    arithmetic is float32), result cast to the promoted dtype: the yardstick for merge kernels."""
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


def _merge_grads(out_a, lse_a, out_b, lse_b, dout, dlse, dtype):
    """Gradients (dout_a, dlse_a, dout_b, dlse_b) of the loss sum(dout * out) + sum(dlse * lse) (rows where
    lse is finite) through the merge written in `dtype` (float64: the reference; float32: the math path),
    by torch.autograd. Written so that autograd gives no NaN: a -inf side's out (which may hold NaN) is
    replaced by 0 before it is weighted, and both sides -inf leave lse -inf with zero gradients."""
    xs = [t.detach().to("cpu", dtype).requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    oa, la, ob, lb = xs
    with torch.enable_grad():
        m = torch.maximum(la, lb).detach()  # a shift: the result does not depend on it
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        wa, wb = torch.exp(la - m), torch.exp(lb - m)
        total = wa + wb
        seen = total > 0
        lse = torch.where(seen, m + torch.log(torch.where(seen, total, torch.ones_like(total))), NEG_INF)
        denom = torch.where(seen, total, torch.ones_like(total))
        dead_a = torch.isneginf(la).transpose(1, 2)[..., None]
        dead_b = torch.isneginf(lb).transpose(1, 2)[..., None]
        out = (torch.where(dead_a, 0.0, oa) * (wa / denom).transpose(1, 2)[..., None]
               + torch.where(dead_b, 0.0, ob) * (wb / denom).transpose(1, 2)[..., None])
        loss = (out * dout.detach().to("cpu", dtype)).sum()
        if dlse is not None:
            dl = dlse.detach().to("cpu", dtype)
            loss = loss + torch.where(torch.isfinite(lse), lse * dl, torch.zeros_like(lse)).sum()
        return torch.autograd.grad(loss, xs)


def merge_bwd_ref(out_a, lse_a, out_b, lse_b, dout, dlse=None):
    """(dout_a, dlse_a, dout_b, dlse_b) float64 on the CPU: the merge of merge_ref, differentiated."""
    return _merge_grads(out_a, lse_a, out_b, lse_b, dout, dlse, torch.float64)


def merge_math_path_bwd(out_a, lse_a, out_b, lse_b, dout, dlse=None):
    """The same gradients in float32 arithmetic, out gradients rounded to their inputs' dtypes: the
    yardstick for merge backward formulas."""
    da, dla, db, dlb = _merge_grads(out_a, lse_a, out_b, lse_b, dout, dlse, torch.float32)
    return da.to(out_a.dtype), dla, db.to(out_b.dtype), dlb


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
    """THE tolerance rule:
        max|got - ref| <= 2 * max|base - ref| + EPS[dtype] * rms(ref) + F32_NOISE * max|ref| + extra_atol
    over the `valid` entries (entries that have an answer), where `ref` is the float64 reference, `base`
    PyTorch's math path for the same inputs, `dtype` the precision the result is held to and rms(ref) the
    root mean square of the reference. extra_atol: the allowances below, where they apply. The baseline
    error must be finite, so that the bound is a real bound and the check can fail."""
    assert got.shape == ref.shape, f"{name}: shape {list(got.shape)}, expected {list(ref.shape)}"
    valid = torch.ones(ref.shape, dtype=torch.bool) if valid is None else valid.cpu().expand(ref.shape)
    base_err, _ = _max_abs_err(base, ref, valid)
    assert math.isfinite(base_err), f"{name}: the math-path baseline is not finite (err {base_err})"
    err, idx = _max_abs_err(got, ref, valid)
    n_valid = int(valid.sum())
    rms_ref = math.sqrt(float(torch.where(valid, ref, 0.0).square().sum()) / n_valid) if n_valid else 0.0
    max_ref = float(torch.where(valid, ref.abs(), 0.0).max()) if n_valid else 0.0
    tol = 2.0 * base_err + EPS[dtype] * rms_ref + F32_NOISE * max_ref + extra_atol
    if not err <= tol:
        where = tuple(torch.unravel_index(torch.tensor(idx), ref.shape)) if idx is not None else ()
        where = tuple(int(i) for i in where)
        raise AssertionError(
            f"{name}: max abs error {err:.3g} > tolerance {tol:.3g} (math-path error {base_err:.3g}, "
            f"dtype {dtype}, rms(ref) {rms_ref:.3g}, max|ref| {max_ref:.3g}); worst at index {where}: "
            f"got {float(got.detach().cpu().double().flatten()[idx]):.6g}, "
            f"reference {float(ref.flatten()[idx]):.6g}")


# Whose kernel produced a result, for the allowances below (conftest.kernel_kind tells it for a target):
# - "ours": our kernels, run as on their device: the rule as it stands, except that on CUDA half-precision
#   attention runs on tensor cores, which round P (see out_allowance);
# - "torch": torch's own kernels (the "aten" backends: baselines and fallbacks that we do not write);
# - "interpreted": our Triton kernels run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
KERNELS = ("ours", "torch", "interpreted")

# torch's kernels compute the LSE of half-precision inputs less accurately than float32 arithmetic allows:
# torch's CPU flash kernel is up to about 1.4e-4 off there, whatever |lse| (its float32 path is
# float32-grade). An absolute allowance on top of the float32 rule, still well below one rounding of an LSE
# of 1 or more to float16.
TORCH_HALF_LSE_ATOL = 2.0**-12


def out_allowance(kernel: str, dtype: torch.dtype, device_type: str, max_ref: float,
                  max_p_abs_v: float = 0.0) -> float:
    """The out check's extra_atol beyond the rule, for half-precision results of kernels that round more:
    - P rounded to the dtype for P @ V (tensor-core kernels: ours and torch's on CUDA, and our Triton kernel
      wherever it runs) moves out[i, d] by up to EPS[dtype] x sum_j p_ij |v_jd|: that bound's largest
      value, max_p_abs_v (attention_ref(..., p_abs_v=True); 0 for a merge, which has no P);
    - Triton's interpreter converts float32 to bfloat16 by truncation rather than to nearest, a whole unit
      in the last place off where a correct rounding is off by half of one: twice the P bound, and one more
      EPS[dtype] x max|ref| for the output's own conversion."""
    assert kernel in KERNELS, kernel
    if dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    truncates = kernel == "interpreted" and dtype == torch.bfloat16
    extra = EPS[dtype] * max_ref if truncates else 0.0
    if kernel == "interpreted" or device_type == "cuda":
        extra += (2.0 if truncates else 1.0) * EPS[dtype] * max_p_abs_v
    return extra


def lse_allowance(kernel: str, dtype: torch.dtype) -> float:
    """The LSE check's extra_atol beyond the float32 rule for inputs of `dtype` (see TORCH_HALF_LSE_ATOL)."""
    assert kernel in KERNELS, kernel
    return TORCH_HALF_LSE_ATOL if kernel == "torch" and dtype in (torch.float16, torch.bfloat16) else 0.0


def assert_lse_float32_grade(lse: torch.Tensor, ref_lse: torch.Tensor, base_lse: torch.Tensor | None = None,
                             extra_atol: float = 0.0):
    """The LSE's check whatever the inputs' dtype: the tolerance rule at float32 grade (the LSE is a float32
    output of every kernel), on the rows that see keys. base_lse is the math path's LSE (float32 for any
    input dtype, see same_dtype_math_path); without it the baseline is the float64 reference rounded to
    float32, the best any float32 LSE can be. extra_atol: see lse_allowance."""
    valid = torch.isfinite(ref_lse)
    base = ref_lse.float() if base_lse is None else base_lse
    assert_close_to_ref("lse", lse, ref_lse, base, torch.float32, valid, extra_atol)


def check_attention(out, lse, q, k, v, scale=None, causal=False, kv_mask=None, kernel="ours", base=None):
    """Checks one attention result against the contract: shapes, dtypes, layout, empty rows exactly (out 0,
    lse -inf), no NaN anywhere, and values within the tolerance rule: out at the grade of q's dtype, lse at
    float32 grade. kernel: whose kernel computed the result (KERNELS; conftest.kernel_kind). base: (out, lse)
    of PyTorch's math path run the way the result was computed (say chunk by chunk, merged), when that is
    not one pass of same_dtype_math_path."""
    B, Sq, H, D = q.shape
    assert out.shape == (B, Sq, H, D), f"out shape {list(out.shape)}, expected {[B, Sq, H, D]}"
    assert out.dtype == q.dtype, f"out dtype {out.dtype}, expected q's {q.dtype}"
    assert out.device == q.device and lse.device == q.device, "outputs must be on q's device"
    assert out.is_contiguous(), f"out must be contiguous, got strides {out.stride()}"
    assert lse.shape == (B, H, Sq), f"lse shape {list(lse.shape)}, expected {[B, H, Sq]}"
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, expected float32"

    ref_out, ref_lse, p_abs_v = attention_ref(q, k, v, scale, causal, kv_mask, p_abs_v=True)
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

    base_out, base_lse = same_dtype_math_path(q, k, v, scale, causal, kv_mask) if base is None else base
    seen = ~empty_bshd
    max_out = float(ref_out[seen].abs().max()) if seen.any() else 0.0
    max_p_abs_v = float(p_abs_v[seen].max()) if seen.any() else 0.0
    extra = out_allowance(kernel, q.dtype, q.device.type, max_out, max_p_abs_v)
    assert_close_to_ref("out", out, ref_out, base_out, q.dtype, seen, extra)
    assert_lse_float32_grade(lse, ref_lse, base_lse, lse_allowance(kernel, q.dtype))


# ---------------------------------------------------------------------------------------------------------
# Gradients. The loss whose gradient flash_attn_fwd's backward computes is sum(dout * out) + sum(dlse * lse)
# over the rows that see a key (a row that sees no key has lse -inf and no gradient).
def _dense_attention(q, k, v, s, vis, heads):
    """out [B, Sq, H, D], lse [B, H, Sq] of plain dense attention in the inputs' dtype, written so that
    autograd differentiates it without NaN on rows that see no key (out 0, lse -inf there)."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k[:, :, heads]) * s
    scores = scores.masked_fill(~vis, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(vis, torch.exp(scores - shift[..., None]), torch.zeros_like(scores))
    return torch.einsum("bhij,bjhd->bihd", p, v[:, :, heads]), lse


def _loss_grads(out, lse, dout, dlse, inputs):
    loss = (out * dout).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse * dlse, torch.zeros_like(lse)).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def attention_bwd_ref(q, k, v, dout, dlse=None, scale=None, causal=False, kv_mask=None):
    """(dq, dk, dv) float64 on the CPU: torch.autograd through `_dense_attention` in float64 (the contract
    of attention_ref, differentiated), for the loss sum(dout * out) + sum(dlse * lse) over rows that see keys.
    With GQA the k/v gradients sum over the query heads that read each kv head (autograd of the gather)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    qd, kd, vd = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    vis = visible_keys(B, Sq, Sk, causal, None if kv_mask is None else kv_mask.cpu())[:, None]
    with torch.enable_grad():
        out, lse = _dense_attention(qd, kd, vd, default_scale(D, scale), vis, kv_head_of(H, Hkv))
        dl = None if dlse is None else dlse.detach().to("cpu", torch.float64)
        grads = _loss_grads(out, lse, dout.detach().to("cpu", torch.float64), dl, (qd, kd, vd))
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (qd, kd, vd)))


def same_dtype_math_path_bwd(q, k, v, dout, dlse=None, scale=None, causal=False, kv_mask=None):
    """(dq, dk, dv) in q's dtype: torch.autograd through same_dtype_math_path (float32 inside for half
    precision inputs, as torch's SDPA math backend), run on inputs of the working dtype: the yardstick for
    backward kernels in the tolerance rule."""
    qd, kd, vd = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out, lse = same_dtype_math_path(qd, kd, vd, scale, causal, kv_mask)
        dl = None if dlse is None else dlse.detach().float()
        grads = _loss_grads(out, lse, dout.detach(), dl, (qd, kd, vd))
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (qd, kd, vd)))
