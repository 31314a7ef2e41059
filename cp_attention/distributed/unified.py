"""Unified (Ulysses x Ring, "USP") attention on a 2D mesh (DESIGN section 1): Ulysses inside each row of the
mesh, ring across rows.

The mesh has shape (ring_degree, ulysses_degree) with Ulysses the inner dimension, global rank
ring_rank * ulysses_degree + ulysses_rank. The ranks of one row therefore hold consecutive chunks of the
global sequence, and after the row's seq -> head all-to-all every rank of the row holds the row's whole
segment for H / ulysses_degree heads. Those segments are in ring-rank order along the sequence, so ring
attention over the column group (same ulysses rank, one per row) with them is exact, causal included; a
head -> seq all-to-all brings the output back. 1 x P is plain Ulysses and P x 1 plain ring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_attention import ops

from .ring import ring_attention
from .ulysses import _FIELDS, _check_agreement, _check_local, _exchange_meta, row_of

_OP = "cp_attention.distributed.unified_attention"


def unified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      ring_group: dist.ProcessGroup,
                      ulysses_group: dist.ProcessGroup, scale: float | None = None, causal: bool = False,
                      kv_mask: torch.Tensor | None = None, return_lse: bool = False):
    """Exact attention over sequence-sharded q, k, v on a (ring x ulysses) mesh; collective over both groups.

    Args:
        q, k, v: [B, S_r, H, D] and [B, S_r, Hkv, D], this rank's chunk of the global sequence (chunk g on
            global mesh rank g = ring_rank * ulysses_degree + ulysses_rank, torch.tensor_split order; lengths
            may differ, even be 0). dtype, device and layout as for flash_attn.
        ring_group: this rank's column of the mesh (the ranks with its ulysses rank, one per row, in row
            order). ulysses_group: this rank's row. H must be divisible by the row size; Hkv a multiple or
            a divisor of it.
        scale, causal, kv_mask ([B, S_r] or [B, 1, 1, S_r]), return_lse: as for ulysses_attention.

    Returns:
        out [B, S_r, H, D] in q's dtype; with return_lse also lse [B, H, S_r] float32 over the whole global
        key sequence. Rows that see no key: out 0, lse -inf.

    Raises:
        ValueError on every rank of the mesh when any rank's inputs are invalid or the ranks disagree.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_OP}: torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group first")
    U = dist.get_world_size(ulysses_group)
    if dist.get_rank(ulysses_group) < 0 or dist.get_rank(ring_group) < 0:
        raise ValueError(f"{_OP}: this process (global rank {dist.get_rank()}) must be a member of both "
                         f"ring_group and ulysses_group")
    ulysses_name = ulysses_group.group_name

    # Row-level checks; their outcome is then shared along the column, so that a failing row cannot leave
    # the other rows waiting in the ring's first exchange.
    error = None
    try:
        (B, S, _, H, Hkv, D), kv_mask, scale = _check_local(q, k, v, kv_mask, scale, _OP)
        row = row_of(q, B, S, H, Hkv, D, causal, kv_mask, scale)
    except (ValueError, TypeError) as e:
        error, row = e, (1,) + (0,) * (len(_FIELDS) - 1)
    metas = [dict(zip(_FIELDS, m)) for m in _exchange_meta(ulysses_name, row)]
    if error is None:
        try:
            _check_agreement(metas, U, _OP)
        except ValueError as e:
            error = e
    flags = [torch.zeros(1, dtype=torch.int64, device=_flag_device(ring_group))
             for _ in range(dist.get_world_size(ring_group))]
    dist.all_gather(flags, torch.full_like(flags[0], int(error is not None)), group=ring_group)
    if error is not None:
        raise error
    if any(int(f) for f in flags):
        raise ValueError(f"{_OP}: ranks in other rows of the mesh rejected their inputs (each raised a "
                         f"ValueError saying why); every rank must pass valid shards of one problem")
    seq_lens = [m["S"] for m in metas]

    parts = ops.a2a_seq_to_head(q, k, v, kv_mask, seq_lens, ulysses_name)
    q_h, k_h, v_h = parts[:3]
    mask_row = parts[3] if kv_mask is not None else None
    out_h, lse_h = ring_attention(q_h, k_h, v_h, group=ring_group, scale=scale, causal=causal,
                                  kv_mask=mask_row, return_lse=True)
    back = ops.a2a_head_to_seq(out_h, lse_h if return_lse else None, seq_lens, ulysses_name)
    return (back[0], back[1]) if return_lse else back[0]


def _flag_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["unified_attention"]
