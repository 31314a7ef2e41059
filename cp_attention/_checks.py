"""Input validation in Python, mirroring csrc/checks.h: used by the fake kernels (so FakeTensor and
torch.compile report bad input at trace time) and by backends that do not go through our C++ ops."""

from __future__ import annotations

import torch

MAX_HEAD_DIM = 256
ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def check_attn_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kv_mask: torch.Tensor | None = None, allow_double: bool = False
                      ) -> tuple[int, int, int, int, int, int]:
    """Checks q [B, Sq, H, D], k/v [B, Sk, Hkv, D], kv_mask bool [B, Sk]; returns (B, Sq, Sk, H, Hkv, D).
    allow_double: float64 is accepted too (the CPU backward, so that gradcheck can run)."""
    layouts = (("q", q, "[B, Sq, H, D]"), ("k", k, "[B, Sk, Hkv, D]"), ("v", v, "[B, Sk, Hkv, D]"))
    for name, t, layout in layouts:
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(op, f"{name} must be a 4-D tensor {layout}, got shape {list(t.shape)}")
    if allow_double and q.dtype not in (*ATTN_DTYPES, torch.float64):
        _fail(op, f"q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    if not allow_double and q.dtype not in ATTN_DTYPES:
        _fail(op, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(op, f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        _fail(op, f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        _fail(op, f"k and v must have batch size {B} (from q), got k {list(k.shape)}, v {list(v.shape)}")
    if v.shape[1] != Sk:
        _fail(op, f"k and v must have the same sequence length, got k {list(k.shape)}, v {list(v.shape)}")
    if v.shape[2] != Hkv:
        _fail(op, f"k and v must have the same number of heads, got k {list(k.shape)}, v {list(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        _fail(op, f"k and v must have head dim {D} (from q), got k {list(k.shape)}, v {list(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        _fail(op, f"head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Hkv < 1 or H % Hkv != 0:
        _fail(op, f"the number of query heads must be a multiple of the number of k/v heads (GQA), "
                  f"got H={H}, Hkv={Hkv}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if D != 1 and t.stride(3) != 1:
            _fail(op, f"{name}'s last dimension must be contiguous (stride 1), "
                      f"got strides {list(t.stride())}")
    if kv_mask is not None:
        if kv_mask.dtype != torch.bool:
            _fail(op, f"kv_mask must be a bool tensor (True = attend), got {kv_mask.dtype}")
        if kv_mask.dim() != 2 or kv_mask.shape[0] != B or kv_mask.shape[1] != Sk:
            _fail(op, f"kv_mask must have shape [B, Sk] = [{B}, {Sk}], got {list(kv_mask.shape)}")
        if kv_mask.device != q.device:
            _fail(op, f"kv_mask must be on {q.device} like q, got {kv_mask.device}")
    return B, Sq, Sk, H, Hkv, D


def check_bwd_inputs(op: str, dout, q, k, v, out, lse, kv_mask=None, dlse=None
                     ) -> tuple[int, int, int, int, int, int]:
    """flash_attn_bwd's inputs: q, k, v, kv_mask as in check_attn_inputs (float64 allowed); dout and out like
    q; lse and dlse [B, H, Sq] float32 (or float64 with float64 inputs). Returns (B, Sq, Sk, H, Hkv, D)."""
    B, Sq, Sk, H, Hkv, D = check_attn_inputs(op, q, k, v, kv_mask, allow_double=True)
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != tuple(q.shape):
            _fail(op, f"{name} must have q's shape [B, Sq, H, D] = {list(q.shape)}, got {list(t.shape)}")
        if t.dtype != q.dtype:
            _fail(op, f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            _fail(op, f"{name} must be on {q.device} like q, got {t.device}")
        if D != 1 and t.stride(3) != 1:
            _fail(op, f"{name}'s last dimension must be contiguous (stride 1), "
                      f"got strides {list(t.stride())}")
    f64 = q.dtype == torch.float64
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is None:
            continue
        if t.dtype != torch.float32 and not (f64 and t.dtype == torch.float64):
            _fail(op, f"{name} must be float32{' or float64' if f64 else ''}, got {t.dtype}")
        if tuple(t.shape) != (B, H, Sq):
            _fail(op, f"{name} must have shape [B, H, Sq] = [{B}, {H}, {Sq}], got {list(t.shape)}")
        if t.device != q.device:
            _fail(op, f"{name} must be on {q.device} like q, got {t.device}")
    return B, Sq, Sk, H, Hkv, D


def check_merge_side(op: str, out_name: str, lse_name: str, out: torch.Tensor, lse: torch.Tensor):
    if out.dim() != 4:
        _fail(op, f"{out_name} must be a 4-D tensor [B, S, H, D], got shape {list(out.shape)}")
    if out.dtype not in ATTN_DTYPES:
        _fail(op, f"{out_name} must be float32, float16 or bfloat16, got {out.dtype}")
    if lse.dtype != torch.float32:
        _fail(op, f"{lse_name} must be float32, got {lse.dtype}")
    B, S, H, _ = out.shape
    if lse.dim() != 3 or tuple(lse.shape) != (B, H, S):
        _fail(op, f"{lse_name} must have shape [B, H, S] = [{B}, {H}, {S}] to match {out_name} "
                  f"{list(out.shape)}, got {list(lse.shape)}")
    if lse.device != out.device:
        _fail(op, f"{lse_name} must be on {out.device} like {out_name}, got {lse.device}")


def check_merge_inputs(op: str, a_name: str, out_a, lse_a, out_b, lse_b):
    check_merge_side(op, a_name, "lse" + a_name[3:], out_a, lse_a)
    check_merge_side(op, "out_b", "lse_b", out_b, lse_b)
    if out_b.shape != out_a.shape:
        _fail(op, f"out_b must have the shape of {a_name} {list(out_a.shape)}, got {list(out_b.shape)}")
    if out_b.device != out_a.device:
        _fail(op, f"out_b must be on {out_a.device} like {a_name}, got {out_b.device}")


def check_acc_state(op: str, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
    """The running state of flash_attn_fwd_acc_: out [B, Sq, H, D] in q's dtype or float32 (last dim
    contiguous), lse [B, H, Sq] float32 (any strides)."""
    B, Sq, H, D = q.shape
    for name, t in (("out", out), ("lse", lse)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(out.shape) != (B, Sq, H, D):
        _fail(op, f"out must have q's shape [B, Sq, H, D] = {list(q.shape)}, got {list(out.shape)}")
    if out.dtype not in (q.dtype, torch.float32):
        _fail(op, f"out must have q's dtype ({q.dtype}) or float32, got {out.dtype}")
    if out.device != q.device:
        _fail(op, f"out must be on {q.device} like q, got {out.device}")
    if D != 1 and out.stride(3) != 1:
        _fail(op, f"out's last dimension must be contiguous (stride 1), got strides {list(out.stride())}")
    if lse.dtype != torch.float32:
        _fail(op, f"lse must be float32, got {lse.dtype}")
    if tuple(lse.shape) != (B, H, Sq):
        _fail(op, f"lse must have shape [B, H, Sq] = [{B}, {H}, {Sq}], got {list(lse.shape)}")
    if lse.device != q.device:
        _fail(op, f"lse must be on {q.device} like q, got {lse.device}")
