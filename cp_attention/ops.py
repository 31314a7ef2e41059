"""The op list of cp_attention: one typed wrapper per op under ``torch.ops.cp_attention``, with its fake
(meta) kernel and its autograd registration directly beneath it.

Conventions (docs/design.md, "Tensors and layout" and "LSE"): q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (BSHD,
last dim contiguous), out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32 with lse = log sum_j
exp(scale * <q_i, k_j>) over the visible keys (natural log); a row that sees no key gives out 0 and lse -inf.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from . import _C  # noqa: F401  (loads the library: schemas and kernels register on import)
from ._checks import ATTN_DTYPES, check_acc_state, check_attn_inputs, check_bwd_inputs, check_merge_inputs
from .aten_backend import merge_states_grad
from .kernel_variants import check_variant

_lib = torch.ops.cp_attention


def _no_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"cp_attention::{op_name} has no backward: it is forward-only. cp_attention.flash_attn with "
            "backend 'auto', 'cpu' or 'aten', merge_attn_states and the context-parallel functions "
            "backpropagate (docs/design.md, \"Backward\"). Call this one under torch.no_grad() / "
            "torch.inference_mode()."
        )

    return backward


# --------------------------------------------------------------------------------------------------------
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   causal: bool = False, kv_mask: torch.Tensor | None = None, variant: str = "default"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Sq, H, D] over k, v [B, Sk, Hkv, D]; returns (out [B, Sq, H, D] q.dtype,
    lse [B, H, Sq] float32). Causal is bottom-right aligned; kv_mask is bool [B, Sk], True = attend.
    variant: "default" (on CUDA the mma.sync kernel; the CPU has one kernel), or on CUDA "mma", "sm90",
    "sm90_tma", "sm90_tma_no_pingpong" or "auto" (cp_attention.kernel_variants: which are proven)."""
    return _lib.flash_attn_fwd(q, k, v, scale, causal, kv_mask, variant)


def _check_variant_of(op: str, q, variant: str) -> None:
    check_variant(op, "cpu" if q.device.type == "cpu" else "cuda", variant)


@torch.library.register_fake("cp_attention::flash_attn_fwd")
def _(q, k, v, scale=None, causal=False, kv_mask=None, variant="default"):
    B, Sq, _, H, _, D = check_attn_inputs("cp_attention.flash_attn_fwd", q, k, v, kv_mask)
    _check_variant_of("cp_attention.flash_attn_fwd", q, variant)
    out = q.new_empty((B, Sq, H, D))
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    return out, lse


def _setup_none(ctx, inputs, output):
    pass


def _flash_attn_fwd_setup(ctx, inputs, output):
    q, k, v, scale, causal, kv_mask, _variant = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_mask)
    ctx.scale, ctx.causal = scale, causal


def _flash_attn_fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_mask = ctx.saved_tensors
    if q.device.type != "cpu":
        raise RuntimeError(
            f"cp_attention::flash_attn_fwd has no backward on {q.device.type} tensors: the backward kernel "
            "(flash_attn_bwd) is CPU-only. Call it under torch.no_grad() / torch.inference_mode(), or use "
            "torch's scaled_dot_product_attention where gradients are needed.")
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        dout = dout.contiguous()
    dq, dk, dv = _lib.flash_attn_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.causal, kv_mask, dlse)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("cp_attention::flash_attn_fwd", _flash_attn_fwd_backward,
                                setup_context=_flash_attn_fwd_setup)


