"""Ulysses attention: exact attention over a sequence sharded across the ranks of a process group, by
trading the sequence split for a head split (DESIGN section 1, "Sequence sharding across ranks").

Rank r holds sequence chunk r (torch.tensor_split order; lengths may differ, even be 0) of q, k, v with all
heads. One all-to-all (`cp_attention::a2a_seq_to_head`, q, k and v packed into one buffer) gives rank r
query heads [r H/P, (r + 1) H/P) over the whole sequence, attention runs there with the ordinary kernel, and
a second all-to-all (`cp_attention::a2a_head_to_seq`) brings each rank its positions of every head back.

Heads: H must be divisible by the group size P (uneven head splits are not supported: ValueError). k/v
heads split as Hkv / P per rank when P divides Hkv; when Hkv divides P (e.g. MQA), each rank gets the one kv
head its query heads read, kv head r // (P // Hkv), so P // Hkv ranks carry a copy of it. Other Hkv raise
ValueError.

As in ring attention, one small all_gather up front carries every rank's shapes, dtype and flags, so a
misuse raises the same kind of ValueError on every rank instead of leaving some ranks in an all-to-all that
never completes. Under torch.compile that exchange runs once, while tracing (its result, the ranks' lengths,
is a constant of the graph); a change of this rank's shapes retraces and so exchanges again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import cp_attention
from cp_attention import ops
from cp_attention._checks import check_attn_inputs

from ._agreement import (
    DEVICE_CODES,
    DTYPE_CODES,
    bits_scale,
    check_agreement,
    check_scale,
    normalize_kv_mask,
    scale_bits,
)

_OP = "cp_attention.distributed.ulysses_attention"

# The up-front all_gather: one int64 row per rank. "status" is 0 when the rank's own checks passed.
_FIELDS = ("status", "B", "S", "H", "Hkv", "D", "dtype", "device", "causal", "has_mask", "scale")


def _check_local(q, k, v, kv_mask, scale, op: str = _OP):
    """This rank's own checks; returns (dims, kv_mask as [B, S] or None, scale as a float)."""
    kv_mask = normalize_kv_mask(op, kv_mask)
    dims = check_attn_inputs(op, q, k, v, kv_mask)
    if dims[1] != dims[2]:
        raise ValueError(f"{op}: q and k/v must be chunks of one sequence (self-attention), got q "
                         f"{list(q.shape)}, k {list(k.shape)}")
    return dims, kv_mask, check_scale(op, scale, dims[-1])


@torch._dynamo.assume_constant_result
def _exchange_meta(group_name: str, row: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every rank's row, gathered. Plain ints in and out, so that torch.compile can run it while tracing
    and keep its result as a constant (a collective cannot be part of the traced graph's shape logic)."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    P = group.size()
    # NCCL carries CUDA tensors only; decided by the group, since a rank whose inputs failed has no device.
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(rows, mine, group=group)
    return tuple(tuple(r.tolist()) for r in rows)


@torch._dynamo.assume_constant_result
def _auto_backend(device_type: str) -> str:
    """flash_attn's "auto" choice for the device, resolved outside the traced graph (the lookup queries the
    dispatcher, which torch.compile cannot trace; the answer is fixed for a process)."""
    return cp_attention.available_backends(device_type)[0]


def row_of(q, B, S, H, Hkv, D, causal, kv_mask, scale) -> tuple[int, ...]:
    """This rank's row of the up-front exchange (_FIELDS), its own checks passed."""
    return (0, B, S, H, Hkv, D, DTYPE_CODES[q.dtype], DEVICE_CODES.get(q.device.type, 99), int(bool(causal)),
            int(kv_mask is not None), scale_bits(scale))


def _check_agreement(metas: list[dict[str, int]], P: int, op: str = _OP):
    """Raises the same ValueError on every rank when the ranks' inputs are not shards of one problem."""
    check_agreement(op, metas)
    # The same on every rank, since H and Hkv agree.
    ops.ulysses_head_split(op, metas[0]["H"], metas[0]["Hkv"], P)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      group: dist.ProcessGroup | None = None, scale: float | None = None,
                      causal: bool = False, kv_mask: torch.Tensor | None = None, return_lse: bool = False):
    """Exact attention over sequence-sharded q, k, v by two all-to-alls (Ulysses); a collective over `group`.

    Args:
        q, k, v: [B, S_r, H, D] and [B, S_r, Hkv, D], this rank's chunk of the global sequence (chunk r on
            group rank r, torch.tensor_split order; lengths may differ between ranks, even be 0). q and k/v
            share S_r (self-attention). dtype, device and layout as for flash_attn.
        group: the process group (None: the default group); the Ulysses degree is its size P. H must be
            divisible by P (uneven head splits raise ValueError), and Hkv a multiple or a divisor of P.
        scale: multiplies q.k; defaults to 1 / sqrt(D). Must be the same on every rank.
        causal: causal over the global sequence (global query i sees global key j iff j <= i).
        kv_mask: bool [B, S_r] or [B, 1, 1, S_r], True = attend: this rank's slice of the key-padding mask
            (gathered to the whole sequence, it is small). Given on every rank or on none.
        return_lse: also return the LSE.

    Returns:
        out [B, S_r, H, D] in q's dtype; with return_lse also lse [B, H, S_r] float32 over the whole global
        key sequence. Rows that see no key: out 0, lse -inf.

    Raises:
        ValueError on every rank of the group when any rank's inputs are invalid, the ranks disagree on B,
        H, Hkv, D, dtype, device type, causal, the presence of kv_mask or scale, or the heads cannot be
        split across the group.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_OP}: torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group first")
    group = dist.group.WORLD if group is None else group
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if r < 0:
        raise ValueError(f"{_OP}: this process (global rank {dist.get_rank()}) is not a member of `group`")
    group_name = group.group_name

    # Local checks first, their failure raised only after the exchange, which the other ranks wait in.
    error, row = None, (1,) + (0,) * (len(_FIELDS) - 1)
    try:
        (B, Sq, _, H, Hkv, D), kv_mask, scale = _check_local(q, k, v, kv_mask, scale)
        row = row_of(q, B, Sq, H, Hkv, D, causal, kv_mask, scale)
    except (ValueError, TypeError) as e:
        error = e
    metas = [dict(zip(_FIELDS, m)) for m in _exchange_meta(group_name, row)]
    if error is not None:
        raise error
    _check_agreement(metas, P)
    seq_lens = [m["S"] for m in metas]
    scale = bits_scale(row[-1])

    parts = ops.a2a_seq_to_head(q, k, v, kv_mask, seq_lens, group_name)
    q_h, k_h, v_h = parts[:3]
    mask_all = parts[3] if kv_mask is not None else None
    # Whole sequences on both sides, so the kernel's bottom-right causal rule is the global one.
    out_h, lse_h = cp_attention.flash_attn(q_h, k_h, v_h, scale=scale, causal=causal, kv_mask=mask_all,
                                           return_lse=True, backend=_auto_backend(q.device.type))
    back = ops.a2a_head_to_seq(out_h, lse_h if return_lse else None, seq_lens, group_name)
    return (back[0], back[1]) if return_lse else back[0]


__all__ = ["ulysses_attention"]
