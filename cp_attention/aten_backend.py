"""torch's own LSE-returning attention kernels behind our contract (docs/design.md, "LSE"), and the merge
of partial states in plain torch ops.

They serve as the baseline in benchmarks and as the GPU path until our GPU kernels are built. Each one's
LSE quirk is normalized here: rows that see no key get out 0 and lse -inf (torch's CPU flash gives lse 0,
flash-attn 2 +inf), the memory-efficient kernel's LSE padding to a multiple of 32 is cut off, and cuDNN's
trailing LSE dimension of 1 is dropped. Causal masking is bottom-right aligned, so causal with Sq != Sk
goes through an explicit mask (torch's own `is_causal` is top-left aligned).
"""

from __future__ import annotations

import torch

from . import kernel_variants as kv
from ._checks import check_merge_inputs

ATEN_KERNELS = ("aten_cpu_flash", "aten_flash", "aten_cudnn", "aten_efficient")


def visibility_mask(B: int, Sq: int, Sk: int, causal: bool, kv_mask: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor | None:
    """Bool [B, 1, Sq, Sk] (True = attend) for causal (bottom-right) and/or kv_mask; None if all visible."""
    mask = None
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        mask = (j <= i + (Sk - Sq))[None, None]
    if kv_mask is not None:
        km = kv_mask[:, None, None, :]
        mask = km if mask is None else mask & km
    return mask if mask is None else mask.expand(B, 1, Sq, Sk)


def _expand_kv_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, H, D] with query head h reading kv head h // (H // Hkv)."""
    B, S, Hkv, D = t.shape
    if Hkv == H:
        return t
    return t[:, :, :, None, :].expand(B, S, Hkv, H // Hkv, D).reshape(B, S, H, D)


def _float_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias (0 where visible, -inf elsewhere) of a bool mask [B, 1, Sq, Sk]. Its rows live in
    a buffer padded to a multiple of 16 elements: torch's memory-efficient kernel rejects a bias whose batch
    or row stride is not 16-byte aligned, which an odd Sk would give."""
    B, G, Sq, Sk = mask.shape
    padded = torch.zeros(B, G, Sq, -(-Sk // 16) * 16, dtype=dtype, device=mask.device)
    return padded[..., :Sk].masked_fill_(~mask, float("-inf"))


def _pad_head_dim(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """t [..., D] zero-padded to the next multiple of `multiple` columns (t itself when D already is one)."""
    D = t.shape[-1]
    pad = -D % multiple
    return t if pad == 0 else torch.nn.functional.pad(t, (0, pad))


def pick_kernel(q: torch.Tensor, causal: bool, has_mask: bool) -> str:
    """The torch kernel that runs these inputs fastest among those that support them."""
    if q.device.type == "cpu":
        return "aten_cpu_flash"
    if q.device.type == "cuda":
        needs_mask = has_mask or (causal and q.shape[1] != 0)
        if q.dtype in (torch.float16, torch.bfloat16) and not needs_mask and q.shape[-1] % 8 == 0:
            return "aten_flash"
        return "aten_efficient"
    raise ValueError(f"cp_attention.flash_attn: backend 'aten' has no kernel for device {q.device}")


def aten_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                   kv_mask: torch.Tensor | None, kernel: str = "aten") -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one of torch's kernels on BSHD inputs; returns (out [B, Sq, H, D], lse [B, H, Sq] float32)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if B * Sq * H == 0 or Sk == 0:
        out = q.new_zeros((B, Sq, H, D))
        return out, torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    mask = visibility_mask(B, Sq, Sk, causal, kv_mask, q.device)
    backend = kernel
    if kernel == "aten":
        # Square causal needs no explicit mask: top-left and bottom-right alignment coincide.
        square_causal = causal and Sq == Sk
        kernel = pick_kernel(q, causal and not square_causal, kv_mask is not None)
    kv.log_choice("cp_attention.flash_attn", backend, "aten", kernel, q)
    k = _expand_kv_heads(k, H)
    v = _expand_kv_heads(v, H)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views, no copies
    is_causal_arg = causal and Sq == Sk and kv_mask is None
    explicit = None if is_causal_arg else mask
    if kernel == "aten_cpu_flash":
        bias = None if explicit is None else _float_bias(explicit, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal_arg, attn_mask=bias, scale=scale)
    elif kernel == "aten_flash":
        if explicit is not None:
            mask_state = "set" if kv_mask is not None else None
            raise ValueError("cp_attention.flash_attn: backend 'aten_flash' supports no kv_mask and causal "
                             f"only with Sq == Sk (got Sq={Sq}, Sk={Sk}, kv_mask={mask_state})")
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, is_causal_arg, False,
                                                                 scale=scale)
        out, lse = res[0], res[1]
    elif kernel == "aten_efficient":
        bias = None if explicit is None else _float_bias(explicit, q.dtype).expand(B, H, Sq, Sk)
        # Its CUDA kernels need D % 8 == 0 ("cutlassF: no kernel found to launch" otherwise): zero columns
        # change no score and give output columns that are cut off again.
        qp, kp, vp = (_pad_head_dim(t, 8) for t in (qt, kt, vt)) if q.is_cuda else (qt, kt, vt)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(qp, kp, vp, bias, True, 0.0,
                                                                     is_causal_arg, scale=scale)
        out, lse = res[0][..., :D], res[1][:, :, :Sq]
    elif kernel == "aten_cudnn":
        bias = None if explicit is None else _float_bias(explicit, q.dtype).expand(B, H, Sq, Sk)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, bias, True, 0.0, is_causal_arg,
                                                                 False, scale=scale)
        out, lse = res[0], res[1]
        if lse.dim() == 4:
            lse = lse.squeeze(-1)
    else:
        raise ValueError(f"cp_attention.flash_attn: unknown aten kernel {kernel!r}; expected one of "
                         f"{('aten',) + ATEN_KERNELS}")
    out = out.transpose(1, 2).contiguous()
    lse = lse.float()
    if mask is not None:
        # torch gives lse 0 (CPU) or +inf (flash-attn 2) for rows that see no key: restore the contract.
        empty = ~mask[:, 0].any(dim=-1)  # [B, Sq]
        lse = lse.masked_fill(empty[:, None, :], float("-inf"))
        out = out.masked_fill(empty[:, :, None, None], 0.0)
    return out, lse.contiguous()


def merge_states_torch(op: str, out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                       lse_b: torch.Tensor, into: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_attn_states in plain torch ops, float32 math (the rule of docs/design.md, "Merging partial
    results"): where none of our merge kernels runs. A side whose weight is 0 (lse -inf) is never read
    into the sum, so its out may hold NaN; both -inf give out 0 and lse -inf. Returns (out, lse) as
    merge_attn_states does, or writes them into `into` (out, lse), which may be out_a and lse_a."""
    a_name = "out_a" if into is None else "out"
    check_merge_inputs(op, a_name, out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # both sides empty: weights exp(-inf) = 0 below
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    seen = total > 0
    lse = torch.where(seen, m + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    wa, wb = (torch.where(seen, w / torch.where(seen, total, 1.0), 0.0) for w in (wa, wb))
    wa, wb = (w.transpose(1, 2)[..., None] for w in (wa, wb))  # [B, S, H, 1], like out
    out = (torch.where(wa > 0, out_a.float() * wa, 0.0) + torch.where(wb > 0, out_b.float() * wb, 0.0))
    if into is not None:
        into[0].copy_(out)
        into[1].copy_(lse)
        return into
    return out.to(torch.promote_types(out_a.dtype, out_b.dtype)).contiguous(), lse.contiguous()


def merge_states_grad(dout: torch.Tensor | None, dlse: torch.Tensor | None, out_a: torch.Tensor,
                      lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, lse: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of merge_attn_states in plain torch ops, float32 math: gradients (dout_a, dlse_a,
    dout_b, dlse_b) from dout [B, S, H, D] and dlse [B, H, S] (None: no gradient reaches that output),
    given the inputs and the merged lse [B, H, S].

    With weights w_x = exp(lse_x - lse) (docs/design.md, "Merging partial results"), out = sum_x w_x out_x
    and lse = log sum_x exp(lse_x), so dout_x = w_x dout and dlse_x = w_x (dlse + <dout, out_x - out>).
    A side of weight 0 (lse_x -inf) gets zero gradients, its out never read (it may hold NaN)."""
    seen = torch.isfinite(lse)  # both sides -inf: lse -inf, no weight anywhere
    ref = torch.where(seen, lse, 0.0)
    wa, wb = (torch.where(seen, torch.exp(lx.float() - ref), 0.0) for lx in (lse_a, lse_b))  # [B, H, S]
    wa_o, wb_o = (w.transpose(1, 2)[..., None] for w in (wa, wb))  # [B, S, H, 1], like out
    oa = torch.where(wa_o > 0, out_a.float(), 0.0)
    ob = torch.where(wb_o > 0, out_b.float(), 0.0)
    g = torch.zeros_like(oa) if dout is None else dout.float()
    dl = torch.zeros_like(wa) if dlse is None else dlse.float()
    out = wa_o * oa + wb_o * ob
    g_out = (g * out).sum(-1)  # [B, S, H]
    dlse_a = wa * (dl + ((g * oa).sum(-1) - g_out).transpose(1, 2))
    dlse_b = wb * (dl + ((g * ob).sum(-1) - g_out).transpose(1, 2))
    return (wa_o * g).to(out_a.dtype), dlse_a, (wb_o * g).to(out_b.dtype), dlse_b


def aten_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                       kv_mask: torch.Tensor | None, dlse: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of aten_attention's (out, lse) by torch's CPU flash-attention backward kernel, run on
    our saved out and lse (flash_attn_bwd's contract: dq like q, dk and dv like k, summed over the query
    heads of each kv head). The lse may be any lse over a superset of these keys (a ring step passes the
    global one): the kernel recomputes P = exp(scale q.k - lse) and D = rowsum(dout * out).

    torch's kernel takes no lse gradient. A nonzero dlse is folded in exactly by one extra head-dim column:
    v gets a column of ones, out a column of zeros and dout the column dlse, so that dP gains dlse_i on
    row i while D stays rowsum(dout * out), which is the lse term of dS = P (dP - D + dlse); q and k get a
    zero column (no score changes). Rows that see no key (lse -inf) get lse +inf here, so P = 0."""
    if q.device.type != "cpu":
        raise RuntimeError(
            f"cp_attention.flash_attn_bwd: backend 'aten' has a backward for CPU tensors only, got "
            f"{q.device.type}. On CUDA, flash_attn(backend='aten') backpropagates through out by torch's "
            "own autograd.")
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if B * Sq * H == 0 or Sk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mask = visibility_mask(B, Sq, Sk, causal, kv_mask, q.device)
    is_causal_arg = causal and Sq == Sk and kv_mask is None
    bias = None if is_causal_arg or mask is None else _float_bias(mask, q.dtype)
    ke, ve = _expand_kv_heads(k, H), _expand_kv_heads(v, H)
    lse_in = lse.float().masked_fill(torch.isneginf(lse), float("inf"))
    if dlse is not None:
        pad = torch.nn.functional.pad
        q, ke, out = pad(q, (0, 1)), pad(ke, (0, 1)), pad(out, (0, 1))
        ve = torch.cat([ve, ve.new_ones((B, Sk, H, 1))], dim=-1)
        dout = torch.cat([dout, dlse.transpose(1, 2)[..., None].to(dout.dtype)], dim=-1)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), out.transpose(1, 2),
        lse_in, 0.0, is_causal_arg, attn_mask=bias, scale=scale)
    dq, dk, dv = (t.transpose(1, 2)[..., :D] for t in (dq, dk, dv))
    if Hkv != H:
        dk, dv = (t.unflatten(2, (Hkv, H // Hkv)).sum(3) for t in (dk, dv))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


class AtenAttention(torch.autograd.Function):
    """aten_attention on CPU tensors with an exact backward through out and lse (aten_attention_bwd);
    torch's own autograd would treat the lse as a constant."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, kv_mask, kernel):
        out, lse = aten_attention(q, k, v, scale, causal, kv_mask, kernel)
        ctx.save_for_backward(q, k, v, out, lse, kv_mask)
        ctx.scale, ctx.causal = scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_mask = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = aten_attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.causal, kv_mask, dlse)
        return dq, dk, dv, None, None, None, None


class LseWithoutGrad(torch.autograd.Function):
    """Passes the lse through and refuses a gradient through it: torch's CUDA attention kernels treat their
    lse as non-differentiable, so without this a loss using the lse would get silently wrong gradients."""

    @staticmethod
    def forward(ctx, lse, q):
        return lse.view_as(lse)

    @staticmethod
    def backward(ctx, dlse, _dq=None):
        raise RuntimeError(
            "cp_attention.flash_attn: with backend 'aten' on CUDA, gradients flow through out only (torch's "
            "kernels treat the lse as a constant); a loss that uses the lse needs the CPU backends here")
