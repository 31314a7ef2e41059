"""A drop-in for torch.nn.functional.scaled_dot_product_attention that runs cp_attention's kernels.

`sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False)`
takes torch's arguments and layout (`[B, H, S, D]`, "BHSD") and hands the same memory to
`cp_attention.flash_attn` as `[B, S, H, D]` ("BSHD") transposed views: no copy when the last dimension is
contiguous. What our kernels do not cover goes to torch's own function, with a warning that says why (once
per reason). `use_as_sdpa(cp=None)` makes a model's own `F.scaled_dot_product_attention` calls take this
path, or context-parallel attention over sequence shards when given a `ContextParallel`. (The module's
name keeps it from shadowing the function `cp_attention.sdpa`.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings

import torch
import torch.nn.functional as F

from ._checks import ATTN_DTYPES, MAX_HEAD_DIM
from .attention import flash_attn

# torch's function as imported, before any use_as_sdpa scope replaces the module attribute: the fallback
# must never call back into a replacement (that would recurse).
TORCH_SDPA = F.scaled_dot_product_attention

_OP = "cp_attention.sdpa"
_warned: set[str] = set()
_warn_lock = threading.Lock()


class Unsupported(Exception):
    """Inputs our kernels do not cover; str(e) says why (stable text, one per kind of input)."""


def _warn_fallback(reason: str) -> None:
    with _warn_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"{_OP}: using torch's scaled_dot_product_attention instead of cp_attention's kernels: "
                  f"{reason} (this warning is shown once per reason)", stacklevel=3)


def reset_fallback_warnings() -> None:
    """Forgets which fallback reasons were already reported, so each warns again (for tests)."""
    with _warn_lock:
        _warned.clear()


def key_padding_mask(attn_mask: torch.Tensor | None, B: int, Sk: int, device: torch.device
                     ) -> torch.Tensor | None:
    """The [B, Sk] bool key-padding mask (True = attend) that `attn_mask` amounts to, or Unsupported.

    attn_mask: None, or a bool tensor broadcastable to [B, H, Sq, Sk] (torch aligns shapes on the right)
    that is the same for every head and query: [Sk], [1, Sk], [1, 1, Sk] or [b, 1, 1, Sk] with b in
    {1, B}; a last dim of 1 broadcasts over the keys. Float (additive) masks, per-head and per-query masks
    raise Unsupported.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise Unsupported("attn_mask is not a tensor")
    if attn_mask.dtype != torch.bool:
        raise Unsupported("attn_mask is not boolean (additive float masks are not covered)")
    if attn_mask.dim() > 4:
        raise Unsupported("attn_mask has more than 4 dimensions")
    if attn_mask.device != device:
        raise Unsupported("attn_mask is on another device than query")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    b, h, i, j = m.shape
    if h != 1 or i != 1:
        raise Unsupported("attn_mask varies across heads or queries (only key-padding masks "
                          "[B, 1, 1, Sk] are covered)")
    if b not in (1, B) or j not in (1, Sk):
        raise Unsupported("attn_mask does not broadcast to [B, 1, 1, Sk]")
    # Contiguous [B, Sk]: a few bytes per key, and the kernels index it directly.
    return m[:, 0, 0, :].expand(B, Sk).contiguous()


def plan_bshd(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, *, local: bool):
    """Checks BSHD q [B, Sq, H, D], k/v [B, Sk, Hkv, D] against what our kernels cover; returns the
    [B, Sk] kv_mask (or None) or raises Unsupported. `local`: one process holds the whole sequences, so
    torch's top-left causal rule must be matched (our kernels align bottom-right; they agree iff
    Sq == Sk). Under context parallelism causal means the global sequence, which our attention handles."""
    for t in (q, k, v):
        if not isinstance(t, torch.Tensor):
            raise Unsupported("query, key or value is not a tensor")
        if t.is_nested or t.layout != torch.strided:
            raise Unsupported("nested or non-strided tensors")
        if t.dim() != 4:
            raise Unsupported("inputs are not 4-D")
    if q.dtype not in ATTN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise Unsupported("dtype is not float32, float16 or bfloat16 for all of query, key and value")
    if k.device != q.device or v.device != q.device:
        raise Unsupported("query, key and value are on different devices")
    B, Sq, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise Unsupported("batch sizes differ (broadcast batch dims)")
    if k.shape != v.shape or k.shape[3] != D:
        raise Unsupported("key and value shapes differ or value's head dim differs from query's")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise Unsupported(f"head dim outside [1, {MAX_HEAD_DIM}]")
    Hkv = k.shape[2]
    if Hkv != H and not (enable_gqa and Hkv >= 1 and H % Hkv == 0):
        raise Unsupported("query and key/value head counts differ without enable_gqa=True and "
                          "H % Hkv == 0")
    if dropout_p:
        raise Unsupported("dropout_p > 0")
    if is_causal and attn_mask is not None:
        raise Unsupported("is_causal together with attn_mask")
    if local and is_causal and Sq != k.shape[1]:
        raise Unsupported("is_causal with Sq != Sk (torch aligns the causal mask top-left, "
                          "cp_attention bottom-right)")
    return key_padding_mask(attn_mask, B, k.shape[1], q.device)


