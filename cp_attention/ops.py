"""The op list of cp_attention: one typed wrapper per op under ``torch.ops.cp_attention``, with its fake
(meta) kernel and its autograd registration directly beneath it.

Conventions (docs/design.md, "Tensors and layout" and "LSE"): q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (BSHD,
last dim contiguous), out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32 with lse = log sum_j
exp(scale * <q_i, k_j>) over the visible keys (natural log); a row that sees no key gives out 0 and lse -inf.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

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
class RankHeads(NamedTuple):
    """One rank's heads in a Ulysses split: query heads [q0, q0 + nq), kv heads [kv0, kv0 + nkv)."""
    q0: int
    nq: int
    kv0: int
    nkv: int


def ulysses_head_split(op: str, H: int, Hkv: int, P: int, name: str = "world_size") -> tuple[RankHeads, ...]:
    """Every rank's heads when P ranks split H query and Hkv kv heads; mirrors rank_heads in
    csrc/a2a_layout.h. Query heads go in torch.tensor_split order (the first H % P ranks get one more), kv
    heads with the query heads that read them (query head g reads kv head g // (H // Hkv)): a rank gets
    exactly the kv heads its query heads read, and a kv head read by several ranks is copied to each.
    Raises ValueError, naming `name` (the argument that sets P), when P < 1 or P > H (a rank would get no
    query head), and when Hkv does not divide H."""
    if P < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {P}")
    if P > H:
        raise ValueError(f"{op}: {name}={P} exceeds the number of query heads H={H}: every rank of a Ulysses "
                         f"group needs at least one query head (use ring attention, or a Unified mesh whose "
                         f"ulysses_degree is at most H)")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"{op}: the number of query heads H={H} must be a multiple of the number of k/v "
                         f"heads Hkv={Hkv}")
    base, extra, group = H // P, H % P, H // Hkv
    split = []
    for r in range(P):
        q0, nq = r * base + min(r, extra), base + (1 if r < extra else 0)
        kv0 = q0 // group
        split.append(RankHeads(q0, nq, kv0, (q0 + nq - 1) // group + 1 - kv0))
    return tuple(split)


def _even_split(H: int, Hkv: int, P: int) -> bool:
    """Whether the split is one the CUDA pack kernel implements (equal counts on every rank); there the
    general split gives the same heads, so both kernels fill one layout."""
    return H % P == 0 and (Hkv % P == 0 or P % Hkv == 0)


def local_kv_index(heads: RankHeads, H: int, Hkv: int) -> list[int] | None:
    """For each of a rank's nq query heads, the index of the kv head it reads among the rank's nkv; None
    when the attention kernel's own GQA rule (local head i reads kv head i // (nq // nkv)) already says so.
    Otherwise (a group cut by the split, e.g. H=12, Hkv=3, P=4: rank 1 reads kv heads 0 and 1 with 1 and 2
    of its query heads) the caller repeats its kv heads along this index, after the transfer."""
    group = H // Hkv
    index = [(heads.q0 + i) // group - heads.kv0 for i in range(heads.nq)]
    if heads.nq % heads.nkv == 0 and index == [i // (heads.nq // heads.nkv) for i in range(heads.nq)]:
        return None
    return index


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
    for each destination rank r, its heads of q, then of k, then of v (ulysses_head_split), each as
    [B, S, n, D]. The CUDA kernel takes even splits only (_pack_seq_to_head routes the others)."""
    return _lib.a2a_pack_seq_to_head(q, k, v, world_size)


@torch.library.register_fake("cp_attention::a2a_pack_seq_to_head")
def _(q, k, v, world_size):
    op = "cp_attention.a2a_pack_seq_to_head"
    B, Sq, Sk, H, Hkv, D = check_attn_inputs(op, q, k, v)
    if Sq != Sk:
        raise ValueError(f"{op}: q, k and v must be shards of one sequence (same length), got q "
                         f"{list(q.shape)}, k {list(k.shape)}")
    split = ulysses_head_split(op, H, Hkv, world_size)
    return q.new_empty((B * Sq * sum(r.nq + 2 * r.nkv for r in split) * D,))


torch.library.register_autograd("cp_attention::a2a_pack_seq_to_head", _no_backward("a2a_pack_seq_to_head"),
                                setup_context=_setup_none)


def pack_seq_to_head_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           split: tuple[RankHeads, ...]) -> torch.Tensor:
    """a2a_pack_seq_to_head's buffer by torch ops, for any split and device: one copy into the buffer. The
    route of CUDA tensors whose heads split unevenly (no CUDA kernel for those)."""
    B, S, _, D = q.shape
    buf = q.new_empty((B * S * sum(r.nq + 2 * r.nkv for r in split) * D,))
    at = 0
    for r in split:
        for t, h0, n in ((q, r.q0, r.nq), (k, r.kv0, r.nkv), (v, r.kv0, r.nkv)):
            buf[at:at + B * S * n * D].view(B, S, n, D).copy_(t[:, :, h0:h0 + n])
            at += B * S * n * D
    return buf


def _pack_seq_to_head(q, k, v, split: tuple[RankHeads, ...]) -> torch.Tensor:
    if q.device.type == "cpu" or _even_split(q.shape[2], k.shape[2], len(split)):
        return _lib.a2a_pack_seq_to_head(q, k, v, len(split))
    return pack_seq_to_head_torch(q, k, v, split)


def a2a_unpack_seq_to_head(recv: torch.Tensor, seq_lens: list[int], batch: int, heads: int, kv_heads: int,
                           head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seq -> head receive buffer (contiguous, any shape, read in memory order; source s sent sequence
    chunk s of seq_lens[s] positions of this rank's heads) as q [B, S, heads, D], k, v [B, S, kv_heads, D],
    S = sum(seq_lens)."""
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


def a2a_unpack_head_to_seq(recv: torch.Tensor, heads: list[int], batch: int, seq_len: int,
                           head_dim: int) -> torch.Tensor:
    """The head -> seq receive buffer (contiguous, any shape; source r sent this rank's positions of its
    heads[r] heads, which follow those of sources < r, as [B, seq_len, heads[r], D]) as out [B, seq_len,
    sum(heads), D]. The CUDA kernel takes equal counts only. Its entry point changed (a list of counts) and
    has not run on a GPU since, so a2a_head_to_seq unpacks CUDA tensors with torch ops; calling this op on
    CUDA tensors runs the kernel (benchmarks/gpu_check.sh's cuda_ops shard does)."""
    return _lib.a2a_unpack_head_to_seq(recv, heads, batch, seq_len, head_dim)


@torch.library.register_fake("cp_attention::a2a_unpack_head_to_seq")
def _(recv, heads, batch, seq_len, head_dim):
    op = "cp_attention.a2a_unpack_head_to_seq"
    if len(heads) == 0:
        raise ValueError(f"{op}: heads must list one head count per source rank, got an empty list")
    if min(heads) < 1:
        raise ValueError(f"{op}: heads must be >= 1 (one count per source rank), got {list(heads)}")
    if batch < 0 or seq_len < 0 or head_dim < 1:
        raise ValueError(f"{op}: batch and seq_len must be >= 0 and head_dim >= 1, got batch={batch}, "
                         f"seq_len={seq_len}, head_dim={head_dim}")
    _check_recv(op, recv, batch * seq_len * sum(heads) * head_dim)
    return recv.new_empty((batch, seq_len, sum(heads), head_dim))


torch.library.register_autograd("cp_attention::a2a_unpack_head_to_seq",
                                _no_backward("a2a_unpack_head_to_seq"), setup_context=_setup_none)


def unpack_head_to_seq_torch(recv: torch.Tensor, heads: list[int], batch: int, seq_len: int,
                             head_dim: int) -> torch.Tensor:
    """a2a_unpack_head_to_seq by torch ops, for any counts and device: one copy out of the buffer. The route
    of CUDA tensors (see a2a_unpack_head_to_seq)."""
    B, S, D = batch, seq_len, head_dim
    out = recv.new_empty((B, S, sum(heads), D))
    at = h0 = 0
    for n in heads:
        out[:, :, h0:h0 + n].copy_(recv[at:at + B * S * n * D].view(B, S, n, D))
        at, h0 = at + B * S * n * D, h0 + n
    return out


def _unpack_head_to_seq(recv, heads: list[int], B: int, S: int, D: int) -> torch.Tensor:
    if recv.device.type == "cpu":
        return _lib.a2a_unpack_head_to_seq(recv, heads, B, S, D)
    return unpack_head_to_seq_torch(recv, heads, B, S, D)


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
    [B, S, nq, D] and k/v [B, S, nkv, D] (S = sum(seq_lens); nq, nkv: this rank's entry of
    ulysses_head_split, which may differ between ranks). q, k and v travel in one all_to_all_single; a
    kv_mask [B, S_r] (bool) is gathered to [B, S] by a second, small one and appended to the list. The group
    is passed by name (`group.group_name`), as torch's functional collectives do."""
    op = "cp_attention.a2a_seq_to_head"
    P, rank = _group_size_and_rank(op, group_name, seq_lens)
    B, S_r, H, D = q.shape
    split = ulysses_head_split(op, H, k.shape[2], P)
    me = split[rank]
    if S_r != seq_lens[rank]:
        raise ValueError(f"{op}: q's sequence length {S_r} must equal seq_lens[{rank}]={seq_lens[rank]}")
    send = _pack_seq_to_head(q, k, v, split)
    recv = _all_to_all(send, [B * S_r * (r.nq + 2 * r.nkv) * D for r in split],
                       [B * s * (me.nq + 2 * me.nkv) * D for s in seq_lens], group_name)
    res = list(_lib.a2a_unpack_seq_to_head(recv, seq_lens, B, me.nq, me.nkv, D))
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
    P, rank = _group_size_and_rank(op, group_name, seq_lens)
    B, _, H, D = q.shape
    me = ulysses_head_split(op, H, k.shape[2], P)[rank]
    S = sum(seq_lens)
    res = [q.new_empty((B, S, me.nq, D)), q.new_empty((B, S, me.nkv, D)), q.new_empty((B, S, me.nkv, D))]
    if kv_mask is not None:
        res.append(kv_mask.new_empty((B, S), dtype=torch.bool))
    return res


def _a2a_seq_to_head_setup(ctx, inputs, output):
    q, k, _v, _kv_mask, seq_lens, group_name = inputs
    ctx.split = ulysses_head_split("cp_attention.a2a_seq_to_head", q.shape[2], k.shape[2], len(seq_lens))
    ctx.kv_heads, ctx.seq_lens, ctx.group_name = k.shape[2], list(seq_lens), group_name
    ctx.like = [t.new_empty(()).expand(t.shape) for t in output[:3]]  # shapes, dtype, device only


def _a2a_seq_to_head_backward(ctx, grads):
    """The transpose of the first all-to-all is the second: the gradients of this rank's heads over the
    whole sequence go back to the ranks that own the positions, in one all-to-all. Where ranks hold copies
    of one kv head, the gradients of the copies are summed, in rank order. The mask gets no gradient."""
    dq, dk, dv = (torch.zeros_like(like) if g is None else g for g, like in zip(grads[:3], ctx.like))
    both = torch.cat([dq, dk, dv], dim=2)  # [B, S, nq + 2 nkv, D]: one collective for all three
    widths = [r.nq + 2 * r.nkv for r in ctx.split]
    (back,) = a2a_head_to_seq(both, None, ctx.seq_lens, widths, ctx.group_name)
    return (*assemble_seq_to_head_grads(back, ctx.split, ctx.kv_heads), None, None, None)


def assemble_seq_to_head_grads(back: torch.Tensor, split: tuple[RankHeads, ...], kv_heads: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (dq [B, S_r, H, D], dk, dv [B, S_r, Hkv, D]) from back [B, S_r, sum(nq + 2 nkv), D]: for
    each rank r in order, the gradients of its nq query heads, then of its nkv kv heads of k, then of v.
    Query heads partition H in rank order; kv heads copied to several ranks sum their copies' gradients."""
    B, S_r, _, D = back.shape
    pieces = back.split([n for r in split for n in (r.nq, r.nkv, r.nkv)], dim=2)
    dq = torch.cat(pieces[0::3], dim=2)
    if all(r.kv0 == sum(x.nkv for x in split[:i]) for i, r in enumerate(split)):
        return dq, torch.cat(pieces[1::3], dim=2), torch.cat(pieces[2::3], dim=2)
    # Summed in float32 and rounded once: half-precision partial sums would round at every copy.
    dk, dv = (back.new_zeros((B, S_r, kv_heads, D), dtype=torch.float32) for _ in range(2))
    for r, pk, pv in zip(split, pieces[1::3], pieces[2::3]):  # in rank order: the same sums on every run
        dk[:, :, r.kv0:r.kv0 + r.nkv] += pk
        dv[:, :, r.kv0:r.kv0 + r.nkv] += pv
    return dq, dk.to(back.dtype), dv.to(back.dtype)


a2a_seq_to_head.register_autograd(_a2a_seq_to_head_backward, setup_context=_a2a_seq_to_head_setup)


@torch.library.custom_op("cp_attention::a2a_head_to_seq", mutates_args=())
def a2a_head_to_seq(out: torch.Tensor, lse: torch.Tensor | None, seq_lens: list[int], heads: list[int],
                    group_name: str) -> list[torch.Tensor]:
    """Ulysses' second all-to-all: out [B, S, h, D] of this rank's heads over the whole sequence (S =
    sum(seq_lens), h = heads[rank]; heads lists every rank's count, rank r's heads following those of ranks
    < r) back to this rank's positions of every head, [out [B, S_r, sum(heads), D]]; with lse [B, h, S]
    float32 also [B, sum(heads), S_r] (a second, small all_to_all_single), appended to the list."""
    op = "cp_attention.a2a_head_to_seq"
    P, rank = _group_size_and_rank(op, group_name, seq_lens)
    _check_heads(op, out, heads, P, rank)
    B, _, h, D = out.shape
    S_r = seq_lens[rank]
    send = _lib.a2a_pack_head_to_seq(out, seq_lens)
    recv = _all_to_all(send, [B * s * h * D for s in seq_lens], [B * S_r * n * D for n in heads], group_name)
    res = [_unpack_head_to_seq(recv, list(heads), B, S_r, D)]
    if lse is not None:
        lse_send = torch.cat([c.reshape(-1) for c in lse.split(list(seq_lens), dim=2)])
        sizes = [B * n * S_r for n in heads]
        lse_recv = _all_to_all(lse_send, [B * h * s for s in seq_lens], sizes, group_name)
        res.append(torch.cat([c.view(B, n, S_r) for c, n in zip(lse_recv.split(sizes), heads)], dim=1))
    return res


def _check_heads(op: str, out: torch.Tensor, heads, P: int, rank: int) -> None:
    if len(heads) != P or min(heads) < 1:
        raise ValueError(f"{op}: heads must list one head count >= 1 per rank of the group ({P}), got "
                         f"{list(heads)}")
    if out.dim() != 4 or out.shape[2] != heads[rank]:
        raise ValueError(f"{op}: out must be [B, S, heads[{rank}]={heads[rank]}, D] on rank {rank}, got "
                         f"{list(out.shape)}")


@a2a_head_to_seq.register_fake
def _(out, lse, seq_lens, heads, group_name):
    op = "cp_attention.a2a_head_to_seq"
    P, rank = _group_size_and_rank(op, group_name, seq_lens)
    _check_heads(op, out, heads, P, rank)
    B, _, _, D = out.shape
    S_r = seq_lens[rank]
    res = [out.new_empty((B, S_r, sum(heads), D))]
    if lse is not None:
        res.append(lse.new_empty((B, sum(heads), S_r)))
    return res


def _a2a_head_to_seq_setup(ctx, inputs, output):
    out, lse, seq_lens, heads, group_name = inputs
    ctx.out_like = out.new_empty(()).expand(out.shape)  # shape, dtype and device, no storage kept
    ctx.has_lse, ctx.seq_lens, ctx.group_name = lse is not None, list(seq_lens), group_name
    ctx.heads = list(heads)


def _a2a_head_to_seq_backward(ctx, grads):
    """The transpose of the second all-to-all: the gradients of this rank's positions of every head go to
    the ranks that own the heads, as [B, S, h, D] (and [B, h, S] for the lse)."""
    if grads[0] is None:
        d_heads = torch.zeros_like(ctx.out_like)
    else:
        d_heads = _seq_to_head_one(grads[0], ctx.heads, ctx.seq_lens, ctx.group_name, seq_dim=1)
    d_lse = None
    if ctx.has_lse and len(grads) > 1 and grads[1] is not None:
        d_lse = _seq_to_head_one(grads[1], ctx.heads, ctx.seq_lens, ctx.group_name, seq_dim=2)
    return d_heads, d_lse, None, None, None


def _seq_to_head_one(x: torch.Tensor, heads: list[int], seq_lens: list[int], group_name: str, seq_dim: int
                     ) -> torch.Tensor:
    """One tensor from this rank's positions of every head to this rank's heads over the whole sequence:
    x [B, S_r, sum(heads), D] (seq_dim 1, head dim 2) or [B, sum(heads), S_r] (seq_dim 2, head dim 1) to
    [B, S, h, D] or [B, h, S], h = heads[rank] (rank r's heads follow those of ranks < r). Plain torch ops
    around one all_to_all_single (a gradient path, not a hot one)."""
    rank = _resolve_process_group(group_name).rank()
    head_dim = 3 - seq_dim
    parts = x.split(heads, dim=head_dim)  # rank p's heads
    send, at = x.new_empty((x.numel(),)), 0
    for p in parts:  # one copy into the send buffer, rank by rank
        send[at:at + p.numel()].view(p.shape).copy_(p)
        at += p.numel()
    shape = list(parts[rank].shape)
    per = math.prod(n for i, n in enumerate(shape) if i != seq_dim)  # elements per position, this rank
    recv = _all_to_all(send, [p.numel() for p in parts], [per * s for s in seq_lens], group_name)
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