# --------------------------------------------------------------------------------------------------------
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: float | None = None, causal: bool = False,
                   kv_mask: torch.Tensor | None = None, dlse: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of flash_attn_fwd's (out, lse) with respect to (q, k, v), from the forward's inputs and
    outputs: dout [B, Sq, H, D] like q, dlse [B, H, Sq] (None: no gradient reaches the lse). Returns
    (dq [B, Sq, H, D], dk, dv [B, Sk, Hkv, D]) in q's dtype; with GQA, dk and dv are summed over the query
    heads of each kv head. Rows that see no key contribute nothing. CPU only; float64 is accepted too (lse
    and dlse may then be float64), so that gradcheck can run. Deterministic (no atomics)."""
    return _lib.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, kv_mask, dlse)


@torch.library.register_fake("cp_attention::flash_attn_bwd")
def _(dout, q, k, v, out, lse, scale=None, causal=False, kv_mask=None, dlse=None):
    check_bwd_inputs("cp_attention.flash_attn_bwd", dout, q, k, v, out, lse, kv_mask, dlse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


torch.library.register_autograd("cp_attention::flash_attn_bwd", _no_backward("flash_attn_bwd"),
                                setup_context=_setup_none)


# --------------------------------------------------------------------------------------------------------
def flash_attn_fwd_acc_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, scale: float | None = None, causal: bool = False,
                        kv_mask: torch.Tensor | None = None, variant: str = "default") -> None:
    """The fused ring step: attends q [B, Sq, H, D] to this chunk k, v [B, Sk, Hkv, D] and merges the result
    into the running state in place, in the kernel's epilogue. out [B, Sq, H, D] in q's dtype or float32
    (last dim contiguous; a row slice of a bigger accumulator works), lse [B, H, Sq] float32, both updated
    with the merge rule of docs/design.md, "Merging partial results". Start from out 0 / lse -inf (attention
    over no key). out and lse must not overlap q, k, v or kv_mask. variant: as in flash_attn_fwd."""
    _lib.flash_attn_fwd_acc_(q, k, v, out, lse, scale, causal, kv_mask, variant)


@torch.library.register_fake("cp_attention::flash_attn_fwd_acc_")
def _(q, k, v, out, lse, scale=None, causal=False, kv_mask=None, variant="default"):
    op = "cp_attention.flash_attn_fwd_acc_"
    check_attn_inputs(op, q, k, v, kv_mask)
    check_acc_state(op, q, out, lse)
    _check_variant_of(op, q, variant)
    return None


@torch.library.impl("cp_attention::flash_attn_fwd_acc_", "Autograd")
def _(q, k, v, out, lse, scale=None, causal=False, kv_mask=None, variant="default"):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, out, lse)):
        _no_backward("flash_attn_fwd_acc_")(None)
    with torch._C._AutoDispatchBelowAutograd():
        return _lib.flash_attn_fwd_acc_(q, k, v, out, lse, scale, causal, kv_mask, variant)


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


def _merge_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _merge_backward(ctx, dout, dlse):
    out_a, lse_a, out_b, lse_b, lse = ctx.saved_tensors
    return merge_states_grad(dout, dlse, out_a, lse_a, out_b, lse_b, lse)


torch.library.register_autograd("cp_attention::merge_attn_states", _merge_backward,
                                setup_context=_merge_setup)


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
# (flash_attn_fwd_acc_ above does the same.)
@torch.library.impl("cp_attention::merge_attn_states_", "Autograd")
def _(out, lse, out_b, lse_b):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, lse, out_b, lse_b)):
        _no_backward("merge_attn_states_")(None)
    with torch._C._AutoDispatchBelowAutograd():
        return _lib.merge_attn_states_(out, lse, out_b, lse_b)


# --------------------------------------------------------------------------------------------------------
# Ulysses (docs/design.md, "Ulysses"): pack/unpack kernels around the two all-to-alls, and the collectives.
def ulysses_head_split(op: str, H: int, Hkv: int, P: int) -> tuple[int, int]:
    """(query heads, kv heads) per rank when P ranks split H query and Hkv kv heads; mirrors the C++ rule.
    H must be divisible by P (uneven head splits are not supported). kv heads: Hkv / P each when P divides
    Hkv; when Hkv divides P, one kv head per rank, r // (P // Hkv), shared by P // Hkv ranks (the kv head
    that all of rank r's query heads read); other Hkv raise ValueError."""
    if P < 1:
        raise ValueError(f"{op}: world_size must be >= 1, got {P}")
    if H % P != 0:
        raise ValueError(f"{op}: the number of query heads H={H} must be divisible by world_size={P} "
                         f"(Ulysses splits heads evenly across ranks)")
    if Hkv % P == 0:
        return H // P, Hkv // P
    if P % Hkv != 0:
        raise ValueError(f"{op}: the number of k/v heads Hkv={Hkv} must be a multiple or a divisor of "
                         f"world_size={P} so that every rank's query heads read whole k/v heads")
    return H // P, 1


def _check_seq_lens(op: str, seq_lens) -> None:
    if len(seq_lens) == 0:
        raise ValueError(f"{op}: seq_lens must list one length per rank, got an empty list")
    if any(s < 0 for s in seq_lens):
        raise ValueError(f"{op}: seq_lens must be >= 0, got {list(seq_lens)}")


