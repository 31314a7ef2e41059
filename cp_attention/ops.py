"""The op list of cp_attention: one typed wrapper per op under ``torch.ops.cp_attention``, with its fake
(meta) kernel and its autograd registration directly beneath it.

Conventions (DESIGN section 1): q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (BSHD, last dim contiguous), out
[B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32 with lse = log sum_j exp(scale * <q_i, k_j>) over the
visible keys (natural log); a row that sees no key gives out 0 and lse -inf.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels register on import)
from ._checks import check_attn_inputs, check_merge_inputs

_lib = torch.ops.cp_attention


def _no_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"cp_attention::{op_name} has no backward: cp_attention's kernels are forward-only (inference). "
            "Call it under torch.no_grad() / torch.inference_mode(), or use torch's "
            "scaled_dot_product_attention where gradients are needed."
        )

    return backward


# --------------------------------------------------------------------------------------------------------
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   causal: bool = False, kv_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Sq, H, D] over k, v [B, Sk, Hkv, D]; returns (out [B, Sq, H, D] q.dtype,
    lse [B, H, Sq] float32). Causal is bottom-right aligned; kv_mask is bool [B, Sk], True = attend."""
    return _lib.flash_attn_fwd(q, k, v, scale, causal, kv_mask)


@torch.library.register_fake("cp_attention::flash_attn_fwd")
def _(q, k, v, scale=None, causal=False, kv_mask=None):
    B, Sq, _, H, _, D = check_attn_inputs("cp_attention.flash_attn_fwd", q, k, v, kv_mask)
    out = q.new_empty((B, Sq, H, D))
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    return out, lse


def _setup_none(ctx, inputs, output):
    pass


torch.library.register_autograd("cp_attention::flash_attn_fwd", _no_backward("flash_attn_fwd"),
                                setup_context=_setup_none)


# --------------------------------------------------------------------------------------------------------
def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two partial states over disjoint key sets: (out [B, S, H, D], lse [B, H, S] float32).
    out's dtype is the promotion of out_a's and out_b's; the math is float32."""
    return _lib.merge_attn_states(out_a, lse_a, out_b, lse_b)


@torch.library.register_fake("cp_attention::merge_attn_states")
def _(out_a, lse_a, out_b, lse_b):
    check_merge_inputs("cp_attention.merge_attn_states", "out_a", out_a, lse_a, out_b, lse_b)
    out = out_a.new_empty(out_a.shape, dtype=torch.promote_types(out_a.dtype, out_b.dtype))
    return out, lse_a.new_empty(lse_a.shape)


torch.library.register_autograd("cp_attention::merge_attn_states", _no_backward("merge_attn_states"),
                                setup_context=_setup_none)


# --------------------------------------------------------------------------------------------------------
def merge_attn_states_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                       lse_b: torch.Tensor) -> None:
    """Merges (out_b, lse_b) into the running (out, lse) in place. out may be a float32 accumulator while
    out_b is half precision; lse and lse_b are float32 [B, H, S]."""
    _lib.merge_attn_states_(out, lse, out_b, lse_b)


@torch.library.register_fake("cp_attention::merge_attn_states_")
def _(out, lse, out_b, lse_b):
    check_merge_inputs("cp_attention.merge_attn_states_", "out", out, lse, out_b, lse_b)
    return None


# An op that mutates its inputs cannot take an autograd formula; without an Autograd kernel torch would
# let backward run through it silently (wrong gradients), so refuse at the call when a graph is recorded.
@torch.library.impl("cp_attention::merge_attn_states_", "Autograd")
def _(out, lse, out_b, lse_b):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, lse, out_b, lse_b)):
        _no_backward("merge_attn_states_")(None)
    with torch._C._AutoDispatchBelowAutograd():
        return _lib.merge_attn_states_(out, lse, out_b, lse_b)


# Every op of the library, for tests that must visit them all (opcheck, fake kernels, autograd errors).
ALL_OPS = (
    _lib.flash_attn_fwd.default,
    _lib.merge_attn_states.default,
    _lib.merge_attn_states_.default,
)