def _check_scalars(dropout_p, is_causal, scale):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{_OP}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"{_OP}: is_causal must be a bool, got {is_causal!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"{_OP}: scale must be a finite number or None, got {scale!r}")


def _to_bshd(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H, D] as a view; copies only when the last dim is not contiguous (the one
    layout rule of our kernels)."""
    t = t.transpose(1, 2)
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
         enable_gqa: bool = False, backend: str = "auto") -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by cp_attention's kernels.

    Args:
        query: [B, H, Sq, D] float32, float16 or bfloat16 (BHSD, torch's layout); any strides.
        key, value: [B, Hkv, Sk, D], query's dtype and device. Hkv == H, or H % Hkv == 0 with enable_gqa
            (query head h reads kv head h // (H // Hkv), as in torch).
        attn_mask: None, or a bool key-padding mask broadcastable to [B, 1, 1, Sk] (True = attend; e.g.
            [B, 1, 1, Sk], [Sk]).
        dropout_p: must be 0 for our kernels.
        is_causal: torch's causal mask (query i sees key j iff j <= i). Covered when Sq == Sk, where it
            equals our bottom-right rule.
        scale: multiplies q.k; defaults to 1 / sqrt(D).
        enable_gqa: as in torch.
        backend: the flash_attn backend ("auto": the fastest measured one for the device).

    Returns:
        out [B, H, Sq, D] in query's dtype: a transposed view of a contiguous [B, Sq, H, D] buffer (the
        layout torch's own flash kernels return). A query that sees no key gets 0. No LSE (torch's
        signature has none; use cp_attention.flash_attn for it: lse [B, H, Sq] float32, natural log).

    Anything else (dropout, float or per-query masks, other dtypes or ranks, GQA without enable_gqa, causal
    with Sq != Sk) runs torch's function on the same arguments, after a warning naming the reason, once
    per reason. Inputs that require grad are differentiated through flash_attn (docs/design.md,
    "Backward"): backend "auto" trains on every device.
    """
    _check_scalars(dropout_p, is_causal, scale)
    try:
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
            raise Unsupported("inputs are not 4-D [B, H, S, D]")
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        kv_mask = plan_bshd(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, local=True)
    except Unsupported as why:
        _warn_fallback(str(why))
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    out = flash_attn(q, k, v, scale=scale, causal=is_causal, kv_mask=kv_mask, backend=backend)
    return out.transpose(1, 2)


def _context_parallel_sdpa(cp):
    """The SDPA replacement for use_as_sdpa(cp): q, k, v [B, H, S_local, D] are this rank's sequence
    shards and attention runs over the global sequence with cp.attention (a collective)."""

    def cp_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                enable_gqa=False):
        _check_scalars(dropout_p, is_causal, scale)
        op = "cp_attention.use_as_sdpa(cp)"
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
            raise ValueError(f"{op}: query, key and value must be 4-D tensors [B, H, S_local, D]")
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        try:
            kv_mask = plan_bshd(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, local=False)
        except Unsupported as why:
            # torch's function would attend to the local shard only: a wrong answer, so refuse.
            raise ValueError(f"{op}: cannot run context-parallel attention for these arguments: "
                             f"{why}") from None
        return cp.attention(q, k, v, scale=scale, causal=is_causal, kv_mask=kv_mask).transpose(1, 2)

    return cp_sdpa


@contextlib.contextmanager
def use_as_sdpa(cp=None, *, backend: str = "auto"):
    """Within the scope, torch.nn.functional.scaled_dot_product_attention is cp_attention's: `sdpa` when
    `cp` is None, else context-parallel attention with `cp` (a ContextParallel), where every SDPA call in
    scope receives this rank's sequence shards [B, H, S_local, D] (chunk order of cp.shard) and returns the
    local rows of attention over the global sequence; then unsupported arguments raise ValueError instead
    of falling back (torch's function would see only the local shard).

    backend: the flash_attn backend of the local path (with `cp`, the ContextParallel's own backend).

    The previous function is restored on exit, exceptions included; scopes nest (the innermost wins). The
    replacement is process-wide (module attribute): other threads see it too, and code that bound torch's
    function before the scope (`from torch.nn.functional import scaled_dot_product_attention`) does not.
    """
    if cp is not None and not callable(getattr(cp, "attention", None)):
        raise ValueError(f"cp_attention.use_as_sdpa: cp must be a cp_attention.ContextParallel or None, "
                         f"got {type(cp).__name__}")
    previous = F.scaled_dot_product_attention
    local = sdpa if backend == "auto" else functools.partial(sdpa, backend=backend)
    F.scaled_dot_product_attention = local if cp is None else _context_parallel_sdpa(cp)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous


__all__ = ["TORCH_SDPA", "key_padding_mask", "plan_bshd", "reset_fallback_warnings", "sdpa", "use_as_sdpa"]