def _check_recv(op: str, recv: torch.Tensor, expected: int) -> None:
    if recv.dtype not in ATTN_DTYPES:
        raise ValueError(f"{op}: recv must be float32, float16 or bfloat16, got {recv.dtype}")
    if recv.numel() != expected:
        raise ValueError(f"{op}: recv must hold {expected} elements for the given sizes, got {recv.numel()} "
                         f"(shape {list(recv.shape)})")


def a2a_pack_seq_to_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world_size: int) -> torch.Tensor:
    """The seq -> head send buffer (1-D, q's dtype) of local shards q [B, S, H, D], k/v [B, S, Hkv, D]:
    for each destination rank r, its heads of q, then of k, then of v, each as [B, S, h(k), D]."""
    return _lib.a2a_pack_seq_to_head(q, k, v, world_size)


@torch.library.register_fake("cp_attention::a2a_pack_seq_to_head")
def _(q, k, v, world_size):
    op = "cp_attention.a2a_pack_seq_to_head"
    B, Sq, Sk, H, Hkv, D = check_attn_inputs(op, q, k, v)
    if Sq != Sk:
        raise ValueError(f"{op}: q, k and v must be shards of one sequence (same length), got q "
                         f"{list(q.shape)}, k {list(k.shape)}")
    h, hk = ulysses_head_split(op, H, Hkv, world_size)
    return q.new_empty((world_size * B * Sq * (h + 2 * hk) * D,))


torch.library.register_autograd("cp_attention::a2a_pack_seq_to_head", _no_backward("a2a_pack_seq_to_head"),
                                setup_context=_setup_none)


