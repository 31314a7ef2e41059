"""Unified (Ulysses x Ring, "USP") attention on a 2D mesh (docs/design.md, "Unified"): Ulysses inside each
row of the mesh, ring across rows.

The mesh has shape (ring_degree, ulysses_degree) with Ulysses the inner dimension, global rank
ring_rank * ulysses_degree + ulysses_rank. The ranks of one row therefore hold consecutive chunks of the
global sequence, and after the row's seq -> head all-to-all every rank of the row holds the row's whole
segment for its share of the heads (ops.ulysses_head_split: any H >= ulysses_degree, the first
H % ulysses_degree ranks of a row one head more; the ranks of a column hold the same heads). Those segments
are in ring-rank order along the sequence, so ring attention over the column group (same ulysses rank, one
per row) with them is exact, causal included; a head -> seq all-to-all brings the output back. 1 x P is
plain Ulysses and P x 1 plain ring.

Agreement: the row's ranks settle theirs as Ulysses does; the column then settles the rows' segments (the
ring's view), carrying a row's failure along, so no row is left waiting. Both are settled once per
signature when the lengths are stated (see _agreement).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_attention import ops

from ._agreement import (
    check_agreement,
    check_mode,
    check_stated_lengths,
    exchange_rows,
    is_agreed,
    remember,
    resolve_seq_lens,
)
from .ring import require_process_group
from .ulysses import FIELDS, check_local, failed_row, finish, head_split_check, resolve_backend, through_heads

_OP = "cp_attention.distributed.unified_attention"


def unified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      ring_group: dist.ProcessGroup,
                      ulysses_group: dist.ProcessGroup, scale: float | None = None, causal: bool = False,
                      kv_mask: torch.Tensor | None = None, return_lse: bool = False, backend: str = "auto",
                      seq_lens=None, check: str = "once"):
    """Exact attention over sequence-sharded q, k, v on a (ring x ulysses) mesh; collective over both groups.

    Args:
        q, k, v: [B, S_r, H, D] and [B, S_r, Hkv, D], this rank's chunk of the global sequence (chunk g on
            global mesh rank g = ring_rank * ulysses_degree + ulysses_rank, torch.tensor_split order; lengths
            may differ, even be 0). dtype float32, float16 or bfloat16, one device, last dim contiguous.
        ring_group: this rank's column of the mesh (the ranks with its ulysses rank, one per row, in row
            order). ulysses_group: this rank's row, of at most H ranks; heads split over it as in
            ulysses_attention.
        scale, causal, kv_mask ([B, S_r] or [B, 1, 1, S_r]), return_lse, backend, check: as for
            ulysses_attention.
        seq_lens: the global length (an int, split in ring_degree * ulysses_degree chunks as
            torch.tensor_split splits it) or the list of every mesh rank's length, in mesh-rank order; the
            same on every rank. None: the lengths are exchanged on every call.

    Returns:
        out [B, S_r, H, D] in q's dtype; with return_lse also lse [B, H, S_r] float32 over the whole global
        key sequence. Rows that see no key: out 0, lse -inf.

    Raises:
        ValueError on every rank of the mesh when any rank's inputs are invalid or the ranks disagree.
    """
    ulysses_group = require_process_group(_OP, ulysses_group)
    ring_group = require_process_group(_OP, ring_group)
    U, R = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    ur, rr = dist.get_rank(ulysses_group), dist.get_rank(ring_group)
    check = check_mode(_OP, check)
    stated = resolve_seq_lens(_OP, "seq_lens", seq_lens, R * U)
    row_stated = None if stated is None else stated[rr * U:(rr + 1) * U]
    segs_stated = None if stated is None else tuple(sum(stated[i * U:(i + 1) * U]) for i in range(R))

    error, row, key = None, failed_row(), None
    try:
        row, kv_mask, scale = check_local(_OP, ulysses_group, q, k, v, kv_mask, scale, causal, row_stated, ur)
        if stated is not None:
            key = ("unified", stated, *row[1:2], *row[3:])
    except (ValueError, TypeError) as e:
        error = e

    if torch.compiler.is_compiling():
        needed = key is None
    else:
        needed = (check == "always" or key is None or not is_agreed(ulysses_group, key)
                  or not is_agreed(ring_group, key))
    if needed:
        row_lens, seg_lens = _settle_mesh(row, error, R, U, row_stated, segs_stated, ulysses_group,
                                          ring_group)
        if key is not None and not torch.compiler.is_compiling():
            remember(ulysses_group, key)
            remember(ring_group, key)
    else:
        if error is not None:
            raise error
        row_lens, seg_lens = list(row_stated), list(segs_stated)

    backend = resolve_backend(backend, q)

    def attend(q_h, k_h, v_h, mask_h):
        # The row's segment, for this rank's heads, around the column's ring (whose failure handling keeps
        # the column's transfers whole).
        out_h, lse_h = ops.ring_attn_fwd(q_h, k_h, v_h, mask_h, seg_lens, seg_lens, ring_group.group_name,
                                         scale, bool(causal), backend, False)
        return out_h.to(q_h.dtype), lse_h  # the float32 accumulator, rounded before the all-to-all

    back, failure = through_heads(q, k, v, kv_mask, row_lens, ulysses_group.group_name, ur, attend,
                                  return_lse)
    finish(_OP, [ring_group, ulysses_group], failure, check)
    return (back[0], back[1]) if return_lse else back[0]


def _settle_mesh(row, error, R: int, U: int, row_stated, segs_stated, ulysses_group, ring_group):
    """The row's exchange, then the column's over the rows' segments; every rank raises the same error
    when any rank of the mesh failed its checks or the mesh disagrees. Returns (row lengths, segments)."""
    metas = exchange_rows(ulysses_group, FIELDS, row)
    if error is None:
        try:
            check_agreement(_OP, metas)
            head_split_check(_OP, U, "ulysses_group.size()")(metas)
            check_stated_lengths(_OP, "seq_lens", row_stated, "S", metas)
        except ValueError as e:
            error = e
    # The column's row for this rank: its row's segment (length summed over the row) with the row's agreed
    # facts, or a failed status.
    seg_row = failed_row() if error is not None else (0, row[1], sum(m["S"] for m in metas), *row[3:])
    col = exchange_rows(ring_group, FIELDS, seg_row)
    if error is not None:
        raise error
    if any(m["status"] for m in col):
        raise ValueError(f"{_OP}: ranks in other rows of the mesh rejected their inputs (each raised a "
                         f"ValueError saying why); every rank must pass valid shards of one problem")
    check_agreement(_OP, col)
    check_stated_lengths(_OP, "seq_lens", segs_stated, "S", col)
    return [m["S"] for m in metas], [m["S"] for m in col]


__all__ = ["unified_attention"]