def a2a_unpack_seq_to_head(recv: torch.Tensor, seq_lens: list[int], batch: int, heads: int, kv_heads: int,
                           head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seq -> head receive buffer (contiguous, any shape, read in memory order; source s sent sequence
    chunk s of seq_lens[s] positions) as q [B, S, heads, D], k, v [B, S, kv_heads, D], S = sum(seq_lens)."""
    return _lib.a2a_unpack_seq_to_head(recv, seq_lens, batch, heads, kv_heads, head_dim)


@torch.library.register_fake("cp_attention::a2a_unpack_seq_to_head")
def _(recv, seq_lens, batch, heads, kv_heads, head_dim):
    op = "cp_attention.a2a_unpack_seq_to_head"
    _check_seq_lens(op, seq_lens)
    if batch < 0 or min(heads, kv_heads, head_dim) < 1:
        raise ValueError(f"{op}: batch must be >= 0 and heads, kv_heads, head_dim >= 1, got batch={batch}, "
                         f"heads={heads}, kv_heads={kv_heads}, head_dim={head_dim}")
    S = sum(seq_lens)
    _check_recv(op, recv, batch * S * (heads + 2 * kv_heads) * head_dim)
    return (recv.new_empty((batch, S, heads, head_dim)), recv.new_empty((batch, S, kv_heads, head_dim)),
            recv.new_empty((batch, S, kv_heads, head_dim)))


torch.library.register_autograd("cp_attention::a2a_unpack_seq_to_head",
                                _no_backward("a2a_unpack_seq_to_head"), setup_context=_setup_none)


def a2a_pack_head_to_seq(out: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """The head -> seq send buffer (1-D, out's dtype) of out [B, sum(seq_lens), h, D]: positions of rank s
    (sequence chunk s) as [B, seq_lens[s], h, D], for s = 0..P-1."""
    return _lib.a2a_pack_head_to_seq(out, seq_lens)


@torch.library.register_fake("cp_attention::a2a_pack_head_to_seq")
def _(out, seq_lens):
    op = "cp_attention.a2a_pack_head_to_seq"
    _check_seq_lens(op, seq_lens)
    if out.dim() != 4:
        raise ValueError(f"{op}: out must be a 4-D tensor [B, S, h, D], got shape {list(out.shape)}")
    if out.dtype not in ATTN_DTYPES:
        raise ValueError(f"{op}: out must be float32, float16 or bfloat16, got {out.dtype}")
    if sum(seq_lens) != out.shape[1]:
        raise ValueError(f"{op}: seq_lens must sum to out's sequence length {out.shape[1]}, got "
                         f"{list(seq_lens)}")
    return out.new_empty((out.numel(),))


torch.library.register_autograd("cp_attention::a2a_pack_head_to_seq", _no_backward("a2a_pack_head_to_seq"),
                                setup_context=_setup_none)


def a2a_unpack_head_to_seq(recv: torch.Tensor, world_size: int, batch: int, seq_len: int, heads: int,
                           head_dim: int) -> torch.Tensor:
    """The head -> seq receive buffer (contiguous, any shape; source r sent this rank's positions of heads
    [r * heads, (r + 1) * heads) as [B, seq_len, heads, D]) as out [B, seq_len, world_size * heads, D]."""
    return _lib.a2a_unpack_head_to_seq(recv, world_size, batch, seq_len, heads, head_dim)


@torch.library.register_fake("cp_attention::a2a_unpack_head_to_seq")
def _(recv, world_size, batch, seq_len, heads, head_dim):
    op = "cp_attention.a2a_unpack_head_to_seq"
    if world_size < 1:
        raise ValueError(f"{op}: world_size must be >= 1, got {world_size}")
    if batch < 0 or seq_len < 0 or min(heads, head_dim) < 1:
        raise ValueError(f"{op}: batch and seq_len must be >= 0 and heads, head_dim >= 1, got batch={batch}, "
                         f"seq_len={seq_len}, heads={heads}, head_dim={head_dim}")
    _check_recv(op, recv, world_size * batch * seq_len * heads * head_dim)
    return recv.new_empty((batch, seq_len, world_size * heads, head_dim))


torch.library.register_autograd("cp_attention::a2a_unpack_head_to_seq",
                                _no_backward("a2a_unpack_head_to_seq"), setup_context=_setup_none)


def _all_to_all(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group_name: str
                ) -> torch.Tensor:
    """One all_to_all_single of a 1-D buffer with uneven element splits; with one rank the buffer itself
    (nothing to move)."""
    group = _resolve_process_group(group_name)
    if group.size() == 1:
        return send
    recv = send.new_empty((sum(recv_splits),))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv


def _group_size_and_rank(op: str, group_name: str, seq_lens) -> tuple[int, int]:
    group = _resolve_process_group(group_name)
    P, rank = group.size(), group.rank()
    if len(seq_lens) != P:
        raise ValueError(f"{op}: seq_lens must list one length per rank of the group ({P}), got "
                         f"{list(seq_lens)}")
    return P, rank


@torch.library.custom_op("cp_attention::a2a_seq_to_head", mutates_args=())
def a2a_seq_to_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None,
                    seq_lens: list[int], group_name: str) -> list[torch.Tensor]:
    """Ulysses' first all-to-all: local shards q [B, S_r, H, D], k/v [B, S_r, Hkv, D] (sequence chunk r of
    group rank r, S_r = seq_lens[r]) to this rank's heads over the whole sequence, [q, k, v] with q
    [B, S, H/P, D] and k/v [B, S, hk, D] (S = sum(seq_lens); hk per ulysses_head_split). q, k and v travel
    in one all_to_all_single; a kv_mask [B, S_r] (bool) is gathered to [B, S] by a second, small one and
    appended to the list. The group is passed by name (`group.group_name`), as torch's functional
    collectives do."""
    op = "cp_attention.a2a_seq_to_head"
    P, rank = _group_size_and_rank(op, group_name, seq_lens)
    B, S_r, H, D = q.shape
    h, hk = ulysses_head_split(op, H, k.shape[2], P)
    if S_r != seq_lens[rank]:
        raise ValueError(f"{op}: q's sequence length {S_r} must equal seq_lens[{rank}]={seq_lens[rank]}")
    send = _lib.a2a_pack_seq_to_head(q, k, v, P)
    width = B * (h + 2 * hk) * D
    recv = _all_to_all(send, [width * S_r] * P, [width * s for s in seq_lens], group_name)
    res = list(_lib.a2a_unpack_seq_to_head(recv, seq_lens, B, h, hk, D))
    if kv_mask is not None:
        # Every rank needs the whole mask: each sends its own chunk to every rank (uneven lengths allowed).
        mine = kv_mask.to(torch.uint8).reshape(1, -1).expand(P, B * S_r).reshape(-1)
        got = _all_to_all(mine, [B * S_r] * P, [B * s for s in seq_lens], group_name)
        chunks = got.split([B * s for s in seq_lens])
        res.append(torch.cat([c.view(B, s) for c, s in zip(chunks, seq_lens)], dim=1).to(torch.bool))
    return res


@a2a_seq_to_head.register_fake
def _(q, k, v, kv_mask, seq_lens, group_name):
    op = "cp_attention.a2a_seq_to_head"
    B, _, H, D = q.shape
    h, hk = ulysses_head_split(op, H, k.shape[2], len(seq_lens))
    S = sum(seq_lens)
    res = [q.new_empty((B, S, h, D)), q.new_empty((B, S, hk, D)), q.new_empty((B, S, hk, D))]
    if kv_mask is not None:
        res.append(kv_mask.new_empty((B, S), dtype=torch.bool))
    return res


def _a2a_seq_to_head_setup(ctx, inputs, output):
    q, k, _v, _kv_mask, seq_lens, group_name = inputs
    ctx.kv_heads, ctx.seq_lens, ctx.group_name = k.shape[2], list(seq_lens), group_name
    ctx.like = [t.new_empty(()).expand(t.shape) for t in output[:3]]  # shapes, dtype, device only


def _a2a_seq_to_head_backward(ctx, grads):
    """The transpose of the first all-to-all is the second: the gradients of this rank's heads over the
    whole sequence go back to the ranks that own the positions, in one all-to-all. Where ranks share a kv
    head (Hkv < P), the gradients of its copies are summed. The mask gets no gradient."""
    dq, dk, dv = (torch.zeros_like(like) if g is None else g for g, like in zip(grads[:3], ctx.like))
    P = len(ctx.seq_lens)
    h, hk = dq.shape[2], dk.shape[2]
    both = torch.cat([dq, dk, dv], dim=2)  # [B, S, h + 2 hk, D]: one collective for all three
    (back,) = a2a_head_to_seq(both, None, ctx.seq_lens, ctx.group_name)
    B, S_r, _, D = back.shape
    back = back.view(B, S_r, P, h + 2 * hk, D)
    dq_r = back[:, :, :, :h].reshape(B, S_r, P * h, D)
    dk_r, dv_r = (back[:, :, :, h + i * hk:h + (i + 1) * hk].reshape(B, S_r, P * hk, D) for i in (0, 1))
    if P * hk != ctx.kv_heads:  # one kv head per rank, shared by P // Hkv consecutive ranks
        dk_r, dv_r = (t.view(B, S_r, ctx.kv_heads, P // ctx.kv_heads, D).sum(3) for t in (dk_r, dv_r))
    return dq_r, dk_r, dv_r, None, None, None


a2a_seq_to_head.register_autograd(_a2a_seq_to_head_backward, setup_context=_a2a_seq_to_head_setup)


@torch.library.custom_op("cp_attention::a2a_head_to_seq", mutates_args=())
def a2a_head_to_seq(out: torch.Tensor, lse: torch.Tensor | None, seq_lens: list[int],
                    group_name: str) -> list[torch.Tensor]:
    """Ulysses' second all-to-all: out [B, S, h, D] of this rank's heads over the whole sequence (S =
    sum(seq_lens)) back to this rank's positions of every head, [out [B, S_r, P*h, D]]; with lse
    [B, h, S] float32 also [B, P*h, S_r] (a second, small all_to_all_single), appended to the list."""
    op = "cp_attention.a2a_head_to_seq"
    P, rank = _group_size_and_rank(op, group_name, seq_lens)
    B, _, h, D = out.shape
    S_r = seq_lens[rank]
    send = _lib.a2a_pack_head_to_seq(out, seq_lens)
    recv = _all_to_all(send, [B * s * h * D for s in seq_lens], [B * S_r * h * D] * P, group_name)
    res = [_lib.a2a_unpack_head_to_seq(recv, P, B, S_r, h, D)]
    if lse is not None:
        lse_send = torch.cat([c.reshape(-1) for c in lse.split(list(seq_lens), dim=2)])
        lse_recv = _all_to_all(lse_send, [B * h * s for s in seq_lens], [B * h * S_r] * P, group_name)
        res.append(lse_recv.view(P, B, h, S_r).permute(1, 0, 2, 3).reshape(B, P * h, S_r))
    return res


@a2a_head_to_seq.register_fake
def _(out, lse, seq_lens, group_name):
    op = "cp_attention.a2a_head_to_seq"
    _, rank = _group_size_and_rank(op, group_name, seq_lens)
    B, _, h, D = out.shape
    P, S_r = len(seq_lens), seq_lens[rank]
    res = [out.new_empty((B, S_r, P * h, D))]
    if lse is not None:
        res.append(lse.new_empty((B, P * h, S_r)))
    return res


def _a2a_head_to_seq_setup(ctx, inputs, output):
    out, lse, seq_lens, group_name = inputs
    ctx.out_like = out.new_empty(()).expand(out.shape)  # shape, dtype and device, no storage kept
    ctx.has_lse, ctx.seq_lens, ctx.group_name = lse is not None, list(seq_lens), group_name


def _a2a_head_to_seq_backward(ctx, grads):
    """The transpose of the second all-to-all: the gradients of this rank's positions of every head go to
    the ranks that own the heads, as [B, S, h, D] (and [B, h, S] for the lse)."""
    h = ctx.out_like.shape[2]
    if grads[0] is None:
        d_heads = torch.zeros_like(ctx.out_like)
    else:
        d_heads = _seq_to_head_one(grads[0], h, ctx.seq_lens, ctx.group_name, seq_dim=1)
    d_lse = None
    if ctx.has_lse and len(grads) > 1 and grads[1] is not None:
        d_lse = _seq_to_head_one(grads[1], h, ctx.seq_lens, ctx.group_name, seq_dim=2)
    return d_heads, d_lse, None, None


def _seq_to_head_one(x: torch.Tensor, h: int, seq_lens: list[int], group_name: str, seq_dim: int
                     ) -> torch.Tensor:
    """One tensor from this rank's positions of every head to this rank's h heads over the whole sequence:
    x [B, S_r, P*h, D] (seq_dim 1, head dim 2) or [B, P*h, S_r] (seq_dim 2, head dim 1) to [B, S, h, D] or
    [B, h, S]. Plain torch ops around one all_to_all_single (a gradient path, not a hot one)."""
    P = len(seq_lens)
    head_dim = 3 - seq_dim
    parts = x.unflatten(head_dim, (P, h)).movedim(head_dim, 0).contiguous()  # [P, ...]: rank p's heads
    per = math.prod(s for i, s in enumerate(parts.shape[1:]) if i != seq_dim)  # elements per position
    recv = _all_to_all(parts.reshape(-1), [parts[0].numel()] * P, [per * s for s in seq_lens], group_name)
    shape = list(parts.shape[1:])
    chunks = []
    for c, s in zip(recv.split([per * s for s in seq_lens]), seq_lens):
        shape[seq_dim] = s
        chunks.append(c.view(shape))
    return torch.cat(chunks, dim=seq_dim)


a2a_head_to_seq.register_autograd(_a2a_head_to_seq_backward, setup_context=_a2a_head_to_seq_setup)


@torch.library.custom_op("cp_attention::ring_attn_fwd", mutates_args=())
def ring_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None,
                  q_lens: list[int], k_lens: list[int], group_name: str, scale: float, causal: bool,
                  backend: str, check_always: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring loop of ring attention: this rank's queries q [B, q_lens[r], H, D] attend to every rank's
    k, v [B, k_lens[s], Hkv, D] (and kv_mask bool [B, k_lens[s]] or None), which travel peer to peer around
    the group (by name); returns (out [B, q_lens[r], H, D] float32 contiguous: the accumulator, which the
    backward reads; lse [B, H, q_lens[r]] float32) over the global keys. Causal is bottom-right over the
    global sequences. The inputs are checked and agreed across ranks by cp_attention.ring_attention, which
    is the public entry point."""
    from .distributed.ring import run_ring

    return run_ring(q, k, v, kv_mask, list(q_lens), list(k_lens), group_name, scale, causal, backend,
                    check_always)


@ring_attn_fwd.register_fake
def _(q, k, v, kv_mask, q_lens, k_lens, group_name, scale, causal, backend, check_always):
    B, Sq, H, _ = q.shape
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty((B, H, Sq), dtype=torch.float32)


def _ring_attn_fwd_setup(ctx, inputs, output):
    q, k, v, kv_mask, q_lens, k_lens, group_name, scale, causal, backend, check_always = inputs
    ctx.save_for_backward(q, k, v, kv_mask, *output)
    ctx.args = (list(q_lens), list(k_lens), group_name, scale, causal, backend, check_always)


def _ring_attn_fwd_backward(ctx, dout, dlse):
    q, k, v, kv_mask, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dk, dv = ring_attn_bwd(dout, q, k, v, out, lse, dlse, kv_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


ring_attn_fwd.register_autograd(_ring_attn_fwd_backward, setup_context=_ring_attn_fwd_setup)


@torch.library.custom_op("cp_attention::ring_attn_bwd", mutates_args=())
def ring_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, dlse: torch.Tensor | None, kv_mask: torch.Tensor | None,
                  q_lens: list[int], k_lens: list[int], group_name: str, scale: float, causal: bool,
                  backend: str, check_always: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ring_attn_fwd (a collective over the group): from this rank's dout [B, q_lens[r], H,
    D] and out (float32, like the forward's) and dlse [B, H, q_lens[r]] float32 or None, and the forward's
    inputs and lse, returns
    (dq like q, dk and dv like k: this rank's chunk, summed over every rank's queries). K/V travel the ring
    again with their dK/dV accumulators (docs/design.md, "Ring"). CPU tensors."""
    from .distributed.ring import run_ring_bwd

    return run_ring_bwd(dout, q, k, v, out, lse, dlse, kv_mask, list(q_lens), list(k_lens), group_name, scale,
                        causal, backend, check_always)


@ring_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, kv_mask, q_lens, k_lens, group_name, scale, causal, backend,
      check_always):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


ring_attn_bwd.register_autograd(_no_backward("ring_attn_bwd"), setup_context=_setup_none)


# ========================================================================================================
# Triton kernels (cp_attention/triton_kernels/). Same contracts as flash_attn_fwd, flash_attn_fwd_acc_,
# merge_attn_states and merge_attn_states_ above. Registered from Python with custom_op, so the ops (schemas,
# fake kernels) exist wherever cp_attention imports; the kernel modules import triton on first use. They
# run on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before the
# first Triton op runs).
#
# An in-place op cannot take an autograd formula, and custom_op's own Autograd kernel would let backward
# run through it silently (missing gradients). Like merge_attn_states_, the two in-place Triton ops get an
# Autograd kernel that refuses at the call when a graph would be recorded (it replaces custom_op's, hence
# the override).
_triton_autograd_lib = torch.library.Library("cp_attention", "FRAGMENT")


def _refuse_grad_in_place(op_name: str) -> None:
    op = getattr(_lib, op_name).default

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            _no_backward(op_name)(None)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _triton_autograd_lib.impl(op_name, autograd_kernel, "Autograd", allow_override=True)


def _triton_kernels(module: str):
    try:
        return importlib.import_module(f"cp_attention.triton_kernels.{module}")
    except ImportError as e:
        raise RuntimeError(f"cp_attention: the Triton ops need triton, which failed to import: {e}") from e


# The Triton forward's `variant` argument as the launcher's tma flag: "default" and "pointer" load through
# pointers, "tma" forces the TMA variant, "auto" lets the autotuner choose (cp_attention.kernel_variants).
_TRITON_TMA = {"default": False, "pointer": False, "tma": True, "auto": None}


def _triton_tma(op: str, variant: str) -> bool | None:
    check_variant(op, "triton", variant)
    return _TRITON_TMA[variant]


@torch.library.custom_op("cp_attention::triton_flash_attn_fwd", mutates_args=())
def triton_flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                          causal: bool = False, kv_mask: torch.Tensor | None = None, variant: str = "default"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_fwd in Triton: q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, H, D] q.dtype,
    contiguous; lse [B, H, Sq] float32, natural log). Bottom-right causal; kv_mask bool [B, Sk].
    variant: "default" or "pointer" (pointer-load tiles), "tma" (the TMA variant, untuned; an error where
    it cannot run) or "auto" (the autotuner chooses between them on sm_90+)."""
    op = "cp_attention.triton_flash_attn_fwd"
    check_attn_inputs(op, q, k, v, kv_mask)
    tma = _triton_tma(op, variant)
    return _triton_kernels("flash_fwd").flash_fwd(q, k, v, scale, causal, kv_mask, tma=tma)


@triton_flash_attn_fwd.register_fake
def _(q, k, v, scale=None, causal=False, kv_mask=None, variant="default"):
    B, Sq, _, H, _, D = check_attn_inputs("cp_attention.triton_flash_attn_fwd", q, k, v, kv_mask)
    _triton_tma("cp_attention.triton_flash_attn_fwd", variant)
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


triton_flash_attn_fwd.register_autograd(_no_backward("triton_flash_attn_fwd"), setup_context=_setup_none)


@torch.library.custom_op("cp_attention::triton_flash_attn_fwd_acc_", mutates_args=("out", "lse"))
def triton_flash_attn_fwd_acc_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                               lse: torch.Tensor, scale: float | None = None, causal: bool = False,
                               kv_mask: torch.Tensor | None = None, variant: str = "default") -> None:
    """flash_attn_fwd_acc_ in Triton: attends q to this K/V chunk and merges the result into the running
    state in the kernel's epilogue. out [B, Sq, H, D] (q's dtype or float32) and lse [B, H, Sq] float32 are
    updated in place and may be strided views (e.g. row slices of a larger accumulator). Rows of out whose
    lse is -inf are never read. variant: as in triton_flash_attn_fwd."""
    op = "cp_attention.triton_flash_attn_fwd_acc_"
    check_attn_inputs(op, q, k, v, kv_mask)
    check_acc_state(op, q, out, lse)
    tma = _triton_tma(op, variant)
    _triton_kernels("flash_fwd").flash_fwd(q, k, v, scale, causal, kv_mask, out=out, lse=lse, tma=tma)


@triton_flash_attn_fwd_acc_.register_fake
def _(q, k, v, out, lse, scale=None, causal=False, kv_mask=None, variant="default"):
    op = "cp_attention.triton_flash_attn_fwd_acc_"
    check_attn_inputs(op, q, k, v, kv_mask)
    check_acc_state(op, q, out, lse)
    _triton_tma(op, variant)
    return None


_refuse_grad_in_place("triton_flash_attn_fwd_acc_")


@torch.library.custom_op("cp_attention::triton_merge_attn_states", mutates_args=())
def triton_merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                             lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_attn_states in Triton: (out [B, S, H, D] contiguous, dtype promoted from out_a and out_b;
    lse [B, H, S] float32). Any strides in; float32 math."""
    check_merge_inputs("cp_attention.triton_merge_attn_states", "out_a", out_a, lse_a, out_b, lse_b)
    out = torch.empty(out_a.shape, dtype=torch.promote_types(out_a.dtype, out_b.dtype), device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device)
    _triton_kernels("merge").merge(out_a, lse_a, out_b, lse_b, out, lse)
    return out, lse


@triton_merge_attn_states.register_fake
def _(out_a, lse_a, out_b, lse_b):
    check_merge_inputs("cp_attention.triton_merge_attn_states", "out_a", out_a, lse_a, out_b, lse_b)
    out = out_a.new_empty(out_a.shape, dtype=torch.promote_types(out_a.dtype, out_b.dtype))
    return out, lse_a.new_empty(lse_a.shape)


triton_merge_attn_states.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("cp_attention::triton_merge_attn_states_", mutates_args=("out", "lse"))
def triton_merge_attn_states_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                              lse_b: torch.Tensor) -> None:
    """merge_attn_states_ in Triton: (out, lse) <- merge((out, lse), (out_b, lse_b)) in place, any strides."""
    check_merge_inputs("cp_attention.triton_merge_attn_states_", "out", out, lse, out_b, lse_b)
    _triton_kernels("merge").merge(out, lse, out_b, lse_b, out, lse)


@triton_merge_attn_states_.register_fake
def _(out, lse, out_b, lse_b):
    check_merge_inputs("cp_attention.triton_merge_attn_states_", "out", out, lse, out_b, lse_b)
    return None


_refuse_grad_in_place("triton_merge_attn_states_")


TRITON_OPS = (
    _lib.triton_flash_attn_fwd.default,
    _lib.triton_flash_attn_fwd_acc_.default,
    _lib.triton_merge_attn_states.default,
    _lib.triton_merge_attn_states_.default,
)


# Every op of the library, for tests that must visit them all (opcheck, fake kernels, autograd errors).
ALL_OPS = (
    _lib.flash_attn_fwd.default,
    _lib.flash_attn_bwd.default,
    _lib.flash_attn_fwd_acc_.default,
    _lib.merge_attn_states.default,
    _lib.merge_attn_states_.default,
    _lib.a2a_pack_seq_to_head.default,
    _lib.a2a_unpack_seq_to_head.default,
    _lib.a2a_pack_head_to_seq.default,
    _lib.a2a_unpack_head_to_seq.default,
    _lib.a2a_seq_to_head.default,
    _lib.a2a_head_to_seq.default,
    _lib.ring_attn_fwd.default,
    _lib.ring_attn_bwd.default,
    *TRITON_OPS,
)
